"""Copy a job folder and set its top-level config variables, leaving the original untouched.

    flctl configure SRC_JOB DEST_JOB [server|client|meta].NAME=VALUE ...

Examples: server.num_rounds=5 client.local_epochs=2 client.data_root=/data meta.min_clients=3
VALUE is parsed as JSON where it can be (5 -> int, 0.1 -> float), else kept as a string.
Only variables that already exist may be set, so a typo fails instead of being ignored.
Symlinked site code (app/custom) is copied as real files: the copy runs anywhere. A job that
`nvflare job create` made holds HOCON (.conf) configs; the copy holds them as JSON, which FLARE
reads alike and the checker reads too.
"""

import json
import shutil
import sys
from pathlib import Path

from flctl.errors import CliError, resolve_job

FILES = {
    "server": Path("app/config/config_fed_server.json"),
    "client": Path("app/config/config_fed_client.json"),
    "meta": Path("meta.json"),
}


class JobConfigError(ValueError):
    pass


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def is_job(folder) -> bool:
    return any((Path(folder) / "meta").with_suffix(ext).is_file() for ext in (".json", ".conf"))


def read_config(path: Path) -> dict:
    """A JSON config, or the HOCON (.conf) one beside it that `nvflare job create` writes."""
    if not path.is_file() and path.with_suffix(".conf").is_file():
        from pyhocon import ConfigFactory  # FLARE's own HOCON reader, installed with nvflare

        conf = path.with_suffix(".conf")
        try:
            return json.loads(json.dumps(ConfigFactory.parse_file(str(conf))))
        except Exception as e:  # pyhocon raises its own parse errors
            raise JobConfigError(f"cannot read {conf}: {type(e).__name__}: {e}") from None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise JobConfigError(f"cannot read {path}: {e}") from None


def configure_job(src, dest, settings: dict) -> Path:
    """settings: {"server.num_rounds": 3, ...}. Returns dest."""
    src, dest = Path(src), Path(dest)
    if not is_job(src):
        raise JobConfigError(f"not a job folder (no meta.json or meta.conf): {src}")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    configs = {name: read_config(dest / rel) for name, rel in FILES.items()}
    for rel in FILES.values():
        (dest / rel).with_suffix(".conf").unlink(missing_ok=True)  # the JSON written below replaces it
    for key, value in settings.items():
        which, _, var = key.partition(".")
        if which not in configs or not var:
            raise JobConfigError(f"setting {key!r}: expected server.NAME, client.NAME or meta.NAME")
        if var not in configs[which]:
            known = sorted(k for k, v in configs[which].items() if not isinstance(v, (list, dict)))
            raise JobConfigError(f"setting {key!r}: {FILES[which]} has no variable {var!r}; known: {known}")
        configs[which][var] = value
    for name, rel in FILES.items():
        (dest / rel).write_text(json.dumps(configs[name], indent=2) + "\n")
    return dest


def parse_settings(items) -> dict:
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise JobConfigError(f"setting {item!r}: expected NAME=VALUE")
        settings[key] = parse_value(value)
    return settings


def register(subparsers) -> None:
    p = subparsers.add_parser("configure", help="copy a job and set its config variables", description=__doc__)
    p.add_argument("src", help="job folder, or the name of one under jobs/")
    p.add_argument("dest", help="where the configured copy goes (replaced if it exists)")
    p.add_argument("settings", nargs="*", metavar="WHICH.NAME=VALUE", help="e.g. server.num_rounds=5")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        dest = configure_job(resolve_job(args.src), args.dest, parse_settings(args.settings))
    except JobConfigError as e:
        raise CliError(str(e)) from None
    print(f"configure: {dest}")
    return 0


def main(argv=None) -> int:
    """As `flctl configure ARGS`."""
    from flctl.cli import main as cli_main

    return cli_main(["configure", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
