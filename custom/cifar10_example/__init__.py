"""The CIFAR-10 example: a user's model and data, written against the engine's public contract.

network.CifarNet (plain torch), lit_module.LitCifarNet (the LightningModule the jobs train) and
data.CifarDataModule (one site's share of CIFAR-10 or of the offline set). Nothing here imports
the project's package: the jobs name these classes in their configs, as a team names its own.
"""
