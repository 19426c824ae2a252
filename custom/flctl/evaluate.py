#!/usr/bin/env python3
"""Accuracy of a saved global model on the held-out test batch.

    python -m flctl.evaluate MODEL.pt DATA_ROOT

MODEL.pt is what PTFileModelPersistor writes (FL_global_model.pt, best_FL_global_model.pt).
"""

import sys
from pathlib import Path

import torch

from fl_lightning_mlflow.common.network import CifarNet
from fl_lightning_mlflow.site.data import SiteDataError, read_test_set, to_tensor


def load_global_model(path) -> CifarNet:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = saved.get("model", saved)
    net = CifarNet()
    net.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return net.eval()


def global_test_accuracy(net: torch.nn.Module, data_root) -> tuple:
    """(accuracy, number of test images)."""
    images, labels = read_test_set(data_root, site="server")
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), 500):
            pred = net(to_tensor(images[i : i + 500])).argmax(dim=1).numpy()
            correct += int((pred == labels[i : i + 500]).sum())
    return correct / len(labels), len(labels)


def main(argv) -> int:
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    model, data_root = argv
    if not Path(model).is_file():
        print(f"evaluate_global_model: no model file at {model}", file=sys.stderr)
        return 1
    try:
        acc, n = global_test_accuracy(load_global_model(model), data_root)
    except SiteDataError as e:
        print(f"evaluate_global_model: {e}", file=sys.stderr)
        return 1
    print(f"{acc:.4f} {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
