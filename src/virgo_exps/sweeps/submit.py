"""Submitting a sweep: checks, the sweep dir in the team store, ONE SLURM job array, then return.

The sweep dir is ``<store>/sweeps/<name>/``:

- ``sweep.json``: the spec, the commit (pushed to the store's git as ``refs/heads/sweeps/<name>``), the
  submitting checkout, the machine, the array job id;
- ``sweep.sbatch``: the array's batch script; each task runs ``python -m virgo_exps.sweeps.task <dir>``;
- ``tasks/<index>.json``: each task's state (written by the task), ``logs/``: the tasks' logs,
  ``work/<experiment>/``: each trial's clone.

Nothing of ours stays on the submitting host: sbatch returns the job id and the command ends.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from virgo_exps import dvcrun, fsio
from virgo_exps.config import ConfigError, DamagedInputError
from virgo_exps.experiments.teamstore import FILE_MODE, GIT_DIR, MARKER, Layout, make_group_tree, read_marker
from virgo_exps.gitrun import git
from virgo_exps.launch.slurm.query import run_tool
from virgo_exps.launch.slurm.script import machine_options, sbatch_arg, slurm_filename
from virgo_exps.launch.slurm.submit import use_slurm_conf
from virgo_exps.launch.strategy_table import strategy_row
from virgo_exps.machines import Machine, load_machine
from virgo_exps.sweeps import search
from virgo_exps.sweeps import spec as sweep_spec
from virgo_exps.sweeps.spec import SweepSpec
from virgo_exps.sweeps.taskstate import task_files

SWEEPS_DIR = "sweeps"
SWEEP_FILE = "sweep.json"
SCRIPT_FILE = "sweep.sbatch"


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return git(repo, *args, check=check, error=ConfigError)


def _dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = dvcrun.run(list(args), repo, check=False, timeout=None)
    if check and proc.returncode != 0:
        raise ConfigError(f"dvc {' '.join(args)} failed in {repo}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def sweep_dir(store: Path, name: str) -> Path:
    return Path(store) / SWEEPS_DIR / name


def branch(name: str) -> str:
    return f"sweeps/{name}"


def read_sweep(directory: Path) -> dict:
    path = Path(directory) / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"{directory}: no {SWEEP_FILE}; not a sweep dir (submit with `virgo-exps sweep submit`)")
    try:
        why = fsio.trust_refusal(path, team_folder=directory)
        record = None if why else json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        record, why = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        why = why or "no spec in it"
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict):
        raise DamagedInputError(
            f"{path}: not a sweep record ({why}): damaged after `sweep submit` wrote it; the trials' records are "
            f"in {Path(directory) / 'tasks'}, their experiments in the team store; submit under another name to "
            "sweep again"
        )
    return record


def find_store(repo: Path, store: Path | None = None) -> Layout:
    """The team store: ``store``, else the one this checkout's shared DVC cache belongs to."""
    if store is None:
        got = _dvc(repo, "config", "cache.dir", check=False).stdout.strip()
        if got:
            cache = Path(got) if Path(got).is_absolute() else (repo / ".dvc" / got)
            if (cache.parent / MARKER).is_file():
                store = cache.parent
    if store is None:
        raise ConfigError(
            "no team store: this checkout's DVC cache is not a shared one; run `virgo-exps share --dir DIR "
            "--group GROUP` first, or pass --store DIR"
        )
    store = Path(store).absolute()
    marker = store / MARKER
    if not marker.is_file() or not (store / GIT_DIR).is_dir():
        raise ConfigError(f"--store {store}: not a team store (no {MARKER}); create it with `virgo-exps share`")
    group = read_marker(marker).get("group", "")
    return Layout(store, group)


def _params_with(repo: Path, overrides: dict[str, str]) -> dict:
    params = yaml.safe_load((repo / "params.yaml").read_text()) or {}
    for key, text in overrides.items():
        section, _, name = key.partition(".")
        params.setdefault(section, {})[name] = yaml.safe_load(text)
    return params


def resources(repo: Path, spec: SweepSpec, machine: Machine) -> tuple[int, int, int]:
    """(nodes, tasks per node, CPUs per task) of one array task: the largest the train stage asks for
    over the grid's trials (a search: params.yaml)."""
    trials = [sweep_spec.overrides_of(spec, n) for n in range(len(spec.grid))] if spec.kind == "grid" else [{}]
    nodes = tasks = cpus = 1
    for overrides in trials:
        train = _params_with(repo, overrides).get("train", {})
        strategy = str(train.get("strategy", "single"))
        n, procs = int(train.get("nodes", 1)), int(train.get("procs_per_node", 1))
        per_process = strategy_row(strategy).task_per_process
        t = procs if per_process else 1
        c = machine.cpus_per_task * (1 if per_process else procs)
        nodes, tasks, cpus = max(nodes, n), max(tasks, t), max(cpus, c)
    return nodes, tasks, cpus


