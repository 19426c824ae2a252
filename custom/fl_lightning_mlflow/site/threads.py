"""How many torch threads a site process should use.

Several sites may share one machine (the FLARE simulator runs its clients as processes on one
host; a POC deployment likewise). Each torch process defaults to one thread per core, so two
sites on four cores would run eight busy threads and slow each other down. A site therefore
takes its share: usable cores // sites sharing this host, at least 1.

Sites sharing this host:
  FL_SITES_PER_HOST (environment)  when set, that number, wherever the site runs;
  in the simulator                 as many as it runs at once: min(-t/--threads, number of
                                   clients from -n/--n_clients or -c/--clients), read from the
                                   simulator's command line (a worker process names its parent
                                   with --parent_pid);
  otherwise                        1 (a deployed site has the machine to itself).
`threads_per_site` > 0 in the job's config overrides all of this.
"""

import os
import sys
from pathlib import Path

SITES_PER_HOST_ENV = "FL_SITES_PER_HOST"


def torch_threads(threads_per_site: int = 0, simulate: bool = False, worker_argv=None) -> int:
    """The thread count for this site: threads_per_site if > 0, else its share of the usable cores."""
    if threads_per_site > 0:
        return threads_per_site
    return max(1, usable_cores() // sites_on_this_host(simulate, worker_argv))


def usable_cores() -> int:
    """Cores this process may run on (a CPU affinity mask or container cpuset counts; os.cpu_count() does not)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def sites_on_this_host(simulate: bool = False, worker_argv=None) -> int:
    value = os.environ.get(SITES_PER_HOST_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{SITES_PER_HOST_ENV} must be an integer >= 1, got {value!r}")
        return int(value)
    if not simulate:
        return 1
    return simulator_concurrency(sys.argv if worker_argv is None else worker_argv)


def simulator_concurrency(worker_argv) -> int:
    """How many clients the simulator that started this worker runs at once; 1 if unknown."""
    try:
        parent = int(worker_argv[worker_argv.index("--parent_pid") + 1])
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
        argv = [a.decode() for a in argv if a]
    except (ValueError, IndexError, OSError):
        return 1
    threads = option(argv, "-t", "--threads")
    n_clients = option(argv, "-n", "--n_clients")
    clients = option(argv, "-c", "--clients")
    try:
        # Neither -n nor -c: the clients come from the job's deploy map; assume the 2 these
        # jobs run. No -t: the simulator runs one client at a time.
        n = int(n_clients) if n_clients else (len(clients.split(",")) if clients else 2)
        return max(1, min(int(threads) if threads else 1, n))
    except ValueError:
        return 1


def option(argv, *names):
    """The value of the first of names in argv, as "-t 2" or "--threads=2"; None if absent."""
    for i, a in enumerate(argv[:-1]):
        if a in names:
            return argv[i + 1]
    for a in argv:
        for n in names:
            if n.startswith("--") and a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None
