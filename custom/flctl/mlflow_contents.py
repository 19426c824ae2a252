"""Dump what an MLflow store holds for one experiment: runs, params, series point counts,
registered versions, cross-site cells. For before/after comparisons of a refactor."""

import json
import sys

from mlflow.tracking import MlflowClient


def contents(uri: str, experiment: str) -> dict:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    out = {"runs": {}, "registered": {}}
    for run in runs:
        tags = run.data.tags
        name = tags.get("site") or ("parent" if tags.get("role") == "federation" else run.info.run_name)
        series = {}
        for key in run.data.metrics:
            series[key] = len(client.get_metric_history(run.info.run_id, key))
        out["runs"][name] = {
            "status": run.info.status,
            "params": dict(sorted(run.data.params.items())),
            "tags": sorted(k for k in tags if not k.startswith("mlflow.")),
            "series": dict(sorted(series.items())),
            "cross_site": sorted(k for k in series if k.startswith("cross_site/")),
            "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)),
        }
    out["logged_models"] = sorted(m.name for m in client.search_logged_models([exp.experiment_id]))
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name='{rm.name}'")
        out["registered"][rm.name] = [{"version": v.version, "tags": dict(v.tags)} for v in versions]
    return out


if __name__ == "__main__":
    print(json.dumps(contents(sys.argv[1], sys.argv[2]), indent=1, sort_keys=True))
