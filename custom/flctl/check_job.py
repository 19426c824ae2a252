#!/usr/bin/env python3
"""Check a FLARE job folder offline, before anything starts; one line per problem.

    python scripts/check_job.py JOB_DIR [--sites N] [--data-root DIR] [--no-data]

Checks, in order:
  - meta.json, config_fed_server.json and config_fed_client.json parse (file:line:col on error),
    have no dotted keys and no {variable} that is not defined; no .yml under app/custom
    (both break `nvflare job submit`);
  - every class path imports from app/custom (as FLARE loads it), every argument is one the
    class accepts (with a "did you mean"), none it requires is missing, and the class accepts
    the values (each component is built, as FLARE would, with nested components first);
  - ranges: rounds >= 1, min clients between 1 and the number of sites, timeouts >= 0;
    the executor's own (epochs, batch size, learning rate) are enforced by its constructor;
  - the model selector's key_metric is one the sites' executor reports;
  - the tracking URI parses (sqlite:////abs.db, http://host:port, ...);
  - for each site (site-1 .. site-N): the data folder, the split and the data files read,
    with the right image shape and labels (--no-data skips this).
Exits 0 and prints one summary line when the job is fine, else 1 with one line per problem
on stderr. Nothing is written anywhere.
"""

import argparse
import difflib
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

CONFIGS = {
    "meta": Path("meta.json"),
    "server": Path("app/config/config_fed_server.json"),
    "client": Path("app/config/config_fed_client.json"),
}
VAR_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Arguments of FLARE's own classes whose ranges FLARE does not check itself.
RANGES = {
    "ScatterAndGather": {"num_rounds": 1, "min_clients": 1, "train_timeout": 0, "start_round": 0},
    "MinClientsGuard": {"min_clients": 1, "train_timeout": 0},
    "CrossSiteModelEval": {"submit_model_timeout": 0, "validation_timeout": 0},
}
KEY_METRIC_ARG = "key_metric"


class Problems(list):
    """One line per problem; a variable used by several components is reported once."""

    def append(self, line):
        if line not in self:
            super().append(line)

    def add(self, where, text):
        self.append(f"{where}: {text}")


def origin(raw, where: str, name: str, path) -> str:
    """Where a value comes from: the top-level variable it names, else the argument itself."""
    whole = VAR_REF.fullmatch(raw) if isinstance(raw, str) else None
    return f"{path}: variable {whole.group(1)}" if whole else f"{where}.args.{name}"


def load_json(path: Path, problems: Problems):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        problems.add(path, "missing")
    except json.JSONDecodeError as e:
        problems.add(f"{path}:{e.lineno}:{e.colno}", f"invalid JSON: {e.msg}")
    except OSError as e:
        problems.add(path, f"unreadable ({e.strerror})")
    return None


