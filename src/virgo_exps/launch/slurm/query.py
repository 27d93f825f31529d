"""Asking Slurm about jobs: ``scontrol show job`` and ``squeue``, parsed into :class:`JobInfo`."""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from virgo_exps.config import ConfigError

if TYPE_CHECKING:
    from virgo_exps.launch.slurm.script import JobContext

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


def run_tool(*args: str, timeout: float = 30, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Every call of a Slurm command (sbatch, squeue, scontrol, scancel, sacct) goes through here (or
    :func:`start_tool`, for ``sbatch -W``): output
    captured, a time limit (:class:`subprocess.TimeoutExpired` past it), in a session of its own (a Ctrl-C
    in the terminal must not kill the tool mid-call)."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, start_new_session=True, env=env)


def start_tool(*args: str) -> subprocess.Popen:
    """The one Slurm command that runs as long as its job (``sbatch -W``), started in a session of its own
    with its stdout and stderr as text for the caller to read as they come."""
    return subprocess.Popen(
        list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


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
        proc = run_tool("scontrol", "show", "job", "-o", job_id, timeout=20)
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
        proc = run_tool("squeue", "-h", "-j", job_id, "-o", "%i %T", timeout=15)
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
    proc = run_tool("squeue", "-h", "-u", current_user(), "-o", "%i|%T|%k|%Z|%j")
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
