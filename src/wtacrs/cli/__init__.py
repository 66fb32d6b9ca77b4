"""`wtacrs` command line: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import sys

from wtacrs.cli import bench, demo, finetune, plan, report
from wtacrs.cli.noise import quiet_third_party

SUBCOMMANDS = {"demo": demo, "bench": bench, "finetune": finetune, "report": report, "plan": plan}

# At import, so the runs `wtacrs finetune` spawns (they import this package) are quiet too.
quiet_third_party()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wtacrs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__))
    args = parser.parse_args(argv)
    return SUBCOMMANDS[args.command].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
