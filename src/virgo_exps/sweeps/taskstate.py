"""The record of one task of a sweep's job array: its one schema, written by the task, read by the status.

A task keeps ``tasks/<index>.json`` in the sweep's folder of the team store (an earlier submission's
record of the same index is kept as ``tasks/<job>_<index>.json``); its log is ``logs/task-<job>_<index>.out``.
The record is a JSON object with an integer ``index`` and a ``state`` of :class:`TaskState`; a search
tells Optuna the state of the trial under :data:`OPTUNA_STATE`. ``sweep status`` adds one state of its
own, :data:`PENDING`: a running task that Slurm requeued and has not started again.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path

from virgo_exps import fsio

TASKS_DIR = "tasks"
LOGS_DIR = "logs"


class TaskState(str, enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    PRUNED = "pruned"
    SKIPPED = "skipped"  # a task whose trial a search no longer needs (the budget was reached)

    def __str__(self) -> str:
        return self.value


PENDING = "pending"  # never recorded: what `sweep status` calls a requeued task waiting in the queue
FINISHED = (TaskState.DONE, TaskState.FAILED, TaskState.PRUNED)
# the Optuna trial state a search is told for a task's final state
OPTUNA_STATE = {TaskState.DONE: "complete", TaskState.PRUNED: "pruned", TaskState.FAILED: "fail"}


def task_file(directory: Path, index: int) -> Path:
    return Path(directory) / TASKS_DIR / f"{index}.json"


def earlier_task_file(directory: Path, job_id: str, index: int) -> Path:
    """Where an earlier submission's record of task ``index`` is kept (never taken over)."""
    return Path(directory) / TASKS_DIR / f"{job_id}_{index}.json"


def task_files(directory: Path) -> list[Path]:
    """Every task record of the sweep, the current array's and earlier submissions', in index order."""
    return sorted((Path(directory) / TASKS_DIR).glob("*.json"), key=lambda p: p.stem.rjust(40))


def log_path(directory: Path, job_id: str, index: int) -> Path:
    return Path(directory) / LOGS_DIR / f"task-{job_id}_{index}.out"


def load_task_state(path: Path) -> tuple[dict, str | None]:
    """A task's state file: (its record, None), ({}, None) when there is none, or ({}, why) when it is
    damaged (not a JSON object with an integer index and a known state), unreadable, or not the team's
    (:func:`fsio.trust_refusal`)."""
    try:
        why = fsio.trust_refusal(path, team_folder=Path(path).parent)
        if why:
            return {}, why
        state = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as exc:
        return {}, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    known = {s.value for s in TaskState}
    if not isinstance(state, dict) or not isinstance(state.get("index"), int) or state.get("state") not in known:
        return {}, "not a task record (an index and a state)"
    return state, None


def write_task_state(directory: Path, index: int, state: dict) -> None:
    """Write task ``index``'s record whole (write, then rename)."""
    record = {k: (v.value if isinstance(v, TaskState) else v) for k, v in state.items()}
    fsio.write_text(task_file(directory, index), json.dumps(record, indent=2, sort_keys=True) + "\n")
