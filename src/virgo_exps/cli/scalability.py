"""``virgo-exps scalability``: the cross-experiment scalability report from the command line.

virgo-exps scalability                          # all experiments of the current baseline (dvc exp show)
virgo-exps scalability --exp exp-a exp-b ...    # only these DVC experiments
virgo-exps scalability --mlflow [EXPERIMENT]    # finished runs of an MLflow experiment
virgo-exps scalability --metrics-files DIR ...  # metrics.json files or folders holding them
"""

from __future__ import annotations

import argparse
import sys

from virgo_exps.cli.common import subcommand_main
from virgo_exps.paths import RESULTS_DIR
from virgo_exps.scalability import mlflow_source, sources
from virgo_exps.scalability.sources import SourceError
from virgo_exps.train.tracking import EXPERIMENT

DEFAULT_OUT = f"{RESULTS_DIR}/scalability"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "scalability",
        help="scalability report over experiments: epoch time, speedup, efficiency, throughput, energy",
        description="Count each result once, pool runs that differ only in seed and scaling axis (nodes, "
        "processes per node) on the same machine, device, software and data, and write a table, CSV, "
        "JSON, PNG figures and index.html into --out.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--exp",
        nargs="+",
        metavar="NAME",
        help="only these DVC experiments (default: all of the "
        "current baseline, plus the workspace when it holds results of its own)",
    )
    src.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        metavar="EXPERIMENT",
        help="read finished runs of an MLflow experiment (default name: virgo-exps or "
        "$VIRGO_MLFLOW_EXPERIMENT) from $MLFLOW_TRACKING_URI or the local store mlflow/mlflow.db",
    )
    src.add_argument(
        "--metrics-files",
        nargs="+",
        metavar="PATH",
        help="metrics.json files, or folders searched for them (epochs.csv and params.yaml beside "
        "them are used when present)",
    )
    p.add_argument("--all-commits", action="store_true", help="with DVC: experiments of every commit, not only HEAD")
    p.add_argument(
        "--by",
        action="append",
        default=[],
        metavar="KEY",
        help="name this parameter in every group label (groups are always separated by every "
        "parameter that differs); repeatable",
    )
    p.add_argument("--repo", default=".", help="DVC repository to read (default: the current directory)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--title", default="Scalability report", help="heading of index.html")
    p.add_argument(
        "--stamp",
        metavar="TEXT",
        help="text added to the origin line (machine, device, commit, date) "
        "printed on every figure and the page, e.g. 'CPU, simulated 2-node cluster'",
    )
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    return p


def _load(args) -> tuple[list, list[str], str]:
    if args.metrics_files:
        runs, notes = sources.load_files(args.metrics_files)
        return runs, notes, "metrics files: " + ", ".join(args.metrics_files)
    if args.mlflow is not None:
        runs, notes = mlflow_source.load_mlflow(args.mlflow or None, names=None)
        return runs, notes, f"MLflow experiment {args.mlflow or EXPERIMENT}"
    runs, notes = sources.load_dvc(args.repo, names=args.exp, all_commits=args.all_commits)
    what = (
        ("DVC experiments " + ", ".join(args.exp))
        if args.exp
        else ("dvc exp show" + (" --all-commits" if args.all_commits else " (current baseline)"))
    )
    return runs, notes, what


def run(args) -> int:
    # pandas, numpy, matplotlib: the report's own; the command line loads them only for this subcommand
    from virgo_exps.scalability.output import console_text, write_report
    from virgo_exps.scalability.report import summarize  # numpy, as the line above

    try:
        runs, notes, what = _load(args)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no finished experiment with results in {what}", file=sys.stderr)
        for n in notes:
            print(f"  - {n}", file=sys.stderr)
        return 1
    report = summarize(
        runs,
        by=args.by,
        source_notes=notes,
        sources=[what],
        repo=args.repo if not (args.metrics_files or args.mlflow is not None) else None,
    )
    if report.groups.empty:
        print(console_text(report, args.stamp), end="", file=sys.stderr)
        return 1
    out = write_report(report, args.out, args.title, args.stamp)
    if not args.quiet:
        print(console_text(report, args.stamp), end="")
    print(f"\nwrote {out}/index.html (figures, table, experiments), scalability.csv, scalability.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m ...``), the same as the ``virgo-exps`` subcommand."""
    return subcommand_main(add_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] if sys.argv[1:2] == ["scalability"] else ["scalability", *sys.argv[1:]]))
