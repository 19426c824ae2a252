"""The flood scenario of issue 21, shared by its slow test and its benchmark: 3 sites x 4 rounds of
the CIFAR-10 job on the offline images, where site-3 streams 1.5 million points in a burst at its
first task (tests/site_code/flooding_module.py) beside two normal sites; and the same job without
the flood, to compare against."""

import json
import shutil
from pathlib import Path

from conftest import JOB, REPO
from flctl.configure import configure_job

SITES, ROUNDS = 3, 4
FLOOD_SITE, FLOOD_STEPS, FLOOD_VALUES = "site-3", 1500, 1000


def flood_job(dest: Path, data_root: Path, flood: bool = True) -> Path:
    """The job, its module the flooding one (flood=False: it floods nobody, same code)."""
    job = configure_job(JOB, dest, {"client.data_root": str(data_root)})
    shutil.copy(REPO / "tests/site_code/flooding_module.py", job / "app/custom")
    path = job / "app/config/config_fed_client.json"
    config = json.loads(path.read_text())
    (engine,) = [c for c in config["components"] if c["id"] == "engine"]
    engine["args"]["module"]["path"] = "flooding_module.FloodingCifarNet"
    engine["args"]["module"]["args"].update(
        flood_site=FLOOD_SITE if flood else "nobody", steps=FLOOD_STEPS, values=FLOOD_VALUES
    )
    path.write_text(json.dumps(config, indent=2) + "\n")
    return job
