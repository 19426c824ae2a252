"""The hello-lightning-mlflow job, built with FLARE's Job API (FedJob) for a given LightningModule and
LightningDataModule: the path FLARE's own hello-lightning example takes (`python3 fl_job.py`).

    python3 jobs/fl_job.py --export /tmp/nvflare/jobs                # write the job folder and stop
    python3 jobs/fl_job.py --workspace /tmp/nvflare/fl_job --sites 2  # write it and run it in the simulator
    python3 jobs/fl_job.py --module mypkg.lit.MyModel --module-args '{"hidden": 64}' \\
        --datamodule mypkg.data.MyData --datamodule-args '{"root": "/data"}' --custom-dir path/to/mypkg \\
        --key-metric val_loss --key-metric-mode min --export /tmp/nvflare/jobs

With the defaults it builds what jobs/hello-lightning-mlflow holds by hand: the same component ids, class
paths and args, the same top-level variables (so `flctl configure`, `flctl check` and `nvflare
simulator` take the exported folder as they take that one), one app deployed to @ALL.

How FedJob writes a component: as its class path (and ships the class's source file) plus the constructor
args it finds back on the object: for each parameter the class's __init__ names, an attribute of that name
(or the same with a leading "_"), left out where equal to the parameter's default. Our classes keep their
settings in other shapes (LightningEngine in an EngineArgs, SiteExecutor its task names as one tuple) and
LightningEngine hands most of its args on as **engine_args, which FedJob does not look behind; so a
constructed one would be written with args missing, silently. Constructing one also takes values, where
the job keeps FLARE's {variables}. So every component here is `configured(cls, **args)`: a stand-in
subclass of cls under cls's own module and name, whose constructor records exactly args, for FedJob to
write as {"path": cls's path, "args": args} (`_always_serialize_args`, FedJob's own switch, keeps an arg
equal to its default). cls's constructor runs where FLARE runs it: when the job starts, after it has put
the top-level variables in for "{name}". Nested objects FLARE or our engine build later (the
LightningModule, the LightningDataModule, the server's initial model) are plain {"path", "args"} dicts,
which FedJob writes as they are.
"""

import argparse
import importlib
import importlib.util
import inspect
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "custom" / "fl_lightning_mlflow"  # the job's own code: always ships (or a DIR of that name)
EXAMPLE = REPO / "custom" / "cifar10_example"

