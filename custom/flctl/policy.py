"""A site's disclosure policy: what of a site's stream may leave it (docs/site-policy.md).

    flctl policy init FILE [--name NAME] [--force]
    flctl policy check FILE

init writes a starting policy that lets out what leaves without one, every key spelt out for
the site admin to tighten. check reads one and prints a summary line of what it lets out, or one
line per problem on stderr (exit 1). The site reads its policy from its own local/ folder:
<site kit>/local/disclosure_policy.json (a provisioned or POC site), or, in the simulator,
<workspace>/local/disclosure_policy.<site>.json (flctl simulate --site-policy SITE=FILE puts it there).
"""

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from fl_lightning_mlflow.site.disclosure_policy import PolicyError, build, load_json, problems_of, starting_policy
from flctl.errors import CliError


def init(path, name: str | None = None, force: bool = False) -> Path:
    path = Path(path).expanduser()
    if path.exists() and not force:
        raise CliError(f"{path} exists; --force to replace it")
    if path.suffix in (".yml", ".yaml"):  # a .yml under a job's app/custom breaks `nvflare job submit`
        raise CliError(f"{path}: a policy is JSON; name it .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(starting_policy(name or path.stem), indent=2) + "\n")
    return path


def check(path) -> tuple:
    """(the summary line, []) for a usable policy, else (None, one line per problem)."""
    path = Path(path).expanduser()
    try:
        data = load_json(path)
    except PolicyError as e:
        return None, [str(e)]
    problems = problems_of(data)
    if problems:
        return None, [f"{path}: {problem}" for problem in problems]
    return summary(build(data, path), path), []


def summary(policy, path) -> str:
    """What the policy lets out, in one line."""
    parts = [
        f"metrics {names(policy.metrics)}",
        f"params {names(policy.params)}",
        f"tags {names(policy.tags)}",
        f"datasets {policy.disclose}" + (f" (bins under {policy.min_label_count} suppressed)"
                                          if policy.min_label_count and policy.disclose == "full" else ""),
        f"system metrics {'yes' if policy.system_metrics else 'no'}",
        f"text artifacts {'yes' if policy.text_artifacts else 'no'}",
    ]  # fmt: skip
    if policy.min_validation_samples:
        parts.append(f"validation metrics from {policy.min_validation_samples} samples")
    if policy.transforms():
        parts.append(policy.transforms())
    return f"{path}: policy {policy.name!r} ({policy.digest}) lets out " + "; ".join(parts)


def names(rule) -> str:
    allow = "all" if rule.allow == ("*",) else ", ".join(rule.allow) or "none"
    return allow + (f" except {', '.join(rule.deny)}" if rule.deny else "")


def place(site_policies: dict | None, target: Callable[[str], Path]) -> None:
    """Each {site: policy file} checked, then copied to target(site): the file that site reads
    (its local/ folder). CliError with the first problem of a bad one, before anything is copied."""
    for site, path in (site_policies or {}).items():
        _, problems = check(path)
        if problems:
            more = f" (and {len(problems) - 1} more: flctl policy check {path})" if len(problems) > 1 else ""
            raise CliError(f"{site}'s policy: {problems[0]}{more}")
    for site, path in (site_policies or {}).items():
        dest = target(site)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(path).expanduser(), dest)


def leaked(metric_names, policy) -> list:
    """The metric names on a site's MLflow run that its policy would have kept on the site (the
    validation sample count aside: it is the site's to know)."""
    from fl_lightning_mlflow.site.disclosure_rule import DisclosureRule

    rule = DisclosureRule(policy, val_samples=sys.maxsize)
    return sorted(name for name in metric_names if not rule.metrics({name: 0.0}))


def site_policy(text: str) -> tuple:
    """--site-policy SITE=FILE as (site, file)."""
    site, _, path = text.partition("=")
    if not site or not path:
        raise argparse.ArgumentTypeError(f"must be SITE=FILE, got {text!r}")
    return site, path


def register(subparsers) -> None:
    p = subparsers.add_parser("policy", help="write or check a site's disclosure policy", description=__doc__)
    p.add_argument("command", choices=("init", "check"))
    p.add_argument("file", help="the policy file (JSON)")
    p.add_argument("--name", help="init: the policy's name, shown on the site's MLflow run (default: the file's)")
    p.add_argument("--force", action="store_true", help="init: replace an existing file")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.command == "init":
        path = init(args.file, args.name, args.force)
        print(f"policy: wrote {path}; edit it, then: flctl policy check {path}")
        return 0
    line, problems = check(args.file)
    for problem in problems:
        print(problem, file=sys.stderr)
    if line:
        print(line)
    return 1 if problems else 0
