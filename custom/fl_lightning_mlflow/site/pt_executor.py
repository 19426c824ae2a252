"""The same site work as LightningExecutor, with a plain PyTorch loop and FLARE's MLflowWriter.

For users who don't write Lightning: tasks, data, model, weight exchange and state are
inherited; only the engine differs. Metrics go through MLflowWriter, which mimics the mlflow
API on the site (log_metric, log_params, set_tags) and streams to the FL server like
FlareLogger does, so both jobs land in the same MLflow run tree.
"""

import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from torch.nn import functional as F

from fl_lightning_mlflow.site.executor import LightningExecutor, TaskAborted


class PTExecutor(LightningExecutor):
    def __init__(self, mlflow_writer_id: str = "mlflow_writer", **kwargs):
        """kwargs: as LightningExecutor. mlflow_writer_id: the client component id of the MLflowWriter."""
        super().__init__(**kwargs)
        self.mlflow_writer_id = mlflow_writer_id
        self.mlflow_writer = None
        self._params_sent = False

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN and not self.setup_error:
            self.mlflow_writer = fl_ctx.get_engine().get_component(self.mlflow_writer_id)
            if self.mlflow_writer is None:
                self.setup_error = f"no component {self.mlflow_writer_id!r} (an MLflowWriter) in config_fed_client.json"
                self.log_error(fl_ctx, self.setup_error)
            cuda = self.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
            self.device = torch.device("cuda" if cuda else "cpu")

    def _log(self, metrics: dict, step: int) -> None:
        self.mlflow_writer.log_metrics(metrics, step=step)
        self.metrics_logger.points_sent += len(metrics)  # the same sending-side count as the Lightning job

    def start_round(self, fl_round) -> None:  # MLflowWriter has no round; the step axis carries on
        if not self._params_sent:
            self.mlflow_writer.log_params(
                {**dict(self.module.hparams), "batch_size": self.batch_size, **self.site_params}
            )
            self.mlflow_writer.set_tags({"trainer": "plain PyTorch loop"})
            self._params_sent = True

    def _batches(self, loader, abort_signal: Signal):
        for x, y in loader:
            if abort_signal is not None and abort_signal.triggered:
                raise TaskAborted()
            yield x.to(self.device), y.to(self.device)

    def evaluate(self, abort_signal: Signal, log_prefix: str | None) -> dict:
        net = self.module.net.to(self.device).eval()
        loss_sum, correct, n = 0.0, 0, 0
        with torch.no_grad():
            for x, y in self._batches(self.data.val_dataloader(), abort_signal):
                logits = net(x)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(dim=1) == y).sum())
                n += len(y)
        metrics = {"val_loss": loss_sum / max(n, 1), "val_acc": correct / max(n, 1)}
        if log_prefix is not None:
            self._log({f"{log_prefix}{k}": v for k, v in metrics.items()}, step=self.metrics_logger.step_offset)
        return metrics

    def fit(self, abort_signal: Signal) -> tuple:
        net = self.module.net.to(self.device)
        optimizer = self.module.configure_optimizers()
        step = self.metrics_logger.step_offset
        local_acc = -1.0
        for _ in range(self.local_epochs):
            net.train()
            for i, (x, y) in enumerate(self._batches(self.data.train_dataloader(), abort_signal)):
                optimizer.zero_grad()
                logits = net(x)
                loss = F.cross_entropy(logits, y)
                loss.backward()
                optimizer.step()
                if (i + 1) % self.log_every_n_steps == 0:
                    acc = float((logits.argmax(dim=1) == y).float().mean())
                    self._log({"train_loss": float(loss), "train_acc": acc}, step=step)
                step += 1
            local = self.evaluate(abort_signal, log_prefix=None)
            local_acc = local["val_acc"]
            # The call FLARE's MLflowWriter offers, as in mlflow: one metric, explicit step.
            self.mlflow_writer.log_metric(key="local_accuracy", value=local_acc, step=step - 1)
            self.mlflow_writer.log_metric(key="local_val_loss", value=local["val_loss"], step=step - 1)
            self.metrics_logger.points_sent += 2
        steps = step - self.metrics_logger.step_offset
        self.metrics_logger.advance(steps, self.local_epochs)
        return steps, local_acc
