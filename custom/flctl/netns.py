"""Hosts on one machine: a Linux network namespace per host, joined like separate machines.

Every namespace is named PREFIX + host (flr-server, flr-site-1, ...) so teardown is exact.
A "switch" namespace (PREFIX + "lan") holds a bridge; each LAN host gets a veth pair whose
one end is its eth0 and whose other end sits on that bridge. The tracking host is not on the
LAN: one more veth pair joins it to the FL server's namespace alone, and the server forwards
nothing (ip_forward=0), so no other host has a route to it. All interfaces are created inside
the namespaces, never in the machine's own: deleting the namespaces removes them all.
Host names resolve through /etc/netns/<namespace>/hosts, which `ip netns exec` mounts over
/etc/hosts for the commands it runs.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

from flctl import processes

PREFIX = "flr-"
ETC_NETNS = Path("/etc/netns")


class NetnsError(RuntimeError):
    pass


def ip(*args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *map(str, args)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(map(str, args))}: {done.stderr.strip() or done.returncode}")
    return done


def cannot_create() -> str | None:
    """None when this process may create network namespaces, else the one-line reason why not."""
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is missing"
    probe = f"{PREFIX}probe-{os.getpid()}"
    done = ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return f"cannot create network namespaces (needs root or CAP_SYS_ADMIN): {why}"
    ip("netns", "del", probe, check=False)
    return None


def ours() -> list:
    """Every namespace with our prefix (also those an earlier, killed run left)."""
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def ns_pids(ns: str) -> list:
    done = ip("netns", "pids", ns, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


class Network:
    """hosts: {host: (address on the LAN, [host names])}; private: (host, address, peer, address,
    [peer's names]) a point-to-point link between host and peer, the peer on no LAN."""

    LAN = "10.213.0.0/24"

    def __init__(self, hosts: dict, private=None, prefix=PREFIX):
        self.hosts, self.private, self.prefix = hosts, private, prefix
        self.lan = prefix + "lan"

    def ns(self, host: str) -> str:
        return self.prefix + host

    def names(self) -> list:
        hosts = list(self.hosts) + ([self.private[2]] if self.private else [])
        return [self.lan, *(self.ns(h) for h in hosts)]

    def exec_prefix(self, host: str) -> list:
        return ["ip", "netns", "exec", self.ns(host)]

    def hosts_file(self, host: str) -> str:
        lines = ["127.0.0.1 localhost"]
        lines += [f"{addr} {' '.join(names)}" for addr, names in self.hosts.values()]
        if self.private and host == self.private[0]:
            lines.append(f"{self.private[3]} {' '.join(self.private[4])}")
        if self.private and host == self.private[2]:
            lines.append(f"{self.private[1]} {' '.join(self.hosts[self.private[0]][1])}")
        return "\n".join(lines) + "\n"

    def up(self) -> None:
        self.down()  # idempotent: whatever an earlier run left goes first
        for name in self.names():
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
        ip("-n", self.lan, "link", "set", "br0", "up")
        for i, (host, (addr, _)) in enumerate(self.hosts.items()):
            ns, port = self.ns(host), f"p{i}"
            ip("-n", self.lan, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", self.lan, "link", "set", port, "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        hosts = list(self.hosts)
        if self.private:
            host, addr, peer, peer_addr, _ = self.private
            ip(
                "-n",
                self.ns(host),
                "link",
                "add",
                "trk0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                self.ns(peer),
            )
            ip("-n", self.ns(host), "addr", "add", f"{addr}/30", "dev", "trk0")
            ip("-n", self.ns(host), "link", "set", "trk0", "up")
            ip("-n", self.ns(peer), "addr", "add", f"{peer_addr}/30", "dev", "eth0")
            ip("-n", self.ns(peer), "link", "set", "eth0", "up")
            # The server is no router: a site that sent it a packet for the tracking link
            # (it has no such route anyway) would see it dropped.
            sysctl = subprocess.run(
                [*self.exec_prefix(host), "sysctl", "-qw", "net.ipv4.ip_forward=0"], capture_output=True, text=True
            )
            if sysctl.returncode != 0:
                raise NetnsError(f"sysctl ip_forward=0 in {self.ns(host)}: {sysctl.stderr.strip()}")
            hosts.append(peer)
        for host in hosts:
            folder = ETC_NETNS / self.ns(host)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(self.hosts_file(host))

    def end_processes(self, grace: float = 5) -> list:
        """Ends every process in our namespaces by PID (TERM, then KILL); returns survivors."""
        names = set(self.names()) | {n for n in ours() if n.startswith(self.prefix)}
        pids = sorted({p for name in names for p in ns_pids(name)} - {os.getpid()})
        return processes.end(pids, grace) if pids else []

    def down(self) -> list:
        """Ends the processes, deletes the namespaces (and with them every interface) and the
        hosts files; returns what could not be removed, as lines."""
        left = []
        survivors = self.end_processes()
        if survivors:
            left.append(f"processes still alive: {' '.join(map(str, survivors))}")
        names = set(self.names()) | {n for n in ours() if n.startswith(self.prefix)}
        for name in sorted(names):
            if name in ours():
                done = ip("netns", "del", name, check=False)
                if done.returncode != 0:
                    left.append(f"namespace {name}: {done.stderr.strip()}")
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
        try:
            ETC_NETNS.rmdir()  # only if empty: someone else's namespaces keep theirs
        except OSError:
            pass
        return left


def wait_port(prefix: list, host: str, port: int, timeout: float, alive=lambda: True) -> bool:
    """True once host:port accepts a TCP connection as seen from the namespace of prefix."""
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=2).close()"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if subprocess.run([*prefix, _python(), "-c", probe], capture_output=True).returncode == 0:
            return True
        time.sleep(1)
    return False


def _python() -> str:
    import sys

    return sys.executable


def connect(prefix: list, host: str, port: int, timeout: float = 3) -> str:
    """From a namespace: "connected", or the error a TCP connection to host:port ends in."""
    code = (
        "import socket,sys\n"
        f"try:\n socket.create_connection(({host!r}, {port}), timeout={timeout}).close(); print('connected')\n"
        "except OSError as e:\n print(f'{type(e).__name__}: {e}')\n"
    )
    done = subprocess.run([*prefix, _python(), "-c", code], capture_output=True, text=True, timeout=timeout + 30)
    return last_line(done)


def last_line(done: subprocess.CompletedProcess) -> str:
    """What a probe snippet printed last (its verdict), or how it ended when it printed nothing."""
    return (done.stdout.strip() or done.stderr.strip() or f"exit {done.returncode}").splitlines()[-1]
