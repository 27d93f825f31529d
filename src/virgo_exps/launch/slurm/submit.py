"""Submitting a stage: :func:`submit` (``sbatch -W`` and the watcher), the dry run, ``main``."""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from virgo_exps import container, fsio
from virgo_exps.config import ConfigError
from virgo_exps.launch import console
from virgo_exps.launch.job import JobSpec, dry_run_requested
from virgo_exps.launch.protocol import record_log
from virgo_exps.launch.slurm.query import find_active_jobs, start_tool
from virgo_exps.launch.slurm.script import JobContext, batch_script, fingerprint, sbatch_command
from virgo_exps.launch.slurm.watch import Signals, SubmitInterrupted, cancel_and_wait, say, stop_child, watch, write
from virgo_exps.launch.strategy_table import check_software
from virgo_exps.machines import Machine


def use_slurm_conf(machine: Machine) -> None:
    """Point every Slurm command of this process (and of the job) at the profile's ``slurm_conf``.

    A ``SLURM_CONF`` already in the environment wins: it is the user's explicit choice.
    """
    path = machine.slurm_conf_path()
    if path is None or os.environ.get("SLURM_CONF"):
        return
    if not path.is_file():
        raise ConfigError(
            f"machine '{machine.name}': slurm_conf {machine.slurm_conf} does not exist ({path}); start that "
            "cluster first (for machines/simcluster: `make cluster` as root), or set SLURM_CONF"
        )
    os.environ["SLURM_CONF"] = str(path)


IN_ALLOCATION_ENV = "VIRGO_IN_ALLOCATION"


def in_allocation() -> bool:
    """``VIRGO_IN_ALLOCATION=1`` inside a SLURM job: run the stage's step in this allocation, submit nothing.

    Set by a sweep's array task, whose own allocation has the resources of the train stage.
    """
    return os.environ.get(IN_ALLOCATION_ENV, "") == "1" and bool(os.environ.get("SLURM_JOB_ID"))


def run_in_allocation(ctx: JobContext, script: str) -> int:
    """Run the batch script with bash in the current allocation (its ``#SBATCH`` lines are comments).

    The job step starts with ``srun`` inside the allocation; the script's requeue logic requeues the
    enclosing job (``scontrol requeue $SLURM_JOB_ID``). The output goes to the stage log under the
    allocation's job id and to stderr. A stop signal ends the script's processes, never the allocation.
    """
    job_id = os.environ["SLURM_JOB_ID"]
    ctx.log_dir.mkdir(parents=True, exist_ok=True)
    fsio.write_text(ctx.script_path, script)
    log_path = ctx.log_file(job_id)
    record_log(log_path)
    say(f"{ctx.stage}: running the job step in the current allocation (job {job_id}); log {log_path}")
    received: list[int] = []
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            ["bash", str(ctx.script_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )

        def stop(signum, frame):  # end the script's processes; the allocation is not ours to cancel
            if not received:
                received.append(signum)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)

        old = {s: signal.signal(s, stop) for s in Signals.SIGNALS}
        try:
            assert proc.stdout is not None
            # every line to the stage log; to stderr (a sweep task's log) without the libraries' chatter
            console.tee(proc.stdout, log, sys.stderr.buffer)
            rc = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return 128 + received[0] if received else rc


