"""The batch script of a stage: ``#SBATCH`` options, quoting, the job step, the requeue logic.

Deterministic for a given context, job and machine profile (the golden files in
tests/golden/ hold examples). Text that cannot reach sbatch unchanged is refused
(:func:`check_job_text`); what can is quoted where it is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from virgo_exps import container
from virgo_exps.config import ConfigError
from virgo_exps.launch import protocol
from virgo_exps.launch.job import JobSpec
from virgo_exps.launch.protocol import EXIT_INTERRUPTED
from virgo_exps.launch.strategy_table import STRATEGY_TABLE
from virgo_exps.machines import Machine
from virgo_exps.paths import experiment_name, main_checkout

if TYPE_CHECKING:
    from virgo_exps.launch.slurm.query import JobInfo


@dataclasses.dataclass(frozen=True)
class JobContext:
    """Where a stage runs and where its job's files go."""

    stage: str
    experiment: str
    workdir: Path  # the workspace where DVC runs the stage (maybe .dvc/tmp/exps/...)
    home: Path  # the main checkout: logs go there
    python: str  # interpreter for the training processes

    @classmethod
    def current(cls, stage: str) -> JobContext:
        return cls(stage, experiment_name(), Path.cwd().resolve(), main_checkout(), sys.executable)

    @property
    def job_name(self) -> str:
        return f"virgo-{self.stage}-{self.experiment}"

    @property
    def log_dir(self) -> Path:
        return protocol.stage_log_dir(self.home, self.stage)

    @property
    def log_pattern(self) -> str:
        """The ``--output`` pattern: the log's folder and experiment name taken literally (``%%``)."""
        return self._pattern(array=False)

    @property
    def array_log_pattern(self) -> str:
        return self._pattern(array=True)

    def _pattern(self, array: bool) -> str:
        name = protocol.job_log_pattern(self.experiment, array, literal=slurm_filename)
        return f"{slurm_filename(str(self.log_dir))}/{name}"

    @property
    def script_path(self) -> Path:
        return self.log_dir / f"{self.experiment}.sbatch"

    def log_file(self, job_id: str, task: str | None = None) -> Path:
        return self.log_dir / protocol.job_log_name(self.experiment, job_id, task)

    def log_of(self, info: JobInfo) -> Path:
        """Where Slurm writes the log of ``info`` (a job, or a task of an array): known from
        the ids, since ``scontrol`` shows a wrong ``StdOut`` for a pattern with ``%%``."""
        if info.array_task_id.isdigit() and info.array_job_id:
            return self.log_file(info.array_job_id, info.array_task_id)
        return self.log_file(info.job_id)


# sbatch reads `#SBATCH` lines with its own rules: white space ends an argument unless
# quoted, quotes group and are removed, an unquoted `#` starts a comment, a backslash
# keeps the next character (also inside quotes) but cannot keep white space outside them.
_SBATCH_PLAIN = re.compile(r"""[^'"#\\\s]*""")


def sbatch_arg(value: str) -> str:
    """``value`` as one argument of an ``#SBATCH`` line, reaching sbatch unchanged:
    as it is when it holds nothing special to sbatch, else in double quotes."""
    if _SBATCH_PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def slurm_filename(text: str) -> str:
    """``text`` taken literally in a Slurm file name pattern (``--output``): ``%`` doubled."""
    return text.replace("%", "%%")


def check_job_text(ctx: JobContext, machine_name: str = "") -> None:
    """Refuse names and paths that cannot reach a batch script and Slurm unchanged.

    Quotes, ``%``, ``$``, ``#``, spaces and other characters are escaped where
    they are written; what remains impossible: a control character (a line break
    would end an ``#SBATCH`` line or a comment), a backslash in the log's path
    (Slurm then stops expanding ``%j`` in it), and ``/`` in the experiment name
    (the log would go to another folder). DVC's own names never contain these.
    """

    def bad(text: str, backslash: bool = False, slash: bool = False) -> str:
        for ch in text:
            if ord(ch) < 32 or ord(ch) == 127:
                return f"a control character ({ch!r})"
            if backslash and ch == "\\":
                return "a backslash"
            if slash and ch == "/":
                return "a '/'"
        return ""

    if problem := bad(ctx.experiment, backslash=True, slash=True):
        raise ConfigError(
            f"experiment name {ctx.experiment!r}: contains {problem}, which cannot be passed safely to "
            "a SLURM batch script and its log file name; choose another name (`dvc exp run -n <name>` "
            "with letters, digits, '-', '_' or '.')"
        )
    for what, text, backslash in (
        ("checkout path", str(ctx.home), True),
        ("workspace path", str(ctx.workdir), False),
        ("machine name", machine_name, False),
        ("stage name", ctx.stage, True),
    ):
        if problem := bad(text, backslash=backslash):
            raise ConfigError(
                f"{what} {text!r}: contains {problem}, which cannot be passed safely to a SLURM "
                "batch script; rename or move it"
            )


