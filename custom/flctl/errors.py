"""What every subcommand shares: the one error type, argument checks, the user's paths."""

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"
DEFAULT_JOB = "hello-lightning-mlflow"
CIFAR_ROOT = "/tmp/nvflare/data/cifar10"
OFFLINE_ROOT = "/tmp/nvflare/data/offline-cifar10"


class CliError(Exception):
    """A failure the user can act on: printed as one line `flctl <subcommand>: <reason>`."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1-65535, got {text!r}")
    return int(text)


def default_data_root(data_root, offline: bool) -> Path:
    return Path(data_root or (OFFLINE_ROOT if offline else CIFAR_ROOT)).expanduser().resolve()


def resolve_job(name) -> Path:
    """A job under jobs/ by name, or the path of a job folder of one's own."""
    path = Path(name).expanduser()
    if (path / "meta.json").is_file() or (path / "meta.conf").is_file():  # .conf: made by `nvflare job create`
        return path.resolve()
    if (JOBS / str(name) / "meta.json").is_file():
        return JOBS / str(name)
    raise CliError(f"no job folder jobs/{name} or {name} (see ls {JOBS})")
