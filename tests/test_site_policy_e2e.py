"""A site's disclosure policy in the FLARE simulator and in POC (issue 25's "Done when"): site-1 has a policy
in its local/ folder that lets out only loss metrics, dataset counts without histograms and no
system metrics; site-2 has none. site-1's run holds exactly the allowed keys, site-2's is as
without a policy, the delivery account balances for both with the withheld counts beside it,
and a job that ships its own, looser, policy files changes nothing."""

import json
import re
import shutil

import pytest

from conftest import BATCH, JOB, LOG_EVERY, tracked_runs
from fl_lightning_mlflow.common.protocol import (
    POLICY_DIGEST_TAG,
    POLICY_NAME_TAG,
    POLICY_TRANSFORMS_TAG,
    STATS_FILE,
)
from fl_lightning_mlflow.site.disclosure_policy import read_policy
from flctl.simulate import simulate

pytestmark = pytest.mark.slow
ROUNDS = 2
POLICY = {
    "name": "site-1: losses only",
    "metrics": {"allow": ["*loss*"]},
    "datasets": {"disclose": "counts"},
    "system_metrics": False,
}
LET_ALL_OUT = {"name": "the job's own", "datasets": {"disclose": "full"}, "system_metrics": True}
# Every metric site-1's run may hold: the module's losses (train_loss per step and per epoch),
# as measured on the received global model (global_) and after local training (val_).
SITE_1_METRICS = {"train_loss_step", "train_loss_epoch", "val_loss", "global_val_loss"}


def job_with_its_own_policies(folder):
    """The job, trying to switch the policy off: looser policy files wherever a job can put them."""
    job = folder / "hello-lightning-mlflow"
    shutil.copytree(JOB, job, ignore=shutil.ignore_patterns("__pycache__"))
    places = ("app/config/disclosure_policy.json", "app/custom/disclosure_policy.site-1.json",
              "app/custom/local/disclosure_policy.json", "app/config/local/disclosure_policy.site-1.json")  # fmt: skip
    for place in places:
        (job / place).parent.mkdir(parents=True, exist_ok=True)
        (job / place).write_text(json.dumps(LET_ALL_OUT))
    return job


def policy_file(folder):
    policy = folder / "site-1-policy.json"
    policy.write_text(json.dumps(POLICY, indent=2))
    return policy


