"""The FL server's job store, read and amended with FLARE's own storage class while the server
is down: a job FLARE still lists as RUNNING after its server died is a zombie (FLARE 2.9 cannot
resume it, and `nvflare job abort` answers "not running"), so it is marked FINISHED:ABORTED and
`nvflare job list` tells the truth again."""

import json
from pathlib import Path

RUNNING, ABORTED = "RUNNING", "FINISHED:ABORTED"


def job_store(server_dir):
    """(FilesystemStorage, jobs uri root) as the server's local/resources.json configures them."""
    from nvflare.app_common.storages.filesystem_storage import FilesystemStorage

    local = Path(server_dir) / "local"
    config = local / "resources.json"
    if not config.is_file():
        config = local / "resources.json.default"
    components = {c.get("id"): c for c in json.loads(config.read_text()).get("components", [])}
    manager = components.get("job_manager", {}).get("args", {})
    store_id = manager.get("job_store_id", "job_store")
    store_args = components.get(store_id, {}).get("args", {})
    return FilesystemStorage(**store_args), manager.get("uri_root", "/tmp/nvflare/jobs-storage")


def end_zombie_jobs(server_dir) -> list:
    """Mark this server's jobs still RUNNING in the store FINISHED:ABORTED; only call it while the
    server is down. Only jobs this server ran (a folder in its workspace) are touched, in case
    several servers share the store. Returns their ids."""
    store, root = job_store(server_dir)
    ended = []
    if not Path(root).is_dir():  # no job was ever submitted to this store
        return ended
    for uri in store.list_objects(root):
        job_id = Path(uri).name
        if not (Path(server_dir) / job_id).is_dir():
            continue
        try:
            meta = store.get_meta(uri)
        except Exception:  # noqa: BLE001, S112 - not a job object
            continue
        if meta.get("status") == RUNNING:
            store.update_meta(uri, {"status": ABORTED}, replace=False)
            ended.append(job_id)
    return ended


def job_status(server_dir, job_id) -> str | None:
    store, root = job_store(server_dir)
    try:
        return store.get_meta(f"{root.rstrip('/')}/{job_id}").get("status")
    except Exception:  # noqa: BLE001 - no such job
        return None
