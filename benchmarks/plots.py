"""The tables (summary.md) and plots of a benchmark run, from its results.json alone."""

from pathlib import Path

import accuracy
import flood
import ingest
import many_sites
import overhead
import write_path
import write_path_server


def summary_markdown(results: dict) -> str:
    parts = []
    if results.get("overhead", {}).get("summary"):
        parts += ["## Overhead and tracking cost", overhead.table(results["overhead"])]
    if results.get("write_path", {}).get("summary"):
        parts += ["## Write path", write_path.table(results["write_path"])]
        if results["write_path"].get("server"):
            server = write_path_server.table(results["write_path"]["server"])
            parts += ["### Write path on an mlflow server", server]  # the table's first line says which
    if results.get("accuracy", {}).get("summary"):
        parts += ["## Accuracy", accuracy.table(results["accuracy"])]
    if results.get("scaling", {}).get("points"):
        parts += ["## Scaling", overhead.scaling_table(results["scaling"])]
    if results.get("many_sites", {}).get("scaling"):
        parts += ["## Many sites on few threads", many_sites.table(results["many_sites"])]
    if results.get("ingest", {}).get("backlog"):
        parts += ["## Ingest", ingest.table(results["ingest"])]
    if results.get("flood", {}).get("summary"):
        parts += ["## One site floods", flood.table(results["flood"])]
    return "\n\n".join(parts) + "\n"


def all_plots(results: dict, out: Path) -> None:
    if results.get("overhead", {}).get("summary"):
        overhead.plot(results["overhead"], out)
    if results.get("many_sites", {}).get("scaling"):
        many_sites.plot(results["many_sites"], out)
    if results.get("accuracy", {}).get("summary"):
        accuracy.plot(results["accuracy"], out)
