"""What a training run used, from our own measurements and from Slurm's accounting.

Every rank measures itself (:func:`rank_usage`) at each snapshot and when the
epochs end; the trainer gathers the figures and :func:`summarise` turns them
into one attempt's cost, :func:`combine` adds up the attempts of a resumed run,
and the result is the ``cost`` dict of ``results/metrics.json`` (DVC shows each
key as a column, so there are few). For one attempt:

``wall_s``
    seconds from the start of the run's first process to the end of the
    epochs: in a SLURM job its batch script (so the job's start), elsewhere a
    rank or the launcher that started the ranks (torchrun's agent); imports
    and data loading are included.
``cores``
    CPU cores allocated to the run: on SLURM the job's cores on every node
    (``SLURM_CPUS_ON_NODE``, what ``sacct`` calls AllocCPUS); elsewhere the
    threads each process was given (``OMP_NUM_THREADS``, at most the cores it
    may run on), summed over ranks.
``core_h``
    ``cores * wall_s / 3600``: what the allocation costs.
``cpu_h``
    CPU time (user + system, waited-for children included) of the ranks and
    the run's other processes, summed, in hours: in a SLURM job every process
    of the job (batch script, srun, launchers, ranks), elsewhere the ranks and
    their launchers.
``cpu_eff``
    ``cpu_h / core_h``: busy over allocated (1 means every allocated core was
    busy all the time).
``max_rss_mb`` / ``node_rss_mb``
    the largest peak resident memory of one rank, and the largest sum of the
    ranks' peaks on one node (MiB).
``gpus`` / ``gpu_h``
    GPUs used (one per rank on a CUDA device) and ``gpus * wall_s / 3600``.
``energy_wh``
    GPU energy summed over ranks where NVML measured it, else None.
``slurm_job``
    the SLURM job id the run ran in (None outside SLURM): the key to
    ``sacct``.
``attempts``
    how many attempts the run took: a run resumed from a running or
    interrupted snapshot (a requeued job, a rerun after a stop) adds the
    figures of the attempts before it, which the snapshot carries
    (:func:`combine`); ``wall_s``, the hours and the energy are then sums over
    the attempts, ``cores`` the last attempt's. A run that continues another
    run's final snapshot (more epochs) counts only its own work: the other
    run's record has the rest.

On a machine with Slurm's accounting, :func:`sacct_usage` reads the same job
back (``sacct -j``) and :func:`compare` puts both side by side; ``python -m
virgo_exps.train.cost`` does it for ``results/metrics.json`` and writes
``results/cost_sacct.json``. Where ``sacct`` is missing or accounting is off it
says so in one line and our figures stand alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from virgo_exps import fsio
from virgo_exps.launch.slurm.query import run_tool
from virgo_exps.paths import METRICS_FILE
from virgo_exps.provenance import read_metrics

SACCT_FIELDS = ("JobID", "Elapsed", "AllocCPUS", "TotalCPU", "MaxRSS", "CPUTimeRAW", "State")


def slurm_job_id() -> int | None:
    value = os.environ.get("SLURM_JOB_ID", "")
    return int(value) if value.isdigit() else None


def _threads() -> int:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(int(omp), usable)) if omp.isdigit() and int(omp) > 0 else usable


# Command-line marks of the processes that start the ranks on a node (outside a Slurm job).
_LAUNCHERS = ("torch.distributed.run", "torchrun", "deepspeed.launcher", "horovod.runner", "horovodrun")


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def _machine_id() -> str:
    """The running kernel (ranks that share one see the same processes), else the host name."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def _figures(proc: psutil.Process) -> dict:
    return {"pid": proc.pid, "started": proc.create_time(), "cpu_s": _cpu_s(proc)}


def _job_processes(job: int) -> list[psutil.Process]:
    """Every process of SLURM job ``job`` on this machine: what its slurmstepd processes started (the
    batch script, srun, every step's tasks and their children)."""
    mark = f"[{job}."
    # Job ids are per cluster: a process is the job's when its environment names the same job and cluster.
    ours = {"SLURM_JOB_ID": str(job), "SLURM_CLUSTER_NAME": os.environ.get("SLURM_CLUSTER_NAME")}
    found: list[psutil.Process] = []
    for stepd in psutil.process_iter(["cmdline"]):
        title = " ".join(stepd.info["cmdline"] or [])  # "slurmstepd: [12.batch]", one word or two
        if title.startswith("slurmstepd:") and mark in title:
            with contextlib.suppress(psutil.Error):
                for proc in stepd.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        env = proc.environ()
                        if all(env.get(k) == v for k, v in ours.items()):
                            found.append(proc)
    return found


