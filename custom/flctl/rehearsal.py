"""Rehearse a provisioned, TLS-secured deployment on one machine, each host in its own network namespace.

    flctl rehearse [--folder DIR] [--sites N] [--rounds R] [--epochs E] [--timeout S] [--no-compare]
                   [--site-policy SITE=FILE ...]
    flctl rehearse --teardown      # end what a killed run left: flr-* namespaces, their processes

Hosts (namespaces flr-*, see flctl/netns.py): the FL server (flserver.rehearsal, 10.213.0.1),
site-1..N (10.213.0.11...), the admin's machine (10.213.0.5) on one LAN; the MLflow tracking
server (mlflow.rehearsal, 10.213.1.2) on a link to the FL server alone. In order:

  1. `flctl project` writes project.yml (server, sites, a project admin, a member) and
     `nvflare provision` builds the startup kits; a second project, another root CA, gives
     the rogue site's kit for the security checks; a --site-policy goes into that site's kit,
     <kit>/local/disclosure_policy.json, where its site admin would put it (docs/site-policy.md)
  2. the tracking host: PostgreSQL (Debian's packages, run as the postgres user, data in
     DIR/tracking) and `mlflow server` with basic auth on it, serving its own artifacts
  3. the FL server and the sites start from their kits in their namespaces (the server alone
     gets the MLflow credentials, in its environment); the admin submits
     jobs/hello-lightning-mlflow with the project admin's kit, waits and downloads the result
  4. the MLflow tree is compared with a simulator run of the same settings (runs, params,
     series point counts), and the security checks run (each prints one line)
  5. everything is torn down: processes by PID, namespaces by name; also after a failure

Needs root (network namespaces); without that right it says so in one line and does nothing.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

from fl_lightning_mlflow.site.disclosure_policy import POLICY_FILE
from flctl import netns, processes
from flctl.errors import CliError, default_data_root, positive_int
from flctl.local_postgres import cannot_run
from flctl.mlflow_server import CREDENTIAL_VARS
from flctl.policy import place as place_policies
from flctl.policy import site_policy
from flctl.project import provision, write_project
from flctl.rehearsal_checks import CHECKS, CredentialScan
from flctl.rehearsal_compare import Comparison, compare_contents
from flctl.rehearsal_federation import Federation
from flctl.rehearsal_hosts import (
    ADMIN_ADDR,
    LINK_SERVER,
    LINK_TRACKING,
    ROGUE_ADDR,
    SERVER_ADDR,
    SERVER_HOST,
    TRACKING_HOST,
    TRACKING_PORT,
    description,
    site_name,
)
from flctl.rehearsal_tracking import TrackingHost

__all__ = ["CHECKS", "Rehearsal", "compare_contents", "preconditions", "rehearse"]  # what tests and callers use
OWN_FOLDERS = ("project", "kits", "rogue", "tracking", "admin", "logs", "simulator")


def say(msg):
    print(msg, flush=True)


def preconditions() -> str | None:
    """None when the rehearsal can run here, else the one-line reason."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run it as root, e.g. in a CI container or with sudo)"
    why = netns.cannot_create()
    if why:
        return why
    return cannot_run()  # PostgreSQL as the postgres user, and MLflow's driver for it


