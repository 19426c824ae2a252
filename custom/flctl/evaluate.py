"""Accuracy of a saved global model on the held-out test batch.

    flctl evaluate MODEL.pt DATA_ROOT

MODEL.pt is what PTFileModelPersistor writes (FL_global_model.pt, best_FL_global_model.pt).
Prints "ACCURACY N_IMAGES".
"""

import sys
from pathlib import Path

from flctl.errors import CliError


def load_global_model(path):
    import torch

    from fl_lightning_mlflow.common.network import CifarNet

    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = saved.get("model", saved)
    net = CifarNet()
    net.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return net.eval()


def global_test_accuracy(net, data_root) -> tuple:
    """(accuracy, number of test images)."""
    import torch

    from fl_lightning_mlflow.site.data import read_test_set, to_tensor

    images, labels = read_test_set(data_root, site="server")
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), 500):
            pred = net(to_tensor(images[i : i + 500])).argmax(dim=1).numpy()
            correct += int((pred == labels[i : i + 500]).sum())
    return correct / len(labels), len(labels)


def evaluate(model, data_root) -> tuple:
    """(accuracy, number of test images); CliError when the model or the data cannot be read."""
    from fl_lightning_mlflow.site.data import SiteDataError

    if not Path(model).is_file():
        raise CliError(f"no model file at {model}")
    try:
        return global_test_accuracy(load_global_model(model), data_root)
    except SiteDataError as e:
        raise CliError(str(e)) from None
    except (OSError, RuntimeError, KeyError) as e:
        raise CliError(f"cannot load {model}: {type(e).__name__}: {e}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="test accuracy of a global model", description=__doc__)
    p.add_argument("model", help="FL_global_model.pt or best_FL_global_model.pt")
    p.add_argument("data_root", help="data folder holding the test batch")
    p.set_defaults(func=run)


def run(args) -> int:
    acc, n = evaluate(args.model, args.data_root)
    print(f"{acc:.4f} {n}")
    return 0


if __name__ == "__main__":
    from flctl.cli import main

    sys.exit(main(["evaluate", *sys.argv[1:]]))
