"""The LightningModule: CifarNet plus its training, validation and test steps.

Every constructor argument is saved with save_hyperparameters(), so the FLARE logger
sends it to MLflow as a param.
"""

import pytorch_lightning as pl
from torch.nn import functional as F

from fl_lightning_mlflow.common.network import CifarNet
from fl_lightning_mlflow.site.engine import OPTIMIZERS, make_optimizer


class LitCifarNet(pl.LightningModule):
    def __init__(self, lr: float = 0.02, optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.save_hyperparameters()
        self.net = CifarNet()

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
