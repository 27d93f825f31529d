"""What the ``virgo-exps`` subcommand modules share: the stand-alone entry of one subcommand."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def subcommand_main(add_parser: Callable, run: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """Stand-alone entry of one subcommand's module (``python -m virgo_exps.cli.<module>``): the same
    parser and the same run as under ``virgo-exps``."""
    parser = argparse.ArgumentParser(prog="virgo-exps")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))