def batch_script(directory: Path, spec: SweepSpec, machine: Machine, res: tuple[int, int, int]) -> str:
    nodes, tasks, cpus = res
    logs = directory / "logs"
    opts = [
        f"--job-name={sbatch_arg('virgo-sweep-' + spec.name)}",
        f"--output={sbatch_arg(slurm_filename(str(logs)) + '/task-%A_%a.out')}",
        "--open-mode=append",  # a requeued task appends to the same log
        f"--chdir={sbatch_arg(str(directory))}",
        f"--array=0-{spec.trials - 1}%{spec.parallel}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks}",
        f"--cpus-per-task={cpus}",
        f"--time={machine.time}",
        # to the job steps (the training), which write their snapshot and ask for a requeue
        f"--signal=USR1@{machine.signal_seconds}",
        "--requeue",
        *machine_options(machine),
    ]
    q = shlex.quote
    return "\n".join(
        [
            "#!/bin/bash",
            f"# Sweep '{spec.name}' ({spec.kind}, {spec.trials} trials, {spec.parallel} at a time) on machine "
            f"'{machine.name}', written by `virgo-exps sweep submit`.",
            *(f"#SBATCH {o}" for o in opts),
            "",
            "umask 0007  # what the tasks write in the team store: the group's too (without default ACLs)",
            f"export VIRGO_MACHINE={q(machine.name)}",
            f"exec {q(sys.executable)} -m virgo_exps.sweeps.task {q(str(directory))}",
            "",
        ]
    )


SBATCH_TIMEOUT_S = 120.0


