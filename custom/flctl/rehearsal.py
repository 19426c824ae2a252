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

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from fl_lightning_mlflow.common.protocol import POLICY_DIGEST_TAG
from fl_lightning_mlflow.site.disclosure_policy import POLICY_FILE, read_policy
from flctl import netns, processes
from flctl.errors import DEFAULT_JOB, CliError, default_data_root, positive_int
from flctl.mlflow_server import CREDENTIAL_VARS, MlflowServer, read_env_file, write_secret
from flctl.outcome import read_stats
from flctl.poc import Poc
from flctl.policy import leaked, site_policy
from flctl.policy import place as place_policies
from flctl.project import provision, write_project

SERVER_HOST = "flserver.rehearsal"
TRACKING_HOST = "mlflow.rehearsal"
SERVER_ADDR, ADMIN_ADDR, ROGUE_ADDR = "10.213.0.1", "10.213.0.5", "10.213.0.99"
LINK_SERVER, LINK_TRACKING = "10.213.1.1", "10.213.1.2"
FED_PORT, TRACKING_PORT, PG_PORT = 8002, 5000, 5432
PROJECT_ADMIN, MEMBER = "admin@coordinator.rehearsal", "member@hospital-a.rehearsal"
EXPERIMENT = "rehearsal"
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
TIME_SAMPLED = "system/"
OWN_FOLDERS = ("project", "kits", "rogue", "tracking", "admin", "logs", "simulator")


def say(msg):
    print(msg, flush=True)


def site_name(i: int) -> str:
    return f"site-{i}"


def description(sites: int, name="rehearsal", server_org="coordinator") -> dict:
    orgs = ["hospital_a", "hospital_b", "hospital_c", "bank_d"]
    return {
        "name": name,
        "server": {"host": SERVER_HOST, "org": server_org, "port": FED_PORT},
        "sites": [{"name": site_name(i), "org": orgs[(i - 1) % len(orgs)]} for i in range(1, sites + 1)],
        "admins": [
            {"email": PROJECT_ADMIN, "org": server_org, "role": "project_admin"},
            {"email": MEMBER, "org": "hospital_a", "role": "member"},
        ],
    }


def pg_bin() -> Path | None:
    found = sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")))
    return next((p for p in reversed(found) if (p / "initdb").is_file()), None)