def tasks_per_node(spec: JobSpec) -> int:
    """Slurm tasks per node: one torchrun per node, or one task per process (Horovod)."""
    return spec.procs_per_node if spec.row.task_per_process else 1


def srun_command(spec: JobSpec, machine: Machine) -> str:
    """The job step that starts every process of ``spec`` (a line of the batch script).

    A job array (``spec.array`` tasks) runs ``spec.argv`` once a task with
    ``--part $SLURM_ARRAY_TASK_ID --parts <array> --workers $SLURM_CPUS_PER_TASK``.
    """
    script = shlex.join(spec.argv)
    array = spec.array
    extra = "".join(f" {shlex.quote(x)}" for x in machine.srun_extra)
    common = f'--cpus-per-task="$SLURM_CPUS_PER_TASK"{extra}'
    if machine.container is not None:
        common += ' "${VIRGO_IMAGE_RUN[@]}"'  # the step's program starts inside the image
    if array:
        return (
            f'srun --nodes=1 --ntasks=1 {common} "$VIRGO_PYTHON" {script} '
            f'--part "$SLURM_ARRAY_TASK_ID" --parts {array} --workers "$SLURM_CPUS_PER_TASK"'
        )
    row = spec.row
    if row.deepspeed_runner and machine.deepspeed_launcher == "deepspeed":
        # DeepSpeed's runner once per node, without ssh: the node's rank is read on the node.
        return (
            f'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 {common} '
            'bash -c \'exec "$0" -m deepspeed.launcher.runner --node_rank="$SLURM_NODEID" "$@"\' "$VIRGO_PYTHON" '
            '--no_ssh --hostfile="$VIRGO_HOSTFILE" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" '
            f'--num_nodes="$SLURM_JOB_NUM_NODES" --num_gpus={spec.procs_per_node} --no_local_rank {script}'
        )
    return _SRUN[row.srun](common, spec.procs_per_node, script)


_SRUN = {  # StrategyRow.srun -> the job step
    "plain": lambda common, procs, script: f'srun --nodes=1 --ntasks=1 {common} "$VIRGO_PYTHON" {script}',
    "torchrun": lambda common, procs, script: (
        f'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 {common} '
        '"$VIRGO_PYTHON" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" '
        f"--nproc_per_node={procs} --rdzv_backend=c10d "
        '--rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" '
        f"{script}"
    ),
    "hvd_slurm": lambda common, procs, script: (
        f'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node={procs} {common} '
        f'"$VIRGO_PYTHON" -m virgo_exps.launch.hvd_slurm {script}'
    ),
}


def _sbatch_options(ctx: JobContext, spec: JobSpec, machine: Machine) -> list[str]:
    array = spec.array
    if array:  # independent CPU tasks of one core set each (data generation)
        nodes, tasks, cpus = 1, 1, machine.cpus_per_task
    else:
        if not spec.row.multi_node and spec.nodes != 1:
            *some, last = [name for name, row in STRATEGY_TABLE.items() if row.multi_node]
            others = f"{', '.join(some)} or {last}"
            raise ConfigError(f"train.nodes: strategy '{spec.strategy}' runs one process on one node; use {others}")
        nodes, tasks = spec.nodes, tasks_per_node(spec)
        # CPUs of one Slurm task: torchrun's task holds all processes of its node.
        cpus = machine.cpus_per_task * (spec.procs_per_node if tasks == 1 else 1)
    opts = [
        f"--job-name={sbatch_arg(ctx.job_name)}",
        f"--output={sbatch_arg(ctx.array_log_pattern if array else ctx.log_pattern)}",
        "--open-mode=append",  # a requeued run appends to the same log
        f"--chdir={sbatch_arg(str(ctx.workdir))}",
        *([f"--array=0-{array - 1}"] if array else []),
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks}",
        f"--cpus-per-task={cpus}",
        f"--time={machine.time}",
        f"--signal=B:USR1@{machine.signal_seconds}",
        "--requeue",
    ]
    return opts + machine_options(machine, gpus=not array)