DEFAULT_MODULE = "cifar10_example.lit_module.LitCifarNet"
DEFAULT_SERVER_MODULE = "cifar10_example.network.CifarNet"  # LitCifarNet's weights, without Lightning
DEFAULT_MODULE_ARGS = {"lr": "{lr}", "optimizer": "{optimizer}", "momentum": 0.9}
DEFAULT_DATAMODULE = "cifar10_example.data.CifarDataModule"
DEFAULT_DATAMODULE_ARGS = {"data_root": "{data_root}", "batch_size": "{batch_size}"}
CIFAR_DESCRIPTION = (
    "FedAvg of a small CNN on CIFAR-10 with PyTorch Lightning sites; one parent run per FL job, one child run per site."
)
AGGREGATION = "FedAvg: InTimeAccumulateWeightedAggregator on WEIGHT_DIFF, weighted by training samples"
SITE_TASKS = ["train", "validate", "submit_model"]
NOT_SHIPPED = ("__pycache__", "*.pyc", "*.yml", "*.yaml")  # a .yml under app/custom breaks `nvflare job submit`


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Build the hello-lightning-mlflow job with FLARE's Job API for a LightningModule and a "
        "LightningDataModule; export it (--export) and/or run it in FLARE's simulator (--workspace).",
    )
    p.add_argument("--name", default="hello-lightning-mlflow", help="job name, the exported folder's (%(default)s)")
    p.add_argument("--module", default=DEFAULT_MODULE, help="the LightningModule, pkg.mod.Class (%(default)s)")
    p.add_argument(
        "--module-args",
        type=json_object,
        help='its constructor args, JSON; a value "{name}" takes the site\'s variable (lr, optimizer, ...) '
        f"(default: {json.dumps(DEFAULT_MODULE_ARGS)} for the default module, else {{}})",
    )
    p.add_argument(
        "--server-module",
        help="what the server builds as the initial global model: the module (the default for any module of "
        "yours), or a plain torch network with the same weights, which keeps Lightning off the FL server "
        f"(the default for the default module: {DEFAULT_SERVER_MODULE})",
    )
    p.add_argument(
        "--server-module-args",
        type=json_object,
        help="the args the server builds the module with for the initial global model, JSON (default: {} for "
        "the default module, else --module-args with its {variables} put in from the site's settings)",
    )
    p.add_argument(
        "--datamodule", default=DEFAULT_DATAMODULE, help="the LightningDataModule, pkg.mod.Class (%(default)s)"
    )
    p.add_argument(
        "--datamodule-args",
        type=json_object,
        help="its constructor args, JSON (the engine adds site=<site name> if it takes `site`) "
        f"(default: {json.dumps(DEFAULT_DATAMODULE_ARGS)} for the default datamodule, else {{}})",
    )
    p.add_argument(
        "--custom-dir",
        action="append",
        metavar="DIR",
        help="a package folder (or .py file) whose code ships in app/custom/<its name>; repeatable "
        f"(default: {PACKAGE.relative_to(REPO)} and {EXAMPLE.relative_to(REPO)}; "
        f"{PACKAGE.name} ships in any case unless a DIR of that name is given)",
    )
    p.add_argument(
        "--key-metric",
        default="val_acc",
        help="the module's validation metric that picks each site's best local model; the server picks the best "
        "global model by global_<it> (%(default)s)",
    )
    p.add_argument("--key-metric-mode", choices=("max", "min"), default="max", help="best is max or min (%(default)s)")
    p.add_argument("--sites", type=int, default=2, help="simulated sites (%(default)s)")
    p.add_argument("--min-clients", type=int, help="sites each round waits for (default: --sites)")
    p.add_argument("--rounds", type=int, default=2, help="FL rounds (%(default)s)")
    p.add_argument("--local-epochs", type=int, default=1, help="epochs per round on each site (%(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="the site variable batch_size (%(default)s)")
    p.add_argument("--lr", type=float, default=0.02, help="the site variable lr (%(default)s)")
    p.add_argument("--optimizer", default="sgd", help="the site variable optimizer (%(default)s)")
    p.add_argument("--accelerator", choices=("auto", "cpu", "gpu"), default="auto", help="(%(default)s)")
    p.add_argument("--data-root", default="/tmp/nvflare/data/cifar10", help="the site variable data_root (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial global model and the sites (%(default)s)")
    p.add_argument("--experiment-name", help="MLflow experiment (default: --name)")
    p.add_argument("--tracking-uri", default="", help='MLflow tracking URI ("": SQLite in the server\'s run folder)')
    p.add_argument("--no-tracking", action="store_true", help="sites train without streaming to MLflow")
    p.add_argument("--export", metavar="DIR", help="write the job folder DIR/<name>")
    p.add_argument(
        "--workspace",
        metavar="DIR",
        help="run the job in FLARE's simulator with this workspace "
        "(default: /tmp/nvflare/simulation/<name>, unless --export is given alone)",
    )
    p.add_argument("--threads", type=int, help="simulator threads (default: --sites)")
    p.add_argument("--gpu", help="simulator GPU ids, comma separated")
    args = p.parse_args(argv)
    for name in ("sites", "rounds", "local_epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.min_clients is None:
        args.min_clients = args.sites
    if not 1 <= args.min_clients <= args.sites:
        p.error("--min-clients must be between 1 and --sites")
    if args.workspace is None and args.export is None:
        args.workspace = f"/tmp/nvflare/simulation/{args.name}"
    return args


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    dotted = sorted(dotted_keys(value))
    if dotted:
        raise argparse.ArgumentTypeError(f"dotted keys are not allowed in a FLARE config: {dotted}")
    return value


def dotted_keys(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if "." in key:
                yield key
            yield from dotted_keys(value)
    elif isinstance(node, list):
        for value in node:
            yield from dotted_keys(value)


def put_in(node, variables: dict):
    """node with each string "{name}" replaced by variables[name] (FLARE's substitution, for known names)."""
    if isinstance(node, dict):
        return {key: put_in(value, variables) for key, value in node.items()}
    if isinstance(node, list):
        return [put_in(value, variables) for value in node]
    if isinstance(node, str) and node.startswith("{") and node.endswith("}") and node[1:-1] in variables:
        return variables[node[1:-1]]
    return node


def nested(class_path: str, args: dict) -> dict:
    """A LightningModule/DataModule for the engine: FLARE's "config_type": "dict" keeps it a dict at
    config time; the engine builds it at setup, after seeding."""
    return {"path": class_path, "config_type": "dict", "args": args}


def load_class(class_path):
    if not isinstance(class_path, str):
        return class_path
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def constructor_parameters(cls) -> set:
    """The names cls's constructor takes, through **kwargs handed on to the base classes' constructors."""
    names = set()
    for klass in cls.__mro__:
        params = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return names


def configured(cls, **args):
    """A stand-in for cls (a class or "pkg.mod.Class") that FedJob writes as {"path": cls's path, "args": args}.

    A subclass of cls under cls's own module and name (FedJob takes the path, and the source file it
    ships, from the object's class), whose constructor records args where FedJob reads them: as
    attributes, with a signature naming them (FedJob reads only the parameters the class's __init__
    names, so it would not see args that a constructor hands on as **kwargs). cls's own constructor is
    not run here: FLARE runs it when the job starts, with the config's {variables} put in. An arg cls
    does not take is refused (FedJob would leave it out without a word).
    """
    from nvflare.apis.impl.controller import Controller

    cls = load_class(cls)
    unknown = sorted(set(args) - constructor_parameters(cls))
    if unknown:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} takes no argument(s) {unknown}")
    json.dumps(args)  # JSON data only: FedJob writes builtins as they are

    def record(self):
        if isinstance(self, Controller):
            Controller.__init__(self)  # the state FedJob's add_workflow uses (set_communicator)
        vars(self).update(args)
        self._always_serialize_args = tuple(args)  # written even where equal to a default

    keyword = inspect.Parameter.KEYWORD_ONLY
    record.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(name, keyword) for name in args]
    )
    namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__init__": record}
    return type(cls.__name__, (cls,), namespace)()


