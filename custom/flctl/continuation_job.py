"""The continuation job: a dead job's own folder, changed only where a resume must change it.

Everything stays the job's own (total rounds, sites' settings, aggregation, tracking names),
except in the FL server's config:
  - ScatterAndGather: start_round = the last completed round + 1, num_rounds = the rounds left
    (FLARE's workflow runs rounds start_round .. start_round + num_rounds - 1);
  - the persistor starts from the dead job's last global model (source_ckpt_file_full_name, a
    copy in app/custom: it travels with the job to wherever the FL server runs);
  - the model selector starts from the best key metric value so far (KeyMetricSelector's
    best_value; FLARE's own IntimeModelSelector is swapped for it, same settings);
  - the tracker gets the plan (resume_from) and the dead job's tracking URI, so it writes into
    the same runs.
  - server state besides the global model starts where the dead job left it: our SCAFFOLD
    workflow's global controls and our FedOpt generator's server model and optimizer, which they
    persist after every round (server.server_state), carried in app/custom as resume_<file> and
    named by their resume_state argument.
FLARE's own ScatterAndGatherScaffold and PTFedOptModelShareableGenerator persist none of it: a job
using them is refused, in one line naming that state and the class that keeps it.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from flctl.configure import FILES, read_config

SAG = "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather"
SCAFFOLD_SAG = "fl_lightning_mlflow.server.scaffold_workflow.ResumableScaffold"
FEDOPT = "fl_lightning_mlflow.server.fedopt_generator.ResumableFedOpt"
# Our components that persist server state per round: class path -> server_state's kind.
STATEFUL = {SCAFFOLD_SAG: "scaffold", FEDOPT: "fedopt"}
PERSISTOR = "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor"
KEY_SELECTOR = "fl_lightning_mlflow.server.model_selector.KeyMetricSelector"
FLARE_SELECTOR = "nvflare.app_common.widgets.intime_model_selector.IntimeModelSelector"
TRACKER = "fl_lightning_mlflow.server.tracker.FederatedMLflowTracker"
# Server state a resume cannot carry (FLARE persists none of it): class path end -> (what, ours).
UNCARRIED = {
    "ScatterAndGatherScaffold": ("SCAFFOLD's server control variates", SCAFFOLD_SAG),
    "PTFedOptModelShareableGenerator": ("FedOpt's server optimizer state (its momentum)", FEDOPT),
}


class ContinuationRefused(Exception):
    """The job cannot be continued as it is: one line."""


@dataclass
class ServerConfig:
    """The parts of a job's config_fed_server that a resume reads and changes."""

    conf: dict
    workflow: dict
    persistor: dict
    selector: dict | None
    tracker: dict
    stateful: dict  # server_state kind -> the component (or workflow) that persists it

    def value(self, value):
        """A "{name}" reference resolved against the config's own variables, as FLARE resolves it."""
        if isinstance(value, str) and value.startswith("{") and value.endswith("}") and value[1:-1] in self.conf:
            return self.conf[value[1:-1]]
        return value

    @property
    def num_rounds(self) -> int:
        rounds = self.value(self.workflow.get("args", {}).get("num_rounds"))
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
            raise ContinuationRefused(f"the workflow's num_rounds is not a number of rounds: {rounds!r}")
        return rounds

    @property
    def key_metric(self) -> tuple:
        """(key metric or None, "max" or "min") of the model selector."""
        if self.selector is None:
            return None, "max"
        args = self.selector.get("args", {})
        if self.selector["path"] == FLARE_SELECTOR:
            negate = self.value(args.get("negate_key_metric"))
            return self.value(args.get("key_metric", "val_accuracy")), "min" if negate else "max"
        return self.value(args.get("key_metric")), self.value(args.get("key_metric_mode", "max"))

    @property
    def model_class(self) -> str | None:
        """The class path of the persistor's model (initial_model's module), if it names one; a
        "{module_path}" reference resolved (as the template's persistor writes it)."""
        model = self.persistor.get("args", {}).get("model")
        if isinstance(model, dict):
            module = (model.get("args") or {}).get("module")
            return self.value(module.get("path") if isinstance(module, dict) else model.get("path"))
        return None


def _by_path(items: list, path_end: str) -> list:
    return [c for c in items if isinstance(c, dict) and str(c.get("path", "")).endswith(path_end)]


