"""The rehearsal's MLflow tree against a simulator run of the same settings (flctl rehearse, step 4).

Comparison is a part of flctl.rehearsal.Rehearsal: it uses the rehearsal's network, base_env,
tracking_credentials, tracking_uri, folder, data_root, sites, rounds, epochs, site_policies,
report and say.
"""

import json
import subprocess
import sys

from flctl.errors import DEFAULT_JOB, CliError
from flctl.rehearsal_hosts import EXPERIMENT

TIME_SAMPLED = "system/"


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


class Comparison:
    """The deployed tree (read on the FL server's host), the simulator's, and their differences."""

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
