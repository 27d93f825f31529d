"""Submitting a stage to SLURM: one generated batch script, ``sbatch -W``, and a watcher.

:func:`submit` is what :func:`virgo_exps.launch.launcher.run` calls on ``kind: slurm``
machines. It

1. builds the batch script from the machine profile and the training
   resources (:func:`batch_script`): job name ``virgo-<stage>-<experiment>``,
   log ``logs/<stage>/<experiment>-<jobid>.out`` in the *main* checkout, a
   ``cd`` into the workspace where DVC runs the stage, one ``srun`` step that
   starts the training processes (torchrun per node for DDP/DeepSpeed, one
   task per process through :mod:`virgo_exps.launch.hvd_slurm` for Horovod);
2. attaches to a job of the same stage (name ``virgo-<stage>-*``), user and
   working directory that is still pending or running, submitted with the same
   script and params (fingerprint in ``--comment``), instead of submitting a
   second one: a re-run after the login node died waits for it. DVC names each
   run afresh, so the experiment name is not compared; a job with other
   params makes the stage fail with a clear message;
3. otherwise runs ``sbatch -W --parsable`` as a child process *and* polls
   ``scontrol show job`` every :data:`POLL_S` seconds. ``sbatch -W`` alone can
   return up to 32 s after the job ended and returns 0 for NODE_FAIL; the poll
   learns the final state within a poll interval and any final state other
   than COMPLETED gives a non-zero exit. A requeued job (PENDING again) is not
   final. When Slurm no longer knows the job, ``sbatch -W``'s code decides;
4. streams the job log to stderr, so DVC (and a tmux pane) shows progress, and
   on failure prints job id, final state, exit code and the log's last lines;
5. on SIGINT, SIGTERM or SIGHUP cancels the job with ``scancel`` and waits
   until ``squeue`` no longer lists it before exiting non-zero.

Time limits and preemption: the job asks for ``--signal=B:USR1@<signal_seconds>``
and ``--requeue``. The batch script forwards SIGUSR1 to ``srun``, which passes it
to every process of the step (torchrun dies of it, its workers handle it; a
SIGTERM to ``srun`` would instead kill the step at once). The trainer writes its
snapshot and exits 85; the batch script then requeues the job with ``scontrol
requeue`` until ``train.max_requeues`` is used up, and the requeued run resumes
from the snapshot. SIGTERM (``scancel``, the time limit itself) never requeues.

Job arrays: the generate stage on a profile with ``generate_tasks: N`` is one
array of N single-task jobs (``--array=0-<N-1>``, logs
``logs/generate/<experiment>-<jobid>_<task>.out``); the stage fails unless every
task completed. The same watcher follows the whole array.

``VIRGO_DRY_RUN=1`` prints the batch script and the ``sbatch`` command and
submits nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from virgo_exps.config import ConfigError, TrainConfig
from virgo_exps.launch import protocol
from virgo_exps.launch.protocol import EXIT_INTERRUPTED, NO_FILES, WorkerFiles
from virgo_exps.machines import Machine
from virgo_exps.paths import experiment_name, main_checkout

POLL_S = 0.5  # seconds between two `scontrol show job`
CONFIRM_S = 1.0  # a final state of a requeueable job must hold this long (Slurm may requeue it)
LOG_TAIL_LINES = 30
CANCEL_WAIT_S = 600  # give up waiting for a cancelled job to leave squeue after this long
UNREACHABLE_S = 60  # ... or when squeue has not answered for this long (slurmctld down)

# Job states after which the job never runs again, unless Slurm requeues it
# (then it shows PENDING with Restarts + 1, which is not in this set).
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)


def dry_run_requested() -> bool:
    return os.environ.get("VIRGO_DRY_RUN", "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------
# the batch script
# --------------------------------------------------------------------------


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


def tasks_per_node(cfg: TrainConfig) -> int:
    """Slurm tasks per node: one torchrun per node, or one task per Horovod process."""
    return cfg.procs_per_node if cfg.strategy == "horovod" else 1


def srun_command(cfg: TrainConfig, argv: list[str], machine: Machine, array: int = 0) -> str:
    """The job step that starts every training process (a line of the batch script).

    ``array``: a job array of that many tasks, each running ``argv`` once with
    ``--part $SLURM_ARRAY_TASK_ID --parts <array> --workers $SLURM_CPUS_PER_TASK``.
    """
    script = shlex.join(argv)
    extra = "".join(f" {shlex.quote(x)}" for x in machine.srun_extra)
    common = f'--cpus-per-task="$SLURM_CPUS_PER_TASK"{extra}'
    if array:
        return (
            f'srun --nodes=1 --ntasks=1 {common} "$VIRGO_PYTHON" {script} '
            f'--part "$SLURM_ARRAY_TASK_ID" --parts {array} --workers "$SLURM_CPUS_PER_TASK"'
        )
    if cfg.strategy == "single":
        return f'srun --nodes=1 --ntasks=1 {common} "$VIRGO_PYTHON" {script}'
    if cfg.strategy == "deepspeed" and machine.deepspeed_launcher == "deepspeed":
        # DeepSpeed's runner once per node, without ssh: the node's rank is read on the node.
        return (
            f'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 {common} '
            'bash -c \'exec "$0" -m deepspeed.launcher.runner --node_rank="$SLURM_NODEID" "$@"\' "$VIRGO_PYTHON" '
            '--no_ssh --hostfile="$VIRGO_HOSTFILE" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" '
            f'--num_nodes="$SLURM_JOB_NUM_NODES" --num_gpus={cfg.procs_per_node} --no_local_rank {script}'
        )
    if cfg.strategy in ("ddp", "deepspeed"):
        return (
            f'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 {common} '
            '"$VIRGO_PYTHON" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" '
            f"--nproc_per_node={cfg.procs_per_node} --rdzv_backend=c10d "
            '--rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" '
            f"{script}"
        )
    if cfg.strategy == "horovod":
        return (
            f'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node={cfg.procs_per_node} {common} '
            f'"$VIRGO_PYTHON" -m virgo_exps.launch.hvd_slurm {script}'
        )
    raise ConfigError(f"train.strategy: unknown strategy {cfg.strategy!r}")


def _sbatch_options(ctx: JobContext, cfg: TrainConfig, machine: Machine, array: int = 0) -> list[str]:
    if array:  # independent CPU tasks of one core set each (data generation)
        nodes, tasks, cpus = 1, 1, machine.cpus_per_task
    else:
        if cfg.strategy == "single" and cfg.nodes != 1:
            raise ConfigError(
                "train.nodes: strategy 'single' runs one process on one node; use ddp, deepspeed or horovod"
            )
        nodes, tasks = cfg.nodes, tasks_per_node(cfg)
        # CPUs of one Slurm task: torchrun's task holds all processes of its node.
        cpus = machine.cpus_per_task * (cfg.procs_per_node if tasks == 1 else 1)
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
    if machine.partition:
        opts.append(f"--partition={sbatch_arg(machine.partition)}")
    if machine.account:
        opts.append(f"--account={sbatch_arg(machine.account)}")
    if machine.gpus_per_node and not array:
        opts.append(
            f"--gres=gpu:{machine.gpus_per_node}"
            if machine.gpu_option == "gres"
            else f"--gpus-per-node={machine.gpus_per_node}"
        )
    if machine.mem:
        opts.append(f"--mem={machine.mem}")
    opts += list(machine.sbatch_extra)
    return opts


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
        && grep -q '"status": *"interrupted"' "$VIRGO_STATUS_FILE" 2>/dev/null; then
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


def batch_script(
    ctx: JobContext, cfg: TrainConfig, argv: list[str], machine: Machine, array: int = 0, files: WorkerFiles = NO_FILES
) -> str:
    """The complete batch script (deterministic for a given context, config and profile)."""
    check_job_text(ctx, machine.name)
    opts = _sbatch_options(ctx, cfg, machine, array)
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# Stage '{ctx.stage}' of experiment '{ctx.experiment}' on machine '{machine.name}',",
        "# generated by virgo_exps.launch.slurm (submitted with `sbatch -W --parsable`).",
        *(f"#SBATCH {opt}" for opt in opts),
        "",
        "set -uo pipefail",
        f"VIRGO_PYTHON={q(ctx.python)}",
        f"VIRGO_STATUS_FILE={q(files.status_file)}",
        f"VIRGO_MAX_REQUEUES={int(cfg.max_requeues)}",
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
    if cfg.strategy == "deepspeed" and machine.deepspeed_launcher == "deepspeed" and not array:
        hostfile = f'{q(str(ctx.log_dir / ctx.experiment))}-"$SLURM_JOB_ID".hostfile'
        lines += [
            f"VIRGO_HOSTFILE={hostfile}  # the nodes of this job, {cfg.procs_per_node} slots each",
            f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots={cfg.procs_per_node}/" '
            '> "$VIRGO_HOSTFILE"',
        ]
    lines += [f"export {key}={q(value)}" for key, value in machine.env.items()]
    if machine.setup_script is not None:
        # module systems often read unset variables: no `set -u` while sourcing
        lines += ["set +u", f"source {q(str(machine.setup_script))}", "set -u"]
    body = _BODY.replace("__SRUN__", srun_command(cfg, argv, machine, array))
    return "\n".join(lines) + "\n" + body


def fingerprint(
    ctx: JobContext, cfg: TrainConfig, argv: list[str], machine: Machine, array: int = 0, files: WorkerFiles = NO_FILES
) -> str:
    """Identifies what a job computes: its batch script and the params file the stage reads.

    The experiment name is left out: `dvc exp run` names every run afresh, and a
    re-run after a lost login session must still recognise the job it started.
    """
    anonymous = dataclasses.replace(ctx, experiment="*")
    h = hashlib.sha256(batch_script(anonymous, cfg, argv, machine, array, files).encode())
    if files.params and Path(files.params).is_file():
        h.update(Path(files.params).read_bytes())
    return h.hexdigest()[:16]


def sbatch_command(script_path: Path, comment: str | None = None) -> list[str]:
    cmd = ["sbatch", "-W", "--parsable"]
    if comment:
        cmd.append(f"--comment={comment}")
    return [*cmd, str(script_path)]


# --------------------------------------------------------------------------
# talking to Slurm
# --------------------------------------------------------------------------


def _slurm(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    # Own session: a Ctrl-C in the terminal must not kill the tool mid-call.
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, start_new_session=True)


@dataclasses.dataclass
class JobInfo:
    job_id: str
    name: str
    state: str
    exit_code: int
    signal: int
    restarts: int
    requeue: bool
    nodes: str
    num_nodes: str
    reason: str
    stdout: str
    array_job_id: str = ""
    array_task_id: str = ""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def stage_exit_code(self) -> int:
        """The stage's exit code: 0 only for COMPLETED; never 0 for another final state."""
        if self.state == "COMPLETED" and self.exit_code == 0 and self.signal == 0:
            return 0
        if self.exit_code:
            return self.exit_code
        if self.signal:
            return 128 + self.signal
        return 1


