"""LitRegressor: a small MLP for tabular regression, trained on mean squared error.

Every constructor argument is saved with save_hyperparameters(), so the engine's logger sends it
to MLflow as a param. FedProx and SCAFFOLD need nothing here: the engine applies them to all of the
module's parameters.
"""

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F


class LitRegressor(pl.LightningModule):
    def __init__(self, num_features: int = 8, hidden: int = 32, lr: float = 0.01):
        super().__init__()
        if not num_features >= 1 or not hidden >= 1:
            raise ValueError(f"num_features and hidden must be >= 1, got {num_features} and {hidden}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _errors(self, batch):
        x, y = batch
        pred = self(x)
        return F.mse_loss(pred, y), F.l1_loss(pred, y)

    def training_step(self, batch, batch_idx):
        mse, _ = self._errors(batch)
        self.log("train_mse", mse, on_step=True, on_epoch=True, prog_bar=True)
        # A name with a slash, as TensorBoard-style code writes them: it must reach MLflow as logged.
        self.log("loss/train", mse, on_step=True, on_epoch=False)
        return mse

    def validation_step(self, batch, batch_idx):
        mse, mae = self._errors(batch)
        # Epoch-level only: one point per validation pass, and exactly the names the server's
        # key metric (global_val_mse) is built from.
        self.log("val_mse", mse, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val_mae", mae, on_step=False, on_epoch=True)

    def test_step(self, batch, batch_idx):
        mse, mae = self._errors(batch)
        self.log("test_mse", mse, on_step=False, on_epoch=True)
        self.log("test_mae", mae, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
