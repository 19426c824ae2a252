#!/usr/bin/env python3
"""One site's training with nothing of FLARE: the floor's worker (overhead.py starts one per site).

    python benchmarks/floor_site.py DATA_ROOT SITE ROUNDS EPOCHS THREADS FOLDER

Imports, reads its share and builds the model first, then writes FOLDER/SITE.ready and waits for
FOLDER/go, so the timed part is the site's compute alone, the same a site does in the job: per
round, a validation of the model it receives, then EPOCHS epochs of training, each followed by
Lightning's validation of the trained model. In one Trainer, a round's closing validation also
serves as the next round's opening one (the model has not changed), where the job's site
validates two different models (its trained one, then the new global one); the ROUNDS - 1
validations that saves are run after the fit, so the floor holds every pass the job's sites make.
Writes FOLDER/SITE.json: started, fit_ended (the one Trainer's fit: the floor as measured before
2026-12-06 afternoon), ended (with those validations) and cpu_s (the process's CPU seconds from
started to ended).
"""

import json
import sys
import time
from pathlib import Path


def main(argv) -> int:
    data_root, site, rounds, epochs, threads, folder = argv
    rounds, epochs, threads, folder = int(rounds), int(epochs), int(threads), Path(folder)
    import pytorch_lightning as pl
    import torch

    from cifar10_example.data import CifarDataModule
    from cifar10_example.lit_module import LitCifarNet
    from cifar10_example.network import CifarNet

    torch.set_num_threads(threads)
    pl.seed_everything(0, verbose=False)
    data = CifarDataModule(data_root, site, batch_size=32)
    data.load()
    model = LitCifarNet(lr=0.02)
    model.load_state_dict(CifarNet(init_seed=0).state_dict())  # as the job's persistor starts
    trainer = pl.Trainer(
        max_epochs=rounds * epochs,
        check_val_every_n_epoch=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=-1,  # every validation batch before the first epoch: round 0's validation
    )
    (folder / f"{site}.ready").touch()
    while not (folder / "go").exists():
        time.sleep(0.01)
    started, cpu_started = time.time(), time.process_time()
    trainer.fit(model, datamodule=data)
    fit_ended = time.time()
    for _ in range(rounds - 1):
        trainer.validate(model, datamodule=data, verbose=False)
    ended = time.time()
    # beside the wall time: equal when the process never waited (a slower machine raises both alike)
    cpu_s = time.process_time() - cpu_started
    times = {"started": started, "fit_ended": fit_ended, "ended": ended, "threads": threads, "cpu_s": cpu_s}
    (folder / f"{site}.json").write_text(json.dumps(times))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