_FIELD = re.compile(r"(?:^|\s)(\w[\w/:]*)=(\S*)")


def parse_show_job(text: str) -> JobInfo | None:
    """The job of ``scontrol show job -o`` output; for a job array (one line a task or
    group of pending tasks) the whole array: unfinished while any task is, else the
    first task that did not complete (its state, exit code and log), else COMPLETED."""
    records = [r for r in (_parse_record(line) for line in text.splitlines() if line.strip()) if r is not None]
    if len(records) <= 1:
        return records[0] if records else None
    running = [r for r in records if not r.final]
    chosen = next((r for r in running if r.state == "RUNNING"), None) or (running[0] if running else None)
    if chosen is None:
        chosen = next((r for r in records if r.stage_exit_code() != 0), records[0])
    nodes = ",".join(dict.fromkeys(r.nodes for r in records if r.nodes and r.nodes != "(null)"))
    return dataclasses.replace(chosen, restarts=max(r.restarts for r in records), nodes=nodes or chosen.nodes)


def _parse_record(text: str) -> JobInfo | None:
    fields = dict(_FIELD.findall(text))
    if "JobState" not in fields:
        return None
    # A log path may contain spaces: it runs up to the next field.
    stdout = re.search(r"(?:^|\s)StdOut=(.*?)(?=\s+[A-Z][A-Za-z]*=|\s*$)", text)
    code, _, sig = fields.get("ExitCode", "0:0").partition(":")
    return JobInfo(
        job_id=fields.get("JobId", ""),
        name=fields.get("JobName", ""),
        state=fields["JobState"],
        exit_code=int(code or 0),
        signal=int(sig or 0),
        restarts=int(fields.get("Restarts", "0") or 0),
        requeue=fields.get("Requeue", "0") == "1",
        nodes=fields.get("NodeList", ""),
        num_nodes=fields.get("NumNodes", ""),
        reason=fields.get("Reason", ""),
        stdout=stdout.group(1) if stdout else "",
        array_job_id=fields.get("ArrayJobId", ""),
        array_task_id=fields.get("ArrayTaskId", ""),
    )