def walk(node, where=""):
    """(where, key, value) for every key of every object inside node."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield where, key, value
            yield from walk(value, f"{where}.{key}" if where else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{where}[{i}]")


def variables(config: dict) -> dict:
    """Top-level scalars: FLARE substitutes them for "{name}" anywhere in the file."""
    return {k: v for k, v in config.items() if not isinstance(v, (dict, list))}


def resolve(node, names: dict):
    """FLARE's substitution: a string that is exactly "{var}" takes the variable's value and type."""
    if isinstance(node, dict):
        return {k: resolve(v, names) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, names) for v in node]
    if isinstance(node, str):
        whole = VAR_REF.fullmatch(node)
        if whole and whole.group(1) in names:
            return names[whole.group(1)]
        return VAR_REF.sub(lambda m: str(names.get(m.group(1), m.group(0))), node)
    return node


def check_structure(path: Path, config: dict, problems: Problems):
    names = variables(config)
    for where, key, value in walk(config):
        at = f"{path}: {where + '.' if where else ''}{key}"
        if "." in key:
            problems.append(f"{at}: dotted key (nvflare job submit turns it into nested objects)")
        if isinstance(value, str):
            for name in VAR_REF.findall(value):
                if name not in names:
                    problems.append(f"{at}: uses {{{name}}}, which is not a top-level variable of this file")


def components(config: dict):
    """(where, id, spec) for the workflows, components and executors of a config."""
    for section in ("workflows", "components"):
        for i, spec in enumerate(config.get(section) or []):
            if isinstance(spec, dict):
                yield f"{section}[{i}]", spec.get("id", "?"), spec
    for i, entry in enumerate(config.get("executors") or []):
        if isinstance(entry, dict) and isinstance(entry.get("executor"), dict):
            yield f"executors[{i}].executor", entry["executor"].get("id", "?"), entry["executor"]


def import_class(class_path: str):
    module, _, name = class_path.rpartition(".")
    if not module:
        raise ImportError(f"{class_path!r} is not a module.Class path")
    obj = getattr(importlib.import_module(module), name, None)
    if obj is None:
        raise ImportError(f"module {module!r} has no {name!r}")
    return obj


def build(spec: dict, raw: dict, where: str, path, problems: Problems):
    """Import, check the arguments against the signature, then construct; None on a problem.
    spec has the variables substituted; raw is as written (to name the variable at fault)."""
    class_path = spec.get("path") or spec.get("name")
    if not isinstance(class_path, str):
        problems.append(f'{where}: no class path ("path")')
        return None
    try:
        cls = import_class(class_path)
    except Exception as e:  # any import-time failure is the user's to see, in one line
        problems.append(f"{where}: class path {class_path!r} does not import: {type(e).__name__}: {e}")
        return None
    args = spec.get("args") or {}
    if not isinstance(args, dict):
        problems.append(f"{where}.args: must be an object, got {type(args).__name__}")
        return None
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if takes_any and hasattr(cls, "__mro__"):  # e.g. PTExecutor(**kwargs) -> LightningExecutor
        for base in cls.__mro__[1:]:
            if "__init__" in vars(base):
                named += [n for n in inspect.signature(base).parameters if n not in named and n != "self"]
                break
    ok = True
    for name in args:
        if name not in named:
            close = difflib.get_close_matches(name, named, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; it takes {sorted(named)}"
            problems.append(f"{where}.args: {cls.__name__} has no argument {name!r}{hint}")
            ok = False
    for name, p in params.items():
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in args:
            problems.append(f"{where}.args: {cls.__name__} needs argument {name!r}")
            ok = False
    raw_args = raw.get("args") if isinstance(raw.get("args"), dict) else {}
    for name, low in RANGES.get(cls.__name__, {}).items():
        value = args.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < low):
            problems.append(f"{origin(raw_args.get(name), where, name, path)}: {name} must be >= {low}, got {value!r}")
            ok = False
    if not ok:
        return None
    built = {}
    for name, value in args.items():  # nested components, e.g. the persistor's model
        if isinstance(value, dict) and "path" in value:
            built[name] = build(value, raw_args.get(name) or {}, f"{where}.args.{name}", path, problems)
            if built[name] is None:
                return None
        else:
            built[name] = value
    try:
        return cls(**built)
    except Exception as e:
        problems.append(f"{where}: {cls.__name__} refused its arguments: {type(e).__name__}: {e}")
        return None


def site_names(sites: int) -> list:
    return [f"site-{i}" for i in range(1, sites + 1)]


def check_job(job: Path, sites: int | None, data_root: str | None, check_data: bool = True) -> tuple:
    """Returns (problems, summary). Leaves sys.path as it found it."""
    saved_path = list(sys.path)
    try:
        return _check_job(Path(job), sites, data_root, check_data)
    finally:
        sys.path[:] = saved_path


def _check_job(job: Path, sites: int | None, data_root: str | None, check_data: bool) -> tuple:
    problems = Problems()
    if not job.is_dir():
        problems.add(job, "no such job folder")
        return problems, ""
    configs = {name: load_json(job / rel, problems) for name, rel in CONFIGS.items()}
    for name, config in configs.items():
        if config is not None and not isinstance(config, dict):
            problems.add(job / CONFIGS[name], "must hold a JSON object")
            configs[name] = None
    for bad in sorted((job / "app" / "custom").rglob("*.y*ml")):
        problems.add(bad, "a YAML file under app/custom breaks `nvflare job submit`; keep it elsewhere")
    if problems:
        return problems, ""
    meta = configs["meta"]
    for name in ("server", "client"):
        check_structure(job / CONFIGS[name], configs[name], problems)
    check_structure(job / CONFIGS["meta"], meta, problems)

    meta_path = job / CONFIGS["meta"]
    if not isinstance(meta.get("name"), str) or not meta["name"]:
        problems.add(meta_path, 'needs a non-empty "name"')
    if not isinstance(meta.get("deploy_map"), dict) or not meta["deploy_map"]:
        problems.add(meta_path, 'needs a "deploy_map" such as {"app": ["@ALL"]}')
    meta_min = meta.get("min_clients")
    if meta_min is not None and (not isinstance(meta_min, int) or isinstance(meta_min, bool) or meta_min < 1):
        problems.add(meta_path, f"min_clients must be an integer >= 1, got {meta_min!r}")
        meta_min = None
    if sites is not None and isinstance(meta_min, int) and meta_min > sites:
        problems.add(meta_path, f"min_clients is {meta_min} but only {sites} site(s) will run")
    if problems:
        return problems, ""

    # Build every component as FLARE would: site code from app/custom first on the path
    # (no __pycache__ left in the job folder).
    sys.dont_write_bytecode = True
    sys.path.insert(0, str((job / "app" / "custom").resolve()))
    built = {}
    for name in ("server", "client"):
        path = job / CONFIGS[name]
        names = variables(configs[name])
        for where, cid, raw in components(configs[name]):
            spec = resolve(raw, names)
            built[(name, cid)] = (build(spec, raw, f"{path}: {where} (id {cid!r})", path, problems), spec, raw)
    if problems:
        return problems, ""

    server_path = job / CONFIGS["server"]
    reported = set()
    for (side, _), (obj, _, _) in built.items():
        if side == "client":
            reported |= set(getattr(obj, "reported_metrics", ()))
    data_roots = set()
    min_clients = [meta_min or 1]
    for (side, cid), (_, spec, raw) in built.items():
        args = spec.get("args") or {}
        if side == "server" and KEY_METRIC_ARG in args and reported and args[KEY_METRIC_ARG] not in reported:
            problems.add(
                server_path,
                f"component {cid!r}: key_metric {args[KEY_METRIC_ARG]!r} is never reported by the sites "
                f"(they report {sorted(reported)})",
            )
        if side == "server" and isinstance(args.get("min_clients"), int):
            min_clients.append(args["min_clients"])
            if sites is not None and args["min_clients"] > sites:
                at = origin(raw["args"].get("min_clients"), f"{server_path}: {cid!r}", "min_clients", server_path)
                problems.append(f"{at}: min_clients is {args['min_clients']} but only {sites} site(s) run")
        if side == "client" and isinstance(args.get("data_root"), str):
            data_roots.add(args["data_root"])
    if problems or not check_data:
        return problems, f"{len(built)} components"

    if data_root:
        data_roots = {data_root}
    if sites is None:  # as many as the split was made for; without a split, as many as the job needs
        sites = split_sites(data_roots) or max(min_clients)
    try:
        from fl_lightning_mlflow.site.data import SiteDataError, SiteDataModule
    except ImportError as e:
        problems.add(job, f"cannot check the sites' data: {type(e).__name__}: {e}")
        return problems, ""

    checked = 0
    for root in sorted(data_roots):
        for site in site_names(sites):
            try:
                SiteDataModule(root, site).load()
                checked += 1
            except SiteDataError as e:
                problems.append(str(e))
                if not Path(root).is_dir():
                    break  # one line for a missing folder, not one per site
    return problems, f"{len(built)} components, data for {checked} site(s)"


def split_sites(data_roots) -> int | None:
    for root in data_roots:
        try:
            return int(json.loads((Path(root) / "splits" / "split_info.json").read_text())["sites"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="check_job.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("job", type=Path, help="job folder (holds meta.json and app/)")
    parser.add_argument("--sites", type=int, help="number of sites that will run (default: from the data split)")
    parser.add_argument("--data-root", help="data folder (default: the executor's data_root)")
    parser.add_argument("--no-data", action="store_true", help="skip the per-site data check")
    args = parser.parse_args(argv)
    if args.sites is not None and args.sites < 1:
        print(f"check_job: --sites must be >= 1, got {args.sites}", file=sys.stderr)
        return 2
    problems, summary = check_job(args.job, args.sites, args.data_root, check_data=not args.no_data)
    for line in problems:
        print(f"check_job: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_job: {args.job} is fine ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
