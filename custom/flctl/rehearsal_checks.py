"""The rehearsal's security checks, each one line, and the credential scan they judge (flctl rehearse, step 4).

CredentialScan is a part of flctl.rehearsal.Rehearsal: it uses the rehearsal's network, prod,
site_hosts and tracking_credentials.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fl_lightning_mlflow.common.protocol import POLICY_DIGEST_TAG
from fl_lightning_mlflow.site.disclosure_policy import read_policy
from flctl import netns, processes
from flctl.errors import CliError
from flctl.mlflow_server import CREDENTIAL_VARS
from flctl.outcome import read_stats
from flctl.policy import leaked
from flctl.rehearsal_hosts import (
    FED_PORT,
    LINK_TRACKING,
    MEMBER,
    ROGUE_ADDR,
    SERVER_HOST,
    TRACKING_HOST,
    TRACKING_PORT,
    site_name,
)

if TYPE_CHECKING:
    from flctl.rehearsal import Rehearsal


class CredentialScan:
    """Which processes and files of the rehearsal hold the MLflow credentials (self.scan)."""

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