class JobGone(Exception):
    """Slurm no longer knows the job (purged after MinJobAge)."""


def show_job(job_id: str) -> JobInfo | None:
    """The job as scontrol sees it; None when scontrol cannot answer right now."""
    try:
        proc = _slurm("scontrol", "show", "job", "-o", job_id, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            raise JobGone(job_id)
        return None
    return parse_show_job(proc.stdout)


def in_squeue(job_id: str) -> bool | None:
    """True while squeue lists the job (pending, running, completing...); None if unsure."""
    try:
        proc = _slurm("squeue", "-h", "-j", job_id, "-o", "%i %T", timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return False if "Invalid job id" in proc.stderr else None
    return bool(proc.stdout.strip())


def current_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER", str(os.getuid()))


def find_active_jobs(ctx: JobContext) -> list[tuple[str, str, str, str]]:
    """(job id, name, state, comment) of our unfinished jobs of this stage in this workspace.

    Matched by user, working directory and the name prefix ``virgo-<stage>-``:
    DVC gives each ``dvc exp run`` a new experiment name, but only one can run
    in a workspace at a time, so an unfinished job there is a previous run's.
    """
    # the job name last: an experiment name may contain '|'
    proc = _slurm("squeue", "-h", "-u", current_user(), "-o", "%i|%T|%k|%Z|%j")
    if proc.returncode != 0:
        raise ConfigError(f"squeue failed: {proc.stderr.strip()}")
    found = []
    prefix = f"virgo-{ctx.stage}-"
    for line in proc.stdout.splitlines():
        parts = line.split("|", 4)
        if len(parts) != 5:
            continue
        job_id, state, comment, workdir, name = (p.strip() for p in parts)
        job_id = job_id.split("_")[0]  # a task of a job array ("123_4", "123_[5-7]"): the array
        if not name.startswith(prefix) or state in FINAL_STATES or any(f[0] == job_id for f in found):
            continue
        try:
            same_dir = Path(workdir).resolve() == ctx.workdir.resolve()
        except OSError:
            same_dir = False
        if same_dir:
            found.append((job_id, name, state, comment))
    return found


# --------------------------------------------------------------------------
# watching a job
# --------------------------------------------------------------------------


def _write(text: str | bytes) -> None:
    """Write to stderr, ignoring a closed pipe: when `dvc exp run` (or the tmux pane) is gone
    the launcher must still cancel its job rather than die on EPIPE."""
    try:
        if isinstance(text, bytes):
            sys.stderr.buffer.write(text)
        else:
            sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _say(msg: str) -> None:
    _write(f"launch: {msg}\n")


class _LogFollower:
    """Copies what the job appends to its log onto our stderr."""

    def __init__(self, path: Path | None, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.offset = 0

    def set_path(self, path: Path) -> None:
        if path != self.path:
            self.path, self.offset = path, 0

    def poll(self) -> None:
        if not self.enabled or self.path is None:
            return
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        if data:
            self.offset += len(data)
            _write(data)


def error_lines(path: Path | None, limit: int = 5) -> list[str]:
    """The distinct "error: ..." lines of a log (which rank failed and why), first ones first."""
    if path is None:
        return []
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    found: list[str] = []
    for line in text:
        line = line.strip()
        if re.match(r"(virgo: )?error: ", line) and line not in found:
            found.append(line)
    return found[:limit]


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None:
        return "(no log file)"
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(log {path} not readable)"
    return "\n".join(text[-lines:]) or "(log is empty)"


class _Interrupted(Exception):
    pass


class _Signals:
    """SIGINT/SIGTERM/SIGHUP set a flag (the watcher cancels the job and exits).

    While ``raise_now`` is set (waiting for sbatch to print the job id) the
    first signal also raises :class:`_Interrupted`, so a hanging sbatch cannot
    make the launcher deaf.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.received: int | None = None
        self.raise_now = False
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.received is None:
            self.received = signum
            if self.raise_now:
                raise _Interrupted()
        else:
            _say(f"{signal.Signals(signum).name} again: still cancelling the job, please wait")

    def __enter__(self):
        for s in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _stop_child(proc: subprocess.Popen | None) -> int | None:
    """End ``sbatch -W`` (SIGTERM does not cancel the job); return its code if it had ended."""
    if proc is None:
        return None
    rc = proc.poll()
    if rc is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return rc


def cancel_and_wait(job_id: str, signum: int, follower: _LogFollower | None = None) -> None:
    """scancel the job, then wait until squeue no longer lists it."""
    name = signal.Signals(signum).name
    _say(f"{name} received: cancelling job {job_id} (scancel {job_id})")
    proc = _slurm("scancel", job_id)
    if proc.returncode != 0:
        _say(f"scancel {job_id} failed: {proc.stderr.strip()}")
    start = told = answered = time.monotonic()
    while time.monotonic() - start < CANCEL_WAIT_S:
        listed = in_squeue(job_id)
        if listed is False:
            if follower:
                follower.poll()
            _say(f"job {job_id} cancelled; squeue no longer lists it")
            return
        now = time.monotonic()
        if listed is not None:
            answered = now
        elif now - answered > UNREACHABLE_S:
            _say(
                f"Slurm has not answered for {UNREACHABLE_S} s; giving up waiting for job {job_id} "
                f"(check with `squeue -j {job_id}`)"
            )
            return
        if now - told > 10:
            _say(f"waiting for job {job_id} to end (Slurm's KillWait)...")
            told = now
        if follower:
            follower.poll()
        time.sleep(POLL_S)
    _say(f"job {job_id} is still listed by squeue after {CANCEL_WAIT_S} s; check with `squeue -j {job_id}`")


def watch(job_id: str, ctx: JobContext, sbatch: subprocess.Popen | None, signals: _Signals, follow: bool = True) -> int:
    """Wait for the job's final state; return the stage's exit code."""
    follower = _LogFollower(ctx.log_file(job_id), enabled=follow)
    last: tuple | None = None
    candidate: tuple[JobInfo, float] | None = None  # a final state waiting for confirmation
    info: JobInfo | None = None
    next_poll = 0.0
    silent_since = told_silent = 0.0
    sbatch_rc: int | None = None
    while True:
        if signals.received is not None:
            _stop_child(sbatch)
            cancel_and_wait(job_id, signals.received, follower)
            return 128 + signals.received
        now = time.monotonic()
        if now >= next_poll:
            next_poll = now + POLL_S
            if sbatch is not None and sbatch_rc is None:
                sbatch_rc = sbatch.poll()
            try:
                info = show_job(job_id)
            except JobGone:
                follower.poll()
                if sbatch is not None:
                    while (rc := sbatch.poll()) is None and signals.received is None:
                        time.sleep(0.1)
                    if rc is None:
                        _stop_child(sbatch)
                        return 128 + signals.received
                    _say(f"job {job_id} is no longer known to Slurm; sbatch -W returned {rc}")
                    return _finish(job_id, ctx, None, rc, follower)
                _say(f"job {job_id} is no longer known to Slurm; its outcome is lost (see its log)")
                return _finish(job_id, ctx, None, 1, follower)
            if info is not None:
                follower.set_path(ctx.log_of(info))
                key = (info.state, info.restarts, info.nodes, info.reason)
                if key != last:
                    _report_change(info, last)
                    last = key
                if info.final:
                    immediate = info.state == "COMPLETED" or not info.requeue
                    if candidate is None or (candidate[0].state, candidate[0].restarts) != (info.state, info.restarts):
                        candidate = (info, now)
                    if immediate or now - candidate[1] >= CONFIRM_S:
                        _stop_child(sbatch)
                        return _finish(job_id, ctx, info, info.stage_exit_code(), follower)
                else:
                    candidate = None
            elif sbatch is not None and sbatch_rc is not None:
                # scontrol cannot answer and sbatch -W is done: its code is all we have.
                _say(f"scontrol cannot show job {job_id}; using sbatch -W's exit code {sbatch_rc}")
                return _finish(job_id, ctx, None, sbatch_rc, follower)
            if info is None:
                silent_since = silent_since or now
                if now - silent_since > 60 and now - told_silent > 60:
                    _say(f"scontrol does not answer about job {job_id} (slurmctld busy or down?); still waiting")
                    told_silent = now
            else:
                silent_since = 0.0
        follower.poll()
        time.sleep(0.1)


def _report_change(info: JobInfo, last: tuple | None) -> None:
    if last is not None and info.restarts > last[1]:
        _say(f"job {info.job_id} requeued (restart {info.restarts}); waiting for it to run again")
    if info.state == "PENDING":
        _say(f"job {info.job_id} pending" + (f" ({info.reason})" if info.reason not in ("", "None") else ""))
    elif info.state == "RUNNING":
        _say(f"job {info.job_id} running on {info.num_nodes} node(s): {info.nodes}")
    elif not info.final:
        _say(f"job {info.job_id} {info.state}")


def _finish(job_id: str, ctx: JobContext, info: JobInfo | None, rc: int, follower: _LogFollower) -> int:
    time.sleep(0.05)
    follower.poll()
    log = follower.path
    state = info.state if info else "UNKNOWN"
    nodes = info.nodes if info else "?"
    if rc == 0:
        _say(f"job {job_id} {state} on {nodes}; log {log}")
        return 0
    name = info.name if info and info.name else ctx.job_name
    what = f"job {job_id} ({name}) ended {state} with exit code {rc} on nodes {nodes}"
    hint = ""
    if state == "NODE_FAIL":
        hint = " (a node failed; running the stage again continues from the last snapshot)"
    elif state == "TIMEOUT":
        hint = " (time limit reached before the training stopped; raise the machine's time or signal_seconds)"
    elif rc == EXIT_INTERRUPTED:
        hint = " (the training was interrupted and not requeued; running the stage again continues from the snapshot)"
    errors = "".join(f"launch:   {line}\n" for line in error_lines(log))
    _write(
        f"launch: error: {what}{hint}\nlaunch: log {log}; its last {LOG_TAIL_LINES} lines:\n"
        f"{log_tail(log)}\n"
        f"launch: error: {what}{hint}\n" + (f"launch: errors reported in the log:\n{errors}" if errors else "")
    )
    return rc


# --------------------------------------------------------------------------
# the entry point used by the launcher
# --------------------------------------------------------------------------


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


def submit(
    stage: str,
    argv: list[str],
    cfg: TrainConfig,
    machine: Machine,
    ctx: JobContext | None = None,
    array: int = 0,
    files: WorkerFiles = NO_FILES,
) -> int:
    """Run ``argv`` (a python script and its arguments) as a SLURM job; return its exit code.

    ``array``: submit a job array of that many tasks instead (see :func:`srun_command`);
    the exit code is then 0 only when every task completed.
    """
    ctx = ctx or JobContext.current(stage)
    use_slurm_conf(machine)
    script = batch_script(ctx, cfg, argv, machine, array, files)
    comment = f"virgo:{fingerprint(ctx, cfg, argv, machine, array, files)}"
    cmd = sbatch_command(ctx.script_path, comment)
    if dry_run_requested():
        print(
            f"# dry run (VIRGO_DRY_RUN): nothing submitted; on machine '{machine.name}' the launcher would "
            f"write {ctx.script_path} and run:\n# {shlex.join(cmd)}\n{script}",
            end="",
            flush=True,
        )
        return 0
    if cfg.strategy == "horovod" and importlib.util.find_spec("horovod") is None:
        # checked here, not after a wait in the queue: the job runs this same interpreter
        raise ConfigError(
            "train.strategy: 'horovod' needs Horovod, which is not built in this environment; "
            "run `make horovod` (a few minutes) or choose 'ddp' or 'deepspeed'"
        )
    for tool in ("sbatch", "scontrol", "squeue", "scancel"):
        if shutil.which(tool) is None:
            raise ConfigError(
                f"machine '{machine.name}' submits to SLURM but `{tool}` is not on PATH; run on the cluster's "
                "login node, or choose another machine (VIRGO_MACHINE or machines/active)"
            )
    follow = os.environ.get("VIRGO_FOLLOW_LOG", "1") != "0"
    with _Signals() as signals:
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
            _say(
                f"attaching to job {job_id} ({name}, {state}), submitted earlier from this workspace with the "
                "same script and params; not submitting a second one"
            )
            return watch(job_id, ctx, None, signals, follow)
        ctx.log_dir.mkdir(parents=True, exist_ok=True)
        tmp = ctx.script_path.with_name(f".{ctx.script_path.name}.{os.getpid()}")
        tmp.write_text(script)
        os.replace(tmp, ctx.script_path)
        _say(f"{stage} on '{machine.name}': {shlex.join(cmd)}")
        sbatch = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        assert sbatch.stdout is not None
        first = ""
        try:
            signals.raise_now = signals.received is None
            if signals.received is not None:
                raise _Interrupted()
            first = sbatch.stdout.readline().strip()  # --parsable prints "<id>[;cluster]" at submission
            signals.raise_now = False
        except _Interrupted:
            # Interrupted while submitting: stop sbatch, and cancel the job if it was created.
            signals.raise_now = False
            _stop_child(sbatch)
            job_id = (first or sbatch.stdout.read() or "").strip().split(";")[0]
            if job_id.isdigit():
                cancel_and_wait(job_id, signals.received)
            else:
                _say(f"{signal.Signals(signals.received).name} received while submitting; nothing was submitted")
            return 128 + signals.received
        job_id = first.split(";")[0]
        if not job_id.isdigit():
            rc = sbatch.wait()
            err = sbatch.stderr.read() if sbatch.stderr else ""
            _write(f"launch: error: sbatch failed (exit code {rc}): {first} {err.strip()}\n")
            return rc or 1
        where = ctx.log_file(job_id, "<task>" if array else None)
        _say(f"submitted job {job_id} ({ctx.job_name}{f', array of {array} tasks' if array else ''}); log {where}")
        try:
            return watch(job_id, ctx, sbatch, signals, follow)
        finally:
            _stop_child(sbatch)


def dry_run_stage(stage: str = "train", dvc_file: str = "dvc.yaml") -> int:
    """Print the batch script of a DVC stage on the active machine, submitting nothing.

    Only stages that may be submitted (their deps list ``src/virgo_exps/launch/slurm.py``:
    train, and generate on profiles with ``generate_tasks``) are allowed: the stage command is run with
    ``VIRGO_DRY_RUN=1``, which stops it before any work.
    """
    import yaml

    stages = (yaml.safe_load(Path(dvc_file).read_text()) or {}).get("stages", {})
    if stage not in stages:
        raise ConfigError(f"{dvc_file}: no stage {stage!r}")
    spec = stages[stage]
    if "src/virgo_exps/launch/slurm.py" not in (spec.get("deps") or []):
        raise ConfigError(f"stage {stage!r} does not go through the launcher; it always runs on the login node")
    argv = shlex.split(spec["cmd"])
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return subprocess.run(argv, env={**os.environ, "VIRGO_DRY_RUN": "1"}).returncode


def main(argv: list[str] | None = None) -> int:
    import argparse

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