def submit(spec: JobSpec, machine: Machine, ctx: JobContext | None = None) -> int:
    """Run ``spec`` as a SLURM job; return its exit code.

    A job array (``spec.array`` tasks, see :func:`~virgo_exps.launch.slurm.script.srun_command`)
    gives 0 only when every task completed.
    """
    stage, array = spec.stage, spec.array
    ctx = ctx or JobContext.current(stage)
    use_slurm_conf(machine)
    script = batch_script(ctx, spec, machine)
    comment = f"virgo:{fingerprint(ctx, spec, machine)}"
    cmd = sbatch_command(ctx.script_path, comment)
    if dry_run_requested():
        print(
            f"# dry run (VIRGO_DRY_RUN): nothing submitted; on machine '{machine.name}' the launcher would "
            f"write {ctx.script_path} and run:\n# {shlex.join(cmd)}\n{script}",
            end="",
            flush=True,
        )
        return 0
    if machine.container is not None:
        container.check(machine.container)  # a missing or damaged image, before the queue
    else:  # checked here, not after a wait in the queue: the job runs this same interpreter
        check_software(spec.row, ctx.python)
    if in_allocation():
        if array:
            raise ConfigError(
                f"stage '{stage}' is a job array of {array} tasks and cannot run inside another job's allocation "
                f"({IN_ALLOCATION_ENV}=1, job {os.environ.get('SLURM_JOB_ID')}); sweep over train parameters only, "
                "or make the data first (`dvc repro preprocess`) and commit dvc.lock"
            )
        return run_in_allocation(ctx, script)
    for tool in ("sbatch", "scontrol", "squeue", "scancel"):
        if shutil.which(tool) is None:
            raise ConfigError(
                f"machine '{machine.name}' submits to SLURM but `{tool}` is not on PATH; run on the cluster's "
                "login node, or choose another machine (VIRGO_MACHINE or machines/active)"
            )
    follow = os.environ.get("VIRGO_FOLLOW_LOG", "1") != "0"
    with Signals() as signals:
        active = find_active_jobs(ctx)
        if signals.received is not None:
            return 128 + signals.received
        if active:
            job_id, name, state, other = active[0]
            if other != comment or len(active) > 1:
                ids = " ".join(a[0] for a in active)
                what = (
                    f"job {job_id} ({name}, {state}) is still in the queue for this workspace but was "
                    "submitted with another batch script or params"
                    if len(active) == 1
                    else f"jobs {ids} of stage '{stage}' are still in the queue for this workspace"
                )
                raise ConfigError(f"{what}; wait for it or cancel it (`scancel {ids}`), then run the stage again")
            say(
                f"attaching to job {job_id} ({name}, {state}), submitted earlier from this workspace with the "
                "same script and params; not submitting a second one"
            )
            record_log(ctx.log_file(job_id))
            return watch(job_id, ctx, None, signals, follow)
        ctx.log_dir.mkdir(parents=True, exist_ok=True)
        fsio.write_text(ctx.script_path, script)
        say(f"{stage} on '{machine.name}': {shlex.join(cmd)}")
        sbatch = start_tool(*cmd)
        assert sbatch.stdout is not None
        first = ""
        try:
            signals.raise_now = signals.received is None
            if signals.received is not None:
                raise SubmitInterrupted()
            first = sbatch.stdout.readline().strip()  # --parsable prints "<id>[;cluster]" at submission
            signals.raise_now = False
        except SubmitInterrupted:
            # Interrupted while submitting: stop sbatch, and cancel the job if it was created.
            signals.raise_now = False
            stop_child(sbatch)
            job_id = (first or sbatch.stdout.read() or "").strip().split(";")[0]
            if job_id.isdigit():
                cancel_and_wait(job_id, signals.received)
            else:
                say(f"{signal.Signals(signals.received).name} received while submitting; nothing was submitted")
            return 128 + signals.received
        job_id = first.split(";")[0]
        if not job_id.isdigit():
            rc = sbatch.wait()
            err = sbatch.stderr.read() if sbatch.stderr else ""
            write(f"launch: error: sbatch failed (exit code {rc}): {first} {err.strip()}\n")
            return rc or 1
        where = ctx.log_file(job_id, "<task>" if array else None)
        if not array:
            record_log(where)
        say(f"submitted job {job_id} ({ctx.job_name}{f', array of {array} tasks' if array else ''}); log {where}")
        try:
            return watch(job_id, ctx, sbatch, signals, follow)
        finally:
            stop_child(sbatch)


def dry_run_stage(stage: str = "train", dvc_file: str = "dvc.yaml") -> int:
    """Print the batch script of a DVC stage on the active machine, submitting nothing.

    Only stages that may be submitted (their script, ``stages/<stage>.py``, imports
    :mod:`virgo_exps.launch`: train, and a data stage on profiles with ``data_tasks``)
    are allowed: the stage command is run with ``VIRGO_DRY_RUN=1``, which stops it
    before any work.
    """
    stages = (yaml.safe_load(Path(dvc_file).read_text()) or {}).get("stages", {})
    if stage not in stages:
        raise ConfigError(f"{dvc_file}: no stage {stage!r}")
    argv = shlex.split(stages[stage]["cmd"])
    if not any(_uses_launcher(Path(arg)) for arg in argv if arg.endswith(".py")):
        raise ConfigError(f"stage {stage!r} does not go through the launcher; it always runs on the login node")
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return subprocess.run(argv, env={**os.environ, "VIRGO_DRY_RUN": "1"}).returncode


# Modules whose import makes a stage script go through the launcher: the
# launcher itself, and the train stage entry point every study's train stage uses.
LAUNCHING = ("virgo_exps.launch", "virgo_exps.train.stage")


def _uses_launcher(script: Path) -> bool:
    """Whether a stage script imports one of :data:`LAUNCHING` (read, not run)."""
    try:
        tree = ast.parse(script.read_text(), filename=str(script))
    except (OSError, SyntaxError):
        return False
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        if any(n == m or n.startswith(m + ".") for n in names for m in LAUNCHING):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m virgo_exps.launch.slurm", description="Show the SLURM batch script of a stage (dry run)."
    )
    parser.add_argument("stage", nargs="?", default="train")
    args = parser.parse_args(argv)
    try:
        return dry_run_stage(args.stage)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