class Rehearsal(TrackingHost, Federation, CredentialScan, Comparison):
    """The rehearsal's hosts and folders, its kits, and its start and teardown; the steps in
    between are its parts: flctl.rehearsal_tracking, _federation, _checks and _compare."""

    def __init__(
        self,
        folder="/tmp/nvflare/rehearsal",
        sites=2,
        rounds=1,
        epochs=1,
        data_root=None,
        timeout=1800,
        say=say,
        site_policies=None,
    ):
        self.folder = Path(folder).expanduser().resolve()
        self.site_policies = dict(site_policies or {})  # site -> disclosure policy file, into its kit
        self.sites, self.rounds, self.epochs, self.timeout, self.say = sites, rounds, epochs, timeout, say
        self.data_root = default_data_root(data_root, True)
        self.tracking = self.folder / "tracking"
        self.logs = self.folder / "logs"
        self.credentials = self.tracking / "mlflow" / "credentials"
        self.tracking_uri = f"http://{TRACKING_HOST}:{TRACKING_PORT}"
        hosts = {"server": (SERVER_ADDR, [SERVER_HOST]), "admin": (ADMIN_ADDR, ["admin.rehearsal"])}
        for i in range(1, sites + 1):
            hosts[site_name(i)] = (f"10.213.0.{10 + i}", [f"{site_name(i)}.rehearsal"])
        hosts["rogue"] = (ROGUE_ADDR, ["rogue.rehearsal"])
        self.network = netns.Network(hosts, ("server", LINK_SERVER, "tracking", LINK_TRACKING, [TRACKING_HOST]))
        self.procs = {}  # name -> Popen of what this rehearsal started
        self.prod = self.rogue_prod = None
        self.mlflow = None
        self.scan = {"scans": 0, "processes": 0, "holders": {}}
        self.job_id = None
        self.report = {}

    def in_ns(self, host, argv, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.network.exec_prefix(host), *map(str, argv)], capture_output=True, text=True, **kw)

    def base_env(self) -> dict:
        return {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}

    def launch(self, name, host, argv, env, cwd=None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "a") as log:
            proc = subprocess.Popen(
                [*self.network.exec_prefix(host), *map(str, argv)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,  # Ctrl-C in the terminal reaches flctl only; it ends these
            )
        self.procs[name] = proc
        return proc

    def provision(self):
        project = write_project(description(self.sites), self.folder / "project" / "project.yml")
        self.prod = provision(project, self.folder / "kits")
        self.say(f"rehearse: startup kits in {self.prod} (project.yml: {project})")
        place_policies(self.site_policies, lambda site: self.prod / site / "local" / POLICY_FILE)
        # Another provisioning, another root CA: what a stranger's kit looks like.
        rogue = description(1, name="rogue")
        rogue["sites"] = [{"name": "site-1", "org": "hospital_a"}]
        rogue_yml = write_project(rogue, self.folder / "rogue" / "project.yml")
        self.rogue_prod = provision(rogue_yml, self.folder / "rogue")

    def org_of(self, name) -> str:
        import yaml

        project = yaml.safe_load((self.folder / "project" / "project.yml").read_text())
        return next(p["org"] for p in project["participants"] if p["name"] == name)

    def site_hosts(self) -> list:
        return [site_name(i) for i in range(1, self.sites + 1)]

    def down(self):
        if self.mlflow is not None:
            self.mlflow.stop()
        for name, proc in reversed(list(self.procs.items())):
            if proc is not None and proc.poll() is None:
                processes.end([proc.pid], grace=10 if name == "server" else 5)
            if proc is not None:
                proc.wait()
        self.procs.clear()
        left = self.network.down()
        if left:
            raise CliError(f"teardown left: {'; '.join(left)}")
        self.say("rehearse: torn down (processes ended, namespaces deleted)")

    def up(self):
        why = preconditions()
        if why:
            raise CliError(why)
        # A rerun starts from scratch (new kits, an empty database): what an earlier run left is
        # ended first, then its folders go; only the rehearsal's own, never the whole --folder.
        left = self.network.down()
        if left:
            raise CliError(f"an earlier rehearsal could not be ended: {'; '.join(left)}")
        for name in OWN_FOLDERS:
            shutil.rmtree(self.folder / name, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.network.up()
        self.say(f"rehearse: hosts up: {', '.join(self.network.names())}")
        self.provision()
        self.start_tracking()
        self.start_federation()


def rehearse(folder, sites, rounds, epochs, timeout, compare=True, say=say, site_policies=None) -> dict:
    started = time.monotonic()
    r = Rehearsal(folder, sites, rounds, epochs, timeout=timeout, say=say, site_policies=site_policies)
    failed = []
    try:
        r.up()
        r.run_job()
        r.report["job_seconds"] = round(time.monotonic() - started)
        say(f"rehearse: hosts up, job run and downloaded in {r.report['job_seconds']} s")
        for name, check in CHECKS.items():
            ok, line = check(r)
            say(f"check {'PASS' if ok else 'FAIL'}: {name}: {line}")
            if not ok:
                failed.append(name)
        if compare:
            diffs = r.compare()
            say(f"rehearse: MLflow tree: {r.report['comparison']}")
            for line in diffs:
                say(f"rehearse:   {line}")
            if diffs:
                failed.append("comparison with the simulator")
    except BaseException:
        # The failure on its way out is the one to see; a teardown problem after it is one more line.
        try:
            r.down()
        except Exception as e:  # noqa: BLE001 - said, so the original failure stays the one raised
            say(f"rehearse: also: {e}")
        raise
    r.down()
    r.report["seconds"] = round(time.monotonic() - started)
    say(f"rehearse: done in {r.report['seconds']} s")
    if failed:
        raise CliError(f"failed: {', '.join(failed)}")
    return r.report


def register(subparsers) -> None:
    p = subparsers.add_parser("rehearse", help="rehearse a provisioned deployment in namespaces", description=__doc__)
    p.add_argument("--folder", default="/tmp/nvflare/rehearsal", help="everything goes here (default %(default)s)")
    p.add_argument("--sites", type=positive_int, default=2, help="number of sites (default 2)")
    p.add_argument("--rounds", type=positive_int, default=1, help="FL rounds (default 1)")
    p.add_argument("--epochs", type=positive_int, default=1, help="local epochs (default 1)")
    p.add_argument("--timeout", type=positive_int, default=1800, help="seconds to wait for the job (default 1800)")
    p.add_argument("--no-compare", action="store_true", help="skip the simulator run and the comparison")
    p.add_argument("--teardown", action="store_true", help="only end what an earlier, killed run left")
    p.add_argument("--site-policy", type=site_policy, action="append", metavar="SITE=FILE",
                   help="a site's disclosure policy, placed in its kit's local/ folder (repeat per site)")  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    if args.teardown:
        left = netns.Network({}, prefix=netns.PREFIX).down()  # every flr-* namespace and its processes
        if left:
            raise CliError(f"teardown left: {'; '.join(left)}")
        print("rehearse: nothing of an earlier rehearsal is left")
        return 0
    policies = dict(args.site_policy or [])
    compare = not args.no_compare
    rehearse(args.folder, args.sites, args.rounds, args.epochs, args.timeout, compare, site_policies=policies)
    return 0
