"""A LightningModule for the flood tests and benchmark: the CIFAR-10 example's, except that one site
logs per-layer statistics in a burst at its first training task: `values` values at each of
`steps` steps, straight through its logger (as a model with many layers and log_every_n_steps=1
would, without Lightning's per-call cost). Shipped into a copy of the job's app/custom."""

from cifar10_example.lit_module import LitCifarNet


class FloodingCifarNet(LitCifarNet):
    def __init__(self, flood_site: str = "site-3", steps: int = 1500, values: int = 1000, **kwargs):
        super().__init__(**kwargs)
        self.flood_site, self.flood_steps, self.flood_values = flood_site, steps, values
        self.flooded = False

    def on_train_start(self):
        site = getattr(self.trainer.datamodule, "site", None)  # the DataModule is the site's own
        if site == self.flood_site and not self.flooded and self.logger is not None:
            self.flooded = True  # once: at the site's first task
            names = [f"layers/{i}/grad_norm" for i in range(self.flood_values)]
            for step in range(self.flood_steps):
                self.logger.log_metrics(dict.fromkeys(names, 0.5 + step * 1e-6), step=step)
            self.logger.flush()
