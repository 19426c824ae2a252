"""A site's disclosure policy: the JSON file in the site's own local/ folder that says what of its
stream may leave it (applied by site.outbound.DisclosureRule).

The file lives where only the site admin writes: the site's startup kit or POC folder
(<site>/local/disclosure_policy.json), or, in the simulator, whose sites all copy the
workspace's local/ folder, local/disclosure_policy.<site>.json. It is read from the site's
workspace, never from the job, so no job configuration can loosen it. No file: everything leaves,
as before. A file that cannot be read or has a problem stops the site's tasks (one line naming
the file and the problem): a typo must not let out what the admin meant to keep.

Pure Python: no FLARE. The format (every key optional; a missing section lets its kind out):

    {"name": "...",
     "metrics": {"allow": [glob, ...], "deny": [glob, ...],
                 "validation_metrics": [glob, ...], "min_validation_samples": N,
                 "coarsen": {glob: step}, "noise": {glob: {"mechanism": "laplace"|"gaussian", "scale": s}}},
     "params": {"allow": [...], "deny": [...]}, "tags": {"allow": [...], "deny": [...]},
     "datasets": {"disclose": "full"|"counts"|"none", "min_label_count": N},
     "system_metrics": true|false, "text_artifacts": true|false}
"""

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

POLICY_FILE = "disclosure_policy.json"
DISCLOSE = ("full", "counts", "none")
MECHANISMS = ("laplace", "gaussian")
SECTIONS = ("name", "metrics", "params", "tags", "datasets", "system_metrics", "text_artifacts")
NAME_KEYS = ("allow", "deny")
METRIC_KEYS = (*NAME_KEYS, "validation_metrics", "min_validation_samples", "coarsen", "noise")
DATASET_KEYS = ("disclose", "min_label_count")
DIGEST_LENGTH = 16


class PolicyError(ValueError):
    """A policy file that cannot be used: one line, naming the file and the problem."""


@dataclass(frozen=True)
class Names:
    """Which names may leave: one matching an allow pattern and no deny pattern (fnmatch globs,
    case-sensitive)."""

    allow: tuple = ("*",)
    deny: tuple = ()

    def allows(self, name: str) -> bool:
        return matches(name, self.allow) and not matches(name, self.deny)


def matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class Policy:
    name: str
    digest: str
    metrics: Names = Names()
    params: Names = Names()
    tags: Names = Names()
    validation_metrics: tuple = ("val_*", "global_val_*")
    min_validation_samples: int = 0
    coarsen: dict = field(default_factory=dict)  # glob -> step: value rounded to a multiple of it
    noise: dict = field(default_factory=dict)  # glob -> (mechanism, scale)
    disclose: str = "full"
    min_label_count: int = 0
    system_metrics: bool = True
    text_artifacts: bool = True

    def transforms(self) -> str:
        """The noise and coarsening applied, for the site run's tag: mechanisms and scales only."""
        parts = [f"{p}: {mechanism} noise, scale {scale}" for p, (mechanism, scale) in self.noise.items()]
        parts += [f"{p}: rounded to a multiple of {step}" for p, step in self.coarsen.items()]
        return "; ".join(parts)


# ----- finding and reading -------------------------------------------------------------------
def policy_path(site_config_dir, site: str) -> Path | None:
    """The site's policy file in its local/ folder: disclosure_policy.<site>.json (the simulator,
    whose sites share one local/ folder) before disclosure_policy.json; None when there is none."""
    folder = Path(site_config_dir)
    for name in (f"disclosure_policy.{site}.json", POLICY_FILE):
        if (folder / name).is_file():
            return folder / name
    return None


def read_policy(path) -> Policy:
    """The policy in the file, or PolicyError with the file's first problem (all: problems_of)."""
    path = Path(path)
    data = load_json(path)
    problems = problems_of(data)
    if problems:
        more = f" (and {len(problems) - 1} more: flctl policy check {path})" if len(problems) > 1 else ""
        raise PolicyError(f"disclosure policy {path}: {problems[0]}{more}")
    return build(data, path)