def _slurm(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """A Slurm command through the one runner; no answer in time is one line."""
    try:
        return run_tool(*args, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"{args[0]} did not answer in {timeout:.0f} s; is the cluster's controller up? (a sweep that was "
            "submitted all the same is found by the next `sweep submit`, by its mark)"
        ) from None


def _still_queued(job_id: str) -> bool:
    """Whether any task of the job array ``job_id`` is still pending, running or requeued."""
    proc = _slurm("squeue", "-h", "-r", "-j", job_id, "-o", "%i")
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise ConfigError(f"squeue -j {job_id} failed: {proc.stderr.strip()}; is the cluster's controller up?")
    return bool(proc.stdout.strip())


SUBMISSION_COMMENT = "virgo-sweep-submission-"


def _queued_submission(spec: SweepSpec, token: str) -> str | None:
    """The array job id of the submission marked ``token`` (sbatch's --comment) if it is in the queue."""
    name = "virgo-sweep-" + spec.name
    proc = _slurm("squeue", "-h", "-n", name, "-o", "%F %k")
    for line in proc.stdout.splitlines():
        job, _, comment = line.strip().partition(" ")
        if comment.strip() == SUBMISSION_COMMENT + token and job.isdigit():
            return job
    return None


def _recorded_by_tasks(directory: Path, known: set[str]) -> str | None:
    """A job id a task of the sweep recorded that sweep.json does not know (its array ran already)."""
    for path in task_files(directory):
        try:
            job = str(json.loads(path.read_text()).get("job_id") or "")
        except (OSError, ValueError, AttributeError):  # a damaged record: `sweep status` names it
            continue
        if job.isdigit() and job not in known:
            return job
    return None


def check_checkout(repo: Path) -> str:
    """Refuse a checkout the sweep could not reproduce; return its commit."""
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    if dirty:
        raise ConfigError(
            f"uncommitted changes ({dirty.splitlines()[0].strip()} ...): every trial clones the commit; "
            "commit them (or `git stash`) first"
        )
    stale = _dvc(repo, "status", "train", "--with-deps", "--json").stdout.strip() or "{}"
    # Stages that always run (the environment check) are run by every trial anyway.
    upstream = sorted(
        k for k, v in json.loads(stale).items() if not k.endswith(("train", ":train")) and "always changed" not in v
    )
    if upstream:
        raise ConfigError(
            f"data stages not up to date: {', '.join(upstream)}; run `dvc repro {upstream[-1]}`, commit dvc.lock, "
            "then submit (trials link the data from the shared cache, they do not make it)"
        )
    return _git(repo, "rev-parse", "HEAD").stdout.strip()


def submit(repo: Path, spec: SweepSpec, store: Path | None = None, machine: Machine | None = None) -> dict:
    """Check, write the sweep dir, push the commit, submit the array; return sweep.json's content."""
    repo = Path(repo).absolute()
    machine = machine or load_machine()
    if machine.kind != "slurm":
        raise ConfigError(
            f"machine '{machine.name}' is not a SLURM machine: a sweep is a job array; set VIRGO_MACHINE to a "
            "slurm profile (e.g. simcluster)"
        )
    for tool in ("sbatch", "squeue"):
        if shutil.which(tool) is None:
            raise ConfigError(f"`{tool}` is not on PATH; submit from the cluster's login node")
    layout = find_store(repo, store)
    commit = check_checkout(repo)
    directory = sweep_dir(layout.root, spec.name)
    previous = None
    if (directory / SWEEP_FILE).exists():
        old = read_sweep(directory)
        if old.get("job_id") is None:
            # An earlier submission that did not record its job: sbatch failed (nothing ran, start again),
            # or the command was stopped after sbatch had queued the array: that array is this sweep's.
            job = _queued_submission(spec, str(old.get("submission", ""))) if old.get("submission") else None
            job = job or _recorded_by_tasks(directory, {str(j) for j in old.get("earlier_jobs", [])})
            if job is not None:
                old.update(job_id=job, recovered=True)
                fsio.write_text(directory / SWEEP_FILE, json.dumps(old, indent=2) + "\n")
                return old
        elif spec.kind == "grid" or old.get("spec", {}).get("kind") != "search":
            raise ConfigError(
                f"sweep '{spec.name}' exists already ({directory}, job {old.get('job_id')}); choose another name"
            )
        elif _still_queued(str(old["job_id"])):
            raise ConfigError(
                f"sweep '{spec.name}': its job array {old['job_id']} is still in the queue; continue the search "
                f"once it has ended (`squeue -j {old['job_id']}`), or cancel it (`scancel {old['job_id']}`)"
            )
        else:
            previous = old
    if spec.kind == "search":  # a continued search reads the study first: a damaged one is refused here
        search.check_journal(directory)
    _git(repo, "push", "-q", "-f", str(layout.git), f"{commit}:refs/heads/{branch(spec.name)}")
    use_slurm_conf(machine)
    for sub in ("logs", "tasks", "work"):  # the store's group folders, as `virgo-exps share` makes them
        make_group_tree(layout.root, directory / sub, layout.group)
    res = resources(repo, spec, machine)
    record = {
        "spec": spec.to_dict(),
        "commit": commit,
        "branch": branch(spec.name),
        "checkout": str(repo),
        "store": str(layout.root),
        "group": layout.group,
        "machine": machine.name,
        "resources": {"nodes": res[0], "ntasks_per_node": res[1], "cpus_per_task": res[2]},
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "submission": secrets.token_hex(8),  # sbatch's --comment: finds the array if we stop before recording it
        "earlier_jobs": [*(previous or {}).get("earlier_jobs", []), *([previous["job_id"]] if previous else [])],
        "job_id": None,
    }
    fsio.write_text(directory / SWEEP_FILE, json.dumps(record, indent=2) + "\n", mode=FILE_MODE)
    script = directory / SCRIPT_FILE
    fsio.write_text(script, batch_script(directory, spec, machine, res), mode=FILE_MODE)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRGO_HOME", "DVC_EXP_NAME", "VIRGO_IN_ALLOCATION")}
    env["VIRGO_MACHINE"] = machine.name
    comment = SUBMISSION_COMMENT + record["submission"]
    proc = _slurm("sbatch", "--parsable", f"--comment={comment}", str(script), env=env, timeout=SBATCH_TIMEOUT_S)
    job_id = proc.stdout.strip().split(";")[0]
    if proc.returncode != 0 or not job_id.isdigit():
        # nothing was submitted: the sweep's record is the earlier submission's again, or none
        if previous is not None:
            fsio.write_text(directory / SWEEP_FILE, json.dumps(previous, indent=2) + "\n")
        raise ConfigError(f"sbatch failed (exit code {proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    record["job_id"] = job_id
    fsio.write_text(directory / SWEEP_FILE, json.dumps(record, indent=2) + "\n")
    return record


__all__ = ["SWEEP_FILE", "branch", "find_store", "read_sweep", "resources", "submit", "sweep_dir"]
