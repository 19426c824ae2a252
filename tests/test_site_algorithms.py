"""FedProx and SCAFFOLD on the sites (site.algorithms), as configuration of the same engines: the
proximal term, the control correction, and what a train result carries for FLARE's
ScatterAndGatherScaffold and its aggregator. Real Lightning, real FLARE classes, no mocks."""

import logging
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.model import make_model_learnable, model_learnable_to_dxo
from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from torch.utils.data import DataLoader, TensorDataset

from cifar10_example.lit_module import LitCifarNet
from cifar10_example.network import CifarNet
from conftest import cifar_engine
from fl_lightning_mlflow.common.protocol import GLOBAL_PREFIX, SENT_COUNTS_META, VAL_SAMPLES_META
from fl_lightning_mlflow.site.algorithms import SCAFFOLD_STATE_FILE, ScaffoldSite, frozen_parameters, proximal_term
from fl_lightning_mlflow.site.engine import SiteContext
from fl_lightning_mlflow.site.executor import SiteExecutor
from fl_lightning_mlflow.site.lightning_engine import FedProxTerm, LightningEngine
from fl_lightning_mlflow.site.pt_engine import PTEngine
from flctl import data_prep

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

BATCH, LR = 128, 0.02
ENGINES = {"lightning": LightningEngine, "pt": PTEngine}
MODEL_WEIGHTS, CTRL_GLOBAL, CTRL_DIFF = (
    AppConstants.MODEL_WEIGHTS,
    AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL,
    AlgorithmConstants.SCAFFOLD_CTRL_DIFF,
)


class Sink:
    """Where an engine's metrics and params go (the executor's sender, or an mlflow-like writer)."""

    def __init__(self):
        self.params, self.metrics = {}, set()

    def __call__(self, kind, values, step, fl_round):  # the executor's sender (Lightning)
        if kind == "params":
            self.params.update(values)
        elif kind == "metrics":
            self.metrics |= set(values)
        elif kind == "metrics_batch":
            for _, _, record in values:
                self.metrics |= set(record)

    def log_params(self, values):  # MLflowWriter's calls (the plain loop)
        self.params.update(values)

    def set_tags(self, tags):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics |= set(metrics)

    def log_metric(self, key, value, step=None):
        self.metrics.add(key)


@pytest.fixture(scope="module")
def offline_data(tmp_path_factory):
    """A small offline set for these unit tests (the shared one is 6,000 images; the algorithms'
    arithmetic does not need them, and local training is most of this module's time)."""
    root = tmp_path_factory.mktemp("small-data") / "offline-cifar10"
    data_prep.prepare(root, sites=2, offline=True, offline_sizes=(2000, 200), say=lambda msg: None)
    return root


@pytest.fixture(autouse=True)
def _one_torch_thread(one_thread):
    """Every test here trains on one thread (conftest.one_thread)."""


def make_engine(kind, data_root, workdir, **args):
    sink = Sink()
    engine = cifar_engine(kind, data_root, batch_size=BATCH, lr=LR, log_every_n_steps=5, **args)
    engine.setup(SiteContext(site="site-1", workdir=workdir, threads=1, send=sink, writer=sink))
    return engine, sink


def global_weights(seed: int = 0) -> dict:
    return {k: v.numpy() for k, v in CifarNet(init_seed=seed).state_dict().items()}


def distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a))


def cosine(a: dict, b: dict) -> float:
    dot = sum(float(np.sum(a[k] * b[k])) for k in a)
    return dot / math.sqrt(sum(float(np.sum(a[k] ** 2)) for k in a) * sum(float(np.sum(b[k] ** 2)) for k in b))


def controls(value: float, seed: int = 0) -> dict:
    """Global controls as the server holds them: one per parameter, of its shape (not constant)."""
    rng = np.random.default_rng(seed)
    return {k: (value * rng.standard_normal(v.shape)).astype(np.float32) for k, v in global_weights().items()}


# ----- FedProx ---------------------------------------------------------------------------------
class Grads(pl.Callback):
    """The module's gradients as they stand at its place among the Trainer's callbacks."""

    def __init__(self):
        self.grads = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def one_step(module, callbacks) -> pl.Trainer:
    """One real Lightning optimizer step of the module on a small batch, with these callbacks."""
    torch.manual_seed(0)  # the same batch every time
    batch = DataLoader(TensorDataset(torch.rand(8, 3, 32, 32), torch.arange(8)), batch_size=8)
    quiet = dict(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, callbacks=callbacks, **quiet)
    trainer.fit(module, train_dataloaders=batch)
    return trainer


