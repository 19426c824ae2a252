"""A tabular regression example for the Lightning engine: LitRegressor (an MLP, lower val_mse is
better) and TabularDataModule (synthetic per-site data, generated on first use like a download).

Written against the engine's public contract only: it imports torch, numpy, pytorch_lightning and
the standard library, nothing from fl_lightning_mlflow.
"""
