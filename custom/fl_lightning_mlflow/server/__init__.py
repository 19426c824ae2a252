"""FL server side: federation summary, MLflow sink and write queue, FLARE glue, guard."""