def machine_options(machine: Machine, gpus: bool = True) -> list[str]:
    """The sbatch options a machine profile adds to every job: partition, account, GPUs (unless
    ``gpus`` is false: the CPU tasks of a data array), memory and its own extra lines."""
    opts = []
    if machine.partition:
        opts.append(f"--partition={sbatch_arg(machine.partition)}")
    if machine.account:
        opts.append(f"--account={sbatch_arg(machine.account)}")
    if machine.gpus_per_node and gpus:
        opts.append(
            f"--gres=gpu:{machine.gpus_per_node}"
            if machine.gpu_option == "gres"
            else f"--gpus-per-node={machine.gpus_per_node}"
        )
    if machine.mem:
        opts.append(f"--mem={machine.mem}")
    return opts + list(machine.sbatch_extra)


# The part of the batch script after the settings: start the step, pass the
# pre-limit SIGUSR1 on, decide between "done", "failed" and "requeue me".
_BODY = r"""
echo "virgo: job $SLURM_JOB_ID ($SLURM_JOB_NAME) on $SLURM_JOB_NUM_NODES node(s): $SLURM_JOB_NODELIST;" \
     "machine $VIRGO_MACHINE; restart ${SLURM_RESTART_COUNT:-0}; $(date '+%Y-%m-%dT%H:%M:%S')"
echo "virgo: workdir $PWD; rendezvous $MASTER_ADDR:$MASTER_PORT"

# Identity of the trainer's status file before the step: "interrupted" only
# counts when the step itself wrote it (atomic rename: new inode and mtime).
status_id() { [ -n "$VIRGO_STATUS_FILE" ] && stat -c '%i %y' "$VIRGO_STATUS_FILE" 2>/dev/null; }
status_before=$(status_id)

step=""
stop_requested=0
terminating=0
got_signal=0
on_usr1() {
    got_signal=1
    stop_requested=1
    echo "virgo: SIGUSR1 (time limit near, or preemption): asking the training to write its snapshot and stop"
    # srun passes USR1 to every process of the step; SIGTERM would make srun kill the step at once.
    if [ -n "$step" ]; then kill -USR1 "$step" 2>/dev/null; fi
}
on_term() {
    got_signal=1
    terminating=1
    echo "virgo: SIGTERM: the job is ending (cancelled, time limit reached, or requeued)"
}
trap on_usr1 USR1
trap on_term TERM

__SRUN__ &
step=$!
if [ "$stop_requested" = 1 ]; then kill -USR1 "$step" 2>/dev/null; fi
# `wait` returns early when a trapped signal arrives: wait again until the step has ended.
while :; do
    got_signal=0
    wait "$step"; rc=$?
    [ "$got_signal" = 0 ] && break
    kill -0 "$step" 2>/dev/null && continue
    wait "$step" 2>/dev/null; again=$?
    [ "$again" != 127 ] && rc=$again
    break
done
echo "virgo: step ended with exit code $rc; $(date '+%Y-%m-%dT%H:%M:%S')"

interrupted=0
[ "$rc" = "$VIRGO_EXIT_INTERRUPTED" ] && interrupted=1
if [ -n "$VIRGO_STATUS_FILE" ] && [ "$(status_id)" != "$status_before" ] \
        && grep -q '"status": *"__INTERRUPTED__"' "$VIRGO_STATUS_FILE" 2>/dev/null; then
    interrupted=1
fi
# Asked to stop and did not finish: requeue even if the step died before its handlers were set.
[ "$stop_requested" = 1 ] && [ "$rc" != 0 ] && interrupted=1
if [ "$interrupted" = 1 ] && [ "$terminating" = 0 ]; then
    restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$restarts" -ge "$VIRGO_MAX_REQUEUES" ]; then
        echo "virgo: error: interrupted again after $restarts requeue(s); train.max_requeues is" \
             "$VIRGO_MAX_REQUEUES, so the job stops here. Raise the machine's time limit or" \
             "train.max_requeues; running the stage again continues from the snapshot." >&2
        exit "$VIRGO_EXIT_INTERRUPTED"
    fi
    echo "virgo: requeueing job $SLURM_JOB_ID (requeue $((restarts + 1)) of at most $VIRGO_MAX_REQUEUES);" \
         "the next run resumes from the snapshot"
    if scontrol requeue "$SLURM_JOB_ID"; then
        # Slurm ends this script as part of the requeue; do not race it with an exit code.
        sleep 60 & wait $!
        exit "$VIRGO_EXIT_INTERRUPTED"
    fi
    echo "virgo: error: scontrol requeue $SLURM_JOB_ID failed; the snapshot is kept," \
         "run the stage again to continue" >&2
    exit "$VIRGO_EXIT_INTERRUPTED"
fi
exit "$rc"
"""


