"""Where a sweep stands: trials done / running / pending / failed / pruned, the best so far, the cost so far.

The cost is told twice: the trainings' own figures (``cost`` of each trial's metrics, all attempts of a
resumed training), and what the tasks' allocations cost (``allocation`` of each task's state: cores x
time of every attempt, from the task's start to its end, failed trials included).

Read from the sweep dir (``tasks/<index>.json``, written by each task) and, for what the tasks have not
written yet, from ``squeue`` (a task that the queue no longer lists and that never finished was lost).
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from virgo_exps.experiments.teamstore import MARKER
from virgo_exps.launch.slurm.query import run_tool
from virgo_exps.sweeps import search, tracking
from virgo_exps.sweeps import spec as sweep_spec
from virgo_exps.sweeps.submit import read_sweep
from virgo_exps.sweeps.task import allocation
from virgo_exps.sweeps.taskstate import PENDING, TaskState, load_task_state, task_files

COST_KEYS = ("core_h", "cpu_h", "gpu_h", "wall_s")


@dataclass
class Status:
    name: str
    job_id: str | None
    trials: int
    counts: dict[str, int]
    best: dict | None
    cost: dict[str, float]
    failed: list[dict] = field(default_factory=list)
    tasks: list[dict] = field(default_factory=list)
    tracking: str | None = None  # the team store's MLflow store holding the sweep's trials (reconcile)


def _queued(job_id: str | None) -> dict[int, str] | None:
    """index -> squeue state of the array's tasks still in the queue (a pending range counts each index);
    None when the queue cannot be asked (no squeue here, controller down)."""
    if not job_id:
        return {}
    try:
        proc = run_tool("squeue", "-h", "-r", "-j", job_id, "-o", "%K %T")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        return None
    out: dict[int, str] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1]
    return out


def status(directory: Path) -> Status:
    record = read_sweep(directory)
    spec = sweep_spec.from_dict(record["spec"])
    asked = _queued(record.get("job_id"))
    queued = asked or {}
    tasks = []
    # tasks/<index>.json: the current array's tasks; tasks/<job>_<index>.json: an earlier submission's
    for path in task_files(directory):
        state, damaged = load_task_state(path)
        if damaged:  # counted as a failed trial, named with the fix; never read as a result or as pending
            ours = path.stem.isdigit()
            job = record.get("job_id") if ours else path.stem.partition("_")[0]
            index = int(path.stem.rpartition("_")[2]) if path.stem.rpartition("_")[2].isdigit() else -1
            state = {
                "index": index,
                "job_id": job,
                "state": TaskState.FAILED.value,
                "reason": f"{path} is damaged ({damaged}); its trial has no record: run it again "
                f"(`scontrol requeue {job}_{index}` while Slurm knows the job, or a new sweep)",
            }
        tasks.append(state)
    counts = {s: 0 for s in (TaskState.DONE.value, TaskState.RUNNING.value, PENDING, TaskState.FAILED.value)}
    counts[TaskState.PRUNED.value] = 0
    seen: set[int] = set()
    failed = []
    current = str(record.get("job_id"))
    # What the tasks' allocations cost, every attempt and every trial (failed ones too). An attempt without
    # an end is the running one of a running task; any other was killed without notice (its node lost).
    alloc_total = {"alloc_core_h": 0.0, "alloc_gpu_h": 0.0, "attempts": 0, "unmeasured": 0}
    for t in tasks:
        mine = str(t.get("job_id")) == current
        if mine:
            seen.add(int(t["index"]))
        state = t.get("state")
        if state == TaskState.RUNNING and (asked is not None or not mine):
            q = queued.get(int(t["index"])) if mine else None
            if q is None:
                state = TaskState.FAILED.value  # no longer in the queue, never finished: lost
                t = {**t, "state": state, "reason": "the task left the queue without finishing"}
            elif q not in ("RUNNING", "COMPLETING"):
                state = PENDING  # requeued, waiting
        attempts = t.get("attempts") or []
        if attempts:
            # a running task's current attempt counts up to now: the allocation is held while it runs
            alloc = allocation(attempts, now=time.time() if state == TaskState.RUNNING else None)
            alloc_total["alloc_core_h"] += alloc["core_h"] or 0.0
            alloc_total["alloc_gpu_h"] += alloc["gpu_h"]
            alloc_total["attempts"] += alloc["attempts"]
            alloc_total["unmeasured"] += alloc["unmeasured"]
        if state in counts:
            counts[state] += 1
        if state == TaskState.FAILED:
            failed.append(t)
    # Array tasks not started yet: each still has a trial to run while the budget lasts (a continued
    # search's array has as many tasks as the budget; the surplus ends as skipped, not a trial).
    left = max(0, spec.trials - sum(counts.values()))
    for index in range(spec.trials):
        if index not in seen and left > 0:
            left -= 1
            if asked is not None and record.get("job_id") and index not in queued:
                # Neither in the queue nor recorded: it ended before it could record its start (a crash
                # at start-up, a cancel while pending). Waiting for it would be waiting forever.
                counts[TaskState.FAILED.value] += 1
                failed.append(
                    {
                        "index": index,
                        "job_id": record.get("job_id"),
                        "state": TaskState.FAILED.value,
                        "reason": "left the queue without recording a start (crashed at start-up or cancelled)",
                    }
                )
                continue
            counts[TaskState.RUNNING.value if queued.get(index) == "RUNNING" else PENDING] += 1
    done = [t for t in tasks if t.get("state") == TaskState.DONE and isinstance(t.get("metric"), (int, float))]
    done = [t for t in done if math.isfinite(t["metric"])]
    best = None
    if done:
        pick = min if spec.direction == "minimize" else max
        best = pick(done, key=lambda t: t["metric"])
    cost = {k: 0.0 for k in COST_KEYS}
    for t in tasks:
        for k in COST_KEYS:
            v = (t.get("cost") or {}).get(k)
            if isinstance(v, (int, float)):
                cost[k] += v
    cost.update(alloc_total)
    return Status(spec.name, record.get("job_id"), spec.trials, counts, best, cost, failed, tasks)


def reconcile(directory: Path) -> Status:
    """The sweep's status, with every record brought into line with it: a trial whose task failed or was
    lost (``scancel``, a node gone) is failed in the search's study too, and its MLflow run, left RUNNING by
    a killed trainer, is ended as KILLED. ``status`` and the page then tell one story."""
    st = status(directory)
    record = read_sweep(directory)
    spec = sweep_spec.from_dict(record["spec"])
    for t in st.failed:
        if t.get("experiment"):
            _end_mlflow_run(Path(directory) / "work" / t["experiment"], t["experiment"])
    trials = {t["experiment"]: t.get("trial") for t in st.tasks if t.get("experiment")}
    merged = tracking.merge_trials(Path(directory), spec.name, trials, record.get("group") or _store_group(directory))
    if merged is not None:
        st.tracking = merged[1]
    if spec.kind != "search":
        return st
    from optuna.trial import TrialState

    trials = search.open_study(spec, directory).get_trials(deepcopy=False)
    for t in st.failed:
        number = t.get("trial")
        if isinstance(number, int) and 0 <= number < len(trials) and trials[number].state == TrialState.RUNNING:
            why = t.get("reason") or f"exit code {t.get('exit_code')}"
            attrs = {"fail_reason": why, "allocation": allocation(t.get("attempts") or [])}
            search.tell(spec, directory, number, None, "fail", attrs=attrs)
    return st


def _store_group(directory: Path) -> str | None:
    """The team store's group, from its marker file (the sweep dir is <store>/sweeps/<name>)."""
    try:
        return json.loads((Path(directory).parent.parent / MARKER).read_text()).get("group") or None
    except (OSError, ValueError, AttributeError):
        return None


