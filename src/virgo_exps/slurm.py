"""Submitting a stage to SLURM with ``sbatch -W``.

The batch script is generated from the machine profile and the training
resources; ``sbatch -W`` blocks until the job ends and returns its exit code,
so DVC sees the job's outcome as the stage's.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from .config import TrainConfig
from .machines import Machine
from .paths import experiment_name, main_checkout, repo_root


def _log_pattern(stage: str) -> Path:
    folder = main_checkout() / "logs" / stage
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{experiment_name()}-%j.out"


def srun_command(cfg: TrainConfig, argv: list[str], python: str = "python") -> str:
    """The job step that starts the training processes, with ranks derived from SLURM."""
    script = " ".join(shlex.quote(a) for a in argv)
    if cfg.strategy == "single":
        return f"srun --ntasks=1 {python} {script}"
    if cfg.strategy in ("ddp", "deepspeed"):
        return (
            f"srun --ntasks-per-node=1 {python} -m torch.distributed.run "
            f"--nnodes=$SLURM_NNODES --nproc_per_node={cfg.procs_per_node} "
            "--rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv_id=$SLURM_JOB_ID "
            f"{script}"
        )
    if cfg.strategy == "horovod":
        return f"srun --ntasks-per-node={cfg.procs_per_node} {python} -m virgo_exps.hvd_slurm {script}"
    raise ValueError(cfg.strategy)


def batch_script(stage: str, cfg: TrainConfig, argv: list[str], machine: Machine) -> str:
    tasks = 1 if cfg.strategy in ("single", "ddp", "deepspeed") else cfg.procs_per_node
    cpus = machine.cpus_per_task * (cfg.procs_per_node if tasks == 1 else 1)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=virgo-{stage}-{experiment_name()}",
        f"#SBATCH --output={_log_pattern(stage)}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --nodes={cfg.nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --time={machine.time}",
        f"#SBATCH --signal=B:USR1@{machine.signal_seconds}",
        "#SBATCH --requeue",
    ]
    if machine.partition:
        lines.append(f"#SBATCH --partition={machine.partition}")
    if machine.account:
        lines.append(f"#SBATCH --account={machine.account}")
    if machine.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={machine.gpus_per_node}")
    if machine.mem:
        lines.append(f"#SBATCH --mem={machine.mem}")
    lines += [f"#SBATCH {extra}" for extra in machine.sbatch_extra]
    lines += [
        "set -uo pipefail",
        f"cd {shlex.quote(str(repo_root()))}",
        f"export VIRGO_HOME={shlex.quote(str(main_checkout()))}",
        f"export DVC_EXP_NAME={shlex.quote(experiment_name())}",
    ]
    for key, value in machine.env.items():
        lines.append(f"export {key}={shlex.quote(value)}")
    if machine.setup_script is not None:
        lines.append(f"source {shlex.quote(str(machine.setup_script))}")
    lines += [
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=$((29500 + SLURM_JOB_ID % 1000))",
        f"{srun_command(cfg, argv)} &",
        "child=$!",
        # SIGUSR1 arrives before the time limit: pass it on as SIGTERM so the
        # trainer writes its snapshot, then wait for the step to end.
        'trap \'kill -TERM "$child" 2>/dev/null\' USR1 TERM',
        'wait "$child"; rc=$?',
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done',
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def submit(stage: str, argv: list[str], cfg: TrainConfig, machine: Machine) -> int:
    script = batch_script(stage, cfg, argv, machine)
    folder = main_checkout() / "logs" / stage
    folder.mkdir(parents=True, exist_ok=True)
    script_path = folder / f"{experiment_name()}.sbatch"
    script_path.write_text(script)
    cmd = ["sbatch", "-W", "--parsable", str(script_path)]
    print(f"launch: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env={**os.environ}, capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    print(proc.stdout.strip(), file=sys.stderr)
    return proc.returncode