def _image_lines(ctx: JobContext, machine: Machine) -> list[str]:
    """With a container: the words that start a job step's program inside the image."""
    if machine.container is None:
        return []
    # On the nodes: the workspace, the main checkout (its code, logs and snapshots) and the profile's binds.
    c = machine.container
    paths = [Path(ctx.workdir), Path(ctx.home), *container.extra_paths(c)]
    words = container.prefix(c, ctx.workdir, src=Path(ctx.home) / "src", paths=paths)
    lines = [f"VIRGO_IMAGE_RUN=({' '.join(shlex.quote(w) for w in words)})  # {c.runtime}"]
    if c.runtime == "charliecloud":
        lines.append('export USER="${USER:-$(id -un)}"  # ch-run needs it; a job started by hand may lack it')
    return lines


def batch_script(ctx: JobContext, spec: JobSpec, machine: Machine) -> str:
    """The complete batch script (deterministic for a given context, job spec and profile)."""
    check_job_text(ctx, machine.name)
    opts = _sbatch_options(ctx, spec, machine)
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# Stage '{ctx.stage}' of experiment '{ctx.experiment}' on machine '{machine.name}',",
        "# generated by virgo_exps.launch.slurm (submitted with `sbatch -W --parsable`).",
        *(f"#SBATCH {opt}" for opt in opts),
        "",
        "set -uo pipefail",
        f"VIRGO_PYTHON={q(container.IMAGE_PYTHON if machine.container else ctx.python)}",
        *_image_lines(ctx, machine),
        f"VIRGO_STATUS_FILE={q(spec.files.status_file)}",
        f"VIRGO_MAX_REQUEUES={int(spec.max_requeues)}",
        f"VIRGO_EXIT_INTERRUPTED={EXIT_INTERRUPTED}",
        f'cd {q(str(ctx.workdir))} || {{ echo "virgo: error: cannot cd into the workspace" >&2; exit 1; }}',
        f"export VIRGO_HOME={q(str(ctx.home))}",
        f"export VIRGO_MACHINE={q(machine.name)}",
        f"export DVC_EXP_NAME={q(ctx.experiment)}",
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{machine.cpus_per_task}}}",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT={protocol.JOB_RENDEZVOUS_PORT}",
        "export MASTER_ADDR MASTER_PORT",
    ]
    if not spec.array and spec.row.deepspeed_runner and machine.deepspeed_launcher == "deepspeed":
        hostfile = f'{q(str(ctx.log_dir / ctx.experiment))}-"$SLURM_JOB_ID".hostfile'
        lines += [
            f"VIRGO_HOSTFILE={hostfile}  # the nodes of this job, {spec.procs_per_node} slots each",
            f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots={spec.procs_per_node}/" '
            '> "$VIRGO_HOSTFILE"',
        ]
    lines += [f"export {key}={q(value)}" for key, value in machine.env.items()]
    if machine.setup_script is not None:
        # module systems often read unset variables: no `set -u` while sourcing
        lines += ["set +u", f"source {q(str(machine.setup_script))}", "set -u"]
    body = _BODY.replace("__SRUN__", srun_command(spec, machine))
    body = body.replace("__INTERRUPTED__", protocol.STATUS_INTERRUPTED)
    return "\n".join(lines) + "\n" + body


def fingerprint(ctx: JobContext, spec: JobSpec, machine: Machine) -> str:
    """Identifies what a job computes: its batch script and the params file the stage reads.

    The experiment name is left out: `dvc exp run` names every run afresh, and a
    re-run after a lost login session must still recognise the job it started.
    """
    anonymous = dataclasses.replace(ctx, experiment="*")
    h = hashlib.sha256(batch_script(anonymous, spec, machine).encode())
    if spec.files.params and Path(spec.files.params).is_file():
        h.update(Path(spec.files.params).read_bytes())
    return h.hexdigest()[:16]


def sbatch_command(script_path: Path, comment: str | None = None) -> list[str]:
    cmd = ["sbatch", "-W", "--parsable"]
    if comment:
        cmd.append(f"--comment={comment}")
    return [*cmd, str(script_path)]
