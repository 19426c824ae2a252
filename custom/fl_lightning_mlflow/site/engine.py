"""What a site's training engine is: the interface the FLARE executor drives, and what engines share.

The executor (site.executor.SiteExecutor) speaks FLARE: tasks, Shareables, DXOs, abort
signals, events, files. An engine speaks training only, so it can be run and tested without
FLARE, and two engines (site.lightning_engine, site.pt_engine) are siblings behind one interface.

The global model is handed to the engine explicitly (a state dict of numpy arrays or tensors)
on every call, so an engine can keep it beside the local model: FedProx's proximal term and
SCAFFOLD's control variates (site.algorithms) need exactly that.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fl_lightning_mlflow.common.class_spec import build, check_spec, path_of
from fl_lightning_mlflow.site.dataset_info import site_datasets
from fl_lightning_mlflow.site.flare_logger import Sender

OPTIMIZERS = ("sgd", "adam", "adamw")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
MAX_LR = 10.0

Weights = Mapping[str, np.ndarray | torch.Tensor]


class TaskAborted(Exception):
    """Raised inside an engine once the task's abort signal has fired."""


class AbortSignal(Protocol):
    """What an engine reads of FLARE's Signal; anything with `triggered` will do."""

    triggered: bool


def check_abort(abort_signal: AbortSignal | None) -> None:
    if abort_signal is not None and abort_signal.triggered:
        raise TaskAborted()


@dataclass
class SiteContext:
    """What the executor gives an engine once, at the start of the run."""

    site: str  # the site's name, e.g. "site-1"
    workdir: Path  # a folder the engine may write to (the site's app folder)
    threads: int = 1  # torch threads this site may use (site.threads.torch_threads)
    send: Sender | None = None  # fires one analytics record as a FLARE event; None: nowhere
    writer: object | None = None  # the log-writer component named by the engine's writer_id
    # The site's workspace: what outlives the job's folder (SCAFFOLD keeps its controls there).
    site_root: Path | None = None


@dataclass
class FitResult:
    """What local training returns; the executor turns it into FLARE's WEIGHT_DIFF result."""

    weights: dict  # the locally trained model, {name: numpy array} (copies, not views)
    samples: int  # training samples seen: FedAvg's weight (MetaKey.NUM_STEPS_CURRENT_ROUND)
    steps: int  # optimizer steps taken
    metrics: dict = field(default_factory=dict)  # the local model on the site's validation data
    # SCAFFOLD only: the change of the site's control variates, c_i+ - c_i, {parameter name: numpy
    # array}; returned beside the weight difference (AlgorithmConstants.SCAFFOLD_CTRL_DIFF).
    control_diff: dict | None = None


class SiteEngine(ABC):
    """Local training and evaluation of one site's model on its own data.

    Lifecycle: setup(ctx) once; then any number of fit / evaluate calls, each given the weights
    to start from. Abort: a TaskAborted raised within about a batch of the signal firing.

    The arguments every engine takes are this constructor's (EngineArgs); an engine adds its own
    and passes these on, so both engines have one argument set, read by FLARE and flctl check.
    """

    # Whether fit() takes global_controls (SCAFFOLD): the executor fails a SCAFFOLD task with one
    # line for an engine that does not.
    supports_scaffold: bool = False
    # The id of a FLARE log-writer component (e.g. MLflowWriter) the engine logs through; the
    # executor looks it up and hands it over as SiteContext.writer. None: the engine needs none.
    writer_id: str | None = None
    train_samples: int = 0
    val_samples: int = 0
    points_sent: int = 0  # metric values handed on for the server, for end-to-end accounting

    def __init__(
        self,
        datamodule: dict | object = None,
        local_epochs: int = 1,
        log_every_n_steps: int = 10,
        tracking: bool = True,
        accelerator: str = "auto",
        seed: int = 0,
        fedprox_mu: float = 0.0,
    ):
        """Set in config_fed_client.json (the "engine" component), for every engine:

        datamodule: the site's LightningDataModule, {"path": "pkg.mod.Class", "config_type": "dict",
            "args": {...}}; built at setup, with site=<the site's name> when its constructor takes
            `site`. It provides train_dataloader and val_dataloader (test_dataloader for the final
            held-out evaluation); its hyperparameters go to the site's run as params.
        local_epochs: epochs of local training per round.
        log_every_n_steps: how often training metrics are logged.
        tracking: stream metrics and params to the server (false: train without a logger).
        accelerator: "auto" (GPU when one is visible, else CPU), "cpu" or "gpu".
        seed: seeds Python, numpy and torch before the site's objects are built.
        fedprox_mu: FedProx's proximal weight mu (loss + mu/2 * ||w - w_global||^2); 0 = FedAvg.
        SCAFFOLD needs no argument: it runs when the server's workflow (ScatterAndGatherScaffold)
        sends control variates with the task.
        """
        self.args = EngineArgs(datamodule, local_epochs, log_every_n_steps, tracking, accelerator, seed, fedprox_mu)
        self.args.check(type(self).__name__)
        self.data = None  # the built DataModule, from setup on
        self.site = None

    @property
    def tracking(self) -> bool:
        return self.args.tracking

    @abstractmethod
    def setup(self, ctx: SiteContext) -> None:
        """Build the site's objects and read its data; a ValueError says what is wrong in one line."""

    @abstractmethod
    def fit(
        self,
        global_weights: Weights,
        fl_round: int | None,
        abort_signal: AbortSignal | None,
        global_controls: Weights | None = None,
    ) -> FitResult:
        """Train from the given global weights; the local model is returned, not kept as the next start.
        global_controls: SCAFFOLD's global control variates, when the task brought them (then the
        result's control_diff is set); None: no SCAFFOLD."""

    @abstractmethod
    def evaluate(
        self,
        weights: Weights,
        abort_signal: AbortSignal | None,
        fl_round: int | None = None,
        log_prefix: str | None = None,
    ) -> dict:
        """The given weights' validation metrics on the site's validation data, under the names the
        model logs them; also logged, names prefixed log_prefix, unless log_prefix is None."""

    def describe(self) -> str:
        """One line for the site's log about where the data comes from and what runs it."""
        return type(self).__name__

    def describe_datasets(self) -> dict:
        """{context: JSON text} describing the site's training and validation data (never samples)."""
        if self.data is None:
            return {}
        return site_datasets(self.site, self.data)

    def flush(self) -> None:  # noqa: B027 - optional: engines that gather records before sending them
        """Hand on whatever the engine still holds for the server."""

    def state_dict(self) -> dict:
        """What must survive a restarted site process (JSON-able), e.g. where the step axis is."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - optional, as state_dict
        """Restore what state_dict returned in an earlier process of this site."""

    # ----- for the engines ---------------------------------------------------------------------
    def _setup_data(self, site: str):
        """Build the DataModule for this site and read its data now (fail at start-up, not mid-round)."""
        self.site = site
        owner = type(self).__name__
        dm = build(self.args.datamodule, owner, "datamodule", fill={"site": site})
        for method in ("train_dataloader", "val_dataloader"):
            if not callable(getattr(dm, method, None)):
                raise ValueError(f"{owner}: datamodule {path_of(dm)} has no {method}()")
        try:
            if callable(getattr(dm, "prepare_data", None)):
                dm.prepare_data()
            if callable(getattr(dm, "setup", None)):
                dm.setup("fit")
            self.train_samples = count_samples(dm.train_dataloader())
            self.val_samples = count_samples(dm.val_dataloader())
        except ValueError:
            raise  # the DataModule's own one-line reason (e.g. a missing file)
        except Exception as e:
            raise ValueError(f"{owner}: datamodule {path_of(dm)} could not read site {site}'s data: "
                             f"{type(e).__name__}: {e}") from None  # fmt: skip
        if self.train_samples == 0:
            raise ValueError(f"{owner}: datamodule {path_of(dm)} has no training samples for site {site}")
        self.data = dm
        return dm

    def _site_params(self, threads: int) -> dict:
        """The run's params besides the model's and the DataModule's hyperparameters (sent once, with
        the first round); fedprox_mu only when FedProx is on, so a FedAvg run's params stay as they were."""
        a = self.args
        algorithm = {"fedprox_mu": a.fedprox_mu} if a.fedprox_mu > 0 else {}
        return dict(
            site=self.site,
            local_epochs=a.local_epochs,
            train_samples=self.train_samples,
            val_samples=self.val_samples,
            accelerator=a.accelerator,
            torch_threads=threads,
            seed=a.seed,
            **algorithm,
        )