def _launchers(proc: psutil.Process) -> list[psutil.Process]:
    """The processes above this rank that started the ranks of its node (torchrun's agent and the like)."""
    found = []
    with contextlib.suppress(psutil.Error):  # an ancestor ended or is not ours to read
        for parent in proc.parents():
            if parent.pid <= 1 or not any(mark in " ".join(parent.cmdline()) for mark in _LAUNCHERS):
                break
            found.append(parent)
    return found


def rank_usage() -> dict:
    """This process's figures so far (host, CPU seconds, peak memory, cores), and those of the run's
    other processes on its machine: in a SLURM job every process of the job, elsewhere the launchers."""
    proc = psutil.Process()
    job = slurm_job_id()
    others = []
    for other in _job_processes(job) if job is not None else _launchers(proc):
        if other.pid != proc.pid:
            with contextlib.suppress(psutil.Error):
                others.append(_figures(other))
    # ru_maxrss is in KiB on Linux; a waited-for child (a data loader worker) may have peaked higher.
    peak_kib = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    node_cores = os.environ.get("SLURM_CPUS_ON_NODE", "")
    mine = _figures(proc)
    return {
        "host": socket.gethostname(),
        "machine": _machine_id(),
        "pid": proc.pid,
        "wall_s": max(0.0, time.time() - min([mine["started"]] + [p["started"] for p in others])),
        "cpu_s": mine["cpu_s"],
        "max_rss_mb": peak_kib / 1024.0,
        "threads": _threads(),
        "node_cores": int(node_cores) if node_cores.isdigit() and job is not None else None,
        "slurm_job": job,
        "others": others,
    }


def summarise(per_rank: list[dict], devices: list[str] | None = None, energy_wh: float | None = None) -> dict:
    """The run's ``cost`` dict from every rank's :func:`rank_usage` (``devices``: each rank's device name)."""
    if not per_rank:
        raise ValueError("no rank figures to summarise")
    wall_s = max(r["wall_s"] for r in per_rank)
    by_host: dict[str, list[dict]] = {}
    for r in per_rank:
        by_host.setdefault(r["host"], []).append(r)
    cores = 0
    for ranks in by_host.values():
        slurm = [r["node_cores"] for r in ranks if r.get("node_cores")]
        # SLURM allocates per node (every rank there sees the same number); elsewhere each rank's threads.
        cores += max(slurm) if slurm else sum(r["threads"] for r in ranks)
    # A process seen by several ranks of a machine (a launcher, the batch script, another rank) counts once.
    ranks = {(r.get("machine"), r.get("pid")) for r in per_rank}
    others = {(r.get("machine"), p["pid"]): p["cpu_s"] for r in per_rank for p in r.get("others", [])}
    cpu_s = sum(r["cpu_s"] for r in per_rank) + sum(v for k, v in others.items() if k not in ranks)
    core_h = cores * wall_s / 3600.0
    gpus = sum(1 for d in devices or [] if d.startswith("cuda"))
    jobs = {r.get("slurm_job") for r in per_rank} - {None}
    return {
        "wall_s": round(wall_s, 3),
        "cores": cores,
        "core_h": core_h,
        "cpu_h": cpu_s / 3600.0,
        "cpu_eff": round(cpu_s / (cores * wall_s), 4) if cores and wall_s > 0 else None,
        "max_rss_mb": round(max(r["max_rss_mb"] for r in per_rank), 1),
        "node_rss_mb": round(max(sum(r["max_rss_mb"] for r in ranks) for ranks in by_host.values()), 1),
        "gpus": gpus,
        "gpu_h": gpus * wall_s / 3600.0,
        "energy_wh": energy_wh,
        "slurm_job": min(jobs) if jobs else None,
        "attempts": 1,
    }


