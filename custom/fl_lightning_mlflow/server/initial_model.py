"""The initial global model: the user's module, built on the FL server from its class path, seeded.

The persistor's `model` in config_fed_server.json:

    {"path": "fl_lightning_mlflow.server.initial_model.initial_model",
     "args": {"module": {"path": "pkg.mod.Class", "config_type": "dict", "args": {...}}, "seed": 0}}

The module is the very class the sites train (a LightningModule is an nn.Module), so the global
weights are its state_dict, named as the sites name them. Seeding torch only while it is built
(fork_rng leaves the server's random state alone) makes a run repeatable from its config. The
built model remembers its spec (MODEL_SPEC_ATTR), so the tracker can log models in a later
process (recovery) from the same class and arguments.
"""

import torch

from fl_lightning_mlflow.common.class_spec import build, check_spec, is_spec, path_of

MODEL_SPEC_ATTR = "fl_model_spec"  # {"path": ..., "args": {...}} the model was built from


def initial_model(module: dict, seed: int | None = 0) -> torch.nn.Module:
    owner = "initial_model"
    if not is_spec(module):
        raise ValueError(
            f'{owner}: module must be {{"path": ..., "config_type": "dict", "args": {{...}}}} (with '
            f'"config_type": "dict", so that FLARE leaves it to be built here, seeded), got {path_of(module)}'
        )
    check_spec(module, owner, "module")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"{owner}: seed must be an integer or null, got {seed!r}")
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = build(module, owner, "module")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{owner}: module {module['path']} is not a torch nn.Module")
    object.__setattr__(model, MODEL_SPEC_ATTR, {"path": module["path"], "args": dict(module.get("args") or {})})
    return model


def spec_of(model) -> dict:
    """The spec a model was built from; for a model built otherwise, its class with no arguments."""
    spec = getattr(model, MODEL_SPEC_ATTR, None)
    return dict(spec) if isinstance(spec, dict) else {"path": path_of(model), "args": {}}
