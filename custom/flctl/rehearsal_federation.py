"""The rehearsal's federation: the FL server and sites from their kits, a job from the admin's host
(flctl rehearse, step 3).

A part of flctl.rehearsal.Rehearsal: it uses the rehearsal's network, launch, base_env, prod,
org_of, tracking_credentials, scan_while (the credential scan while the job runs) and report.
"""

import sys
import threading
from pathlib import Path

from flctl import netns, processes
from flctl.errors import CliError
from flctl.poc import Poc
from flctl.rehearsal_hosts import EXPERIMENT, FED_PORT, PROJECT_ADMIN, SERVER_HOST, site_name


class Deployment(Poc):
    """Poc's submit/wait/download, spoken from the admin's namespace with a provisioned kit."""

    def __init__(self, rehearsal, kit, **kw):
        super().__init__(rehearsal.folder / "admin", **kw)
        self.prod, self.kit = rehearsal.prod, kit
        self.poc_ws = rehearsal.folder / "kits"
        self.command_prefix = tuple(rehearsal.network.exec_prefix("admin"))

    def part_pids(self, part) -> dict:
        # Poc's "server" is this deployment's server kit.
        return processes.naming(self.prod / (SERVER_HOST if part == "server" else part))


class Federation:
    """Starts the FL server and the sites in their namespaces; submits, waits for and downloads the job."""

    def start_federation(self):
        server_kit = self.prod / SERVER_HOST
        # The FL server alone gets the tracking credentials, in its environment.
        env = {**self.base_env(), **self.tracking_credentials()}
        server = self.launch("server", "server", self.fl_command("server", server_kit), env, cwd=server_kit)
        # Up when its port answers from the admin's host, across the LAN.
        alive = lambda: server.poll() is None  # noqa: E731
        if not netns.wait_port(self.network.exec_prefix("admin"), SERVER_HOST, FED_PORT, 180, alive):
            raise CliError(f"the FL server did not start; see {self.logs / 'server.log'}")
        site_env = {**self.base_env(), "FL_SITES_PER_HOST": str(self.sites)}
        for i in range(1, self.sites + 1):
            kit = self.prod / site_name(i)
            self.launch(site_name(i), site_name(i), self.fl_command(site_name(i), kit), site_env, cwd=kit)
        self.say(f"rehearse: FL server and {self.sites} site(s) started from their kits")

    def port_open(self, host, target, port) -> bool:
        return netns.connect(self.network.exec_prefix(host), target, port) == "connected"

    def fl_command(self, name, kit: Path, uid=None, org=None) -> list:
        """What the kit's startup/sub_start.sh runs, without its restart loop: the PID is FLARE's."""
        if name == "server":
            module, conf, extra = "nvflare.private.fed.app.server.server_train", "fed_server.json", []
            org = org or self.org_of(SERVER_HOST)
        else:
            module, conf = "nvflare.private.fed.app.client.client_train", "fed_client.json"
            extra, org = [f"uid={uid or name}"], org or self.org_of(name)
        return [sys.executable, "-u", "-m", module, "-m", kit, "-s", conf, "--set", "secure_train=true"] + [
            *extra,
            f"org={org}",
            "config_folder=config",
        ]

    def admin(self, kit=PROJECT_ADMIN, tracking_uri=None) -> Deployment:
        return Deployment(
            self,
            self.prod / kit,
            sites=self.sites,
            rounds=self.rounds,
            epochs=self.epochs,
            offline=True,
            data_root=self.data_root,
            tracking_uri=self.tracking_uri if tracking_uri is None else tracking_uri,
            timeout=self.timeout,
            job_id=self.job_id,
            say=lambda m: self.say(m.replace("poc: ", "rehearse: ", 1)),
            experiment=EXPERIMENT,  # named for the comparison with the simulator
        )

    def run_job(self):
        deployment = self.admin()
        deployment.submit()
        self.job_id = deployment.job_id
        stop = threading.Event()
        scanner = threading.Thread(target=self.scan_while, args=(stop,), daemon=True)
        scanner.start()
        try:
            deployment.wait()
        finally:
            stop.set()
            scanner.join(10)
        deployment.download()
        self.report["result"] = str(deployment.workspace / "results" / self.job_id / "workspace")
