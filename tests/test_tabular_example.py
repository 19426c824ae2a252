"""The tabular regression example job's own package (jobs/hello-lightning-tabular/app/custom/
tabular_regression): its data generation, a short real training run, its metric names, and that it
is written against the public contract only (imports nothing from the project)."""

import ast
import importlib
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO

CUSTOM = REPO / "jobs" / "hello-lightning-tabular" / "app" / "custom"
PACKAGE = CUSTOM / "tabular_regression"


@pytest.fixture(scope="module")
def tab():
    """The example's modules, imported from the job folder as FLARE's app/custom would put them on
    the path (only for the import: app/custom also holds a link to fl_lightning_mlflow)."""
    sys.path.insert(0, str(CUSTOM))
    try:
        model = importlib.import_module("tabular_regression.model")
        data = importlib.import_module("tabular_regression.data")
    finally:
        sys.path.remove(str(CUSTOM))
    return SimpleNamespace(model=model, data=data)


def site_arrays(root: Path, site: str) -> dict:
    with np.load(root / f"{site}.npz") as f:
        return {k: f[k] for k in f.files}


def test_generation_is_deterministic_and_differs_per_site(tab, tmp_path):
    for root in (tmp_path / "a", tmp_path / "b"):
        for site in ("site-1", "site-2"):
            tab.data.TabularDataModule(str(root), site=site).prepare_data()
    a1, b1, a2 = (
        site_arrays(tmp_path / "a", "site-1"),
        site_arrays(tmp_path / "b", "site-1"),
        site_arrays(tmp_path / "a", "site-2"),
    )
    assert sorted(a1) == ["x_train", "x_val", "y_train", "y_val"]
    assert all(np.array_equal(a1[k], b1[k]) for k in a1)  # same site, same data, in any process
    assert a1["x_train"].shape == (480, 8) and a1["y_train"].shape == (480, 1) and a1["x_val"].shape == (120, 8)
    assert a1["x_train"].dtype == np.float32 and a1["y_train"].dtype == np.float32
    # per-site covariate shift: the feature means differ between sites
    assert np.abs(a1["x_train"].mean(0) - a2["x_train"].mean(0)).max() > 0.3
    # ... but one true function: y - X @ w - 0.5 sin(X0) is just the noise, on both sites
    w = tab.data.true_weights(8, 0)
    for arrays in (a1, a2):
        x, y = arrays["x_train"], arrays["y_train"][:, 0]
        assert np.std(y - x @ w - 0.5 * np.sin(x[:, 0])) < 2 * tab.data.NOISE_STD
    with np.load(tmp_path / "a" / "test.npz") as f, np.load(tmp_path / "b" / "test.npz") as g:
        assert np.array_equal(f["x"], g["x"]) and f["x"].shape == (600, 8)
    # another seed, other data
    tab.data.TabularDataModule(str(tmp_path / "c"), site="site-1", seed=1).prepare_data()
    assert not np.array_equal(site_arrays(tmp_path / "c", "site-1")["x_train"], a1["x_train"])


def test_the_site_offset_does_not_depend_on_the_process_hash_seed(tab):
    # crc32 of the name: a fixed value, where hash() would change with PYTHONHASHSEED
    assert tab.data.site_key("site-1") == 0x73E3AF25
    assert np.allclose(tab.data.site_offset("site-1", 8)[:2], [0.45850473, 0.51867539])
    assert not np.allclose(tab.data.site_offset("site-1", 8), tab.data.site_offset("site-2", 8))


def test_writes_are_atomic_and_leave_no_temp_files(tab, tmp_path, monkeypatch):
    root = tmp_path / "data"
    # several sites preparing one data_root at once, as in the simulator
    threads = [
        threading.Thread(target=tab.data.TabularDataModule(str(root), site=f"site-{i % 4 + 1}").prepare_data)
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in root.iterdir()) == [
        "site-1.npz",
        "site-2.npz",
        "site-3.npz",
        "site-4.npz",
        "test.npz",
    ]
    for i in range(1, 5):
        dm = tab.data.TabularDataModule(str(root), site=f"site-{i}")
        dm.setup("test")
        assert len(dm.train_set) == 480 and len(dm.val_set) == 120 and len(dm.test_set) == 600

    # a write that fails half-way leaves nothing behind, not even a temp file
    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(tab.data.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        tab.data.TabularDataModule(str(tmp_path / "other"), site="site-1").prepare_data()
    assert list((tmp_path / "other").iterdir()) == []


def test_a_missing_or_corrupt_file_is_one_line_naming_site_and_path(tab, tmp_path):
    dm = tab.data.TabularDataModule(str(tmp_path), site="site-7")
    with pytest.raises(ValueError) as missing:
        dm.setup("fit")
    message = str(missing.value)
    assert "\n" not in message and "site-7" in message and str(tmp_path / "site-7.npz") in message

    (tmp_path / "site-7.npz").write_bytes(b"not a zip\nat all")
    with pytest.raises(ValueError) as corrupt:
        dm.setup("fit")
    message = str(corrupt.value)
    assert "\n" not in message and "site-7" in message and str(tmp_path / "site-7.npz") in message
    assert "unreadable" in message

    # the wrong number of features (data made for another config) is named too
    tab.data.TabularDataModule(str(tmp_path / "four"), site="site-7", num_features=4).prepare_data()
    with pytest.raises(ValueError, match=r"site site-7: x_train has shape \(480, 4\), expected \(N>0, 8\)"):
        tab.data.TabularDataModule(str(tmp_path / "four"), site="site-7").setup("fit")


def trainer(**kwargs):
    import pytorch_lightning as pl

    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_the_module_trains_and_val_mse_drops(tab, tmp_path, one_thread):
    import torch

    torch.manual_seed(0)
    module = tab.model.LitRegressor(num_features=8, lr=0.01)
    dm = tab.data.TabularDataModule(str(tmp_path), site="site-2", batch_size=64)
    (before,) = trainer().validate(module, datamodule=dm, verbose=False)  # generates the data first
    assert sorted(before) == ["val_mae", "val_mse"]  # exactly the module's names, as logged

    fit = trainer(max_epochs=2)
    fit.fit(module, datamodule=dm)
    (after,) = trainer().validate(module, datamodule=dm, verbose=False)
    assert after["val_mse"] < 0.7 * before["val_mse"], (before, after)
    # training logs its names as written, the slash included
    assert {"train_mse_step", "train_mse_epoch", "loss/train"} <= set(fit.logged_metrics)

    (tested,) = trainer().test(module, datamodule=dm, verbose=False)
    assert sorted(tested) == ["test_mae", "test_mse"]
    assert dict(module.hparams) == {"num_features": 8, "hidden": 32, "lr": 0.01}


def test_the_package_imports_only_torch_numpy_lightning_and_the_standard_library():
    allowed = {"torch", "numpy", "pytorch_lightning"} | set(sys.stdlib_module_names)
    files = sorted(PACKAGE.glob("*.py"))
    assert [f.name for f in files] == ["__init__.py", "data.py", "model.py"]
    assert not PACKAGE.is_symlink()  # the example's own code, shipped in the job
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{file.name} imports {name}"
