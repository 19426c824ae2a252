"""flctl: the project's one command line.

    flctl prepare-data | configure | check | simulate | poc | mlflow-server | evaluate | contents | recover |
    resume | screenshots | project | rehearse | policy

`flctl SUBCOMMAND --help` says more. A failure prints one line `flctl SUBCOMMAND: reason` on
stderr and exits non-zero (2 for a wrong argument).
"""

import argparse
import importlib
import os
import signal
import sys

from flctl.errors import CliError

# subcommand -> module that registers it (each module: register(subparsers), run(args) -> int)
MODULES = (
    "flctl.data_prep",
    "flctl.configure",
    "flctl.check_job",
    "flctl.simulate",
    "flctl.poc_cli",
    "flctl.mlflow_server",
    "flctl.evaluate",
    "flctl.mlflow_contents",
    "flctl.recover",
    "flctl.resume",
    "flctl.screenshots",
    "flctl.project",
    "flctl.rehearsal",
    "flctl.policy",
)


class Parser(argparse.ArgumentParser):
    """argparse, but an argument error is one line: `flctl SUBCOMMAND: reason` (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> Parser:
    parser = Parser(prog="flctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=Parser)
    for name in MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in subparsers.choices.values():
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.error("no subcommand given")
    if extra:  # said by the subcommand, not by flctl
        parser._subparsers._group_actions[0].choices[args.subcommand].error(
            f"unrecognized arguments: {' '.join(extra)}"
        )
    # flctl says what it did in its own lines: MLflow's "View run ... at: URL" lines, printed when
    # recovery or a resume ends or reopens runs on a tracking server, would bury them.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # SIGTERM ends the command like Ctrl-C: its finally blocks stop what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return args.func(args) or 0
    except CliError as e:
        print(f"flctl {args.subcommand}: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"flctl {args.subcommand}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