def test_the_proximal_term_is_zero_at_the_global_weights_and_grows_with_distance():
    mu = 0.1
    module = LitCifarNet(lr=LR, momentum=0.9)  # a LightningModule that knows nothing of FedProx
    assert "fedprox_mu" not in module.hparams and set(module.state_dict()) == set(CifarNet().state_dict())
    start = {k: v.clone() for k, v in module.state_dict().items()}
    torch.manual_seed(1)
    direction = {name: torch.randn_like(p) for name, p in module.named_parameters()}
    squared_norm = sum(float(torch.sum(d**2)) for d in direction.values())
    terms = []
    for eps in (0.0, 0.01, 0.02, 0.04):
        with torch.no_grad():  # the local model at eps along the direction from the global one
            for name, p in module.named_parameters():
                p.copy_(start[name] + eps * direction[name])
        at = {name: p.detach().clone() for name, p in module.named_parameters()}
        before, after = Grads(), Grads()
        prox = FedProxTerm(module, numpy_weights_of(start), mu)  # as LightningEngine.fit makes it per task
        trainer = one_step(module, [before, prox, after])
        terms.append(float(trainer.callback_metrics["train_prox_loss_step"]))
        assert float(trainer.callback_metrics["train_prox_loss_epoch"]) == pytest.approx(terms[-1])
        # Its gradient, mu * (w - w_global), is added to every parameter's before the optimizer step.
        assert set(before.grads) == set(after.grads) == set(direction)
        for name in direction:
            pull = mu * (at[name] - start[name])  # = mu * eps * direction, up to float rounding
            torch.testing.assert_close(after.grads[name], before.grads[name] + pull)  # float32's tolerance
            torch.testing.assert_close(pull, mu * eps * direction[name], rtol=1e-3, atol=1e-6)
            # The optimizer stepped with the corrected gradient (SGD's first step with momentum: w - lr * g).
            torch.testing.assert_close(module.state_dict()[name], at[name] - LR * after.grads[name])
            assert torch.equal(prox.global_params[name], start[name])  # the global copy stays as it was
        # The logged term: mu/2 * ||w - w_global||^2.
        assert terms[-1] == pytest.approx(mu / 2 * eps**2 * squared_norm, rel=1e-3)
    assert terms[0] == 0.0  # at the global weights, the term and its gradient vanish
    assert terms[1] < terms[2] < terms[3] and terms[3] / terms[2] == pytest.approx(4, rel=1e-3)


def test_the_fedprox_term_leaves_frozen_parameters_alone():
    module = LitCifarNet(lr=LR)
    module.classifier[3].weight.requires_grad_(False)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05)
    at = {name: p.detach().clone() for name, p in module.named_parameters()}
    before, after = Grads(), Grads()
    prox = FedProxTerm(module, numpy_weights_of(start), 1.0)
    assert "classifier.3.weight" not in prox.global_params and "classifier.3.bias" in prox.global_params
    trainer = one_step(module, [before, prox, after])
    assert "classifier.3.weight" not in after.grads  # no gradient made up for a frozen parameter
    assert torch.equal(module.classifier[3].weight, at["classifier.3.weight"])  # not moved by the step
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert float(trainer.callback_metrics["train_prox_loss_step"]) == pytest.approx(0.5 * 0.05**2 * trainable, rel=1e-3)
    for name in prox.global_params:
        pull = at[name] - start[name]  # mu = 1
        torch.testing.assert_close(after.grads[name], before.grads[name] + pull)


def numpy_weights_of(state: dict) -> dict:
    """Global weights as a task brings them: numpy arrays by state_dict name."""
    return {k: v.numpy() for k, v in state.items()}


def test_the_proximal_term_covers_trainable_parameters_only():
    net = CifarNet()
    net.classifier[3].weight.requires_grad_(False)
    frozen = frozen_parameters(net, global_weights(1))
    assert "classifier.3.weight" not in frozen and "classifier.3.bias" in frozen
    assert all(not t.requires_grad for t in frozen.values())
    assert proximal_term(net.named_parameters(), frozen, 1.0).item() > 0
    with pytest.raises(ValueError, match="none of the model's parameters"):
        proximal_term(net.named_parameters(), {}, 1.0)


