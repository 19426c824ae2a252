"""Which rounds' global models become MLflow LoggedModels: the tracker's `log_models` setting.

  "best_and_final"  (default) only the best round's model (alias champion) and the final one:
                    two models per job, whatever the number of rounds
  "every_round"     every round's, plus the final one
  "every_k:<k>"     every k-th round's (rounds k-1, 2k-1, ...), plus the best and the final

The best and the final are always logged: the registry's aliases point at them. Round r's model is
the global model the sites received in round r, the one the parent run's metrics at step r measure.
"""

from dataclasses import dataclass

CHOICES = "'best_and_final', 'every_round' or 'every_k:<k>' (k an integer >= 1)"


class ModelPolicyError(ValueError):
    pass


@dataclass(frozen=True)
class ModelPolicy:
    every: int = 0  # log every this many rounds; 0: best and final only

    @classmethod
    def parse(cls, value, owner: str = "FederatedMLflowTracker") -> "ModelPolicy":
        """One line naming the setting and its owner when the value is not one of CHOICES."""
        text = value.strip() if isinstance(value, str) else None
        if text == "best_and_final":
            return cls(0)
        if text == "every_round":
            return cls(1)
        if text and text.startswith("every_k:"):
            k = text.removeprefix("every_k:").strip()
            if k.isdigit() and int(k) >= 1:
                return cls(int(k))
        raise ModelPolicyError(f"{owner}: log_models must be {CHOICES}, got {value!r}")

    def logs_round(self, fl_round) -> bool:
        """Whether round fl_round's global model is logged when the round ends (best and final:
        at job end, whatever this says)."""
        return self.every > 0 and isinstance(fl_round, int) and (fl_round + 1) % self.every == 0


ROUND_MODELS_DIR = "mlflow_round_models"  # in the job's run folder: round models waiting for the writer


def queue_round_model(sink, round_weights, fl_round, logger) -> None:
    """round_weights: (round, the weights copied at its start) when the policy logs this round.
    They are saved beside the journal (the queue carries the path, not megabytes) and queued after
    the round's metrics, which MLflow links to the model. Returns what the tracker keeps: None."""
    if not round_weights or round_weights[0] != fl_round or round_weights[1] is None:
        return None
    import torch

    folder = sink.run_dir / ROUND_MODELS_DIR
    try:
        folder.mkdir(exist_ok=True)
        path = folder / f"round_{fl_round}.pt"
        torch.save({k: torch.as_tensor(v) for k, v in round_weights[1].items()}, path)
        sink.round_model(path, fl_round)
    except Exception as e:  # noqa: BLE001 - a round's model is optional; training and tracking go on
        logger.warning(f"MLflow: round {fl_round}'s global model not logged: {type(e).__name__}: {e}")
    return None
