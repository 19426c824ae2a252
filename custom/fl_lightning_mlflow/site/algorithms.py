"""What the site engines add to plain local training for skewed sites: FedProx and SCAFFOLD.

Both engines (site.lightning_engine, site.pt_engine) use these, so an algorithm is configuration
of the same code, not another engine.

FedProx (Li et al., 2020): local training minimises loss + mu/2 * ||w - w_global||^2, where
w_global are the global weights the task brought (a frozen copy, kept for the task only). The
server side is plain FedAvg. mu = 0 is FedAvg itself: no term is computed.

SCAFFOLD (Karimireddy et al., 2020), as FLARE 2.9's ScatterAndGatherScaffold workflow drives it:
the train task is a DXO collection {AppConstants.MODEL_WEIGHTS: WEIGHTS,
AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL: the global control variates c}; after every optimizer
step the site moves its weights by -lr * (c - c_i) (FLARE's PTScaffoldHelper.model_update); after
the round it computes its new local control c_i+ = c_i - c + (w_global - w) / (steps * lr)
(PTScaffoldHelper.terms_update) and returns c_i+ - c_i beside the weight difference, in a
collection {MODEL_WEIGHTS: WEIGHT_DIFF, SCAFFOLD_CTRL_DIFF: WEIGHT_DIFF}, which the aggregator
averages key by key and the workflow adds to c. A site's c_i lives on between rounds, in memory
and in a file, so a restarted site process carries on from it: when the task names its lineage
(server.scaffold_workflow does), in the site's workspace per lineage and round
(site.scaffold_store), where a continuation of the job after a server crash finds the c_i of
the round before its first; else (FLARE's own workflow) in the job's app folder on the site.
"""

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from nvflare.app_opt.pt.scaffold import PTScaffoldHelper

from fl_lightning_mlflow.site.engine import Weights
from fl_lightning_mlflow.site.scaffold_store import ScaffoldStore

SCAFFOLD_STATE_FILE = "scaffold_local_controls.pt"  # the site's c_i, beside the executor's state file
log = logging.getLogger(__name__)


# ----- FedProx ---------------------------------------------------------------------------------
def frozen_parameters(net: torch.nn.Module, weights: Weights) -> dict:
    """The global weights of net's trainable parameters, as tensors that take no gradient, on the
    parameters' device (copies: what the optimizer then does to net leaves them alone)."""
    return {
        name: torch.as_tensor(np.asarray(weights[name])).to(device=p.device, dtype=p.dtype).detach().clone()
        for name, p in net.named_parameters()
        if p.requires_grad
    }


def proximal_term(named_parameters: Iterable, global_parameters: dict, mu: float) -> torch.Tensor:
    """mu/2 * sum over the parameters of ||w - w_global||^2 (differentiable in w)."""
    squares = [
        torch.sum((p - global_parameters[name]) ** 2) for name, p in named_parameters if name in global_parameters
    ]
    if not squares:
        raise ValueError("FedProx: none of the model's parameters has a global value to stay close to")
    return 0.5 * mu * torch.stack(squares).sum()


# ----- SCAFFOLD --------------------------------------------------------------------------------
class _Snapshot:
    """A model's state at the start of a round, as PTScaffoldHelper.terms_update reads it."""

    def __init__(self, net: torch.nn.Module):
        self._state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}

    def state_dict(self) -> dict:
        return self._state