@pytest.mark.parametrize("kind", ENGINES)
def test_fedprox_mu_0_is_plain_training_and_mu_keeps_the_model_near_the_global_one(kind, offline_data, tmp_path):
    start = global_weights(3)
    fits, sinks = {}, {}
    for mu in (None, 0.0, 5.0):  # None: the engine's default, as the FedAvg jobs configure it
        args = {} if mu is None else {"fedprox_mu": mu}
        engine, sink = make_engine(kind, offline_data, tmp_path / str(mu), **args)  # seeded at setup
        fits[mu], sinks[mu] = engine.fit(start, 0, None), sink
    plain, zero, prox = fits[None], fits[0.0], fits[5.0]
    # mu = 0 is FedAvg's local training, bit for bit, and logs and records nothing more.
    assert all(np.array_equal(plain.weights[k], zero.weights[k]) for k in plain.weights)
    assert sinks[0.0].metrics == sinks[None].metrics and "train_prox_loss" not in sinks[0.0].metrics
    assert sinks[0.0].params == sinks[None].params and "fedprox_mu" not in sinks[0.0].params
    # mu > 0: the proximal pull keeps the local model closer to the global one; the term is logged.
    assert distance(prox.weights, start) < 0.9 * distance(plain.weights, start)
    assert "train_prox_loss" in {m.removesuffix("_step").removesuffix("_epoch") for m in sinks[5.0].metrics}
    assert float(sinks[5.0].params["fedprox_mu"]) == 5.0
    assert prox.steps == plain.steps and prox.control_diff is None


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("mu", [-0.1, "0.01", True, float("nan"), float("inf"), None])
def test_a_bad_fedprox_mu_is_refused_in_one_line(kind, mu, tmp_path):
    # An engine argument (SiteEngine's), whatever the module: refused where the engine is configured.
    with pytest.raises(ValueError) as refused:
        cifar_engine(kind, tmp_path, fedprox_mu=mu)
    assert str(refused.value) == f"{ENGINES[kind].__name__}: fedprox_mu must be a number >= 0 (0: FedAvg), got {mu!r}"


@pytest.mark.parametrize("kind", ENGINES)
def test_a_fedprox_mu_of_zero_or_more_is_taken(kind, tmp_path):
    for mu in (0, 0.0, 0.01, 5):
        assert cifar_engine(kind, tmp_path, fedprox_mu=mu).args.fedprox_mu == mu


# ----- SCAFFOLD --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ENGINES)
def test_scaffold_corrects_every_step_and_returns_the_control_difference(kind, offline_data, tmp_path):
    start, c = global_weights(4), controls(0.05)
    plain_engine, _ = make_engine(kind, offline_data, tmp_path / "plain", tracking=False)
    plain = plain_engine.fit(start, 0, None)
    engine, _ = make_engine(kind, offline_data, tmp_path / "scaffold", tracking=False)
    fit = engine.fit(start, 0, None, global_controls=c)

    # The correction ran once per optimizer step: w -= lr * (c - c_i), with c_i = 0 in round 0.
    assert engine.scaffold.steps == fit.steps == plain.steps > 0
    shift = {k: fit.weights[k] - plain.weights[k] for k in c}
    expected = {k: -fit.steps * LR * c[k] for k in c}  # what the corrections add up to, to first order
    assert cosine(shift, expected) > 0.9

    # The new local control is option II: c_i+ = c_i - c + (w_global - w) / (steps * lr); returned as c_i+ - c_i.
    assert set(fit.control_diff) == {name for name, _ in CifarNet().named_parameters()}
    for k, diff in fit.control_diff.items():
        assert isinstance(diff, np.ndarray) and diff.shape == start[k].shape
        np.testing.assert_allclose(diff, -c[k] + (start[k] - fit.weights[k]) / (fit.steps * LR), rtol=1e-4, atol=1e-6)
    # The site's controls are kept for the next round, in its work folder too (a restarted process reads them).
    assert (tmp_path / "scaffold" / SCAFFOLD_STATE_FILE).is_file()
    assert plain_engine.scaffold is None and plain.control_diff is None


def test_local_controls_carry_over_rounds_and_process_restarts(tmp_path):
    net, start, c = CifarNet(init_seed=5), global_weights(5), controls(0.1)
    site = ScaffoldSite(tmp_path)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    diffs = []
    for _ in range(2):  # two rounds, from the same global model and controls
        net.load_state_dict({k: torch.as_tensor(v) for k, v in start.items()})
        site.start(net, c)
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            site.step_lr(optimizer)
            optimizer.step()
            site.corrected(net)
        diffs.append(site.finish(net))
    kept = {k: v.clone() for k, v in site.helper.c_local.state_dict().items()}
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in kept.values())
    # Round 2's difference is relative to round 1's new controls: c_i after two rounds is their sum.
    for k, value in kept.items():
        np.testing.assert_allclose(value.numpy(), diffs[0][k] + diffs[1][k], rtol=1e-5, atol=1e-6)

    restarted = ScaffoldSite(tmp_path)  # a new process of the same site
    restarted.start(CifarNet(), c)
    assert all(torch.equal(restarted.helper.c_local.state_dict()[k], v) for k, v in kept.items())
    with pytest.raises(ValueError, match=r"^SCAFFOLD: Invalid SCAFFOLD global control 'features.0.weight'"):
        restarted.start(CifarNet(), {**c, "features.0.weight": np.zeros(3)})


