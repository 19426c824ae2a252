"""The MLflow side of the server: the run tree, the models and the stats file.

One parent run per FL job (role=federation) and one nested child run per site (role=site,
mlflow.parentRunId). Nothing here blocks its caller: every write is an item of the WriteQueue,
whose writer thread runs the "call" actions below (creating runs, logging models, the
cross-site table) and retries them like any point until the job ends.
"""

import collections
import importlib
import json
import sys
from importlib import metadata
from pathlib import Path

from fl_lightning_mlflow.common.protocol import MAX_PARAM_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH, PARENT_RUN_KEY, STATS_FILE
from fl_lightning_mlflow.server.tracking_uri import redact_uri
from fl_lightning_mlflow.server.write_queue import WriteQueue

PARENT = PARENT_RUN_KEY  # the run key of the job's parent run; sites' run keys are their names

SPILL_FILE = "mlflow_spill.jsonl"
CROSS_SITE_TABLE = "cross_site_validation.json"


def versions() -> dict:
    out = {}
    for dist in ("nvflare", "pytorch-lightning", "mlflow", "torch"):
        try:
            out[f"{dist}_version"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class ModelLogger:
    """Writer thread: the final and best global models as MLflow PyTorch models, the best registered."""

    def __init__(self, model_class_path: str, registered_model_name: str):
        self.model_class_path = model_class_path
        self.registered_model_name = registered_model_name
        self.logged: set = set()  # a retried call skips what an earlier attempt logged

    def load(self, path) -> tuple:
        """(the network with the saved weights, the directory to ship as code_paths)."""
        import torch

        module, _, name = self.model_class_path.rpartition(".")
        net = getattr(importlib.import_module(module), name)()
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = saved.get("model", saved)
        net.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        # code_paths takes the whole top-level package, so the pickled class imports where the model loads
        return net.eval(), str(Path(sys.modules[module.partition(".")[0]].__file__).parent)

    def log(self, client, tracking_uri, parent_id, job_id, final_path, best_path, best_info, register):
        import mlflow
        import mlflow.pytorch
        import numpy as np

        mlflow.set_tracking_uri(tracking_uri)
        example = np.zeros((1, 3, 32, 32), dtype=np.float32)
        with mlflow.start_run(run_id=parent_id):
            for name, path in (("final_global_model", final_path), ("best_global_model", best_path)):
                if name in self.logged or not Path(path).is_file():
                    continue
                net, code = self.load(path)
                registered = self.registered_model_name if (name == "best_global_model" and register) else None
                info = mlflow.pytorch.log_model(
                    net,
                    name=name,
                    code_paths=[code],
                    input_example=example,
                    pip_requirements=[f"torch=={metadata.version('torch')}"],
                    registered_model_name=registered,
                    serialization_format="pickle",  # a plain nn.Module: any batch size, code_paths bring the class
                )
                if registered and info.registered_model_version:
                    version = str(info.registered_model_version)
                    if best_info:
                        client.set_model_version_tag(registered, version, "round", str(best_info[0]))
                        client.set_model_version_tag(registered, version, "key_metric_value", str(best_info[1]))
                    client.set_model_version_tag(registered, version, "job_id", job_id)
                self.logged.add(name)


class MLflowSink:
    def __init__(
        self,
        tracking_uri,
        run_dir,
        experiment_name,
        models: ModelLogger,
        experiment_tags=None,
        run_tags=None,
        description="",
        promote_params=(),
        logger=None,
        **queue_args,
    ):
        """queue_args: WriteQueue's max_memory_items, retry_initial, retry_max."""
        self.experiment_name, self.models = experiment_name, models
        self.experiment_tags = {str(k): str(v) for k, v in (experiment_tags or {}).items()}
        self.run_tags, self.description = dict(run_tags or {}), description
        self.promote_params, self._promoted = set(promote_params), set()
        self.run_dir, self.sites, self.job_id = Path(run_dir), [], ""
        actions = {
            "setup": self._setup_runs,
            "child": self._create_child,
            "log_models": self._log_models,
            "log_table": self._log_table,
            "log_text": lambda client, key, text, path: client.log_text(self.queue.run_ids[key], text, path),
            "terminate": lambda client, key, status: client.set_terminated(self.queue.run_ids[key], status),
        }
        self.queue = WriteQueue(tracking_uri, self.run_dir / SPILL_FILE, actions, logger=logger, **queue_args)

    # ----- what the tracker queues (FLARE's threads: never waits on MLflow) --------------------
    def start(self, job_name, job_id, sites, tags, fl_params, artifacts=None):
        self.job_id, self.sites = job_id, list(sites)
        tags = {**self.run_tags, "job_id": job_id, "sites": ",".join(self.sites), **versions(), **tags}
        self.queue.put(("call", "setup", [job_name, artifacts, tags]))
        for key, value in fl_params.items():
            self.param(PARENT, key, value)

    def add_site(self, site):
        if site not in self.sites:  # a site that joined after the start gets its run now
            self.sites.append(site)
            self.queue.put(("call", "child", [site]))

    def metrics(self, run_key, points, now, step=None):
        """points: [(name, value, step)], or [(name, value)] all at `step`."""
        for point in points:
            key, value, at = point if step is None else (*point, step)
            self.queue.put(("metric", run_key, key, float(value), now, int(at)))

    def param(self, run_key, key, value):
        self.queue.put(("param", run_key, key, str(value)[:MAX_PARAM_VALUE_LENGTH]))

    def site_params(self, site, pairs):
        for key, value in pairs:
            self.param(site, key, value)
            if key in self.promote_params and key not in self._promoted:  # shared settings, once on the parent
                self._promoted.add(key)
                self.param(PARENT, key, value)

    def tags(self, run_key, pairs):
        for key, value in pairs:
            self.queue.put(("tag", run_key, key, str(value)[:MAX_TAG_VALUE_LENGTH]))

    def text(self, run_key, text, path):
        self.queue.put(("call", "log_text", [run_key, str(text), str(path)]))

    def cross_site(self, points, rows, now):
        if rows:
            self.metrics(PARENT, points, now, step=0)
            self.queue.put(("call", "log_table", [PARENT, rows, CROSS_SITE_TABLE]))

    def finish(self, status, failure, site_status, models: tuple, flush_timeout) -> collections.Counter:
        """Queue the end (failure tag, models, statuses), write what can be written within
        flush_timeout seconds and return what could not. models: (final path, best path,
        (round, value) or None)."""
        if failure:
            self.tags(PARENT, [("failure_reason", failure)])
        final, best, best_info = models
        if Path(final).is_file() or Path(best).is_file():
            register = status == "FINISHED"
            self.queue.put(("call", "log_models", [str(final), str(best), list(best_info or []) or None, register]))
        for site in self.sites:
            self.queue.put(("call", "terminate", [site, site_status.get(site, status)]))
        self.queue.put(("call", "terminate", [PARENT, status]))
        flushed = self.queue.drain(flush_timeout)
        return self.queue.close(timeout=5 if flushed else 1)

    # ----- writer thread actions (idempotent: a failed attempt is retried whole) -----------------
    def _setup_runs(self, client, job_name, artifacts, tags):
        exp = client.get_experiment_by_name(self.experiment_name)
        exp_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(self.experiment_name, artifacts, tags=self.experiment_tags)
        )
        if self.description:
            client.set_experiment_tag(exp_id, "mlflow.note.content", self.description)
        self.queue.experiment_id = exp_id
        if PARENT not in self.queue.run_ids:
            parent = client.create_run(exp_id, run_name=job_name, tags={**tags, "role": "federation"})
            self.queue.run_ids[PARENT] = parent.info.run_id
        for site in self.sites:
            self._create_child(client, site)

    def _create_child(self, client, site):
        if site not in self.queue.run_ids:
            parent_id = self.queue.run_ids[PARENT]
            tags = {**self.run_tags, "mlflow.parentRunId": parent_id, "site": site, "role": "site"}
            self.queue.run_ids[site] = client.create_run(self.queue.experiment_id, run_name=site, tags=tags).info.run_id

    def _log_table(self, client, run_key, rows, artifact_file):
        columns = {name: [r[name] for r in rows] for name in ("model", "data_site", "metric", "value")}
        client.log_table(self.queue.run_ids[run_key], columns, artifact_file)

    def _log_models(self, client, final_path, best_path, best_info, register):
        parent_id = self.queue.run_ids[PARENT]
        self.models.log(
            client, self.queue.tracking_uri, parent_id, self.job_id, final_path, best_path, best_info, register
        )

    # ----- the account ---------------------------------------------------------------------------
    def report(self, status, failure, lost, records, timings: dict) -> tuple:
        """Write the stats file; returns (nothing lost, the one line to log)."""
        stats = {
            "status": status,
            "failure": failure,
            "received": {site: dict(c) for site, c in records.received.items()},
            "written": {k: v for k, v in self.queue.stats.items() if k.startswith("written_")},
            "lost": dict(lost),
            "rejected": dict(records.rejected),
            "truncated": dict(records.truncated),
            "write_failures": self.queue.stats["failures"],
            "spilled": self.queue.stats["spilled"],
            "max_event_seconds": round(timings["max_event_seconds"], 6),
            "probe_seconds": round(timings["probe_seconds"], 6),
            "slowest_event": timings["slowest_event"],
            "run_ids": dict(self.queue.run_ids),
        }
        path = self.run_dir / STATS_FILE
        path.write_text(json.dumps(stats, indent=2))
        if not sum(lost.values()):
            slowest = timings["max_event_seconds"] * 1000
            return (
                True,
                f"MLflow: all written ({stats['written']}); status {status}; slowest event handled in {slowest:.1f} ms",
            )
        try:  # one quick attempt to mark the loss on the run itself
            if PARENT in self.queue.run_ids and self.queue.client is not None:
                self.queue.client.set_tag(self.queue.run_ids[PARENT], "lost_items", json.dumps(dict(lost)))
        except Exception:  # noqa: BLE001 - the server is still unreachable; the log and file say it
            pass
        error = redact_uri(str(self.queue.last_error))
        where = f"counts in {path}"
        return (
            False,
            f"MLflow: could not write {dict(lost)} after retrying until job end (last error: {error}); {where}",
        )