def load_json(path: Path):
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"disclosure policy {path}: cannot be read ({type(e).__name__}: {e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PolicyError(f"disclosure policy {path}: not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def digest_of(data) -> str:
    """The policy's content, key order and layout aside: two files that say the same agree."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_LENGTH]


def build(data: dict, path: Path) -> Policy:
    metrics, datasets = data.get("metrics", {}), data.get("datasets", {})
    return Policy(
        name=data.get("name") or path.stem,
        digest=digest_of(data),
        metrics=names_of(metrics),
        params=names_of(data.get("params", {})),
        tags=names_of(data.get("tags", {})),
        validation_metrics=tuple(metrics.get("validation_metrics", Policy.validation_metrics)),
        min_validation_samples=metrics.get("min_validation_samples", 0),
        coarsen=dict(metrics.get("coarsen", {})),
        noise={p: (n["mechanism"], n["scale"]) for p, n in metrics.get("noise", {}).items()},
        disclose=datasets.get("disclose", "full"),
        min_label_count=datasets.get("min_label_count", 0),
        system_metrics=data.get("system_metrics", True),
        text_artifacts=data.get("text_artifacts", True),
    )


def names_of(section: dict) -> Names:
    return Names(tuple(section.get("allow", ("*",))), tuple(section.get("deny", ())))


# ----- checking: one line per problem, each naming where ---------------------------------------
def problems_of(data) -> list:
    """Every problem of a policy's JSON value, one line each ("metrics.allow: ..."); [] when fine."""
    if not isinstance(data, dict):
        return [f"must be a JSON object of {', '.join(SECTIONS)}, got {type(data).__name__}"]
    out = unknown_keys(data, SECTIONS, "")
    if "name" in data and (not isinstance(data["name"], str) or not data["name"].strip()):
        out.append(f"name: must be a non-empty text, got {data['name']!r}")
    for key in ("system_metrics", "text_artifacts"):
        if key in data and not isinstance(data[key], bool):
            out.append(f"{key}: must be true or false, got {data[key]!r}")
    for key, allowed in (("metrics", METRIC_KEYS), ("params", NAME_KEYS), ("tags", NAME_KEYS),
                         ("datasets", DATASET_KEYS)):  # fmt: skip
        if key in data and not isinstance(data[key], dict):
            out.append(f"{key}: must be an object, got {type(data[key]).__name__}")
        elif key in data:
            out += unknown_keys(data[key], allowed, f"{key}.")
            out += pattern_problems(data[key], key)
    out += metric_problems(data.get("metrics"))
    out += dataset_problems(data.get("datasets"))
    return out


def unknown_keys(section: dict, allowed, where: str) -> list:
    return [f"{where}{k}: unknown key (known: {', '.join(allowed)})" for k in section if k not in allowed]


def pattern_problems(section: dict, where: str) -> list:
    out = []
    for key in ("allow", "deny", "validation_metrics"):
        value = section.get(key, [])
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            out.append(f'{where}.{key}: must be a list of name patterns (globs such as "*loss*"), got {value!r}')
    return out


def metric_problems(metrics) -> list:
    if not isinstance(metrics, dict):
        return []
    out = []
    n = metrics.get("min_validation_samples", 0)
    if not is_count(n):
        out.append(f"metrics.min_validation_samples: must be an integer >= 0, got {n!r}")
    coarsen = metrics.get("coarsen", {})
    if not isinstance(coarsen, dict):
        out.append(f"metrics.coarsen: must be an object of name pattern to step, got {coarsen!r}")
    else:
        out += [f"metrics.coarsen.{p}: the step must be a number > 0, got {s!r}"
                for p, s in coarsen.items() if not is_positive(s)]  # fmt: skip
    noise = metrics.get("noise", {})
    if not isinstance(noise, dict):
        return [*out, f"metrics.noise: must be an object of name pattern to mechanism, got {noise!r}"]
    for pattern, spec in noise.items():
        where = f"metrics.noise.{pattern}"
        if not isinstance(spec, dict) or set(spec) != {"mechanism", "scale"}:
            out.append(f'{where}: must be {{"mechanism": "laplace" or "gaussian", "scale": number > 0}}, got {spec!r}')
        elif spec["mechanism"] not in MECHANISMS:
            out.append(f"{where}.mechanism: must be one of {', '.join(MECHANISMS)}, got {spec['mechanism']!r}")
        elif not is_positive(spec["scale"]):
            out.append(f"{where}.scale: must be a number > 0, got {spec['scale']!r}")
    return out


def dataset_problems(datasets) -> list:
    if not isinstance(datasets, dict):
        return []
    out = []
    if datasets.get("disclose", "full") not in DISCLOSE:
        out.append(f"datasets.disclose: must be one of {', '.join(DISCLOSE)}, got {datasets['disclose']!r}")
    n = datasets.get("min_label_count", 0)
    if not is_count(n):
        out.append(f"datasets.min_label_count: must be an integer >= 0, got {n!r}")
    return out


def is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def is_positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and x != float("inf")


# ----- a starting policy (flctl policy init) ----------------------------------------------------
def starting_policy(name: str) -> dict:
    """A policy that lets out what leaves without one, every key spelt out for the admin to edit."""
    return {
        "name": name,
        "metrics": {
            "allow": ["*"],
            "deny": [],
            "validation_metrics": ["val_*", "global_val_*"],
            "min_validation_samples": 0,
            "coarsen": {},
            "noise": {},
        },  # fmt: skip
        "params": {"allow": ["*"], "deny": []},
        "tags": {"allow": ["*"], "deny": []},
        "datasets": {"disclose": "full", "min_label_count": 0},
        "system_metrics": True,
        "text_artifacts": True,
    }
