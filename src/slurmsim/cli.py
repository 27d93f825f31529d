"""The command line, ``python -m slurmsim up|status|down|install``: :func:`main` and its subcommands."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

from .cluster import SimCluster, stop_from_state
from .constants import STATE_FILE
from .errors import SlurmSimError, SlurmUnavailable
from .install import _is_root, ensure_installed, missing_commands
from .procs import _alive, _run


def _cmd_install(args: argparse.Namespace) -> int:
    """``python -m slurmsim install``: what the Slurm tests need, multi-node tools and accounting included.

    A no-op when everything is there. Without ``--strict`` a failure only warns
    (exit 0), so ``make test`` goes on and the Slurm tests skip with their
    reason; with it: 1 apt-get failed, 2 not root or no apt-get.
    """
    missing = missing_commands(multinode=True, accounting=True)
    if not missing:
        return 0
    print(f"install_slurm: missing {' '.join(missing)}", file=sys.stderr)
    # Slurm first, accounting (slurmdbd, MariaDB) apart: a failure of the
    # second leaves the Slurm tests running and only the accounting ones skipped.
    try:
        ensure_installed(multinode=True)
    except SlurmUnavailable as exc:
        print(f"install_slurm: {exc}", file=sys.stderr)
        if args.strict:
            return 2 if not _is_root() or shutil.which("apt-get") is None else 1
        print("install_slurm: the Slurm tests will be skipped", file=sys.stderr)
        return 0
    try:
        ensure_installed(multinode=True, accounting=True)
    except SlurmUnavailable as exc:
        print(f"install_slurm: accounting: {exc}", file=sys.stderr)
        if args.strict:
            return 1
        print("install_slurm: the accounting tests will be skipped", file=sys.stderr)
    version = _run(["sbatch", "--version"], check=False).stdout.split()[-1:]
    print(f"install_slurm: Slurm {' '.join(version)} and munge installed", file=sys.stderr)
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    cluster = SimCluster(
        args.dir,
        nodes=args.nodes,
        cpus_per_node=args.cpus_per_node,
        min_job_age=args.min_job_age,
        accounting=args.accounting,
    )
    try:
        cluster.start(timeout=args.timeout, warmup=not args.no_warmup)
    except SlurmUnavailable as exc:
        print(f"slurmsim: unavailable: {exc}", file=sys.stderr)
        return 2
    except SlurmSimError as exc:
        print(f"slurmsim: {exc}", file=sys.stderr)
        return 1
    print(
        f"# cluster up in {cluster.startup_seconds:.1f}s: nodes "
        f"{' '.join(cluster.node_names)} (partition {cluster.partition})",
        file=sys.stderr,
    )
    for key, value in cluster.env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    if stop_from_state(args.dir):
        print(f"slurmsim: stopped cluster in {Path(args.dir).absolute()}", file=sys.stderr)
    else:
        print(f"slurmsim: no cluster state in {Path(args.dir).absolute()}", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    path = Path(args.dir) / STATE_FILE
    if not path.exists():
        print(f"no cluster in {Path(args.dir).absolute()}")
        return 1
    cluster = SimCluster.from_state(args.dir)
    state = cluster._state
    running = cluster.is_running()
    print(f"workdir:    {cluster.workdir}")
    print(f"running:    {running}")
    print(f"SLURM_CONF: {cluster.conf_path}")
    print(f"nodes:      {' '.join(cluster.node_names)}")
    print(f"addresses:  {' '.join(cluster.node_addresses)}")
    for key, rec in state.get("daemons", {}).items():
        alive = _alive(rec.get("pid"), rec.get("starttime"))
        print(f"  {key:<24} pid {rec.get('pid'):>7}  {'alive' if alive else 'dead'}")
    if running:
        print(cluster.slurm("sinfo", "-N", check=False).stdout.rstrip())
    return 0 if running else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slurmsim", description="Start/stop a real local Slurm cluster (needs root)."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a cluster; prints `export SLURM_CONF=...`")
    up.add_argument("--nodes", type=int, default=1)
    up.add_argument("--cpus-per-node", type=int, default=None)
    up.add_argument("--timeout", type=float, default=60)
    up.add_argument(
        "--min-job-age",
        type=int,
        default=300,
        help="seconds finished jobs stay visible (also sets the "
        "sbatch -W poll interval: <=5 -> 2 s, <=17 -> 8 s, else 32 s)",
    )
    up.add_argument("--no-warmup", action="store_true", help="do not run the warm-up job after the nodes are idle")
    up.add_argument(
        "--accounting", action="store_true", help="keep job accounting (slurmdbd + MariaDB in --dir), for sacct"
    )
    install = sub.add_parser("install", help="apt-get install Slurm, munge and the netns tools where missing (root)")
    install.add_argument("--strict", action="store_true", help="exit non-zero (1, 2) when they cannot be installed")
    for p in (
        up,
        sub.add_parser("down", help="stop the cluster of --dir"),
        sub.add_parser("status", help="show the cluster of --dir"),
    ):
        p.add_argument("--dir", default=".slurmsim", type=Path, help="cluster work directory (default: ./.slurmsim)")
    args = parser.parse_args(argv)
    try:
        return {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status, "install": _cmd_install}[args.cmd](args)
    except SlurmSimError as exc:
        # one line, not a traceback; `down` only removes what is still there, so it can be run again
        again = "; run `down` again" if args.cmd == "down" else ""
        print(f"slurmsim: {args.cmd} failed: {str(exc).splitlines()[0]}{again}", file=sys.stderr)
        return 1
