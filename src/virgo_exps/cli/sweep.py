"""``virgo-exps sweep submit | status | page``: many trials of the train stage as one SLURM job array.

virgo-exps sweep submit --grid lrgrid -S train.lr=0.001,0.01 -S train.seed=0,1 --parallel 2
virgo-exps sweep submit sweeps/lr-wd.yaml          # an Optuna search (a second submission continues it)
virgo-exps sweep status lrgrid                     # done / running / pending / failed / pruned, best, cost
virgo-exps sweep page lrgrid --out results/sweep   # the sweep's page (history, importances, best trial)
"""

from __future__ import annotations

import sys
from pathlib import Path

from virgo_exps.cli.common import subcommand_main
from virgo_exps.config import ConfigError, DamagedInputError
from virgo_exps.paths import RESULTS_DIR
from virgo_exps.sweeps import spec as sweep_spec


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="a sweep of the train stage as one SLURM job array (grid or search)")
    sub = p.add_subparsers(dest="sweep_command", required=True)
    s = sub.add_parser(
        "submit",
        help="check, write the sweep dir in the team store, submit one job array and return its id",
        description="Each array task clones the sweep commit, runs one trial as `dvc exp run -n <name>-<nnn> -S "
        "...` inside its own allocation and pushes it to the team store.",
    )
    s.add_argument("spec", nargs="?", type=Path, help="a sweep file (YAML), e.g. sweeps/lr-wd.yaml")
    s.add_argument("--grid", metavar="NAME", help="a grid sweep named NAME from the -S lists")
    s.add_argument("-S", dest="sets", action="append", default=[], metavar="KEY=V1,V2", help="a grid parameter")
    s.add_argument("--parallel", type=int, default=1, help="trials running at once (the array throttle)")
    s.add_argument(
        "--metric", help="key of results/metrics.json to rank by (grid; default: the study's objective, val_loss)"
    )
    s.add_argument(
        "--direction",
        choices=("minimize", "maximize"),
        help="default: the study's objective's direction without --metric, minimize with one",
    )
    s.add_argument("--store", type=Path, help="the team store (default: the one of this checkout's shared cache)")
    s.add_argument("--repo", type=Path, default=Path("."), help="the checkout to sweep (default: here)")
    s.add_argument(
        "--parsable", action="store_true", help="print only the job array's id (for scripts, as `sbatch --parsable`)"
    )
    for name, what in (("status", "trials done / running / pending / failed, best and cost so far"), ("page", "")):
        q = sub.add_parser(name, help=what or "the sweep's page: history, importances, best trial, cost")
        q.add_argument("name", help="the sweep's name")
        q.add_argument("--store", type=Path, help="the team store (default: the one of this checkout)")
        q.add_argument("--repo", type=Path, default=Path("."))
        if name == "page":
            q.add_argument("--out", type=Path, help="output folder (default: results/sweeps/<name>)")


def _submit(args) -> int:
    # The Slurm side of sweeps loads here, not with the command line: `virgo-exps --help` starts without it.
    from virgo_exps.sweeps.submit import submit

    if (args.spec is None) == (args.grid is None):
        raise ConfigError("give a sweep file or --grid NAME with -S lists (one of them)")
    spec = (
        sweep_spec.load(args.spec)
        if args.spec
        else sweep_spec.from_grid(args.grid, args.sets, args.parallel, args.metric, args.direction)
    )
    record = submit(args.repo, spec, args.store)
    if record.get("recovered"):
        print(
            f"sweep {spec.name}: job array {record['job_id']} was submitted by an earlier `sweep submit` that "
            "stopped before recording it; recorded it now, nothing new submitted",
            file=sys.stderr,
        )
    if args.parsable:
        print(record["job_id"])
        return 0
    print(
        f"submitted sweep {spec.name}: job array {record['job_id']} ({spec.trials} trials, {spec.parallel} at a "
        f"time); sweep dir {record['store']}/sweeps/{spec.name}; `virgo-exps sweep status {spec.name}`"
    )
    return 0


def _dir(args) -> Path:
    from virgo_exps.sweeps.submit import find_store, sweep_dir  # the Slurm side, loaded late: see _submit

    return sweep_dir(find_store(args.repo.absolute(), args.store).root, args.name)


def _status(args) -> int:
    from virgo_exps.sweeps.status import reconcile, render  # the Slurm side, loaded late: see _submit
    from virgo_exps.sweeps.submit import read_sweep  # the Slurm side, loaded late: see _submit

    directory = _dir(args)
    spec = sweep_spec.from_dict(read_sweep(directory)["spec"])
    print(render(reconcile(directory), spec.metric))
    return 0


def _page(args) -> int:
    # matplotlib: the page's own; the command line loads it only for this subcommand
    from virgo_exps.sweeps import page
    from virgo_exps.sweeps.submit import read_sweep  # the Slurm side, loaded late: see _submit

    directory = _dir(args)
    spec = sweep_spec.from_dict(read_sweep(directory)["spec"])
    if spec.kind != "search":
        raise ConfigError(
            f"sweep {spec.name} is a grid: its page is built from an Optuna study, which only a search has; "
            f"use `virgo-exps sweep status {spec.name}` and `dvc exp show`"
        )
    out = args.out or (args.repo / RESULTS_DIR / "sweeps" / args.name)
    print(page.build(spec, directory, out))
    return 0


def run(args) -> int:
    try:
        return {"submit": _submit, "status": _status, "page": _page}[args.sweep_command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DamagedInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m ...``), the same as the ``virgo-exps`` subcommand."""
    return subcommand_main(add_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