def combine(attempts: list[dict]) -> dict:
    """The ``cost`` dict of a run made in several attempts (a requeued or resumed training), oldest first.

    Time, core-, CPU- and GPU-hours and energy add up; ``cores``, ``gpus`` and ``slurm_job`` are the last
    attempt's (the allocation that finished the run); memory is the largest peak of any attempt;
    ``attempts`` says how many there were. An attempt counts until its last snapshot: all of it when it
    was stopped by a signal (the snapshot is written at the stop), up to its last finished epoch when it
    was killed without warning.
    """
    if not attempts:
        raise ValueError("no attempts to combine")
    last = attempts[-1]

    def total(key: str) -> float | None:
        values = [a.get(key) for a in attempts if isinstance(a.get(key), (int, float))]
        return float(sum(values)) if values else None

    core_h, cpu_h = total("core_h") or 0.0, total("cpu_h") or 0.0
    return {
        **last,
        "wall_s": round(total("wall_s") or 0.0, 3),
        "core_h": core_h,
        "cpu_h": cpu_h,
        "cpu_eff": round(cpu_h / core_h, 4) if core_h > 0 else None,
        "max_rss_mb": max(a["max_rss_mb"] for a in attempts),
        "node_rss_mb": max(a["node_rss_mb"] for a in attempts),
        "gpu_h": total("gpu_h") or 0.0,
        "energy_wh": total("energy_wh"),
        "attempts": len(attempts),
    }


# --------------------------------------------------------------------------
# Slurm's accounting
# --------------------------------------------------------------------------