def ship(paths, into: Path):
    """Copy each package folder (or .py file) to into/<its name>, less NOT_SHIPPED; [(copy, name)]."""
    shipped = []

    def ignore(folder, names):
        skip = shutil.ignore_patterns(*NOT_SHIPPED)(folder, names)
        for name in sorted(skip):
            if name.endswith((".yml", ".yaml")):
                print(f"fl_job: not shipped (a .yml under app/custom breaks `nvflare job submit`): {folder}/{name}")
        return skip

    for path in paths:
        dest = into / path.name
        if path.is_dir():
            shutil.copytree(path, dest, ignore=ignore)
        else:
            shutil.copy2(path, dest)
        shipped.append((dest, path.name))
    return shipped


def code_dirs(given) -> list[Path]:
    paths = [Path(p).resolve() for p in given] if given else [PACKAGE, EXAMPLE]
    if PACKAGE.name not in {p.name for p in paths}:
        paths.insert(0, PACKAGE)
    names = [p.name for p in paths]
    for path in paths:
        if not path.exists():
            raise SystemExit(f"fl_job: --custom-dir {path}: no such file or folder")
        if names.count(path.name) > 1:
            raise SystemExit(f"fl_job: two code folders named {path.name!r}: both would be app/custom/{path.name}")
    return paths


def check_importable(class_path: str, shipped_names: set, option: str):
    """class_path's top package must ship in app/custom or be installed (found without importing it)."""
    if class_path.count(".") < 1:
        raise SystemExit(f"fl_job: {option} must be pkg.mod.Class, got {class_path!r}")
    top = class_path.split(".")[0]
    if top + ".py" in shipped_names or top in shipped_names:
        return
    if importlib.util.find_spec(top) is None:
        raise SystemExit(f"fl_job: {option} {class_path}: no package {top!r}; ship its code with --custom-dir")


