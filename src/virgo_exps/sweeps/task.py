"""One array task of a sweep: ``python -m virgo_exps.sweeps.task <sweep dir>`` (run by the sweep's batch script).

1. its trial: the array index (grid) or the next trial of the study (search), kept in ``tasks/<index>.json``
   so that a requeued task runs the same trial again;
2. its own clone of the sweep commit in ``work/<experiment>`` (from the store's git), pointed at the team
   store with symlinks into the shared cache: the data stages' outputs are linked, never copied;
3. ``dvc exp run -n <experiment> -S ...`` with ``VIRGO_IN_ALLOCATION=1``: the train stage's job step runs
   inside this task's allocation. A requeued task (time limit, node failure, ``scontrol requeue``) comes back
   here, resets the clone's tracked files and runs the same command: the trainer resumes at its snapshot
   (``.virgo/snapshots`` of the clone, kept across requeues);
4. ``dvc exp push`` to the store; a search also tells the study the metric (or pruned / failed).

Every attempt of the task (a requeued task makes several) is kept in its state file with its start, its
end and the cores and GPUs of its allocation; ``allocation`` adds them up: what the trial's allocations
cost, whatever became of it (a failed trial writes no metrics, so this is its only cost). An attempt ends
when the task finishes or is sent SIGTERM (a requeue, a cancel); one killed without notice (its node lost)
has no end and is counted in ``unmeasured``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from virgo_exps import dvcrun
from virgo_exps.config import DamagedInputError
from virgo_exps.experiments.clone import DEFAULT_NAME, configure_clone
from virgo_exps.experiments.teamstore import Layout
from virgo_exps.gitrun import experiment_refs, git
from virgo_exps.launch.slurm.submit import IN_ALLOCATION_ENV
from virgo_exps.paths import METRICS_FILE
from virgo_exps.provenance import read_metrics
from virgo_exps.sweeps import search
from virgo_exps.sweeps import spec as sweep_spec
from virgo_exps.sweeps.submit import read_sweep
from virgo_exps.sweeps.taskstate import (
    OPTUNA_STATE,
    TaskState,
    earlier_task_file,
    load_task_state,
    log_path,
    task_file,
    write_task_state,
)
from virgo_exps.train import outcome

RUNNING, DONE, FAILED, PRUNED, SKIPPED = (
    TaskState.RUNNING,
    TaskState.DONE,
    TaskState.FAILED,
    TaskState.PRUNED,
    TaskState.SKIPPED,
)


def say(text: str) -> None:
    print(f"sweep task: {text} ({time.strftime('%Y-%m-%dT%H:%M:%S')})", file=sys.stderr, flush=True)


def allocated(env: dict | None = None) -> tuple[int | None, int]:
    """(cores, GPUs) of this job's allocation on all its nodes (cores None outside SLURM)."""
    env = os.environ if env is None else env
    cores: int | None = None
    per_node = env.get("SLURM_JOB_CPUS_PER_NODE", "")  # e.g. "4(x2),2"
    if per_node:
        parts = [re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", p.strip()) for p in per_node.split(",")]
        if all(parts):
            cores = sum(int(m.group(1)) * int(m.group(2) or 1) for m in parts)
    nodes = env.get("SLURM_JOB_NUM_NODES", "1")
    gpus = env.get("SLURM_GPUS_ON_NODE", "")
    return cores, int(gpus) * int(nodes) if gpus.isdigit() and nodes.isdigit() else 0


def allocation(attempts: list[dict], now: float | None = None) -> dict:
    """What a task's attempts were allocated, added up (see the module's docstring). With ``now`` (a task
    still running), its last attempt, not ended yet, counts up to ``now``."""
    spans = [(a, a["ended"] - a["started"]) for a in attempts if a.get("ended") is not None]
    if now is not None and attempts and attempts[-1].get("ended") is None:
        spans.append((attempts[-1], max(0.0, now - attempts[-1]["started"])))
    known = all(a.get("cores") is not None for a, _ in spans)
    return {
        "wall_s": round(sum(t for _, t in spans), 3),
        "core_h": sum(a["cores"] * t for a, t in spans) / 3600 if known else None,
        "gpu_h": sum(a.get("gpus", 0) * t for a, t in spans) / 3600,
        "attempts": len(attempts),
        "unmeasured": len(attempts) - len(spans),
    }


def _tell(spec, directory: Path, number: int, value, told: str, attrs: dict) -> None:
    """The trial's outcome into the sweep's study: a search's asked trial, or a grid's trial recorded."""
    if spec.kind == "search":
        search.tell(spec, directory, number, value, told, attrs)
    else:
        try:
            search.record_grid_trial(spec, directory, number, value, told, attrs)
        except Exception as exc:  # the trial's result is in its task record and the team store already
            say(f"warning: trial {number} not recorded in the sweep's Optuna study ({type(exc).__name__}: {exc})")


def _dvc(args: list[str], cwd: Path, env: dict | None = None) -> int:
    """``dvc ARGS`` in ``cwd``, its output in the task's log; its exit code."""
    say(f"$ dvc {' '.join(args)}")
    return dvcrun.stream(args, cwd, echo=False, base_env=env)


def _check_dvc(args: list[str], cwd: Path, env: dict | None = None) -> None:
    rc = _dvc(args, cwd, env)
    if rc != 0:
        raise RuntimeError(f"dvc {args[0]} {args[1]} failed with exit code {rc}")


def prepare_clone(work: Path, record: dict, layout: Layout) -> bool:
    """The trial's clone at the sweep commit; True when it existed (a requeued task)."""
    commit = record["commit"]
    if (work / ".dvc").is_dir():
        # A requeued task: back to the commit (`dvc exp run` had written the -S values), keep
        # .virgo/snapshots (ignored by git) and the outputs DVC tracks.
        git(work, "reset", "-q", "--hard", commit, error=RuntimeError)
        (work / ".dvc" / "tmp" / "rwlock").unlink(missing_ok=True)
        return True
    partial = work.with_name(work.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # --no-local: through git's pack transport, as a fetch does. A local clone walks the store's
    # objects folder, and fails on the private folder a teammate's arriving push keeps there.
    git(
        work.parent,
        "clone",
        "-q",
        "--no-local",
        "--branch",
        record["branch"],
        str(layout.git),
        str(partial),
        error=RuntimeError,
    )
    git(partial, "checkout", "-q", commit, error=RuntimeError)
    configure_clone(partial, layout, DEFAULT_NAME, link_type="symlink")
    partial.rename(work)
    return False


def _experiments(work: Path) -> set[str]:
    """Names of the experiments recorded in the clone (its refs under refs/exps)."""
    return {name for name, _, _ in experiment_refs(work)}


def _metrics(work: Path) -> dict:
    """The trial's record (metrics.json with run.json beside it); empty when unreadable (then refused)."""
    try:
        return read_metrics(work / METRICS_FILE)
    except DamagedInputError:
        return {}


def run_task(directory: Path, index: int, job_id: str) -> int:
    directory = Path(directory).absolute()
    record = read_sweep(directory)
    spec = sweep_spec.from_dict(record["spec"])
    layout = Layout(Path(record["store"]), record.get("group", ""))
    path = task_file(directory, index)
    state, damaged = load_task_state(path)
    if damaged:
        aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
        os.replace(path, aside)
        say(f"{path}: damaged ({damaged}); kept as {aside.name}; the task runs its trial afresh")
    if state and str(state.get("job_id")) != str(job_id):
        # The record of an earlier submission's task of this index (a search continued to a larger
        # budget): kept under its job's name, never taken over.
        os.replace(path, earlier_task_file(directory, state.get("job_id"), index))
        state = {}
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    log = str(log_path(directory, job_id, index))
    if state.get("state") in (DONE, PRUNED):
        # Requeued after its trial was recorded (e.g. a node lost during the push): push again
        # (nothing new is sent when it arrived) and say so; the trial is not run a second time.
        say(f"trial {state['trial']} ({state['experiment']}) is already {state['state']}; pushing it again")
        rc = _dvc(["exp", "push", DEFAULT_NAME, state["experiment"]], directory / "work" / state["experiment"])
        told = OPTUNA_STATE[TaskState(state["state"])]
        attrs = {"experiment": state["experiment"], "cost": state.get("cost"), "log": state.get("log")}
        # a trial the study has finished already is left as it is
        _tell(spec, directory, int(state["trial"]), state.get("metric"), told, attrs)
        return 0 if rc == 0 else 1
    if "trial" in state:
        number, overrides = int(state["trial"]), dict(state["overrides"])
    elif spec.kind == "grid":
        number, overrides = index, sweep_spec.overrides_of(spec, index)
    else:
        # the task's name: a task requeued between this ask and its state file gets the same trial back
        asked = search.ask(spec, directory, task=f"{job_id}_{index}")
        if asked is None:
            write_task_state(directory, index, {"index": index, "state": SKIPPED, "job_id": job_id, "log": log})
            say("the search's budget is used up: nothing to run")
            return 0
        number, overrides = asked
    name = spec.experiment(number)
    cores, gpus = allocated()
    attempts = [*state.get("attempts", []), {"restart": restarts, "started": round(time.time(), 3), "cores": cores}]
    if gpus:
        attempts[-1]["gpus"] = gpus
    state = {
        **state,
        "attempts": attempts,
        "index": index,
        "trial": number,
        "experiment": name,
        "overrides": overrides,
        "state": RUNNING,
        "job_id": job_id,
        "node": os.environ.get("SLURMD_NODENAME", ""),
        "restarts": restarts,
        "log": log,
        "started": state.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_task_state(directory, index, state)

    def close_attempt() -> None:
        attempts[-1].setdefault("ended", round(time.time(), 3))
        state["allocation"] = allocation(attempts)

    def on_term(signum, frame):  # requeued or cancelled: this attempt ends here, the trial stays running
        close_attempt()
        try:
            write_task_state(directory, index, state)
        except OSError as exc:  # the end goes unrecorded; the task must still end as the signal asks
            say(f"cannot record the end of this attempt ({exc})")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    say(f"trial {number} ({name}) with {overrides}; restart {restarts}")
    work = directory / "work" / name
    try:
        resumed = prepare_clone(work, record, layout)
        if resumed:
            say(f"requeued: re-entering {work}; the training resumes from its snapshot")
        env = {k: v for k, v in os.environ.items() if k not in ("DVC_EXP_NAME", "VIRGO_HOME")}
        env.update({IN_ALLOCATION_ENV: "1", "VIRGO_HOME": str(work)})
        if spec.kind == "search":
            env.update(search.trial_env(spec, directory, number))
        if resumed and name in _experiments(work):
            # Requeued after `dvc exp run` had recorded the experiment, before the task wrote its
            # state: the experiment is the trial's result; running it again would be refused.
            say(f"{name} is already recorded in {work}; taking its results")
            rc = _dvc(["exp", "apply", name], work, env)
        else:
            rc = _dvc(["exp", "run", "-n", name, *sweep_spec.set_args(overrides)], work, env)
        metrics = _metrics(work) if rc == 0 else {}
        refusal = outcome.metrics_refusal(metrics) if rc == 0 else None
        if refusal:  # the one rule of what a successful run is (virgo_exps.train.outcome)
            say(f"error: {name}: results/metrics.json: {refusal}; the trial has no result")
            rc, metrics = outcome.EXIT_FAILED_RUN, {}
        if rc == 0:
            _check_dvc(["exp", "push", DEFAULT_NAME, name], work, env)
    except (RuntimeError, OSError) as exc:
        say(f"error: {exc}")
        rc, metrics = 1, {}
    value = search.metric_of(metrics, spec.metric)
    pruned = bool(metrics.get("pruned"))
    final = FAILED if rc != 0 else (PRUNED if pruned else DONE)
    signal.signal(signal.SIGTERM, previous)
    close_attempt()
    state.update(
        state=final,
        exit_code=rc,
        metric=value,
        cost=metrics.get("cost"),
        pruned_at_epoch=metrics.get("pruned_at_epoch"),
        ended=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    write_task_state(directory, index, state)
    attrs = {"experiment": name, "cost": metrics.get("cost"), "allocation": state["allocation"], "log": log}
    if metrics.get("mlflow_run_id"):
        attrs["mlflow_run_id"] = metrics["mlflow_run_id"]  # its run in the clone's store or the team's server
    _tell(spec, directory, number, value, OPTUNA_STATE[final], attrs)
    shown = f", {spec.metric} {value}" if value is not None else ""
    say(f"trial {number} ({name}): {final}{shown}; log {log}")
    return 0 if final != FAILED else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m virgo_exps.sweeps.task SWEEP_DIR (run by a sweep's array task)", file=sys.stderr)
        return 2
    index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID", "local")
    return run_task(Path(argv[0]), index, job_id)


if __name__ == "__main__":
    sys.exit(main())
