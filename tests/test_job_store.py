"""flctl.job_store on FLARE's own FilesystemStorage: a dead server's RUNNING jobs are marked
FINISHED:ABORTED; jobs of other POC workspaces sharing the store, and ended ones, are not."""

import json

from nvflare.app_common.storages.filesystem_storage import FilesystemStorage

from flctl.job_store import end_zombie_jobs, job_status


def server_with_store(tmp_path):
    server, root = tmp_path / "prod_00" / "server", tmp_path / "jobs-storage"
    (server / "local").mkdir(parents=True)
    components = [
        {"id": "job_manager", "path": "x", "args": {"uri_root": str(root), "job_store_id": "job_store"}},
        {"id": "job_store", "path": "nvflare.app_common.storages.filesystem_storage.FilesystemStorage"},
    ]
    (server / "local" / "resources.json.default").write_text(json.dumps({"components": components}))
    store = FilesystemStorage()
    for job_id, status, ours in [("a1", "RUNNING", True), ("b2", "RUNNING", False), ("c3", "FINISHED:COMPLETED", True)]:
        store.create_object(f"{root}/{job_id}", b"job", {"job_id": job_id, "status": status}, overwrite_existing=True)
        if ours:
            (server / job_id).mkdir()
    return server


def test_only_this_servers_running_jobs_are_marked_aborted(tmp_path):
    server = server_with_store(tmp_path)
    assert end_zombie_jobs(server) == ["a1"]
    assert [job_status(server, j) for j in ("a1", "b2", "c3")] == ["FINISHED:ABORTED", "RUNNING", "FINISHED:COMPLETED"]
    assert end_zombie_jobs(server) == []  # idempotent
    assert job_status(server, "nope") is None


def test_a_store_no_job_was_ever_submitted_to_has_nothing_to_end(tmp_path):
    server = server_with_store(tmp_path)
    for job in (tmp_path / "jobs-storage").iterdir():
        for f in job.iterdir():
            f.unlink()
        job.rmdir()
    (tmp_path / "jobs-storage").rmdir()
    assert end_zombie_jobs(server) == []
