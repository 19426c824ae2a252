"""What a site's training engine is: the interface the FLARE executor drives, and what engines share.

The executor (site.executor.SiteExecutor) speaks FLARE: tasks, Shareables, DXOs, abort
signals, events, files. An engine speaks training only, so it can be run and tested without
FLARE, and two engines (site.lightning_engine, site.pt_engine) are siblings behind one interface.

The global model is handed to the engine explicitly (a state dict of numpy arrays or tensors)
on every call, so an engine can keep it beside the local model: FedProx's proximal term and
SCAFFOLD's control variates (site.algorithms) need exactly that.
"""

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fl_lightning_mlflow.site.data import SPLITS_DIR
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

    @abstractmethod
    def setup(self, ctx: SiteContext) -> None:
        """Read the site's data and build the model; a ValueError (SiteDataError) says what is wrong in one line."""

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
        """{"val_loss", "val_acc"} of the given weights on the site's validation data; also logged,
        names prefixed log_prefix, unless log_prefix is None."""

    def describe(self) -> str:
        """One line for the site's log about where the data comes from and what runs it."""
        return type(self).__name__

    def state_dict(self) -> dict:
        """What must survive a restarted site process (JSON-able), e.g. where the step axis is."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - optional, as state_dict
        """Restore what state_dict returned in an earlier process of this site."""


# ----- what both engines share -----------------------------------------------------------------
@dataclass(frozen=True)
class TrainingArgs:
    """The settings both engines take (each engine lists them in its own signature, which is what
    the job checker and FLARE read)."""

    data_root: str
    local_epochs: int
    batch_size: int
    lr: float
    optimizer: str
    momentum: float
    weight_decay: float
    log_every_n_steps: int
    tracking: bool
    accelerator: str
    num_workers: int
    seed: int
    fedprox_mu: float = 0.0  # FedProx's proximal weight; 0: plain FedAvg local training

    def check(self, owner: str) -> None:
        """One ValueError line per bad value, prefixed with the class that took it (the job checker
        and FLARE both show it as is)."""
        for name in ("local_epochs", "batch_size", "log_every_n_steps"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
        lr = self.lr
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr <= MAX_LR:
            raise ValueError(f"{owner}: lr must be a number in (0, {MAX_LR}], got {lr!r}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{owner}: {name} must be a number >= 0, got {value!r}")
        mu = self.fedprox_mu
        if not isinstance(mu, (int, float)) or isinstance(mu, bool) or not math.isfinite(mu) or mu < 0:
            raise ValueError(f"{owner}: fedprox_mu must be a number >= 0 (0: FedAvg), got {mu!r}")
        if not is_int(self.num_workers) or self.num_workers < 0:
            raise ValueError(f"{owner}: num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not is_int(self.seed):
            raise ValueError(f"{owner}: seed must be an integer, got {self.seed!r}")
        if not isinstance(self.tracking, bool):
            raise ValueError(f"{owner}: tracking must be true or false, got {self.tracking!r}")
        if not isinstance(self.data_root, str) or not self.data_root:
            raise ValueError(f"{owner}: data_root must be a folder path, got {self.data_root!r}")
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"{owner}: accelerator must be auto, cpu or gpu, got {self.accelerator!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{owner}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    def optimizer_args(self) -> dict:
        return dict(lr=self.lr, optimizer=self.optimizer, momentum=self.momentum, weight_decay=self.weight_decay)

    def site_params(self, site: str, threads: int, train_samples: int, val_samples: int) -> dict:
        """The run's params besides the optimizer's and batch_size (sent once, with the first round);
        fedprox_mu only when FedProx is on, so a FedAvg run's params are what they always were."""
        algorithm = {"fedprox_mu": self.fedprox_mu} if self.fedprox_mu > 0 else {}
        return dict(
            **split_params(self.data_root),
            site=site,
            local_epochs=self.local_epochs,
            train_samples=train_samples,
            val_samples=val_samples,
            accelerator=self.accelerator,
            torch_threads=threads,
            seed=self.seed,
            **algorithm,
        )


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def make_optimizer(
    parameters, optimizer: str = "sgd", lr: float = 0.02, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimizer both engines build from the same settings (momentum is SGD's only)."""
    if optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def load_weights(net: torch.nn.Module, weights: Weights) -> None:
    """Copy the given weights into net (numpy arrays from FLARE, or tensors)."""
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()})


def numpy_weights(net: torch.nn.Module) -> dict:
    # Copies: .numpy() would share memory with tensors the optimizer then changes in place.
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def split_params(data_root) -> dict:
    """How the site's share was made (from prepare_data's split_info.json), as params."""
    try:
        info = json.loads((Path(data_root) / SPLITS_DIR / "split_info.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"split": info.get("split"), "alpha": info.get("alpha"), "split_seed": info.get("seed")}
