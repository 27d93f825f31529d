"""What a worker and its launcher agree on, in one place.

- exit codes: :data:`EXIT_INTERRUPTED` is the worker's "snapshot written,
  requeue me" (the trainer exits with it; the batch script and the watcher read
  it back);
- the status file: ``<checkpoints>/status.json``, JSON with a ``status`` of
  ``running``, ``interrupted`` or ``complete`` (written by the trainer, read by
  the batch script to decide on a requeue);
- the stage logs in the main checkout: ``logs/<stage>/<experiment>-local-<pid>.out``
  for a local run, ``<experiment>-<jobid>.out`` for a SLURM job and
  ``<experiment>-<jobid>_<task>.out`` for a task of a job array; written by the
  launcher, found again by :func:`experiment_of_log` (``virgo-exps failures``);
- the rendezvous port: a free port here, ``20000 + jobid % 10000`` in a job.

The files a worker writes are handed to the launcher as values
(:class:`WorkerFiles`), never searched for in the worker's command line.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

EXIT_INTERRUPTED = 85  # snapshot written, requeue me

STATUS_FILE = "status.json"
# The values of its "status" (and of a snapshot's): the one place they are spelled.
STATUS_RUNNING = "running"
STATUS_INTERRUPTED = "interrupted"
STATUS_COMPLETE = "complete"
STATUS_PRUNED = "pruned"  # a sweep's trial stopped early by its pruner: a final state, as complete
STATUS_STALLED = "stalled"  # a rank stopped making progress (train.watchdog)


@dataclass(frozen=True)
class WorkerFiles:
    """Files of a worker its launcher needs to know: the params it reads (part of a job's
    identity) and the folder of its status file (None: the worker writes none)."""

    params: str | None = None
    checkpoints: str | None = None

    @property
    def status_file(self) -> str:
        """The status file's path as the job sees it (relative to the workspace), or ''."""
        return f"{self.checkpoints}/{STATUS_FILE}" if self.checkpoints else ""


NO_FILES = WorkerFiles()


# -- log names ------------------------------------------------------------------


def stage_log_dir(home: Path, stage: str) -> Path:
    """The folder of a stage's logs in the main checkout ``home``."""
    return Path(home) / "logs" / stage


def local_log_name(experiment: str, pid: int) -> str:
    return f"{experiment}-local-{pid}.out"


def job_log_name(experiment: str, job_id: str, task: str | None = None) -> str:
    """The log of a SLURM job, or of one task of a job array (``task``)."""
    return f"{experiment}-{job_id}{f'_{task}' if task is not None else ''}.out"


def job_log_pattern(experiment: str, array: bool = False, literal=str) -> str:
    """:func:`job_log_name` as a Slurm ``--output`` pattern; ``literal`` escapes the experiment name."""
    return job_log_name(literal(experiment), "%A", "%a") if array else job_log_name(literal(experiment), "%j")


# The logs of the jobs this process launched, in order (train/stage.py copies them into the
# experiment's results, so that they travel with it).
_LOGS: list[Path] = []


def record_log(path: Path) -> None:
    _LOGS.append(Path(path))


def recorded_logs() -> list[Path]:
    return list(_LOGS)


def log_announcement(path: Path) -> str:
    """The line by which the launcher tells where a stage's log is (on stderr, so in DVC's output)."""
    return f"launch: log {path}"


def announced_logs(text: str) -> list[str]:
    """The logs :func:`log_announcement` lines in ``text`` name (a path without spaces or ';')."""
    return re.findall(r"^launch: log (\S+?)(?=;|\s|$)", text, flags=re.M)


_LOG_NAME = re.compile(r"^(?P<exp>.+?)-(?:local-\d+|\d+(?:_\d+)?)\.out$")


def experiment_of_log(name: str) -> str | None:
    """The experiment a file named by :func:`local_log_name` or :func:`job_log_name` belongs to."""
    m = _LOG_NAME.match(name)
    return m.group("exp") if m else None


# -- rendezvous -----------------------------------------------------------------

# In a job: the same port on every node without talking to each other.
JOB_RENDEZVOUS_PORT = "$((20000 + SLURM_JOB_ID % 10000))"


def free_port() -> int:
    """A port free on this machine now, for a rendezvous of local processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
