"""Federated learning with PyTorch Lightning and MLflow on NVIDIA FLARE.

Sub-packages by side:
  common/  what both sides share: the wire protocol between sites and server, the network
  site/    what runs at each site: the FLARE executor, its training engines, the Lightning
           logger that streams metrics through FLARE, the site's data
  server/  what runs on the FL server: the federation summary, the MLflow sink and its write
           queue, the FLARE glue (an MLflowReceiver) and the min-clients guard

Jobs carry this package in app/custom, so FLARE ships it to every site. Nothing is imported
here: the server never loads Lightning, a loaded model never loads FLARE.
"""
