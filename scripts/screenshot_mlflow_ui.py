#!/usr/bin/env python3
"""Screenshots of the MLflow UI for the README: the run tree, and the global accuracy per round.

    python scripts/screenshot_mlflow_ui.py UI_URL EXPERIMENT_ID PARENT_RUN_ID OUT_DIR

Needs a running `mlflow ui`, the playwright Python package and a Chromium
(CHROMIUM=/usr/bin/chromium by default; no browser download). Not part of the tests.
"""

import os
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking"]


def main(url, experiment_id, parent_run_id, out_dir) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 700})
        page.goto(f"{url}/#/experiments/{experiment_id}/runs")
        page.wait_for_selector("text=hello-lightning-mlflow", timeout=30000)
        page.wait_for_timeout(1500)
        for close in page.locator("[aria-label='Close']").all():  # the assistant side panel, if shown
            if close.is_visible():
                close.click()
        # The expander left of the parent run's name (the UI gives it no stable label).
        name = page.locator(f"a[href*='{parent_run_id}']").first.bounding_box()
        page.mouse.click(name["x"] - 32, name["y"] + name["height"] / 2)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "mlflow-run-tree.png"))
        page.set_viewport_size({"width": 1500, "height": 1100})
        page.goto(f"{url}/#/experiments/{experiment_id}/runs/{parent_run_id}/model-metrics")
        page.wait_for_selector("input[placeholder='Search metric charts']", timeout=30000)
        page.fill("input[placeholder='Search metric charts']", "global_val_acc")
        page.wait_for_timeout(3000)
        page.screenshot(path=str(out / "mlflow-global-accuracy.png"))
        browser.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 5:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))
