"""The LightningModule: CifarNet plus its training, validation and test steps.

Every constructor argument but fedprox_mu is saved with save_hyperparameters(), so the FLARE
logger sends it to MLflow as a param (the engine sends fedprox_mu with the site's params, only
when FedProx is on).

FedProx (site.algorithms): with fedprox_mu > 0 and the task's global weights given
(set_global_weights), the training loss is cross entropy + mu/2 * ||w - w_global||^2; the term is
logged as train_prox_loss.
"""

import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from fl_lightning_mlflow.common.network import CifarNet
from fl_lightning_mlflow.site.algorithms import frozen_parameters, proximal_term
from fl_lightning_mlflow.site.engine import OPTIMIZERS, Weights, make_optimizer


class LitCifarNet(pl.LightningModule):
    def __init__(
        self,
        lr: float = 0.02,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        fedprox_mu: float = 0.0,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not fedprox_mu >= 0:
            raise ValueError(f"fedprox_mu must be >= 0, got {fedprox_mu}")
        # fedprox_mu is how this site trains, not part of the model: left out, so a FedAvg run's
        # params are what they always were.
        self.save_hyperparameters(ignore=["fedprox_mu"])
        self.fedprox_mu = float(fedprox_mu)
        self.net = CifarNet()
        self.global_params = None  # FedProx: the task's global weights, frozen (not in state_dict)

    def set_global_weights(self, weights: Weights | None) -> None:
        """The global weights the task brought, for the proximal term; None: the task is over."""
        self.global_params = frozen_parameters(self.net, weights) if weights is not None else None

    def proximal_loss(self) -> torch.Tensor:
        """mu/2 * ||w - w_global||^2 for the current weights (0 at the global weights)."""
        if self.global_params is None:
            raise RuntimeError("FedProx: no global weights for this task (set_global_weights)")
        for name, p in self.net.named_parameters():  # Lightning may have moved the model since
            if name in self.global_params and self.global_params[name].device != p.device:
                self.global_params[name] = self.global_params[name].to(p.device)
        return proximal_term(self.net.named_parameters(), self.global_params, self.fedprox_mu)

    def forward(self, x):
        return self.net(x)

    def _loss_acc(self, batch):
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).float().mean()

    def training_step(self, batch, batch_idx):
        loss, acc = self._loss_acc(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_acc", acc, on_step=True, on_epoch=True)
        if self.fedprox_mu > 0:  # needs the task's global weights (set_global_weights)
            prox = self.proximal_loss()
            self.log("train_prox_loss", prox, on_step=True, on_epoch=True)
            loss = loss + prox  # train_loss stays the task's own loss, comparable with FedAvg's
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._loss_acc(batch)
        # Epoch-level only: one point per validation pass keeps the MLflow step axis clean.
        self.log("val_loss", loss, on_step=False, on_epoch=True)
        self.log("val_acc", acc, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx):
        loss, acc = self._loss_acc(batch)
        self.log("test_loss", loss, on_step=False, on_epoch=True)
        self.log("test_acc", acc, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        hp = self.hparams
        return make_optimizer(self.parameters(), hp.optimizer, hp.lr, hp.momentum, hp.weight_decay)