def settings(args):
    """The top-level variables of config_fed_client.json and config_fed_server.json, as the hand-written job's."""
    client = {
        "data_root": args.data_root,
        "local_epochs": args.local_epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "accelerator": args.accelerator,
        "threads_per_site": 0,
        "system_metrics_seconds": 10,
        "log_every_n_steps": 10,
        "tracking": not args.no_tracking,
        "key_metric": args.key_metric,
        "key_metric_mode": args.key_metric_mode,
    }
    server = {
        "num_rounds": args.rounds,
        "min_clients": args.min_clients,
        "train_timeout": 3600,
        "seed": args.seed,
        "key_metric": "global_" + args.key_metric if args.key_metric else "",
        "key_metric_mode": args.key_metric_mode,
        "tracking_uri": args.tracking_uri,
        "experiment_name": args.experiment_name or args.name,
        "registered_model_name": f"{args.name}-global",
        "log_models": "best_and_final",
        "cross_site_models": "all",
        "task_request_interval": 0.25,
        "task_check_period": 0.05,
    }
    return client, server


def server_module(args) -> str:
    if args.server_module:
        return args.server_module
    return DEFAULT_SERVER_MODULE if args.module == DEFAULT_MODULE else args.module


def model_args(args, client_vars):
    default_module = args.module == DEFAULT_MODULE
    module_args = args.module_args
    if module_args is None:
        module_args = dict(DEFAULT_MODULE_ARGS) if default_module else {}
    server_module_args = args.server_module_args
    if server_module_args is None:
        server_module_args = {} if default_module and args.module_args is None else put_in(module_args, client_vars)
    datamodule_args = args.datamodule_args
    if datamodule_args is None:
        datamodule_args = dict(DEFAULT_DATAMODULE_ARGS) if args.datamodule == DEFAULT_DATAMODULE else {}
    return module_args, server_module_args, datamodule_args


