"""Check a FLARE job folder offline, before anything starts; one line per problem.

    flctl check JOB_DIR [--sites N] [--data-root DIR] [--no-data]

Checks, in order:
  - meta.json, config_fed_server.json and config_fed_client.json parse (file:line:col on error),
    have no dotted keys and no {variable} that is not defined; no .yml under app/custom
    (both break `nvflare job submit`);
  - every class path imports from app/custom (as FLARE loads it), every argument is one the
    class accepts (with a "did you mean"), none it requires is missing, and the class accepts
    the values (each component is built, as FLARE would, with nested components first);
  - ranges: rounds >= 1, min clients between 1 and the number of sites, timeouts >= 0;
    the site's own (epochs, batch size, learning rate) are enforced by the constructor of the
    executor or training engine that takes them;
  - the engine's module (or network) and datamodule, and the initial model's module: the class
    imports, the arguments exist (with a "did you mean"), "config_type": "dict" is there;
  - the algorithm holds together: a ScatterAndGatherScaffold workflow's aggregator expects the
    collection of weight and control differences and the sites' engines support SCAFFOLD; what
    the tracker's fl_params record (algorithm, fedprox_mu) is what the sites and server run;
  - the tracking URI parses (sqlite:////abs.db, http://host:port, ...);
  - for each site (site-1 .. site-N): the engine builds the site's DataModule and reads its
    data (the DataModule's own line when it cannot); on the first site's data, a dry validation
    step of one batch with the server's initial model loaded: the weights fit the module, and
    the server's key_metric is global_<a name the module logs in validation> (the site's
    key_metric one of those names) (--no-data skips all this).
Exits 0 and prints one summary line when the job is fine, else 1 with one line per problem
on stderr. Nothing is written anywhere.
"""

import json
import sys
from pathlib import Path

from flctl.build_components import VAR_REF, Problems, build, check_arguments, import_class, origin
from flctl.errors import CliError, positive_int

CONFIGS = {
    "meta": Path("meta.json"),
    "server": Path("app/config/config_fed_server.json"),
    "client": Path("app/config/config_fed_client.json"),
}
KEY_METRIC_ARG = "key_metric"


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
        if name == "client" and data_root and "data_root" in names:  # --data-root: the variable's value
            names["data_root"] = data_root
        for where, cid, raw in components(configs[name]):
            spec = resolve(raw, names)
            built[(name, cid)] = (build(spec, raw, f"{path}: {where} (id {cid!r})", path, problems), spec, raw)
    if problems:
        return problems, ""

    server_path = job / CONFIGS["server"]
    for (side, cid), (_, spec, _) in built.items():
        for name, nested in (spec.get("args") or {}).items():
            check_user_class(name, nested, f"{job / CONFIGS[side]}: component {cid!r}: {name}", problems)
    min_clients = [meta_min or 1]
    for (side, cid), (_, spec, raw) in built.items():
        args = spec.get("args") or {}
        if side == "server" and isinstance(args.get("min_clients"), int):
            min_clients.append(args["min_clients"])
            if sites is not None and args["min_clients"] > sites:
                at = origin(raw["args"].get("min_clients"), f"{server_path}: {cid!r}", "min_clients", server_path)
                problems.append(f"{at}: min_clients is {args['min_clients']} but only {sites} site(s) run")
    for line in check_algorithm(built, server_path, job / CONFIGS["client"]):
        problems.append(line)
    if problems or not check_data:
        return problems, f"{len(built)} components"

    from fl_lightning_mlflow.site.engine import SiteEngine

    engines = [
        (cid, obj) for (side, cid), (obj, _, _) in built.items() if side == "client" and isinstance(obj, SiteEngine)
    ]
    if not engines:
        return problems, f"{len(built)} components"
    cid, engine = engines[0]
    client_path = job / CONFIGS["client"]
    dm_args = (engine.args.datamodule.get("args") or {}) if isinstance(engine.args.datamodule, dict) else {}
    root = dm_args.get("data_root") or data_root
    if sites is None:  # as many as the split was made for; without a split, as many as the job needs
        sites = split_sites([root] if root else []) or max(min_clients)
    checked, reported, validated = 0, None, False
    for site in site_names(sites):
        try:
            engine._setup_data(site)
            checked += 1
        except ValueError as e:  # the DataModule's own line (it names the site and the path)
            problems.append(str(e))
            if root and not Path(root).is_dir():
                break  # one line for a missing folder, not one per site
            continue
        if not validated:  # on the first site whose data reads
            validated = True
            try:
                reported = dry_validation(engine, built, client_path, server_path, problems)
            except ValueError as e:  # the module does not build: its one line
                problems.append(f"{client_path}: component {cid!r}: {e}")
    if reported is not None:
        check_key_metrics(built, reported, client_path, server_path, problems)
    return problems, f"{len(built)} components, data for {checked} site(s)"


