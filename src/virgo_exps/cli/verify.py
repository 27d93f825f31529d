"""``virgo-exps verify``: its arguments and its output (the checks: :mod:`virgo_exps.experiments.verify`)."""

from __future__ import annotations

import sys

from virgo_exps.cli.common import subcommand_main
from virgo_exps.experiments.verify import verify as verify_outputs
from virgo_exps.experiments.verify_sources import VerifyError


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check that outputs match their params, dvc.lock and checksums")
    p.add_argument("--exp", help="check this experiment (name from `dvc exp show`) instead of the workspace")
    p.add_argument("--no-chunks", action="store_true", help="do not read every chunk of the zarr stores")
    p.add_argument("--repo", default=".", help="the repository (default: the current folder)")


def run(args) -> int:
    try:
        report = verify_outputs(args.repo, args.exp, read_chunks=not args.no_chunks)
    except VerifyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = f"experiment {args.exp}" if args.exp else "workspace"
    for line in report.lines():
        print(line, file=sys.stderr if line.startswith("FAIL") else sys.stdout)
    if report.problems:
        print(f"verify: {what}: {len(report.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"verify: {what}: every check passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m virgo_exps.cli.verify``), the same as ``virgo-exps verify``."""
    return subcommand_main(add_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
