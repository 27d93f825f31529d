"""``virgo-exps share | failures | resume``: team exchange, failed experiments, continuing from a checkpoint.

virgo-exps share --dir /projects/vx/dvc --group vx_team   # create or join the team's store, configure this clone
virgo-exps share --dir ... --group ... --check [--fix]    # only check the store's permissions (repair yours)
virgo-exps failures                                        # failed experiments: status, error line, log path
virgo-exps logs [--exp NAME] [--stage train]               # the logs an experiment carries (also a pulled one)
virgo-exps resume <exp> --epochs 10 [--queue]              # continue <exp> from its last checkpoint
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from virgo_exps.cli.common import subcommand_main
from virgo_exps.experiments import share
from virgo_exps.experiments.failures import LogsError, carried_logs, failures, format_failures, format_logs
from virgo_exps.experiments.resume import ResumeError, resume
from virgo_exps.experiments.teamstore import Layout, ShareError, check_membership, check_tree, explain, fix_own

COMMANDS = ("share", "failures", "logs", "resume")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "share",
        help="create or join the team's shared experiment store (git refs, DVC remote, shared cache) and "
        "configure this clone",
        description="Creates DIR (bare git repository for experiment refs, DVC remote, shared DVC cache; group "
        "GROUP, setgid, never world-writable) or joins it, and points this clone at it in its local "
        "configuration. Safe to repeat. Then: `dvc exp push team <exp>`, `dvc exp pull team <exp>`, "
        "`dvc exp list team`.",
    )
    p.add_argument("--dir", required=True, type=Path, help="the shared folder on the cluster file system")
    p.add_argument("--group", required=True, help="Unix group of the team (every member must be in it)")
    p.add_argument("--name", default="team", help="name of the git and DVC remotes (default: team)")
    p.add_argument(
        "--link-type",
        default="copy",
        choices=("copy", "symlink"),
        help="how workspace files come from the shared cache: copy (reflink where the file system "
        "can, default) or symlink (read-only links, no duplicate data); hard links are never used",
    )
    p.add_argument(
        "--auto-push",
        action="store_true",
        help="also let every finished `dvc exp run` push its experiment to the team (exp.auto_push)",
    )
    p.add_argument("--check", action="store_true", help="only check the shared folder's permissions; change nothing")
    p.add_argument(
        "--fix",
        action="store_true",
        help="repair the permission problems on paths you own (group, g+rwx, setgid, o-w, default ACL)",
    )
    p.add_argument("--repo", default=".", type=Path, help="the clone to configure (default: current directory)")

    f = subparsers.add_parser(
        "failures",
        help="list failed experiments (queued or run in the workspace) with status, error line and log path",
        description="Reads `dvc queue status` / `dvc queue logs` and logs/ of the main checkout; keeps a copy of "
        "each failed queued experiment's DVC log in logs/failed/ so it survives `dvc queue remove`.",
    )
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.add_argument("--repo", default=".", type=Path)

    g = subparsers.add_parser(
        "logs",
        help="show the logs an experiment carries: its data stages, its training's runs or jobs, its report",
        description="Reads results/train.log and results/report/report.log (held by git, so `dvc exp pull` "
        "brings them with a teammate's experiment) from the experiment's commit, or from the workspace.",
    )
    g.add_argument("--exp", help="experiment name or revision (default: the workspace)")
    g.add_argument("--stage", help="only this stage's logs (generate, preprocess, train, report)")
    g.add_argument("--repo", default=".", type=Path)

    r = subparsers.add_parser(
        "resume",
        help="continue an experiment from its last checkpoint with more epochs, in the workspace or the queue",
        description="Applies EXP (restoring its checkpoints/, which git holds) and runs it again with "
        "train.epochs=N; the trainer continues from the snapshot, so the result equals training N "
        "epochs in one go.",
    )
    r.add_argument("exp", help="experiment name (or revision), as `dvc exp show` lists it")
    r.add_argument("--epochs", required=True, type=int, help="total epochs (absolute, larger than the experiment's)")
    r.add_argument("--queue", action="store_true", help="queue it (`dvc queue start` runs it) instead of running now")
    r.add_argument("--name", help="name of the new experiment (default: <exp>-e<N>)")
    r.add_argument("--pull", metavar="REMOTE", help="first `dvc exp pull REMOTE <exp>` (a teammate's experiment)")
    r.add_argument("--repo", default=".", type=Path)


def _share(args) -> int:
    try:
        if args.check:
            check_membership(args.group)
            layout = Layout(args.dir.expanduser().absolute(), args.group)
            if not layout.root.is_dir():
                print(
                    f"error: {layout.root}: does not exist (create it with `virgo-exps share --dir "
                    f"{layout.root} --group {args.group}`)",
                    file=sys.stderr,
                )
                return 1
            problems = check_tree(layout.root, args.group)
            if problems and args.fix:
                problems, done = fix_own(problems, args.group)
                for line in done:
                    print(line)
            if problems:
                print(explain(problems, layout.root, args.group), file=sys.stderr)
                return 1
            print(f"{layout.root}: permissions ok for group '{args.group}'")
            return 0
        result = share.share(args.dir, args.group, args.repo, args.name, args.link_type, args.auto_push, fix=args.fix)
    except ShareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = share.summary(result, args.name)
    print(text, file=sys.stderr if result.problems else sys.stdout)
    return 1 if result.problems else 0


def _failures(args) -> int:
    found = failures(args.repo)
    if args.json:
        print(json.dumps([f.as_dict() for f in found], indent=2))
    else:
        print(format_failures(found))
    return 0


def _logs(args) -> int:
    try:
        found = carried_logs(args.repo, args.exp)
    except LogsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_logs(found, args.stage, f"experiment {args.exp}" if args.exp else "the workspace"))
    return 0


def _resume(args) -> int:
    try:
        return resume(args.exp, args.epochs, queue=args.queue, name=args.name, pull=args.pull, repo=args.repo)
    except ResumeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args) -> int:
    return {"share": _share, "failures": _failures, "logs": _logs, "resume": _resume}[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m ...``), the same as the ``virgo-exps`` subcommand."""
    return subcommand_main(add_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
