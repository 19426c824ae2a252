"""Dump what an MLflow store holds for one experiment: runs, params, series point counts,
registered versions, cross-site cells. For before/after comparisons of a refactor.

    flctl contents TRACKING_URI EXPERIMENT

Credentials for a server come from MLFLOW_TRACKING_USERNAME/PASSWORD in the environment.
"""

import json
import sys

from flctl.errors import CliError


def contents(uri: str, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise CliError(f"no experiment {experiment!r} in {uri}")
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


def register(subparsers) -> None:
    p = subparsers.add_parser("contents", help="dump an MLflow store's runs as JSON", description=__doc__)
    p.add_argument("uri", help="tracking URI, e.g. sqlite:////abs/mlflow.db or http://127.0.0.1:5000")
    p.add_argument("experiment", help="experiment name")
    p.set_defaults(func=run)


def run(args) -> int:
    print(json.dumps(contents(args.uri, args.experiment), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    from flctl.cli import main

    sys.exit(main(["contents", *sys.argv[1:]]))