def _end_mlflow_run(clone: Path, experiment: str) -> None:
    """End the RUNNING MLflow runs named ``experiment`` in a trial clone's own store as KILLED."""
    db = clone / "mlflow" / "mlflow.db"
    if not db.is_file():
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'"):
            if run.info.run_name == experiment or run.data.tags.get("mlflow.parentRunId"):
                client.set_terminated(run.info.run_id, status="KILLED")


def render(s: Status, metric: str) -> str:
    c = s.counts
    lines = [
        f"sweep {s.name} (job {s.job_id}): {s.trials} trials: {c['done']} done, {c['running']} running, "
        f"{c['pending']} pending, {c['failed']} failed, {c['pruned']} pruned"
    ]
    if s.best:
        lines.append(
            f"best so far: {s.best['experiment']} {metric} {s.best['metric']:.6g} "
            f"({', '.join(f'{k}={v}' for k, v in s.best['overrides'].items())}); "
            f"`dvc exp apply {s.best['experiment']}` after `dvc exp pull team {s.best['experiment']}`"
        )
    else:
        lines.append("best so far: none yet")
    lines.append(
        f"cost so far: {s.cost['core_h']:.4f} core-hours, {s.cost['gpu_h']:.4f} GPU-hours, "
        f"{s.cost['wall_s']:.0f} s of training wall time"
    )
    if s.cost.get("attempts"):
        lost = s.cost["unmeasured"]
        lines.append(
            f"allocated so far: {s.cost['alloc_core_h']:.4f} core-hours, {s.cost['alloc_gpu_h']:.4f} GPU-hours "
            f"over {s.cost['attempts']:.0f} task attempt(s), failed trials included"
            + (f"; {lost:.0f} attempt(s) killed without notice are not counted" if lost else "")
        )
    if s.tracking:
        lines.append(
            f"MLflow: the finished trials in {s.tracking} (experiment sweep-{s.name}); "
            f"`mlflow ui --backend-store-uri {s.tracking}`"
        )
    for t in s.failed:
        why = t.get("reason") or f"exit code {t.get('exit_code')}"
        what = t.get("experiment") or f"array task {t.get('job_id')}_{t.get('index')}"
        log = f"; log {t['log']}" if t.get("log") else ""
        lines.append(f"failed: {what} ({why}){log}")
    return "\n".join(lines)


__all__ = ["Status", "reconcile", "render", "status"]