def inspect_server(job: Path) -> ServerConfig:
    """The job's server config, or ContinuationRefused naming what a resume cannot carry."""
    conf = read_config(Path(job) / FILES["server"])
    components, workflows = conf.get("components", []), conf.get("workflows", [])
    for item in components + workflows:
        for end, (what, ours) in UNCARRIED.items():
            if str(item.get("path", "")).endswith(end):
                raise ContinuationRefused(
                    f"FLARE's {end} (component {item.get('id')!r}) does not persist {what} per round, so the "
                    f"job cannot resume exactly; {ours} does"
                )
    stateful = {STATEFUL[c["path"]]: c for c in components + workflows if c.get("path") in STATEFUL}
    sag = [w for w in workflows if w.get("path") in (SAG, SCAFFOLD_SAG)]
    if len(sag) != 1:
        names = [w.get("path") for w in workflows]
        raise ContinuationRefused(f"only a ScatterAndGather job can resume; its workflows are {names}")
    workflow = sag[0]
    by_id = {c.get("id"): c for c in components}
    persistor = by_id.get(workflow.get("args", {}).get("persistor_id"))
    if persistor is None or persistor.get("path") != PERSISTOR:
        raise ContinuationRefused("the workflow's persistor is not PTFileModelPersistor: no global model to start from")
    trackers = _by_path(components, TRACKER)
    if len(trackers) != 1:
        raise ContinuationRefused("the job has no FederatedMLflowTracker: there are no runs to continue")
    selector_id = trackers[0].get("args", {}).get("model_selector_id", "model_selector")
    selector = by_id.get(selector_id)
    if selector is not None and selector.get("path") not in (KEY_SELECTOR, FLARE_SELECTOR):
        selector = None  # another selector: no best value to carry into it
    return ServerConfig(conf, workflow, persistor, selector, trackers[0], stateful)


def check_model_class(server: ServerConfig, dead_state: dict) -> None:
    """The continuation must build the very class whose weights the dead job persisted."""
    was = (dead_state.get("model_spec") or {}).get("path")
    now = server.model_class
    if was and now and was != now:
        raise ContinuationRefused(f"the model class changed ({was} then, {now} now): its persisted weights do not fit")


def write_continuation(src_job: Path, dest: Path, server: ServerConfig, plan: dict, model: Path, best: Path | None,
                       tracking_uri: str, states: dict | None = None) -> Path:  # fmt: skip
    """Copy src_job to dest with the changes above; returns dest. states: server_state kind ->
    the dead job's state file (checked by the caller), one for each of server.stateful."""
    from fl_lightning_mlflow.server.resume_plan import RESUME_BEST_MODEL, RESUME_MODEL
    from fl_lightning_mlflow.server.server_state import RESUME_PREFIX, STATE_FILES

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src_job, dest, ignore=shutil.ignore_patterns("__pycache__"))
    custom = dest / "app" / "custom"
    custom.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, custom / RESUME_MODEL)
    if best is not None:
        shutil.copyfile(best, custom / RESUME_BEST_MODEL)
    wf_args = server.workflow.setdefault("args", {})
    wf_args["start_round"] = plan["start_round"]
    wf_args["num_rounds"] = plan["num_rounds"] - plan["start_round"]
    server.persistor.setdefault("args", {})["source_ckpt_file_full_name"] = RESUME_MODEL
    for kind, item in server.stateful.items():
        carried = RESUME_PREFIX + STATE_FILES[kind]
        shutil.copyfile(states[kind], custom / carried)
        item.setdefault("args", {})["resume_state"] = carried
        if kind == "fedopt":  # the generator does not know the workflow's start_round
            item["args"]["resume_round"] = plan["last_round"]
    if server.selector is not None and plan.get("best"):
        _carry_best(server, plan["best"][1])
    tracker_args = server.tracker.setdefault("args", {})
    tracker_args["resume_from"] = plan
    tracker_args["tracking_uri"] = tracking_uri
    path = dest / FILES["server"]
    path.with_suffix(".conf").unlink(missing_ok=True)  # the JSON written here replaces a HOCON one
    path.write_text(json.dumps(server.conf, indent=2) + "\n")
    return dest


def _carry_best(server: ServerConfig, best_value: float) -> None:
    selector, args = server.selector, server.selector.setdefault("args", {})
    if selector["path"] == FLARE_SELECTOR:  # the same selection, with a best value it can start from
        key, mode = server.key_metric
        kept = {k: args[k] for k in ("weigh_by_local_iter", "aggregation_weights") if k in args}
        selector["path"], selector["args"] = KEY_SELECTOR, {**kept, "key_metric": key, "key_metric_mode": mode}
        args = selector["args"]
    args["best_value"] = best_value
