"""LitCifarNet: the CIFAR-10 example's LightningModule (CifarNet, its steps, its optimizer).

Every constructor argument is saved with save_hyperparameters(), so the engine's logger sends it
to MLflow as a param. What it logs with self.log arrives in MLflow under the same names:
train_loss, train_acc (per step and per epoch), val_loss, val_acc, test_loss, test_acc. FedProx
and SCAFFOLD need nothing from it: the engine applies them to the module's parameters.
"""

import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from cifar10_example.network import CifarNet

OPTIMIZERS = ("sgd", "adam", "adamw")


class LitCifarNet(pl.LightningModule):
    def __init__(self, lr: float = 0.02, optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.save_hyperparameters()
        # CifarNet's layers as this module's own: its weights are named as CifarNet's
        # ("features.0.weight", ...), so the Lightning and the plain-PyTorch jobs exchange the same model.
        net = CifarNet()
        self.features, self.classifier = net.features, net.classifier

    def forward(self, x):
        return self.classifier(self.features(x))

    def _loss_acc(self, batch):
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).float().mean()

    def training_step(self, batch, batch_idx):
        loss, acc = self._loss_acc(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_acc", acc, on_step=True, on_epoch=True)
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
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        optimizer = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
        return optimizer(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
