"""One launcher for every stage that may run somewhere else than the login node.

``run(stage, worker_argv, train_cfg)`` starts the stage's worker processes on
the active machine (see :mod:`virgo_exps.machines`):

- ``local``: directly, with torchrun / horovodrun for several processes; the
  output goes to the terminal and to ``logs/<stage>/<experiment>-local-<pid>.out``.
- ``slurm``: as a batch job submitted with ``sbatch -W`` (:mod:`virgo_exps.slurm`),
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
import time
from pathlib import Path

from .config import ConfigError, TrainConfig
from .machines import Machine, load_machine
from .paths import experiment_name, main_checkout


def log_path(stage: str, suffix: str) -> Path:
    path = main_checkout() / "logs" / stage / f"{experiment_name()}-{suffix}.out"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _python() -> str:
    return sys.executable


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_command(cfg: TrainConfig, argv: list[str], python: str | None = None,
                  deepspeed_launcher: str = "torchrun") -> list[str]:
    """The command that starts all training processes on this machine."""
    python = python or _python()
    procs = cfg.procs_per_node
    if cfg.nodes != 1:
        raise ConfigError(
            f"train.nodes: {cfg.nodes} nodes need a SLURM machine; the local machine runs one node "
            "(set VIRGO_MACHINE=<cluster profile> or train.nodes=1)"
        )
    if cfg.strategy == "single":
        return [python, *argv]
    if cfg.strategy == "deepspeed" and deepspeed_launcher == "deepspeed":
        # DeepSpeed's runner; it sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* as torchrun does.
        return [python, "-m", "deepspeed.launcher.runner", "--num_nodes=1", f"--num_gpus={procs}",
                f"--master_port={_free_port()}", "--no_local_rank", *argv]
    if cfg.strategy in ("ddp", "deepspeed"):
        return [python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                f"--nproc_per_node={procs}", *argv]
    if cfg.strategy == "horovod":
        horovodrun = str(Path(python).parent / "horovodrun")
        if not Path(horovodrun).exists():
            raise ConfigError(
                "train.strategy: 'horovod' needs Horovod, which is not built in this environment; "
                "run `make horovod` (a few minutes) or choose 'ddp' or 'deepspeed'"
            )
        return [horovodrun, "--gloo", "-np", str(procs), "-H", f"localhost:{procs}", python, *argv]
    raise ConfigError(f"train.strategy: unknown strategy {cfg.strategy!r}")


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
                print(f"launch: waiting for {n} free core(s) on '{machine.name}' "
                      "(another experiment is training)", file=sys.stderr, flush=True)
                told = True
            time.sleep(1.0)
        yield
    finally:
        for fh in held:
            fh.close()


def run_local(stage: str, cmd: list[str], machine: Machine, procs: int, env: dict | None = None) -> int:
    """Run ``cmd`` here, teeing its output to the stage log; forward Ctrl-C/SIGTERM/SIGHUP."""
    log = log_path(stage, f"local-{os.getpid()}")
    print(f"launch: {stage} on '{machine.name}': {shlex.join(cmd)}", file=sys.stderr, flush=True)
    print(f"launch: log {log}", file=sys.stderr, flush=True)
    full_env = {**os.environ, **machine.env, **(env or {})}
    with core_slots(procs, machine), open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)

        def forward(signum, frame):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                out.write(line)
                out.flush()
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
            rc = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    if rc != 0:
        print(f"launch: {stage} failed with exit code {rc}; log: {log}", file=sys.stderr, flush=True)
    return rc


def run(stage: str, argv: list[str], cfg: TrainConfig | None = None, machine: Machine | None = None) -> int:
    """Run a stage's worker command on the active machine; return its exit code."""
    machine = machine or load_machine()
    if cfg is None:
        cfg = TrainConfig()
    if machine.kind == "local":
        # Every strategy gets the same share of the cores per process (torchrun
        # would set 1, a single process would take all): without this, strategy
        # comparisons measure thread counts, not parallelism.
        threads = max(1, (machine.max_procs or os.cpu_count() or 1) // cfg.procs_per_node)
        env = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(threads)}
        if os.environ.get("VIRGO_DRY_RUN", "").strip().lower() not in ("", "0", "false", "no"):
            print(f"# dry run (VIRGO_DRY_RUN): nothing started; on machine '{machine.name}' the launcher would run:\n"
                  f"{shlex.join(local_command(cfg, argv, deepspeed_launcher=machine.deepspeed_launcher))}", flush=True)
            return 0
        return run_local(stage, local_command(cfg, argv, deepspeed_launcher=machine.deepspeed_launcher), machine, cfg.procs_per_node, env)
    from .slurm import submit

    return submit(stage, argv, cfg, machine)