def parse_duration(text: str) -> float | None:
    """Seconds of a sacct duration: ``[D-][HH:]MM:SS[.mmm]`` (None when empty)."""
    text = text.strip()
    if not text or text in ("INVALID", "Unknown"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [float(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    h, m, s = parts
    return days * 86400 + h * 3600 + m * 60 + s


_UNITS = {"": 1 / 1024**2, "K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0**2}


def parse_memory_mb(text: str) -> float | None:
    """MiB of a sacct memory figure (``123456K``, ``1.5G``; bytes without a unit)."""
    match = re.fullmatch(r"([\d.]+)([KMGT]?)", text.strip())
    return float(match.group(1)) * _UNITS[match.group(2)] if match else None


class AccountingUnavailable(RuntimeError):
    """sacct is missing, accounting is off, or the job is not (yet) in the database."""


def sacct_usage(job_id: int | str, env: dict[str, str] | None = None, timeout: float = 30) -> dict:
    """The job's figures as Slurm accounted them; raises :class:`AccountingUnavailable` with the reason.

    ``alloc_cpus`` and ``state`` are the job's (its last attempt's, when it was
    requeued); ``elapsed_s``, ``cpu_s`` (TotalCPU: all steps, user + system)
    and ``core_h`` (CPUTimeRAW, AllocCPUS x Elapsed, in hours) are summed over
    its ``attempts``; ``max_rss_mb`` is the largest MaxRSS of its steps (one
    task's peak). ``steps`` keeps every line as sacct printed it.
    """
    if shutil.which("sacct", path=(env or os.environ).get("PATH")) is None:
        raise AccountingUnavailable("sacct is not installed here")
    # --duplicates: every attempt of a requeued job, not only its last (our figures add the attempts up too)
    cmd = ["sacct", "-j", str(job_id), "--duplicates", "--parsable2", "--noheader", "-o", ",".join(SACCT_FIELDS)]
    try:
        proc = run_tool(*cmd, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise AccountingUnavailable(f"sacct did not answer in {timeout:.0f} s") from exc
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[0]
        raise AccountingUnavailable(f"sacct: {first.removeprefix('sacct: ')}")
    rows = [dict(zip(SACCT_FIELDS, line.split("|"))) for line in proc.stdout.splitlines() if line.strip()]
    attempts = [r for r in rows if r["JobID"] == str(job_id)]  # one line per attempt, oldest first
    if not attempts:
        raise AccountingUnavailable(f"job {job_id} is not in Slurm's accounting (accounting off when it ran?)")
    job = attempts[-1]
    rss = [v for v in (parse_memory_mb(r["MaxRSS"]) for r in rows) if v is not None]

    def total(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else float(sum(values))

    raw = [float(r["CPUTimeRAW"]) if r["CPUTimeRAW"].isdigit() else None for r in attempts]
    core_s = total(raw)
    return {
        "job": str(job_id),
        "state": job["State"],
        "attempts": len(attempts),
        "elapsed_s": total([parse_duration(r["Elapsed"]) for r in attempts]),
        "alloc_cpus": int(job["AllocCPUS"]) if job["AllocCPUS"].isdigit() else None,
        "cpu_s": total([parse_duration(r["TotalCPU"]) for r in attempts]),
        "max_rss_mb": max(rss) if rss else None,
        "core_h": core_s / 3600.0 if core_s is not None else None,
        "steps": rows,
    }


def compare(ours: dict, sacct: dict | None, reason: str | None = None) -> dict:
    """Our ``cost`` dict beside sacct's figures for the same job, with the ratios sacct / ours."""
    out: dict = {"ours": ours, "sacct": sacct, "sacct_unavailable": reason}
    if sacct is not None:
        pairs = {
            "wall_s": ("elapsed_s", ours.get("wall_s")),
            "cores": ("alloc_cpus", ours.get("cores")),
            "cpu_s": ("cpu_s", (ours.get("cpu_h") or 0.0) * 3600.0),
            "core_h": ("core_h", ours.get("core_h")),
        }
        out["ratio"] = {
            key: (sacct[theirs] / mine if sacct.get(theirs) is not None and mine else None)
            for key, (theirs, mine) in pairs.items()
        }
    return out


def accounting_report(metrics_path: Path, env: dict[str, str] | None = None) -> dict:
    """:func:`compare` for the run of ``metrics_path`` (its ``cost.slurm_job``)."""
    cost = read_metrics(metrics_path).get("cost")
    if not cost:
        return compare({}, None, f"{metrics_path} has no cost figures (made before they were recorded)")
    job = cost.get("slurm_job")
    if job is None:
        return compare(cost, None, "the run did not run in a SLURM job")
    try:
        return compare(cost, sacct_usage(job, env=env))
    except AccountingUnavailable as exc:
        return compare(cost, None, str(exc))


def describe(report: dict) -> str:
    """A few lines for the console."""
    ours = report["ours"]
    lines = []
    if ours:
        eff = ours.get("cpu_eff")
        lines.append(
            "ours:  "
            + (f"{ours['attempts']} attempts, " if (ours.get("attempts") or 1) > 1 else "")
            + f"wall {ours['wall_s']:.0f} s, {ours['cores']} cores, {ours['core_h']:.4g} core-h, "
            f"{ours['cpu_h'] * 3600:.0f} CPU s"
            + (f" ({eff:.0%} efficiency)" if eff is not None else "")
            + f", peak {ours['max_rss_mb']:.0f} MiB per rank"
            + (f", {ours['gpu_h']:.4g} GPU-h" if ours.get("gpus") else "")
            + (f", {ours['energy_wh']:.4g} Wh" if ours.get("energy_wh") is not None else "")
        )
    sacct = report["sacct"]
    if sacct is None:
        lines.append(f"sacct: not used ({report['sacct_unavailable']}); the figures above are our own")
    else:
        rss = f", MaxRSS {sacct['max_rss_mb']:.0f} MiB" if sacct.get("max_rss_mb") is not None else ""
        lines.append(
            f"sacct: job {sacct['job']} {sacct['state']}, "
            + (f"{sacct['attempts']} attempts, " if (sacct.get("attempts") or 1) > 1 else "")
            + f"elapsed {sacct['elapsed_s']:.0f} s, "
            f"{sacct['alloc_cpus']} cores, {sacct['core_h']:.4g} core-h, {sacct['cpu_s']:.0f} CPU s{rss}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m virgo_exps.train.cost",
        description="A training run's cost: our figures and, where the cluster keeps accounting, sacct's.",
    )
    parser.add_argument("metrics", nargs="?", default=METRICS_FILE, type=Path)
    parser.add_argument(
        "--out", type=Path, default=None, help="write the comparison as JSON (e.g. results/cost_sacct.json)"
    )
    args = parser.parse_args(argv)
    if not args.metrics.exists():
        print(f"error: {args.metrics} does not exist (run the train stage first)", file=sys.stderr)
        return 1
    report = accounting_report(args.metrics)
    print(describe(report))
    if args.out is not None:
        fsio.write_text(args.out, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