USER_CLASS_ARGS = {"module": (), "network": (), "datamodule": ("site",)}  # and the arguments the engine fills in


def check_user_class(name, spec, where: str, problems: Problems) -> None:
    """A user's class named by an engine's (or the initial model's) module, network or datamodule:
    it imports and takes its arguments (it is built by the dry run, with the site filled in)."""
    if name not in USER_CLASS_ARGS or not isinstance(spec, dict) or "path" not in spec:
        return
    if spec.get("config_type", "component") != "dict":
        problems.append(f'{where}: needs "config_type": "dict" (FLARE would build it before the site is known)')
        return
    try:
        cls = import_class(spec["path"])
    except Exception as e:
        problems.append(f"{where}: class path {spec['path']!r} does not import: {type(e).__name__}: {e}")
        return
    check_arguments(cls, spec.get("args") or {}, where, problems, filled=USER_CLASS_ARGS[name])


def dry_validation(engine, built: dict, client_path: Path, server_path: Path, problems: Problems) -> set | None:
    """The names the module logs in validation, from one validation batch of the first site's data,
    with the server's initial global model loaded (so a module the server builds differently is
    found here); None when it cannot run."""
    names = engine.dry_validation(initial_weights(built))
    if isinstance(names, str):
        problems.append(f"{client_path}: dry validation on site {engine.site}'s data: {names}")
        return None
    return names


def initial_weights(built: dict):
    """The server's initial global weights (its persistor's model), or None."""
    for (side, _), (obj, _, _) in built.items():
        model = getattr(obj, "model", None) if side == "server" else None
        if model is not None and hasattr(model, "state_dict"):
            return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    return None


def check_key_metrics(built: dict, reported: set, client_path: Path, server_path: Path, problems: Problems) -> None:
    """The server's key_metric is a global_ name of one the module logs in validation; the site's
    key_metric (its best local model) is one of those names."""
    from fl_lightning_mlflow.common.protocol import GLOBAL_PREFIX

    global_names = {GLOBAL_PREFIX + n for n in reported}
    for (side, cid), (_, spec, _) in built.items():
        key = (spec.get("args") or {}).get(KEY_METRIC_ARG)
        if not isinstance(key, str) or not key:
            continue
        if side == "server" and key not in global_names:
            problems.add(
                server_path,
                f"component {cid!r}: key_metric {key!r} is never reported by the sites "
                f"(they report {sorted(global_names)})",
            )
        if side == "client" and key not in reported:
            problems.add(
                client_path,
                f"component {cid!r}: key_metric {key!r} is not a metric the module logs in validation "
                f"({sorted(reported)})",
            )


SCAFFOLD_WORKFLOWS = ("ScatterAndGatherScaffold",)  # or a subclass (server.scaffold_workflow)
# What ScatterAndGatherScaffold's aggregator must return: FLARE's AppConstants.MODEL_WEIGHTS and
# AlgorithmConstants.SCAFFOLD_CTRL_DIFF (spelled out: the checker does not import FLARE).
SCAFFOLD_COLLECTION = {"_model_weights_": "WEIGHT_DIFF", "scaffold_c_diff": "WEIGHT_DIFF"}