class ScaffoldSite:
    """One site's SCAFFOLD state across rounds, around FLARE's PTScaffoldHelper.

    Per round: start(net, global_controls) after the global weights are loaded into net;
    step_lr(optimizer) before and corrected(net) after every optimizer step; finish(net) once
    training is done: the control difference c_i+ - c_i, {parameter name: numpy array}.
    """

    def __init__(self, workdir: Path | None = None, site_root: Path | None = None):
        self.helper = PTScaffoldHelper()
        self.state_file = Path(workdir) / SCAFFOLD_STATE_FILE if workdir else None
        self.site_root = Path(site_root) if site_root else (Path(workdir) if workdir else None)
        self.store: ScaffoldStore | None = None  # set by a task that names its lineage
        self._fl_round = None
        self._local_of = None  # (lineage, round) whose c_i the helper holds, once known
        self._net_id = None
        self._c_global = self._c_local = self._start = None
        self._pending_lr = None
        self._lr_sum = 0.0
        self.active = False

    def start(self, net: torch.nn.Module, global_controls: Weights) -> None:
        if self._net_id != id(net):  # once per model (the engines keep theirs for the whole run)
            self.helper.init(net)
            self._net_id = id(net)
            self._local_of = None
            lineage = getattr(global_controls, "lineage", None)
            if lineage is None and self.state_file is not None and self.state_file.is_file():
                # A restarted site process: its local controls as the last round left them.
                self.helper.c_local.load_state_dict(torch.load(self.state_file, map_location="cpu", weights_only=True))
        self._restore_local(global_controls)
        try:
            self.helper.load_global_controls(global_controls)
        except RuntimeError as e:  # FLARE's own words on what does not match
            raise ValueError(f"SCAFFOLD: {e}") from None
        self._c_global, self._c_local = self.helper.get_params()
        self._start = _Snapshot(net)
        self._pending_lr, self._lr_sum = None, 0.0
        self.active = True

    def _restore_local(self, global_controls) -> None:
        """With a lineage: c_i as the round before this one left them, from memory or the store."""
        lineage, fl_round = getattr(global_controls, "lineage", None), getattr(global_controls, "fl_round", None)
        self.store, self._fl_round = None, fl_round
        if lineage is None or self.site_root is None or not isinstance(fl_round, int):
            return
        self.store = ScaffoldStore(self.site_root, lineage)
        if fl_round == 0 or self._local_of == (lineage, fl_round - 1):
            return  # nothing before round 0; or this process holds them already
        controls, why = self.store.load(fl_round - 1)
        if controls is None:
            log.warning(f"SCAFFOLD round {fl_round}: {why}; this site goes on from the controls it holds (zero if new)")
            return
        try:
            self.helper.c_local.load_state_dict(controls)
        except RuntimeError as e:
            said = " ".join(str(e).split())[:200]  # torch's text spans lines
            raise ValueError(f"SCAFFOLD: {self.store.path} does not fit the model: {said}") from None
        self._local_of = (lineage, fl_round - 1)
        log.info(f"SCAFFOLD round {fl_round}: this site's controls of round {fl_round - 1} from {self.store.path}")

    @property
    def steps(self) -> int:
        return self.helper.cnt

    def step_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """Before an optimizer step: the learning rate it steps with (one for all groups)."""
        if not self.active:
            return
        rates = {float(group["lr"]) for group in optimizer.param_groups}
        if len(rates) != 1:
            raise ValueError(f"SCAFFOLD needs one learning rate for all parameter groups, got {sorted(rates)}")
        self._pending_lr = rates.pop()

    def corrected(self, net: torch.nn.Module) -> None:
        """After an optimizer step: w -= lr * (c - c_i)."""
        if not self.active or self._pending_lr is None:
            return
        self.helper.model_update(net, self._pending_lr, self._c_global, self._c_local)
        self._lr_sum += self._pending_lr
        self._pending_lr = None

    def finish(self, net: torch.nn.Module) -> dict:
        """The round's new local controls (kept, and saved for a restarted process); returns c_i+ - c_i."""
        if not self.active:
            raise RuntimeError("SCAFFOLD: finish() without start()")
        try:
            if self.steps == 0:
                raise ValueError("SCAFFOLD: no optimizer step was taken this round; no control update")
            lr = self._lr_sum / self.steps  # constant in our engines; the mean if a scheduler changed it
            if not math.isfinite(lr) or lr <= 0:
                raise ValueError(f"SCAFFOLD: the learning rate must be > 0, got {lr}")
            self.helper.terms_update(net, lr, self._c_global, self._c_local, self._start)
            if self.store is not None:
                self.store.save(self._fl_round, self.helper.c_local.state_dict())
                self._local_of = (self.store.path.stem, self._fl_round)
            elif self.state_file is not None:
                self.state_file.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self.helper.c_local.state_dict(), self.state_file)
            return {k: np.array(v, copy=True) for k, v in self.helper.get_delta_controls().items()}
        finally:
            self.abort()

    def abort(self) -> None:
        """Forget the round (an aborted task leaves the local controls as they were)."""
        self.active = False
        self._c_global = self._c_local = self._start = None
        self._pending_lr, self._lr_sum = None, 0.0
