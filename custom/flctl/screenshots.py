"""Screenshots of the MLflow UI for a finished job, taken in a real (headless) Chromium: the ones docs/mlflow.md shows.

    flctl screenshots --tracking-uri sqlite:////path/mlflow.db --out DIR [--experiment NAME]

Starts `mlflow ui` on 127.0.0.1 over the store (its process group is ended afterwards), finds
the newest federation run (tag role=federation), one of its site runs and its registered model,
and saves PNGs of: the run tree, the federation run's charts of the global validation accuracy
(weighted mean and worst site per round), the registered model's versions with their aliases, a
site run's system metrics, and a site run's overview with its dataset inputs.

Needs the playwright package (pip install playwright; no browser download) and a Chromium
(Debian: apt-get install chromium; CHROMIUM=path to choose one). Without them, one line says so.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flctl.errors import CliError
from flctl.mlflow_server import free_port, healthy
from flctl.processes import end_group

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking"]


def browser() -> str:
    chosen = os.environ.get("CHROMIUM")
    if chosen:
        if not Path(chosen).is_file():
            raise CliError(f"CHROMIUM={chosen}: no such file")
        return chosen
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise CliError("no Chromium found (Debian: apt-get install chromium, or set CHROMIUM=path)")


def targets(tracking_uri: str, experiment: str | None) -> dict:
    """What the pages show, from what the store holds."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exps = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    for exp in [e for e in exps if e is not None]:
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=500)
        parents = [r for r in runs if r.data.tags.get("role") == "federation"]
        if not parents:
            continue
        parent = parents[0]
        sites = sorted(
            (r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
            key=lambda r: r.info.run_name or "",
        )
        versions = client.search_model_versions(f"run_id = '{parent.info.run_id}'")
        return {
            "experiment_id": exp.experiment_id,
            "job_name": parent.info.run_name,
            "parent": parent.info.run_id,
            "site": sites[0].info.run_id if sites else None,
            "model": versions[0].name if versions else None,
        }
    where = tracking_uri + (f", experiment {experiment!r}" if experiment else "")
    raise CliError(f"no federation run (tag role=federation) in {where}")


def shoot(ui: str, t: dict, out: Path, chrome: str, say) -> list:
    from playwright.sync_api import sync_playwright

    exp, parent, site = t["experiment_id"], t["parent"], t["site"]
    written = []

    def save(page, name):
        png = out / f"{name}.png"
        page.screenshot(path=str(png))
        say(f"screenshots: {png}")
        written.append(png)

    def close_side_panels(page):
        for close in page.locator("[aria-label='Close']").all():  # the assistant side panel, if shown
            if close.is_visible():
                close.click()
        training = page.locator("text=Model training").first  # the UI's deep-learning mode, not GenAI
        if training.count() and training.is_visible():
            training.click()
            page.wait_for_timeout(1000)

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chrome, args=ARGS)
        page = b.new_page(viewport={"width": 1500, "height": 750})
        page.goto(f"{ui}/#/experiments/{exp}/runs")
        page.wait_for_selector(f"a[href*='{parent}']", timeout=60000)
        page.wait_for_timeout(1500)
        close_side_panels(page)
        page.goto(f"{ui}/#/experiments/{exp}/runs")
        page.wait_for_selector(f"a[href*='{parent}']", timeout=60000)
        page.wait_for_timeout(1500)
        box = page.locator(f"a[href*='{parent}']").first.bounding_box()
        page.mouse.click(box["x"] - 32, box["y"] + box["height"] / 2)  # the expander left of the run's name
        page.wait_for_timeout(1500)
        save(page, "mlflow-run-tree")

        page.set_viewport_size({"width": 1500, "height": 1500})
        page.goto(f"{ui}/#/experiments/{exp}/runs/{parent}/model-metrics")
        page.wait_for_selector("input[placeholder='Search metric charts']", timeout=60000)
        page.fill("input[placeholder='Search metric charts']", "global_val_acc")
        page.wait_for_timeout(3000)
        save(page, "mlflow-global-accuracy")

        if t["model"]:
            page.goto(f"{ui}/#/models/{t['model']}")
            page.wait_for_selector("text=champion", timeout=60000)
            page.wait_for_timeout(1500)
            save(page, "mlflow-model-aliases")
        if site:
            page.goto(f"{ui}/#/experiments/{exp}/runs/{site}/system-metrics")
            page.wait_for_selector("text=cpu_utilization_percentage", timeout=60000)
            page.wait_for_timeout(3000)
            save(page, "mlflow-site-system-metrics")
            page.goto(f"{ui}/#/experiments/{exp}/runs/{site}")
            page.wait_for_selector("text=Datasets", timeout=60000)
            page.wait_for_timeout(2000)
            save(page, "mlflow-site-datasets")
        b.close()
    return written


def take(tracking_uri: str, out, experiment: str | None = None, say=print) -> list:
    try:
        import playwright  # noqa: F401
    except ImportError:
        raise CliError("the screenshots need the playwright package: pip install playwright") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chrome = browser()
    t = targets(tracking_uri, experiment)
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    mlflow = str(Path(sys.executable).parent / "mlflow")
    log_path = out / "mlflow-ui.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [mlflow, "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300  # a busy machine takes minutes to start the UI's workers
            while not healthy(ui):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise CliError(f"mlflow ui did not start; see {log_path}")
                time.sleep(0.5)
            return shoot(ui, t, out, chrome, say)
        finally:
            end_group(proc, grace=5)  # the UI's server and its workers


def register(subparsers) -> None:
    p = subparsers.add_parser("screenshots", help="PNGs of the MLflow UI for a job", description=__doc__)
    p.add_argument("--tracking-uri", required=True, help="the job's store, e.g. sqlite:////path/mlflow.db")
    p.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    p.add_argument("--experiment", default=None, help="experiment name (default: the newest with a federation run)")
    p.set_defaults(func=run)


def run(args) -> int:
    take(args.tracking_uri, args.out, args.experiment)
    return 0