def check_algorithm(built: dict, server_path: Path, client_path: Path) -> list:
    """Problems with how the job's algorithm is put together (FedAvg, FedProx, SCAFFOLD)."""
    problems = []
    server = {cid: (obj, spec.get("args") or {}) for (side, cid), (obj, spec, _) in built.items() if side == "server"}
    engines = [
        obj for (side, _), (obj, _, _) in built.items() if side == "client" and hasattr(obj, "supports_scaffold")
    ]
    scaffold = [
        cid for cid, (obj, _) in server.items() if any(c.__name__ in SCAFFOLD_WORKFLOWS for c in type(obj).__mro__)
    ]
    for cid in scaffold:
        aggregator_id = server[cid][1].get("aggregator_id", "aggregator")
        if aggregator_id not in server:
            problems.append(f"{server_path}: workflow {cid!r}: no aggregator component {aggregator_id!r}")
            continue
        kinds = server[aggregator_id][1].get("expected_data_kind")
        if not isinstance(kinds, dict) or any(kinds.get(k) != v for k, v in SCAFFOLD_COLLECTION.items()):
            problems.append(
                f"{server_path}: component {aggregator_id!r}: SCAFFOLD (workflow {cid!r}) needs "
                f"expected_data_kind {json.dumps(SCAFFOLD_COLLECTION)}, got {json.dumps(kinds)}"
            )
        for engine in engines:
            if not engine.supports_scaffold:
                problems.append(f"{client_path}: {type(engine).__name__} does not support SCAFFOLD (workflow {cid!r})")
    site_mus = {float(obj.args.fedprox_mu) for obj in engines if hasattr(getattr(obj, "args", None), "fedprox_mu")}
    for cid, (_, args) in server.items():
        fl_params = args.get("fl_params")
        if not isinstance(fl_params, dict):
            continue
        algorithm, mu = fl_params.get("algorithm"), fl_params.get("fedprox_mu")
        at = f"{server_path}: component {cid!r}: fl_params"
        if mu is not None and site_mus and site_mus != {mu if isinstance(mu, (int, float)) else None}:
            sites = ", ".join(str(m) for m in sorted(site_mus))
            problems.append(f"{at} record fedprox_mu {mu!r}, but the sites train with fedprox_mu {sites}")
        if algorithm == "SCAFFOLD" and not scaffold:
            problems.append(f"{at} record algorithm SCAFFOLD, but no workflow runs it ({SCAFFOLD_WORKFLOWS[0]})")
        elif algorithm == "FedProx" and site_mus and not any(m > 0 for m in site_mus):
            problems.append(f"{at} record algorithm FedProx, but the sites train with fedprox_mu 0 (FedAvg)")
        elif algorithm is not None and algorithm != "SCAFFOLD" and scaffold:
            problems.append(f"{at} record algorithm {algorithm!r}, but workflow {scaffold[0]!r} runs SCAFFOLD")
    return problems


def split_sites(data_roots) -> int | None:
    for root in data_roots:
        try:
            return int(json.loads((Path(root) / "splits" / "split_info.json").read_text())["sites"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def register(subparsers) -> None:
    p = subparsers.add_parser("check", help="check a job folder offline (configs, classes, data)", description=__doc__)
    p.add_argument("job", type=Path, help="job folder (holds meta.json and app/)")
    p.add_argument("--sites", type=positive_int, help="number of sites that will run (default: from the data split)")
    p.add_argument("--data-root", help="data folder (default: the site's data_root)")
    p.add_argument("--no-data", action="store_true", help="skip the per-site data check")
    p.set_defaults(func=run)


def check_or_fail(job, sites, data_root, check_data=True, verdict="the job has the problem(s) above") -> str:
    """Prints each problem as `flctl check: ...` on stderr and raises CliError(verdict) if any;
    else returns the summary."""
    problems, summary = check_job(job, sites, data_root, check_data=check_data)
    for line in problems:
        print(f"flctl check: {line}", file=sys.stderr)
    if problems:
        sys.stderr.flush()
        raise CliError(verdict)
    return summary


def run(args) -> int:
    problems, summary = check_job(args.job, args.sites, args.data_root, check_data=not args.no_data)
    for line in problems:
        print(f"flctl check: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"flctl check: {args.job} is fine ({summary})")
    return 0


def main(argv=None) -> int:
    """As `flctl check ARGS`."""
    from flctl.cli import main as cli_main

    return cli_main(["check", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
