"""nvflare's own command line, run from here: output to a log file (a daemon it starts must not
hold a pipe of ours), JSON answers (`nvflare --format json ...`) parsed, never its wording."""

import json
import subprocess
import sys
from pathlib import Path

NVFLARE = str(Path(sys.executable).parent / "nvflare")


def run(args, log_path, env, timeout=600, json_out=False, prefix=()) -> subprocess.CompletedProcess:
    """nvflare ARGS with stdout and stderr in log_path (with json_out: stdout returned, parsed
    by parse_json, and stderr in log_path). prefix: a command that runs it (`ip netns exec NS`)."""
    cmd = [*prefix, NVFLARE, *(["--format", "json"] if json_out else []), *map(str, args)]
    with open(log_path, "w") as log:
        out = subprocess.PIPE if json_out else log
        return subprocess.run(
            cmd, stdout=out, stderr=log, stdin=subprocess.DEVNULL, env=env, timeout=timeout, text=True
        )


def popen(args, log_path, env, json_out=True, prefix=()) -> subprocess.Popen:
    cmd = [*prefix, NVFLARE, *(["--format", "json"] if json_out else []), *map(str, args)]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env, text=True)


def parse_json(text: str) -> dict:
    """The last JSON object nvflare printed ({"status": "ok"|"error", "data": {...}, ...}), or {}."""
    text = text or ""
    starts = [i for i, ch in enumerate(text) if ch == "{" and (i == 0 or text[i - 1] == "\n")]
    decoder = json.JSONDecoder()
    for start in reversed(starts):
        try:
            value, _ = decoder.raw_decode(text[start:])
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def tail(path, lines=3) -> str:
    try:
        return "\n".join(Path(path).read_text().strip().splitlines()[-lines:])
    except OSError:
        return ""