@pytest.fixture(scope="module")
def policy_run(offline_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy")
    policy, job = policy_file(folder), job_with_its_own_policies(folder)
    run = simulate(
        job,
        folder / "workspace",
        offline_data,
        sites=2,
        rounds=ROUNDS,
        epochs=1,
        extra_settings={
            "client.batch_size": BATCH,
            "client.log_every_n_steps": LOG_EVERY,
            "client.system_metrics_seconds": 2,
        },
        prepare=False,
        evaluate=False,
        say=lambda msg: None,
        show=None,
        timeout=600,
        site_policies={"site-1": policy},
    )
    assert run.outcome.ok, (run.outcome.problems, run.log[-3000:])
    return run.server_dir, run.log, read_policy(policy)


def test_the_policy_comes_from_the_sites_folder_and_no_policy_is_said_once(policy_run):
    _, log, policy = policy_run
    assert re.search(rf"site-1: disclosure policy '{re.escape(POLICY['name'])}' \({policy.digest}\) from \S+/site-1/"
                     r"local/disclosure_policy\.site-1\.json", log)  # fmt: skip
    assert "the job's own" not in log
    said = re.findall(r"site-2: no disclosure policy in \S+/site-2/local: everything streamed leaves", log)
    assert len(said) == 1


def test_site_1s_run_holds_exactly_the_allowed_keys_and_says_which_policy(policy_run):
    server, _, policy = policy_run
    client, _, children = tracked_runs(server)
    site_1 = client.get_run(children["site-1"].info.run_id)
    assert set(site_1.data.metrics) == SITE_1_METRICS
    tags = site_1.data.tags
    assert tags[POLICY_NAME_TAG] == POLICY["name"] and tags[POLICY_DIGEST_TAG] == policy.digest
    assert POLICY_TRANSFORMS_TAG not in tags  # no noise, no coarsening
    site_2 = client.get_run(children["site-2"].info.run_id)
    assert set(site_1.data.params) == set(site_2.data.params)  # params: the policy left them as they were
    profiles = [json.loads(d.dataset.profile) for d in site_1.inputs.dataset_inputs]
    assert len(profiles) == 2 and all(p["num_samples"] > 0 and p["label_histogram"] == {} for p in profiles)


def test_site_2_without_a_policy_streams_as_before(policy_run):
    server, _, _ = policy_run
    client, _, children = tracked_runs(server)
    site_2 = client.get_run(children["site-2"].info.run_id)
    keys = set(site_2.data.metrics)
    assert SITE_1_METRICS | {"train_acc_step", "train_acc_epoch", "val_acc", "global_val_acc", "epoch"} <= keys
    assert "system/cpu_utilization_percentage" in keys
    assert {k for k in keys if "loss" in k} == SITE_1_METRICS  # site-1 got every loss site-2 has
    assert not {POLICY_NAME_TAG, POLICY_DIGEST_TAG} & set(site_2.data.tags)
    profiles = [json.loads(d.dataset.profile) for d in site_2.inputs.dataset_inputs]
    assert len(profiles) == 2 and all(sum(p["label_histogram"].values()) == p["num_samples"] for p in profiles)


def test_delivery_balances_for_both_sites_with_what_site_1_withheld(policy_run):
    server, log, _ = policy_run
    stats = json.loads((server / STATS_FILE).read_text())
    delivery = stats["delivery"]
    for site, row in delivery.items():
        assert row["sent"] == row["received"] == row["written"] > 0, (site, row)
        assert row["lost"] == row["in_flight"] == row["refused"] == row["rejected"] == 0, (site, row)
    held = delivery["site-1"]["withheld_by_kind"]
    assert held["metric"] > 0 and held["system"] > 0 and held["dataset"] == 2 and held["param"] == held["tag"] == 0
    assert delivery["site-1"]["withheld"] == sum(held.values())
    assert delivery["site-2"]["withheld"] == 0
    assert delivery["site-1"]["sent_by_kind"]["tag"] >= 2  # the policy's own tags, counted as sent
    assert f"site-1 sent {delivery['site-1']['sent']}, written {delivery['site-1']['written']}, withheld " in log
    client, (parent,), _ = tracked_runs(server)
    metrics = parent.data.metrics
    assert metrics["delivery/site-1/withheld"] == delivery["site-1"]["withheld"]
    assert metrics["delivery/site-1/withheld/system"] == held["system"]
    assert metrics["delivery/site-2/withheld"] == 0


def test_what_site_1_withheld_is_not_on_the_parent_run_either(policy_run):
    server, _, _ = policy_run
    _, (parent,), _ = tracked_runs(server)
    metrics = parent.data.metrics
    # The train results' global-model metrics and the cross-site matrix pass the same gate.
    assert "global_val_loss/site-1" in metrics and "global_val_acc/site-1" not in metrics
    assert "global_val_acc/site-2" in metrics
    cross_site = [k for k in metrics if k.startswith("cross_site/") and k.split("/")[-2] == "site-1"]
    assert cross_site and all(k.endswith("/val_loss") for k in cross_site)


def test_in_poc_the_policy_in_site_1s_own_folder_does_the_same(offline_data, tmp_path):
    """POC: real site processes, the policy placed in site-1's folder of the POC workspace."""
    from flctl.poc import Poc

    policy = policy_file(tmp_path)
    poc = Poc(tmp_path / "poc", sites=2, job=job_with_its_own_policies(tmp_path), rounds=ROUNDS, offline=True,
              data_root=offline_data, timeout=900, say=print, site_policies={"site-1": policy})  # fmt: skip
    try:
        poc.prepare()
        assert (poc.prod / "site-1/local/disclosure_policy.json").read_text() == policy.read_text()
        assert not (poc.prod / "site-2/local/disclosure_policy.json").exists()
        poc.start()
        poc.submit()
        poc.wait()
        poc.download()
    finally:
        poc.stop(quiet=True)
    job_id = poc.resolve_job_id()
    site_log = (poc.prod / "site-1" / job_id / "log.txt").read_text()
    assert f"site-1: disclosure policy '{POLICY['name']}' ({read_policy(policy).digest}) from " in site_log
    server = poc.workspace / "results" / job_id / "workspace"
    client, _, children = tracked_runs(server)
    site_1, site_2 = (client.get_run(children[site].info.run_id) for site in ("site-1", "site-2"))
    assert set(site_1.data.metrics) == SITE_1_METRICS
    assert site_1.data.tags[POLICY_DIGEST_TAG] == read_policy(policy).digest
    assert {"val_acc", "global_val_acc", "system/cpu_utilization_percentage"} <= set(site_2.data.metrics)
    assert all(json.loads(d.dataset.profile)["label_histogram"] == {} for d in site_1.inputs.dataset_inputs)
    delivery = json.loads((server / STATS_FILE).read_text())["delivery"]
    for site, row in delivery.items():
        assert row["sent"] == row["received"] == row["written"] > 0 and row["lost"] == 0, (site, row)
    assert delivery["site-1"]["withheld_by_kind"]["metric"] > 0 and delivery["site-2"]["withheld"] == 0