def preconditions() -> str | None:
    """None when the rehearsal can run here, else the one-line reason."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run it as root, e.g. in a CI container or with sudo)"
    why = netns.cannot_create()
    if why:
        return why
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing: it starts PostgreSQL as the postgres user"
    if pg_bin() is None:
        return "PostgreSQL is not installed (apt-get install -y postgresql; scripts/setup.sh --postgres does it)"
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        return "no 'postgres' user (Debian's postgresql package creates it)"
    try:
        import psycopg2  # noqa: F401 - MLflow's PostgreSQL driver
    except ImportError:
        return "psycopg2 is missing (pip install -r requirements.txt)"
    return None


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


class Rehearsal:
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

    # ----- helpers ------------------------------------------------------------------------------
    def in_ns(self, host, argv, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.network.exec_prefix(host), *map(str, argv)], capture_output=True, text=True, **kw)

    def as_postgres(self, host=None) -> list:
        # setpriv execs (no fork, unlike runuser): the PID we keep is PostgreSQL's own.
        drop = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
        return [*(self.network.exec_prefix(host) if host else []), *drop]

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

    def tracking_credentials(self) -> dict:
        """The MLFLOW_TRACKING_* lines the tracking server's first start wrote: the FL server's alone."""
        return read_env_file(self.credentials)

    # ----- 1. kits ----------------------------------------------------------------------------------
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

    # ----- 2. tracking host -------------------------------------------------------------------------
    def start_tracking(self):
        pg = pg_bin()
        data, sock = self.tracking / "pgdata", self.tracking / "pgsock"
        for folder in (self.tracking, data, sock):
            folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(data, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
        os.chmod(data, 0o700)
        os.chmod(sock, 0o700)  # the socket: for root and postgres only
        if not (data / "PG_VERSION").exists():
            # Local socket trusted (folder mode 700); TCP, even on 127.0.0.1, by password.
            init = subprocess.run(
                [*self.as_postgres(), pg / "initdb", "-D", data, "-U", "postgres", "-E", "UTF8"]
                + ["--auth-local=trust", "--auth-host=scram-sha-256"],
                capture_output=True,
                text=True,
            )
            if init.returncode != 0:
                raise CliError(f"initdb failed: {init.stderr.strip().splitlines()[-1:]}")
        pg_cmd = [pg / "postgres", "-D", data, "-k", sock, "-p", str(PG_PORT), "-c", "listen_addresses=127.0.0.1"]
        self.launch("postgres", "tracking", [*self.as_postgres(), *pg_cmd], self.base_env())
        deadline = time.monotonic() + 60
        while self.as_ready(pg, sock) != 0:
            if time.monotonic() > deadline or self.procs["postgres"].poll() is not None:
                raise CliError(f"PostgreSQL did not start; see {self.logs / 'postgres.log'}")
            time.sleep(0.5)
        pgpass = self.tracking / "pgpass"
        if not pgpass.exists():
            password = secrets.token_urlsafe(24)
            # The password travels on psql's stdin, never a command line.
            sql = f"CREATE ROLE mlflow LOGIN PASSWORD '{password}';\nCREATE DATABASE mlflow OWNER mlflow;\n"
            done = subprocess.run(
                [*self.as_postgres("tracking"), pg / "psql", "-h", sock, "-p", str(PG_PORT), "-U", "postgres"]
                + ["-v", "ON_ERROR_STOP=1", "-q", "-f", "-"],
                input=sql,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise CliError(f"could not create MLflow's database: {done.stderr.strip()}")
            write_secret(pgpass, f"127.0.0.1:{PG_PORT}:mlflow:mlflow:{password}\n")
        self.mlflow = MlflowServer(
            self.tracking / "mlflow",
            TRACKING_PORT,
            auth=True,
            say=self.say,
            store=f"postgresql+psycopg2://mlflow@127.0.0.1:{PG_PORT}/mlflow",
            host=LINK_TRACKING,
            prefix=self.network.exec_prefix("tracking"),
            env={"PGPASSFILE": str(pgpass)},
            healthy=self.tracking_healthy,
            # MLflow answers 403 to a Host header it does not know (DNS-rebinding protection):
            # the name the FL server uses must be allowed.
            args=[
                "--allowed-hosts",
                f"{TRACKING_HOST},{TRACKING_HOST}:{TRACKING_PORT},{LINK_TRACKING}:{TRACKING_PORT}",
            ],
        )
        self.mlflow.start(timeout=180)
        self.procs["mlflow"] = self.mlflow.proc

    def as_ready(self, pg, sock) -> int:
        return subprocess.run(
            [*self.as_postgres("tracking"), pg / "pg_isready", "-q", "-h", sock, "-p", str(PG_PORT)],
            capture_output=True,
        ).returncode

    def tracking_healthy(self, uri) -> bool:
        """/health, asked from the FL server's namespace: the only one with a route to it."""
        code = f"import urllib.request as u; u.urlopen('{uri}/health', timeout=2)"
        return self.in_ns("server", [sys.executable, "-c", code]).returncode == 0

    # ----- 3. the federation ------------------------------------------------------------------------
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

    # ----- security: who holds the tracking credentials --------------------------------------------
    def scan_while(self, stop):
        while not stop.is_set():
            self.scan_credentials()
            stop.wait(3)

    def scan_credentials(self) -> dict:
        """Every process in every rehearsal namespace: does its environment or command line hold
        the MLflow password or username variable? Accumulated into self.scan."""
        password = self.tracking_credentials().get("MLFLOW_TRACKING_PASSWORD", "")
        needles = [n.encode() for n in (password, *CREDENTIAL_VARS) if n]
        for ns in self.network.names():
            for pid in netns.ns_pids(ns):
                try:
                    blobs = {
                        "environ": Path(f"/proc/{pid}/environ").read_bytes(),
                        "cmdline": Path(f"/proc/{pid}/cmdline").read_bytes(),
                    }
                except OSError:
                    continue
                self.scan["processes"] += 1
                for where, blob in blobs.items():
                    if any(n in blob for n in needles):
                        key = f"{ns} {pid} {where}: {processes.cmdline(pid)[:90]}"
                        self.scan["holders"][key] = ns
        self.scan["scans"] += 1
        return self.scan

    def site_hosts(self) -> list:
        return [site_name(i) for i in range(1, self.sites + 1)]

    def files_with_password(self) -> list:
        """Files under the site kits (their job workspaces included) that hold the password."""
        password = self.tracking_credentials().get("MLFLOW_TRACKING_PASSWORD", "").encode()
        found = []
        for site in self.site_hosts():
            for path in (self.prod / site).rglob("*"):
                try:
                    if path.is_file() and password in path.read_bytes():
                        found.append(str(path))
                except OSError:
                    continue
        return found

    # ----- 4. comparison ----------------------------------------------------------------------------
    def deployed_contents(self) -> dict:
        """flctl contents, run on the FL server's host (the only one that reaches the tracking
        server) with the server's credentials."""
        env = {**self.base_env(), **self.tracking_credentials()}
        done = subprocess.run(
            [*self.network.exec_prefix("server"), sys.executable, "-m", "flctl", "contents"]
            + [self.tracking_uri, EXPERIMENT],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        if done.returncode != 0:
            raise CliError(f"could not read the tracking server's runs: {done.stderr.strip()[-300:]}")
        return json.loads(done.stdout)

    def simulator_contents(self) -> dict:
        from flctl.mlflow_contents import contents
        from flctl.simulate import simulate

        self.say("rehearse: the simulator with the same settings, for the comparison")
        sim = simulate(
            DEFAULT_JOB,
            self.folder / "simulator",
            self.data_root,
            self.sites,
            self.rounds,
            self.epochs,
            offline=True,
            experiment=EXPERIMENT,
            evaluate=False,
            say=lambda m: None,
            show=None,
            site_policies=self.site_policies,  # the same sites' policies: the same tree expected
        )
        return contents(f"sqlite:///{sim.server_dir / 'mlflow.db'}", EXPERIMENT)

    def compare(self) -> list:
        deployed, simulated = self.deployed_contents(), self.simulator_contents()
        (self.folder / "contents-deployed.json").write_text(json.dumps(deployed, indent=1, sort_keys=True))
        (self.folder / "contents-simulator.json").write_text(json.dumps(simulated, indent=1, sort_keys=True))
        diffs = compare_contents(deployed, simulated)
        runs = deployed["runs"]
        points = sum(sum(r["series"].values()) for r in runs.values())
        self.report["comparison"] = (
            f"{len(runs)} runs ({', '.join(sorted(runs))}), "
            f"{sum(len(r['params']) for r in runs.values())} params, "
            f"{sum(len(r['series']) for r in runs.values())} series, {points} points: "
            + ("same as the simulator's" if not diffs else f"{len(diffs)} difference(s)")
        )
        return diffs

    # ----- 5. teardown ------------------------------------------------------------------------------
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


def compare_contents(a: dict, b: dict) -> list:
    """Differences in runs, params and series point counts, one line each."""
    diffs = []
    ra, rb = a["runs"], b["runs"]
    for name in sorted(set(ra) ^ set(rb)):
        diffs.append(f"run {name}: only in the {'deployment' if name in ra else 'simulator'}")
    for name in sorted(set(ra) & set(rb)):
        pa, pb = ra[name]["params"], rb[name]["params"]
        for key in sorted(set(pa) | set(pb)):
            if pa.get(key) != pb.get(key):
                diffs.append(f"run {name}: param {key}: {pa.get(key)!r} vs {pb.get(key)!r}")
        sa, sb = ra[name]["series"], rb[name]["series"]
        for key in sorted(set(sa) | set(sb)):
            # system/* metrics are sampled by the clock: their count follows the run's duration
            # on this machine, not the job's settings; present in both is what can be compared.
            if key.startswith(TIME_SAMPLED) and key in sa and key in sb:
                continue
            if sa.get(key) != sb.get(key):
                diffs.append(f"run {name}: series {key}: {sa.get(key)} vs {sb.get(key)} points")
    return diffs


# ----- security checks: each returns (passed, one line) ---------------------------------------------
def check_site_cannot_reach_tracking(r: Rehearsal) -> tuple:
    from_server = netns.connect(r.network.exec_prefix("server"), LINK_TRACKING, TRACKING_PORT)
    seen = {h: netns.connect(r.network.exec_prefix(h), LINK_TRACKING, TRACKING_PORT) for h in r.site_hosts()}
    ok = from_server == "connected" and all(v != "connected" for v in seen.values())
    parts = "; ".join(f"{h} -> {LINK_TRACKING}:{TRACKING_PORT}: {v}" for h, v in seen.items())
    return ok, f"{parts}; server -> tracking: {from_server}"


def check_credentials_only_on_server(r: Rehearsal) -> tuple:
    r.scan_credentials()
    holders = r.scan["holders"]
    elsewhere = [k for k, ns in holders.items() if ns != r.network.ns("server")]
    on_server = sorted({k.split()[1]: k for k, ns in holders.items() if ns == r.network.ns("server")}.values())
    ok = not elsewhere and bool(on_server)
    # which FL server processes: its parent and the job's server process
    kinds = sorted(
        {"job process" if "worker_process" in k or "runner_process" in k else "FL server" for k in on_server}
    )
    line = (
        f"{r.scan['scans']} scans of {r.scan['processes']} process snapshots in {len(r.network.names())} "
        f"namespaces: credentials in the environment of {len(on_server)} process(es) in {r.network.ns('server')} "
        f"({', '.join(kinds)})" + (f"; ELSEWHERE: {elsewhere}" if elsewhere else ", nowhere else")
    )
    found = r.files_with_password()
    if found:
        ok = False
        line += f"; password in site files: {found[:3]}"
    else:
        line += "; not in any file of the site kits or workspaces"
    return ok, line


def check_plaintext_refused(r: Rehearsal) -> tuple:
    code = (
        "import socket\n"
        f"s = socket.create_connection(({SERVER_HOST!r}, {FED_PORT}), timeout=5)\n"
        f"s.sendall(b'GET / HTTP/1.1\\r\\nHost: {SERVER_HOST}\\r\\n\\r\\n')\n"
        "try:\n data = s.recv(200)\nexcept OSError as e:\n data = repr(e).encode()\n"
        "print(repr(data[:60]))\n"
    )
    done = r.in_ns(site_name(1), [sys.executable, "-c", code], timeout=60)
    answer = netns.last_line(done)
    # A TLS endpoint answers plaintext with a TLS alert (0x15 ...) or closes the connection.
    ok = done.returncode == 0 and "HTTP/" not in answer
    handshake = tls_handshake(r, site_name(1), cert=None, ca=r.prod / site_name(1) / "startup" / "rootCA.pem")
    ok = ok and handshake != "ok"
    return ok, f"plaintext HTTP to {SERVER_HOST}:{FED_PORT} got {answer}; TLS without a client certificate: {handshake}"


def tls_handshake(r: Rehearsal, host, cert, ca) -> str:
    """From a namespace: a TLS connection to the FL server, with the given client certificate
    (a kit's startup folder) and CA; "ok" or the error, once the server had its say."""
    load = f"c.load_cert_chain({str(cert / 'client.crt')!r}, {str(cert / 'client.key')!r})\n" if cert else ""
    code = (
        "import socket, ssl\n"
        f"c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.load_verify_locations({str(ca)!r}); c.check_hostname = False\n"
        f"{load}"
        "try:\n"
        f" s = c.wrap_socket(socket.create_connection(({SERVER_HOST!r}, {FED_PORT}), timeout=5))\n"
        # TLS 1.3: the server judges the client certificate after the handshake; a read shows it.
        " s.sendall(b'GET / HTTP/1.1\\r\\n\\r\\n'); s.settimeout(5); d = s.recv(100)\n"
        " print('ok' if d else 'closed by the server')\n"
        "except (OSError, ssl.SSLError) as e:\n print(f'{type(e).__name__}: {e}')\n"
    )
    done = r.in_ns(host, [sys.executable, "-c", code], timeout=60)
    return netns.last_line(done)


def check_rogue_site_refused(r: Rehearsal) -> tuple:
    rogue = r.rogue_prod / "site-1"
    # The rogue certificate, trusting the real CA: the server alone decides.
    handshake = tls_handshake(r, "rogue", cert=rogue / "startup", ca=r.prod / site_name(1) / "startup" / "rootCA.pem")
    # And the rogue kit as it is, run as a site for a while: it must never join.
    proc = r.launch(
        "rogue-site", "rogue", r.fl_command("rogue", rogue, uid="site-1", org="hospital_a"), r.base_env(), rogue
    )
    time.sleep(25)
    processes.end([proc.pid], grace=5)
    proc.wait()
    r.procs.pop("rogue-site", None)
    # The server's own account: a connection from the rogue's address never got in.
    server_log = (r.logs / "server.log").read_text(errors="replace")
    admitted = [line for line in server_log.splitlines() if f"<= {ROGUE_ADDR}:" in line and "is created" in line]
    errors = [line for line in (r.logs / "rogue-site.log").read_text(errors="replace").splitlines() if "ERROR" in line]
    found = re.search(r"\[SSL: (\w+)\]", errors[0]) if errors else None
    reason = f"SSL {found.group(1)}" if found else (errors[0][-100:] if errors else "no error logged")
    ok = handshake != "ok" and not admitted
    return ok, (
        f"rogue certificate (another CA) against the server: {handshake}; rogue site process for 25 s: "
        f"{len(admitted)} connection(s) admitted by the FL server; its own log: {reason}"
    )


def check_member_cannot_submit(r: Rehearsal) -> tuple:
    member = r.admin(kit=MEMBER)
    try:
        member.submit()
    except CliError as e:
        # Only FLARE's refusal of the right counts: any other failure (nothing running, a broken
        # config, the network) says nothing about authorization.
        return "not authorized" in str(e), f"{MEMBER} (role member): {e}"
    return False, f"{MEMBER} (role member) submitted job {member.job_id}"


def check_userinfo_refused(r: Rehearsal) -> tuple:
    uri = f"http://admin:secret@{TRACKING_HOST}:{TRACKING_PORT}"
    deployment = r.admin(tracking_uri=uri)
    try:
        deployment.submit()
    except CliError as e:
        text = str(e)
        return "credentials file" in text and "secret" not in text, text
    return False, f"a URI with user:password@ was submitted as job {deployment.job_id}"


def check_site_policies(r: Rehearsal) -> tuple:
    """Each site's run holds only what its kit's policy lets out, says which policy, and the
    delivery account balances with the withheld counts beside it."""
    if not r.site_policies:
        return True, "no site policy given"
    runs = r.deployed_contents()["runs"]
    delivery = (read_stats(Path(r.report["result"])) or {}).get("delivery", {})
    ok, parts = True, []
    for site, path in sorted(r.site_policies.items()):
        policy, run, row = read_policy(path), runs.get(site, {}), delivery.get(site, {})
        bad = leaked(run.get("series", {}), policy)
        held = {k: n for k, n in (row.get("withheld_by_kind") or {}).items() if n}
        balanced = row.get("sent") == row.get("written") and not row.get("lost")
        ok = ok and not bad and POLICY_DIGEST_TAG in run.get("tags", []) and balanced and bool(held)
        parts.append(
            f"{site}: {len(run.get('series', {}))} series ({', '.join(run.get('series', {}))}), "
            + (f"{len(bad)} its policy keeps: {', '.join(bad)}" if bad else f"all let out by {policy.name!r}")
            + f" ({policy.digest}); withheld {row.get('withheld')} {held}; sent {row.get('sent')}, "
            f"written {row.get('written')}, lost {row.get('lost')}"
        )
    return ok, "; ".join(parts)


CHECKS = {
    "site cannot reach tracking": check_site_cannot_reach_tracking,
    "credentials only on the FL server": check_credentials_only_on_server,
    "FL server refuses plaintext": check_plaintext_refused,
    "site of another CA refused": check_rogue_site_refused,
    "member cannot submit": check_member_cannot_submit,
    "user:password@ URI refused": check_userinfo_refused,
    "site policies held": check_site_policies,
}


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
