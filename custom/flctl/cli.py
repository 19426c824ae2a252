"""flctl: one command line for the project (placeholder until the subcommands land)."""

import sys


def main(argv=None) -> int:
    print("flctl: no subcommands yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
