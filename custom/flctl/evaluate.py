"""A saved global model on the held-out test data, through the job's own module and DataModule.

    flctl evaluate JOB_DIR MODEL.pt [--data-root DIR] [--site NAME]

MODEL.pt is what PTFileModelPersistor writes (FL_global_model.pt, best_FL_global_model.pt).
The module and the DataModule are the ones the job's engine names (config_fed_client.json, with
its variables; --data-root sets the `data_root` variable): the module gets the weights, the
DataModule of one site (site-1 unless --site) gives its test loader, and the module's own
test_step says what is measured. Prints one "name value" line per test metric the module logs,
then "samples N". A plain nn.Module (PTEngine's network) is measured as a classifier: test_loss
(cross entropy) and test_acc.
"""

import json
import sys
from pathlib import Path

from flctl.errors import CliError

ENGINE_ID = "engine"
CLIENT_CONFIG = Path("app/config/config_fed_client.json")


def job_specs(job, data_root=None) -> tuple:
    """(model spec, datamodule spec) of the job's engine, with the config's variables resolved;
    data_root overrides the `data_root` variable."""
    from flctl.check_job import resolve, variables

    path = Path(job) / CLIENT_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CliError(f"{path}: cannot read the job's client config ({type(e).__name__}: {e})") from None
    names = variables(config)
    if data_root is not None:
        names["data_root"] = str(data_root)
    engines = [c for c in config.get("components", []) if isinstance(c, dict) and c.get("id") == ENGINE_ID]
    if not engines:
        raise CliError(f"{path}: no component {ENGINE_ID!r} (the training engine)")
    args = resolve(engines[0].get("args") or {}, names)
    model = args.get("module") or args.get("network")
    if not isinstance(model, dict) or not isinstance(args.get("datamodule"), dict):
        raise CliError(f"{path}: the engine names no module (or network) and datamodule")
    return model, args["datamodule"]


def on_job_path(job) -> None:
    """The job's own code first, as FLARE loads it (app/custom)."""
    custom = str((Path(job) / "app" / "custom").resolve())
    if custom not in sys.path:
        sys.path.insert(0, custom)


def load_global_model(job, path, data_root=None):
    """The job's module with the saved global weights."""
    import torch

    from fl_lightning_mlflow.common.class_spec import build
    from fl_lightning_mlflow.site.engine import load_weights

    on_job_path(job)
    model_spec, _ = job_specs(job, data_root)
    model = build(model_spec, "flctl evaluate", "module")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    load_weights(model, saved.get("model", saved))
    return model.eval()


def test_metrics(job, model, data_root=None, site="site-1") -> tuple:
    """({test metric: value}, number of test samples) of model on site's DataModule's test loader."""
    import pytorch_lightning as pl

    from fl_lightning_mlflow.common.class_spec import build
    from fl_lightning_mlflow.site.engine import count_samples

    on_job_path(job)
    _, dm_spec = job_specs(job, data_root)
    dm = build(dm_spec, "flctl evaluate", "datamodule", fill={"site": site})
    if callable(getattr(dm, "prepare_data", None)):
        dm.prepare_data()
    dm.setup("test")
    if not callable(getattr(dm, "test_dataloader", None)):
        raise CliError(f"the datamodule {dm_spec['path']} has no test_dataloader(): nothing held out to evaluate on")
    loader = dm.test_dataloader()
    if isinstance(model, pl.LightningModule):
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
        (results,) = trainer.test(model, dataloaders=loader, verbose=False)
        metrics = {k: float(v) for k, v in results.items()}
    else:
        metrics = classifier_metrics(model, loader)
    return metrics, count_samples(loader)


def classifier_metrics(net, loader) -> dict:
    """test_loss (cross entropy) and test_acc of a plain classification network."""
    import torch
    from torch.nn import functional as F

    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = net(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            n += len(y)
    return {"test_loss": loss_sum / max(n, 1), "test_acc": correct / max(n, 1)}


def evaluate(job, model_path, data_root=None, site="site-1") -> tuple:
    """({test metric: value}, samples); CliError when the job, the model or the data cannot be read."""
    if not Path(model_path).is_file():
        raise CliError(f"no model file at {model_path}")
    try:
        return test_metrics(job, load_global_model(job, model_path, data_root), data_root, site)
    except CliError:
        raise
    except ValueError as e:  # the DataModule's or the spec's own one line
        raise CliError(str(e)) from None
    except (OSError, RuntimeError, KeyError) as e:
        raise CliError(f"cannot evaluate {model_path}: {type(e).__name__}: {e}") from None


def shown(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())) or "(the module logs no test metric)"


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="a global model on the job's held-out test data", description=__doc__)
    p.add_argument("job", help="the job folder whose module and DataModule to use")
    p.add_argument("model", help="FL_global_model.pt or best_FL_global_model.pt")
    p.add_argument("--data-root", help="the data folder (the job's data_root variable by default)")
    p.add_argument("--site", default="site-1", help="whose DataModule gives the test loader (default site-1)")
    p.set_defaults(func=run)


def run(args) -> int:
    metrics, n = evaluate(args.job, args.model, args.data_root, args.site)
    for name, value in sorted(metrics.items()):
        print(f"{name} {value:.4f}")
    print(f"samples {n}")
    return 0


if __name__ == "__main__":
    from flctl.cli import main

    sys.exit(main(["evaluate", *sys.argv[1:]]))