def build_job(args, code: list[tuple[Path, str]]):
    """The FedJob; code: [(folder or file, name in app/custom)] to ship to the server and the sites."""
    from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator
    from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
    from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
    from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
    from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
    from nvflare.job_config.api import FedJob

    client_vars, server_vars = settings(args)
    module_args, server_module_args, datamodule_args = model_args(args, client_vars)
    description = CIFAR_DESCRIPTION
    if args.module != DEFAULT_MODULE:
        description = f"FedAvg of {args.module.rpartition('.')[2]} with PyTorch Lightning sites; " + (
            "one parent run per FL job, one child run per site."
        )

    job = FedJob(name=args.name, min_clients=args.min_clients)

    # ----- server: config_fed_server.json
    job.to_server({**server_vars, "server": {"task_request_interval": "{task_request_interval}"}})
    sag = configured(
        ScatterAndGather,
        min_clients="{min_clients}",
        num_rounds="{num_rounds}",
        start_round=0,
        wait_time_after_min_received=0,
        aggregator_id="aggregator",
        persistor_id="persistor",
        shareable_generator_id="shareable_generator",
        train_task_name="train",
        train_timeout="{train_timeout}",
        task_check_period="{task_check_period}",
    )
    job.to_server(sag, id="scatter_and_gather")
    cse = configured(
        "fl_lightning_mlflow.server.cross_site_eval.CrossSiteEval",
        models="{cross_site_models}",
        model_locator_id="model_locator",
        submit_model_timeout=600,
        validation_timeout=600,
        task_check_period="{task_check_period}",
    )
    job.to_server(cse, id="cross_site_model_eval")
    initial_model = {
        "path": "fl_lightning_mlflow.server.initial_model.initial_model",
        "args": {"module": nested(server_module(args), server_module_args), "seed": "{seed}"},
    }
    server_components = {
        "persistor": configured(PTFileModelPersistor, model=initial_model),
        "model_locator": configured(PTFileModelLocator, pt_persistor_id="persistor"),
        "shareable_generator": configured(FullModelShareableGenerator),
        "aggregator": configured(
            InTimeAccumulateWeightedAggregator, expected_data_kind="WEIGHT_DIFF", weigh_by_local_iter=True
        ),
        # FLARE 2.9's task loops ignore the workflows' task_check_period without it
        "task_check_period_fix": configured("fl_lightning_mlflow.server.task_check_period.TaskCheckPeriod"),
        "min_clients_guard": configured(
            "fl_lightning_mlflow.server.guard.MinClientsGuard",
            min_clients="{min_clients}",
            train_timeout="{train_timeout}",
        ),
        "model_selector": configured(
            "fl_lightning_mlflow.server.model_selector.KeyMetricSelector",
            key_metric="{key_metric}",
            key_metric_mode="{key_metric_mode}",
            weigh_by_local_iter=True,
        ),
        "mlflow_tracker": configured(
            "fl_lightning_mlflow.server.tracker.FederatedMLflowTracker",
            tracking_uri="{tracking_uri}",
            kw_args={
                "experiment_name": "{experiment_name}",
                "experiment_tags": {"project": args.name},
                "run_tags": {"framework": "pytorch-lightning"},
            },
            registered_model_name="{registered_model_name}",
            log_models="{log_models}",
            # the direction of the global metrics besides the key metric that get a worst_site
            metric_modes={"global_val_loss": "min"} if args.module == DEFAULT_MODULE else {},
            description=description,
            fl_params={
                "num_rounds": "{num_rounds}",
                "min_clients": "{min_clients}",
                "seed": "{seed}",
                "key_metric": "{key_metric}",
                "algorithm": "FedAvg",
                "aggregation": AGGREGATION,
            },
            promote_params=["local_epochs", "batch_size", "lr", "optimizer", "split", "alpha", "split_seed"],
            events=["fed.analytix_log_stats"],
            final_flush_timeout=120,
        ),
    }
    for comp_id, component in server_components.items():
        job.to_server(component, id=comp_id)

    # ----- sites: config_fed_client.json (one app for @ALL, as the hand-written job)
    job.to_clients(client_vars)
    executor = configured(
        "fl_lightning_mlflow.site.executor.SiteExecutor",
        engine_id="engine",
        threads_per_site="{threads_per_site}",
        system_metrics_seconds="{system_metrics_seconds}",
        key_metric="{key_metric}",
        key_metric_mode="{key_metric_mode}",
    )
    job.to_clients(executor, tasks=SITE_TASKS)
    engine = configured(
        "fl_lightning_mlflow.site.lightning_engine.LightningEngine",
        module=nested(args.module, module_args),
        datamodule=nested(args.datamodule, datamodule_args),
        trainer={},
        local_epochs="{local_epochs}",
        log_every_n_steps="{log_every_n_steps}",
        tracking="{tracking}",
        accelerator="{accelerator}",
        seed=args.seed,
    )
    job.to_clients(engine, id="engine")
    job.to_clients(
        configured(ConvertToFedEvent, events_to_convert=["analytix_log_stats"], fed_event_prefix="fed."),
        id="event_to_fed",
    )

    for path, name in code:
        job.add_file_to_server(str(path), dest_dir=None if path.is_file() else name)
        job.add_file_to_clients(str(path), dest_dir=None if path.is_file() else name)
    return job


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = code_dirs(args.custom_dir)
    names = {p.name for p in paths}
    check_importable(args.module, names, "--module")
    check_importable(args.datamodule, names, "--datamodule")
    check_importable(server_module(args), names, "--server-module")
    # Our classes are imported from the code that ships (their constructors' parameters are checked).
    for parent in reversed(dict.fromkeys(str(p.parent) for p in paths)):
        if parent not in sys.path:
            sys.path.insert(0, parent)

    with tempfile.TemporaryDirectory(prefix="fl_job_code_") as staging:
        job = build_job(args, ship(paths, Path(staging)))
        if args.export:
            job.export_job(args.export)
            print(f"fl_job: exported {Path(args.export).resolve() / args.name}")
        if args.workspace is None:
            return 0
        rc = job.simulator_run(args.workspace, n_clients=args.sites, threads=args.threads or args.sites, gpu=args.gpu)
    print(f"fl_job: simulator finished with exit code {rc}; workspace {Path(args.workspace).resolve()}")
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
