"""One launcher for every stage that may run somewhere else than the login node.

``launch(spec)`` starts the work a stage describes in a
:class:`~virgo_exps.launch.job.JobSpec` (its worker command, processes,
strategy, job array, requeues) on the active machine (see
:mod:`virgo_exps.machines`):

- ``local``: directly, with torchrun / horovodrun for several processes; the
  output goes to the terminal and to ``logs/<stage>/<experiment>-local-<pid>.out``.
- ``slurm``: as a batch job submitted with ``sbatch -W`` (:mod:`virgo_exps.launch.slurm`),
  so DVC waits for the job and receives its exit code.

Logs always go to the *main* checkout, also for queued experiments running in
DVC's temporary workspaces, so they can be found by experiment name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from virgo_exps.config import ConfigError, TrainConfig
from virgo_exps.launch import console, protocol
from virgo_exps.launch.job import JobSpec, dry_run_requested
from virgo_exps.launch.lifetime import TRAIN_STOP_GRACE_S, dies_with_parent_hook, stop_reason
from virgo_exps.launch.slurm import submit
from virgo_exps.launch.strategy_table import check_software, horovodrun_of, strategy_row
from virgo_exps.machines import Machine, load_machine
from virgo_exps.paths import experiment_name, main_checkout


def local_log_path(stage: str) -> Path:
    """The log of a local run of ``stage`` by this process (its folder made)."""
    path = protocol.stage_log_dir(main_checkout(), stage) / protocol.local_log_name(experiment_name(), os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _python() -> str:
    return sys.executable


def local_command(
    cfg: TrainConfig, argv: list[str], python: str | None = None, deepspeed_launcher: str = "torchrun"
) -> list[str]:
    """The command that starts all training processes on this machine (see the strategy table).

    ``cfg``: anything with ``strategy``, ``nodes`` and ``procs_per_node`` (a JobSpec, ``params.train``).
    """
    python = python or _python()
    procs = cfg.procs_per_node
    if cfg.nodes != 1:
        raise ConfigError(
            f"train.nodes: {cfg.nodes} nodes need a SLURM machine; the local machine runs one node "
            "(set VIRGO_MACHINE=<cluster profile> or train.nodes=1)"
        )
    row = strategy_row(cfg.strategy)
    check_software(row, python)
    if row.deepspeed_runner and deepspeed_launcher == "deepspeed":
        # DeepSpeed's runner; it sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* as torchrun does.
        return [
            python,
            "-m",
            "deepspeed.launcher.runner",
            "--num_nodes=1",
            f"--num_gpus={procs}",
            f"--master_port={protocol.free_port()}",
            "--no_local_rank",
            *argv,
        ]
    return _LOCAL[row.local](python, procs, argv)


_LOCAL = {  # StrategyRow.local -> the command
    "plain": lambda python, procs, argv: [python, *argv],
    "torchrun": lambda python, procs, argv: [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={procs}",
        *argv,
    ],
    "horovodrun": lambda python, procs, argv: [
        str(horovodrun_of(python)),
        "--gloo",
        "-np",
        str(procs),
        "-H",
        f"localhost:{procs}",
        python,
        *argv,
    ],
}


@contextlib.contextmanager
def core_slots(n: int, machine: Machine):
    """Hold ``n`` of the machine's process slots; wait (and say so) while they are busy.

    Queued experiments (``dvc queue start -j N``) run in parallel; on the
    local machine their trainings would fight for the same cores and every
    timing would be wrong. File locks in the main checkout serialise them.
    """
    total = machine.max_procs or os.cpu_count() or 1
    if n > total:
        raise ConfigError(
            f"train.procs_per_node: {n} processes do not fit the {total} cores of machine "
            f"'{machine.name}'; lower it or run on a cluster"
        )
    folder = main_checkout() / "logs" / ".slots"
    folder.mkdir(parents=True, exist_ok=True)
    held: list = []
    told = False
    try:
        while True:
            for i in range(total):
                if len(held) == n:
                    break
                fh = open(folder / f"slot-{i}.lock", "w")
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held.append(fh)
                except BlockingIOError:
                    fh.close()
            if len(held) == n:
                break
            for fh in held:
                fh.close()
            held = []
            if not told:
                print(
                    f"launch: waiting for {n} free core(s) on '{machine.name}' (another experiment is training)",
                    file=sys.stderr,
                    flush=True,
                )
                told = True
            time.sleep(1.0)
        yield
    finally:
        for fh in held:
            fh.close()


def run_local(
    stage: str, cmd: list[str], machine: Machine, procs: int, env: dict | None = None, cores: int | None = None
) -> int:
    """Run ``cmd`` here, teeing its output to the stage log; forward Ctrl-C/SIGTERM/SIGHUP. It holds
    ``cores`` of the machine's core slots (default ``procs``) while it runs."""
    log = local_log_path(stage)
    protocol.record_log(log)
    print(f"launch: {stage} on '{machine.name}': {shlex.join(cmd)}", file=sys.stderr, flush=True)
    print(protocol.log_announcement(log), file=sys.stderr, flush=True)
    full_env = {**os.environ, **machine.env, **(env or {})}
    with core_slots(cores or procs, machine), open(log, "ab") as out:
        # Own session: a terminal's Ctrl-C reaches the training through `forward` only (once).
        # The child also ends when this launcher dies, even by SIGKILL.
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
            preexec_fn=dies_with_parent_hook(),
        )
        killer: list[threading.Timer] = []

        def kill_group() -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        def forward(signum, frame):
            # SIGTERM: the trainer writes its snapshot at the next step and exits; a process
            # group still there after TRAIN_STOP_GRACE_S is killed.
            if not killer:
                why = stop_reason(signum)
                with contextlib.suppress(OSError, ValueError, RuntimeError):  # RuntimeError: reentrant write
                    print(f"launch: {why}: stopping the training", file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            if not killer:
                killer.append(threading.Timer(TRAIN_STOP_GRACE_S, kill_group))
                killer[0].daemon = True
                killer[0].start()

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            assert proc.stdout is not None
            console.tee(proc.stdout, out, sys.stderr.buffer)  # the log gets every line, the console no chatter
            rc = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for timer in killer:
                timer.cancel()
        if killer:
            kill_group()  # the workers torchrun left behind, if any
    if rc != 0:
        print(f"launch: {stage} failed with exit code {rc}; log: {log}", file=sys.stderr, flush=True)
    return rc


def launch(spec: JobSpec, machine: Machine | None = None) -> int:
    """Run ``spec`` on the active machine (or ``machine``); return its exit code."""
    machine = machine or load_machine()
    if machine.kind != "local":
        return submit(spec, machine)
    if spec.array:
        raise ConfigError(
            f"stage {spec.stage}: a job array of {spec.array} tasks needs a SLURM machine; "
            f"machine '{machine.name}' runs the stage's work itself"
        )
    # Every strategy gets the same share of the cores per process (torchrun
    # would set 1, a single process would take all): without this, strategy
    # comparisons measure thread counts, not parallelism.
    total = machine.max_procs or os.cpu_count() or 1
    threads = max(1, total // spec.procs_per_node)
    env = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(threads)}
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        threads = int(given)
    # The run holds a core slot for every thread it runs, so that queued experiments wait for free cores
    # instead of sharing them (a single process with 2 threads holds 2).
    cores = min(total, max(spec.procs_per_node, spec.procs_per_node * threads))
    cmd = local_command(spec, list(spec.argv), deepspeed_launcher=machine.deepspeed_launcher)
    if dry_run_requested():
        print(
            f"# dry run (VIRGO_DRY_RUN): nothing started; on machine '{machine.name}' the launcher would run:\n"
            f"{shlex.join(cmd)}",
            flush=True,
        )
        return 0
    return run_local(spec.stage, cmd, machine, spec.procs_per_node, env, cores=cores)


def run(stage: str, argv: list[str], cfg: TrainConfig | None = None, machine: Machine | None = None) -> int:
    """:func:`launch` of a training (``cfg``: ``params.train``, defaults when None) running ``argv``."""
    return launch(JobSpec.training(stage, argv, cfg or TrainConfig()), machine)
