"""Command-line entry points shared by the stage scripts, and the ``virgo-exps`` CLI."""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable

from .config import ConfigError, describe


def stage_main(run: Callable[[], int | None]) -> None:
    """Run a stage body; turn configuration errors into one clear line and exit 2."""
    try:
        code = run()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def worker_main(run: Callable[[], int | None], rank: Callable[[], int]) -> None:
    """Like :func:`stage_main` for a training process: a crash names the rank."""
    try:
        code = run()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported, then re-raised as an exit code
        traceback.print_exc()
        print(f"error: training process rank {rank()} failed: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        sys.exit(1)
    sys.exit(code or 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="virgo-exps", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("params", help="list every key of params.yaml with its default and allowed values")
    check = sub.add_parser("check", help="validate params.yaml and the machine profile, write nothing")
    check.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    if args.command == "params":
        print(describe())
    elif args.command == "check":
        from .config import load_params
        from .machines import load_machine

        def body():
            load_params(args.params)
            machine = load_machine()
            print(f"{args.params}: valid; machine: {machine.name} ({machine.kind})")

        stage_main(body)
