"""Screenshots of the MLflow UI for a finished job, taken in a real (headless) Chromium.

    flctl screenshots --tracking-uri sqlite:////path/mlflow.db --out DIR [--experiment NAME]

Starts `mlflow ui` on 127.0.0.1 over the store (ended by PID afterwards), finds the job's
federation run, one site run and the registered model, and saves PNGs of: the federation run's
metric charts (weighted mean and worst site per round), the registered model's versions with
their aliases, a site run's system metrics, and a site run's overview with its dataset inputs.
Needs Chromium (Debian: apt-get install chromium); without it, one line says so.
"""

import shutil
import subprocess
import sys
import time
from pathlib import Path

from flctl.errors import CliError
from flctl.mlflow_server import free_port, healthy
from flctl.processes import end_group

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = "1440,1000"


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise CliError("no Chromium found (Debian: apt-get install chromium); the screenshots need a real browser")


def pages(tracking_uri: str, experiment: str | None) -> dict:
    """name -> UI route (after '#'), from what the store holds."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exps = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    exps = [e for e in exps if e is not None]
    for exp in exps:
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=200)
        parents = [r for r in runs if r.data.tags.get("role") == "federation"]
        if not parents:
            continue
        parent = parents[0]
        sites = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        base = f"/experiments/{exp.experiment_id}/runs"
        out = {"federation_charts": f"{base}/{parent.info.run_id}/model-metrics"}
        if sites:
            site = sorted(sites, key=lambda r: r.info.run_name or "")[0]
            out["site_system_metrics"] = f"{base}/{site.info.run_id}/system-metrics"
            out["site_overview_datasets"] = f"{base}/{site.info.run_id}"
        versions = client.search_model_versions(f"run_id = '{parent.info.run_id}'")
        if versions:
            out["model_versions_aliases"] = f"/models/{versions[0].name}"
        return out
    raise CliError(
        f"no federation run (tag role=federation) in {tracking_uri}"
        + (f", experiment {experiment!r}" if experiment else "")
    )


def take(tracking_uri: str, out: Path, experiment: str | None = None, budget_ms: int = 20000, say=print) -> list:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chrome = browser()
    routes = pages(tracking_uri, experiment)
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    mlflow = str(Path(sys.executable).parent / "mlflow")
    log = open(out / "mlflow-ui.log", "w")  # noqa: SIM115 - closed below, after the server ends
    proc = subprocess.Popen(
        [mlflow, "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    written = []
    try:
        deadline = time.monotonic() + 120
        while not healthy(ui):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise CliError(f"mlflow ui did not start; see {out / 'mlflow-ui.log'}")
            time.sleep(0.5)
        for name, route in routes.items():
            png = out / f"{name}.png"
            cmd = [chrome, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
            cmd += [f"--window-size={WINDOW}", f"--virtual-time-budget={budget_ms}", f"--screenshot={png}"]
            done = subprocess.run(cmd + [f"{ui}/#{route}"], capture_output=True, text=True, timeout=180)
            if done.returncode != 0 or not png.is_file():
                raise CliError(f"Chromium could not take {name}: {done.stderr.strip()[-300:]}")
            say(f"screenshots: {png}  ({route})")
            written.append(png)
    finally:
        end_group(proc, grace=5)  # the UI's server and its workers
        log.close()
    return written


def register(subparsers) -> None:
    p = subparsers.add_parser("screenshots", help="PNGs of the MLflow UI for a job", description=__doc__)
    p.add_argument("--tracking-uri", required=True, help="the job's store, e.g. sqlite:////path/mlflow.db")
    p.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    p.add_argument("--experiment", default=None, help="experiment name (default: the newest with a federation run)")
    p.set_defaults(func=run)


def run(args) -> int:
    take(args.tracking_uri, args.out, args.experiment)
    return 0