def scaffold_task(weights: dict, ctrl: dict, fl_round: int = 0):
    """The train task exactly as ScatterAndGatherScaffold builds it: a DXO collection."""
    parts = {
        MODEL_WEIGHTS: model_learnable_to_dxo(make_model_learnable(weights, {})),
        CTRL_GLOBAL: DXO(data_kind=DataKind.WEIGHT_DIFF, data=ctrl),
    }
    task = DXO(data_kind=DataKind.COLLECTION, data=parts).to_shareable()
    task.set_header(AppConstants.CURRENT_ROUND, fl_round)
    task.add_cookie(AppConstants.CONTRIBUTION_ROUND, fl_round)
    return task


def executor_for(engine, tmp_path) -> SiteExecutor:
    """The executor as START_RUN leaves it, around an engine already set up."""
    executor = SiteExecutor()
    executor.engine, executor.site, executor.app_dir = engine, "site-1", tmp_path
    return executor


def test_a_scaffold_train_task_is_answered_as_scatter_and_gather_scaffold_aggregates_it(offline_data, tmp_path):
    start, c = global_weights(6), controls(0.01)
    engine, _ = make_engine("lightning", offline_data, tmp_path)
    task = scaffold_task(start, c)
    result = executor_for(engine, tmp_path).execute("train", task, FLContext(), Signal())
    assert result.get_return_code(ReturnCode.OK) == ReturnCode.OK
    result.set_cookie_jar(task.get_cookie_jar())  # as FLARE's client runner returns it

    dxo = from_shareable(result)
    assert dxo.data_kind == DataKind.COLLECTION and set(dxo.data) == {MODEL_WEIGHTS, CTRL_DIFF}
    weights, ctrl = dxo.data[MODEL_WEIGHTS], dxo.data[CTRL_DIFF]
    assert weights.data_kind == ctrl.data_kind == DataKind.WEIGHT_DIFF
    assert set(weights.data) == set(start) and set(ctrl.data) == {n for n, _ in CifarNet().named_parameters()}
    # Each part weighted by the samples seen; what the model selector and the tracker read is on the outer DXO.
    assert weights.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == ctrl.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == engine.train_samples
    assert set(dxo.get_meta_prop(MetaKey.INITIAL_METRICS)) == {f"{GLOBAL_PREFIX}val_loss", f"{GLOBAL_PREFIX}val_acc"}
    assert dxo.get_meta_prop(VAL_SAMPLES_META) == engine.val_samples == 100
    assert isinstance(dxo.get_meta_prop(SENT_COUNTS_META), dict)

    # FLARE's aggregator, configured as jobs/hello-lightning-scaffold configures it, takes it.
    aggregator = InTimeAccumulateWeightedAggregator(
        expected_data_kind={MODEL_WEIGHTS: "WEIGHT_DIFF", CTRL_DIFF: "WEIGHT_DIFF"}
    )
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    aggregator.handle_event(EventType.START_RUN, fl_ctx)
    result.set_peer_props({ReservedKey.IDENTITY_NAME: "site-1"})
    assert aggregator.accept(result, fl_ctx)
    aggregated = from_shareable(aggregator.aggregate(fl_ctx))
    assert set(aggregated.data) == {MODEL_WEIGHTS, CTRL_DIFF}  # what ScatterAndGatherScaffold reads back
    for k, v in ctrl.data.items():
        np.testing.assert_allclose(aggregated.data[CTRL_DIFF].data[k], v, rtol=1e-6)


def test_controls_in_the_task_meta_are_answered_in_the_result_meta(offline_data, tmp_path):
    # FLARE's FLModel-based Scaffold controller: controls in meta; the difference goes back in meta.
    start, c = global_weights(7), controls(0.01)
    task = DXO(data_kind=DataKind.WEIGHTS, data=start, meta={CTRL_GLOBAL: c}).to_shareable()
    task.set_header(AppConstants.CURRENT_ROUND, 0)
    engine, _ = make_engine("pt", offline_data, tmp_path, tracking=False)
    result = executor_for(engine, tmp_path).execute("train", task, FLContext(), Signal())
    model = FLModelUtils.from_shareable(result)
    assert set(model.meta[CTRL_DIFF]) == {n for n, _ in CifarNet().named_parameters()}
    assert model.params_type.value == "DIFF" and model.meta[MetaKey.NUM_STEPS_CURRENT_ROUND] == engine.train_samples


def test_a_scaffold_task_for_an_engine_without_scaffold_fails_in_one_line(offline_data, tmp_path, caplog):
    engine, _ = make_engine("lightning", offline_data, tmp_path, tracking=False)
    engine.supports_scaffold = False  # as an engine of one's own that does not implement it
    with caplog.at_level(logging.ERROR):
        result = executor_for(engine, tmp_path).execute(
            "train", scaffold_task(global_weights(), controls(0.01)), FLContext(), Signal()
        )
    assert result.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "round 0: the server runs SCAFFOLD, which LightningEngine does not support" in caplog.text