# ----- what both engines share -----------------------------------------------------------------
@dataclass(frozen=True)
class EngineArgs:
    """The settings every engine takes (SiteEngine.__init__), checked once for all."""

    datamodule: object
    local_epochs: int
    log_every_n_steps: int
    tracking: bool
    accelerator: str
    seed: int
    fedprox_mu: float = 0.0  # FedProx's proximal weight; 0: plain FedAvg local training

    def check(self, owner: str) -> None:
        """One ValueError line per bad value, prefixed with the class that took it (the job checker
        and FLARE both show it as is)."""
        check_spec(self.datamodule, owner, "datamodule")
        for name in ("local_epochs", "log_every_n_steps"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
        mu = self.fedprox_mu
        if not isinstance(mu, (int, float)) or isinstance(mu, bool) or not math.isfinite(mu) or mu < 0:
            raise ValueError(f"{owner}: fedprox_mu must be a number >= 0 (0: FedAvg), got {mu!r}")
        if not is_int(self.seed):
            raise ValueError(f"{owner}: seed must be an integer, got {self.seed!r}")
        if not isinstance(self.tracking, bool):
            raise ValueError(f"{owner}: tracking must be true or false, got {self.tracking!r}")
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"{owner}: accelerator must be auto, cpu or gpu, got {self.accelerator!r}")


def check_optimizer(owner: str, lr, optimizer, momentum, weight_decay) -> None:
    """PTEngine's optimizer settings (a LightningModule configures its own optimizer)."""
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr <= MAX_LR:
        raise ValueError(f"{owner}: lr must be a number in (0, {MAX_LR}], got {lr!r}")
    for name, value in (("momentum", momentum), ("weight_decay", weight_decay)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{owner}: {name} must be a number >= 0, got {value!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"{owner}: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def count_samples(loader) -> int:
    """Samples a DataLoader yields per pass: its dataset's length, else counted batch by batch."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return sum(len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch) for batch in loader)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def make_optimizer(
    parameters, optimizer: str = "sgd", lr: float = 0.02, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """PTEngine's optimizer from its settings (momentum is SGD's only)."""
    if optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def load_weights(net: torch.nn.Module, weights: Weights) -> None:
    """Copy the given weights into net (numpy arrays from FLARE, or tensors). Weights that do not fit
    (the server's model is another class than the site's) are one line naming the first misfits."""
    state = {k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    misshaped = [k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or misshaped:
        raise ValueError(
            f"the global model does not fit the site's {type(net).__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, other shape {sorted(misshaped)[:3]} (is the server's persistor "
            "building the same module class as the sites?)"
        )
    net.load_state_dict(state)


def numpy_weights(net: torch.nn.Module) -> dict:
    # Copies: .numpy() would share memory with tensors the optimizer then changes in place.
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}
