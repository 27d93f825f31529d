"""A sweep is one SLURM job array (real Slurm with 2 nodes of 1 CPU, real DVC, a team store made by `share`).

One grid of 6 trials submitted with `virgo-exps sweep submit --grid ... --parallel 2` and shared by every
test of the module: the submit command returns at once and leaves no process of ours on the host; squeue
never shows more than 2 running tasks; every trial is a DVC experiment pushed to the team store, which a
second clone pulls; `sweep status` counts them and names the best and the cost. One task is requeued in the
middle of its training (`scontrol requeue`) and its experiment resumes at its snapshot with the metrics of
an uninterrupted run. A one-trial sweep whose value the first stage refuses is listed as failed with its log.
"""

from __future__ import annotations

import grp
import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN, ROOT, make_repo, mlflow_served, sh, tool_env, wait_until
from virgo_exps.machines import load_machine
from virgo_exps.provenance import read_metrics
from virgo_exps.sweeps import spec as sweep_spec
from virgo_exps.sweeps.status import render, status
from virgo_exps.sweeps.submit import batch_script, resources
from virgo_exps.sweeps.task import allocated, allocation

EPOCHS = 30  # ~0.1 s an epoch: a window of seconds to requeue a task in the middle of its training
PARAMS = {"preprocess": {"fmax": 64.0}, "train": {"epochs": EPOCHS}}
LRS, SEEDS = ("0.001", "0.003", "0.01"), ("0", "1")
REQUEUED = 3  # the array index whose task is requeued mid-training (lr 0.003, seed 1)
SIGNALLED = 4  # the array index whose job step gets the time limit's signal (USR1)
CRASHED = 5  # the array index whose node is killed mid-training
RTOL = 1e-4


def vx(repo: Path, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return sh([str(BIN / "virgo-exps"), *args], repo, env=env, check=check)


def dvc(repo: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return sh([str(BIN / "dvc"), *args], repo, env=env or tool_env(), check=check)


def leaves(tree: dict):
    for value in tree.values():
        yield from leaves(value) if isinstance(value, dict) else [value]


def measure(value) -> bool:
    """A number DVC can subtract and sort: no text, flag or null."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def squeue(cluster, job_id: str) -> dict[int, str]:
    out = cluster.slurm("squeue", "-h", "-r", "-j", job_id, "-o", "%K %T", check=False).stdout
    return {int(k): v for k, v in (line.split() for line in out.splitlines() if line.strip()) if k.isdigit()}


def our_processes(roots: list[Path]) -> list[str]:
    """Processes whose working folder is under ``roots``, not started by slurmd (a job step or batch script)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if not any(cwd.startswith(str(r)) for r in roots):
            continue
        pid, slurm = int(entry.name), False
        while pid > 1:
            try:
                stat = (Path("/proc") / str(pid) / "stat").read_text()
            except OSError:
                break
            if stat[stat.find("(") + 1 : stat.rfind(")")].startswith("slurmstepd"):
                slurm = True
                break
            pid = int(stat[stat.rfind(")") + 2 :].split()[1])
        if not slurm:
            found.append(f"{entry.name}: {cmd}")
    return found


def finished(directory: Path, trials: int) -> bool:
    states = []
    for i in range(trials):
        path = directory / "tasks" / f"{i}.json"
        states.append(json.loads(path.read_text()).get("state") if path.is_file() else None)
    return all(s in ("done", "failed", "pruned") for s in states)


# --- units: the array's batch script, the status read back -------------------------------------------------


def test_each_task_asks_what_the_largest_trial_of_the_train_stage_asks():
    spec = sweep_spec.from_grid("g", ["train.strategy=ddp", "train.procs_per_node=1,2"], parallel=5)
    machine = load_machine("simcluster")
    res = resources(ROOT, spec, machine)
    assert res == (1, 1, 2 * machine.cpus_per_task)
    script = batch_script(Path("/store/sweeps/g"), spec, machine, res)
    for line in (
        "#SBATCH --array=0-1%2",  # the throttle is at most the number of trials
        f"#SBATCH --cpus-per-task={2 * machine.cpus_per_task}",
        f"#SBATCH --signal=USR1@{machine.signal_seconds}",
        "#SBATCH --requeue",
        "#SBATCH --output=/store/sweeps/g/logs/task-%A_%a.out",
    ):
        assert line in script.splitlines(), script
    assert script.rstrip().endswith("-m virgo_exps.sweeps.task /store/sweeps/g"), script


def test_status_counts_each_state_and_names_the_best_the_cost_and_the_failed_log(tmp_path):
    spec = sweep_spec.from_grid("g", ["train.lr=0.1,0.2,0.3,0.4,0.5"], parallel=2, direction="maximize")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": spec.to_dict(), "job_id": None}))
    cost = {"core_h": 0.25, "gpu_h": 0.0, "cpu_h": 0.2, "wall_s": 30.0}
    for index, state, metric in ((0, "done", 1.5), (1, "done", 2.5), (2, "failed", None), (3, "pruned", 9.0)):
        task = {"index": index, "trial": index, "experiment": f"g-{index:03d}", "state": state, "metric": metric}
        task.update(overrides=spec.grid[index], cost=cost, exit_code=0 if state != "failed" else 1, log=f"/l/{index}")
        (tmp_path / "tasks" / f"{index}.json").write_text(json.dumps(task))
    s = status(tmp_path)
    assert s.counts == {"done": 2, "running": 0, "pending": 1, "failed": 1, "pruned": 1}
    out = render(s, "val_loss")
    assert "5 trials: 2 done, 0 running, 1 pending, 1 failed, 1 pruned" in out
    assert "best so far: g-001 val_loss 2.5 (train.lr=0.2)" in out, out  # maximize; a pruned trial is not best
    assert "cost so far: 1.0000 core-hours" in out and "120 s" in out, out
    assert "failed: g-002 (exit code 1); log /l/2" in out, out
    assert "allocated so far" not in out  # tasks of before allocations were recorded


def one_task_sweep(folder: Path, spec, job_id: str, task: dict) -> None:
    """A sweep folder of array ``job_id`` whose task 0 recorded ``task``."""
    (folder / "tasks").mkdir()
    (folder / "sweep.json").write_text(json.dumps({"spec": spec.to_dict(), "job_id": job_id}))
    record = {"index": 0, "trial": 0, "experiment": "g-000", "job_id": job_id, "overrides": spec.grid[0], **task}
    (folder / "tasks" / "0.json").write_text(json.dumps(record))


def queue_says(folder: Path, monkeypatch, lines: str) -> None:
    """An squeue that prints ``lines`` (index and state of the array's tasks still queued): a stand-in
    for the queue in a test of the status function alone."""
    fake = folder / "bin"
    fake.mkdir()
    (fake / "squeue").write_text(f"#!/bin/sh\necho '{lines}'\n" if lines else "#!/bin/sh\nexit 0\n")
    (fake / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")


def test_status_counts_a_task_that_left_the_queue_without_a_record_as_failed(tmp_path, monkeypatch):
    """A continued search whose tasks all crashed at start-up: the array is gone from the queue (an squeue
    that answers with an empty queue, a stand-in for this one function) and a task wrote no record: it
    failed; it is not pending forever."""
    spec = sweep_spec.from_grid("g", ["train.lr=0.1,0.2"], parallel=2)
    one_task_sweep(tmp_path, spec, "77", {"state": "done", "metric": 1.0})
    queue_says(tmp_path, monkeypatch, "")
    s = status(tmp_path)
    assert s.counts == {"done": 1, "running": 0, "pending": 0, "failed": 1, "pruned": 0}
    out = render(s, "val_loss")
    assert "failed: array task 77_1 (left the queue without recording a start" in out, out


def test_status_counts_a_running_tasks_allocation_up_to_now(tmp_path, monkeypatch):
    """A task that has run for an hour on 2 cores holds 2 core-hours now, not 0 until it ends (the queue
    is an squeue stand-in that lists the task as RUNNING)."""
    spec = sweep_spec.from_grid("g", ["train.lr=0.1"], parallel=1)
    hour = [{"started": time.time() - 3600, "cores": 2}]
    one_task_sweep(tmp_path, spec, "78", {"state": "running", "attempts": hour})
    queue_says(tmp_path, monkeypatch, "0 RUNNING")
    s = status(tmp_path)
    assert s.counts["running"] == 1
    assert s.cost["alloc_core_h"] == pytest.approx(2.0, abs=0.01) and s.cost["unmeasured"] == 0


def test_status_adds_up_the_allocations_and_names_the_attempts_lost(tmp_path):
    spec = sweep_spec.from_grid("g", ["train.lr=0.1,0.2,0.3"], parallel=2)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": spec.to_dict(), "job_id": None}))
    tasks = [
        # failed: no metrics, so no training cost; its allocation counts
        {"state": "failed", "exit_code": 1, "attempts": [{"started": 0.0, "ended": 30.0, "cores": 2}]},
        # requeued once by a lost node, then done
        {
            "state": "done",
            "metric": 1.0,
            "attempts": [{"started": 0.0, "cores": 4}, {"started": 90.0, "ended": 150.0, "cores": 4}],
        },
        # its node lost, never requeued: the queue no longer has it, its last attempt never ended
        {"state": "running", "attempts": [{"started": 10.0, "cores": 4}]},
    ]
    for index, task in enumerate(tasks):
        task.update(
            index=index, trial=index, experiment=f"g-{index:03d}", overrides=spec.grid[index], log=f"/l/{index}"
        )
        (tmp_path / "tasks" / f"{index}.json").write_text(json.dumps(task))
    s = status(tmp_path)
    assert s.counts == {"done": 1, "running": 0, "pending": 0, "failed": 2, "pruned": 0}
    assert s.cost["alloc_core_h"] == pytest.approx((2 * 30 + 4 * 60) / 3600)
    assert s.cost["attempts"] == 4 and s.cost["unmeasured"] == 2
    out = render(s, "val_loss")
    assert (
        "allocated so far: 0.0833 core-hours, 0.0000 GPU-hours over 4 task attempt(s), failed trials included; "
        "2 attempt(s) killed without notice are not counted" in out
    ), out


def test_the_allocation_of_a_task_adds_up_its_attempts():
    assert allocated({"SLURM_JOB_CPUS_PER_NODE": "4(x2),2", "SLURM_JOB_NUM_NODES": "3"}) == (10, 0)
    assert allocated({"SLURM_JOB_CPUS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NUM_NODES": "2"}) == (2, 8)
    assert allocated({}) == (None, 0)
    attempts = [
        {"started": 100.0, "ended": 160.0, "cores": 4},  # requeued with SIGTERM
        {"started": 200.0, "cores": 4},  # its node lost: no end
        {"started": 300.0, "ended": 330.0, "cores": 2, "gpus": 1},
    ]
    a = allocation(attempts)
    assert a["attempts"] == 3 and a["unmeasured"] == 1 and a["wall_s"] == 90.0
    assert a["core_h"] == pytest.approx((4 * 60 + 2 * 30) / 3600) and a["gpu_h"] == pytest.approx(30 / 3600)
    assert allocation([{"started": 0.0, "ended": 10.0, "cores": None}])["core_h"] is None


# --- the sweep on a real cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, slurm_multinode):
    cluster = slurm_multinode
    base = tmp_path_factory.mktemp("sweep-array")
    repo = make_repo(base / "repo", PARAMS)
    env = {k: v for k, v in tool_env().items() if not k.startswith("SLURM_")}
    env.update({**cluster.env, "VIRGO_MACHINE": "simcluster", "OMP_NUM_THREADS": "1"})
    local = {**env, "VIRGO_MACHINE": "local"}
    # The data stages made once and committed: trials link their outputs from the shared cache.
    dvc(repo, "repro", "preprocess", env=local)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "data"], repo)
    (repo / ".slurmsim").symlink_to(cluster.workdir, target_is_directory=True)
    store = base / "store"
    group = grp.getgrgid(os.getgid()).gr_name
    vx(repo, "share", "--dir", str(store), "--group", group, env=env)

    grid = ["-S", f"train.lr={','.join(LRS)}", "-S", f"train.seed={','.join(SEEDS)}"]
    started = time.monotonic()
    submitted = vx(repo, "sweep", "submit", "--grid", "lrgrid", *grid, "--parallel", "2", env=env)
    submit_s = time.monotonic() - started
    job_id = re.search(r"^submitted sweep lrgrid: job array (\d+) \(6 trials, 2 at a time\)", submitted.stdout, re.M)[1]
    assert len(submitted.stdout.strip().splitlines()) == 1, submitted.stdout  # one sentence, no bare id
    leftover = our_processes([repo])  # the submit command's processes: all gone
    directory = store / "sweeps" / "lrgrid"

    # Sample the queue while the sweep runs; requeue one task in the middle of its training.
    samples: list[dict[int, str]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(squeue(cluster, job_id))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    requeued_at = signalled_at = crashed_at = killed = None
    try:
        task_log = directory / "logs" / f"task-{job_id}_{REQUEUED}.out"
        wait_until(
            lambda: task_log.is_file() and re.search(r"epoch 2/\d+:", task_log.read_text()),
            timeout=400,
            what=f"epoch 2 of task {REQUEUED}",
            interval=0.3,
        )
        requeued_at = task_log.read_text().count("\n")
        cluster.slurm("scontrol", "requeue", f"{job_id}_{REQUEUED}")
        # The time limit's signal (USR1 to the job step) on another task: the training writes its
        # snapshot and exits 85, the step's script requeues the task itself.
        signal_log = directory / "logs" / f"task-{job_id}_{SIGNALLED}.out"
        wait_until(
            lambda: signal_log.is_file() and re.search(r"epoch 2/\d+:", signal_log.read_text()),
            timeout=400,
            what=f"epoch 2 of task {SIGNALLED}",
            interval=0.3,
        )
        signalled_at = signal_log.read_text().count("\n")
        cluster.slurm("scancel", "--signal=USR1", f"{job_id}_{SIGNALLED}")
        # A node fails under another task: Slurm requeues it, it resumes on a node that works.
        crash_log = directory / "logs" / f"task-{job_id}_{CRASHED}.out"
        wait_until(
            lambda: crash_log.is_file() and re.search(r"epoch 2/\d+:", crash_log.read_text()),
            timeout=400,
            what=f"epoch 2 of task {CRASHED}",
            interval=0.3,
        )
        crashed_at = crash_log.read_text().count("\n")
        killed = json.loads((directory / "tasks" / f"{CRASHED}.json").read_text())["node"]
        cluster.kill_node(killed)
        wait_until(
            lambda: json.loads((directory / "tasks" / f"{CRASHED}.json").read_text())["restarts"] >= 1,
            timeout=180,
            what=f"task {CRASHED} requeued after the node failure",
            interval=1,
        )
        cluster.restart_node(killed, timeout=120)
        killed = None
        # A trial whose value the first stage refuses (global batch larger than the training split).
        bad = vx(
            repo, "sweep", "submit", "--grid", "badgrid", "-S", "train.global_batch_size=64", "--parsable", env=env
        )
        bad_job = bad.stdout.strip()
        wait_until(lambda: finished(directory, 6), timeout=900, what="all trials of lrgrid", interval=2)
        wait_until(lambda: finished(store / "sweeps" / "badgrid", 1), timeout=300, what="badgrid", interval=1)
        wait_until(lambda: not squeue(cluster, job_id) and not squeue(cluster, bad_job), timeout=120, what="queue")
    finally:
        stop.set()
        if killed is not None:
            cluster.restart_node(killed, timeout=120)
        sampler.join()
    return {
        "cluster": cluster,
        "repo": repo,
        "store": store,
        "group": group,
        "env": env,
        "local": local,
        "job_id": job_id,
        "dir": directory,
        "submit_s": submit_s,
        "submitted": submitted.stdout,
        "leftover": leftover,
        "samples": samples,
        "requeued_at": requeued_at,
        "crashed_at": crashed_at,
        "signalled_at": signalled_at,
        "base": base,
    }


@pytest.mark.slurm
@pytest.mark.slow
def test_one_array_at_most_two_running_and_nothing_left_on_the_host(sweep):
    assert sweep["job_id"].isdigit(), sweep["submitted"]
    assert sweep["submit_s"] < 60, sweep["submit_s"]
    assert sweep["leftover"] == [], sweep["leftover"]
    script = (sweep["dir"] / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-5%2" in script and "#SBATCH --requeue" in script
    info = sweep["cluster"].slurm("scontrol", "show", "job", sweep["job_id"], check=False).stdout
    assert info == "" or f"ArrayJobId={sweep['job_id']}" in info
    running = [sum(1 for s in sample.values() if s == "RUNNING") for sample in sweep["samples"]]
    assert len(running) > 20 and max(running) == 2, running  # both nodes used, never more than 2
    record = json.loads((sweep["dir"] / "sweep.json").read_text())
    assert record["job_id"] == sweep["job_id"] and record["spec"]["trials"] == 6


@pytest.mark.slurm
@pytest.mark.slow
def test_every_trial_is_an_experiment_a_second_clone_pulls(sweep):
    store, env = sweep["store"], sweep["env"]
    other = sweep["base"] / "second"
    sh(["git", "clone", "-q", "--branch", "sweeps/lrgrid", str(store / "experiments.git"), str(other)], sweep["base"])
    vx(other, "share", "--dir", str(store), "--group", sweep["group"], env=env)
    names = [f"lrgrid-{n:03d}" for n in range(6)]
    dvc(other, "exp", "pull", "team", *names, env=env)
    shown = json.loads(dvc(other, "exp", "show", "--json", env=env).stdout)
    rows = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") in names:
                    rows[rev["name"]] = rev["data"]
    assert sorted(rows) == names, sorted(rows)
    for n, name in enumerate(names):
        params = rows[name]["params"]["params.yaml"]["data"]["train"]
        assert (str(params["lr"]), str(params["seed"])) == (LRS[n // 2], SEEDS[n % 2]), (name, params)
        metrics = rows[name]["metrics"]["results/metrics.json"]["data"]
        assert np.isfinite(metrics["val_loss"]) and metrics["cost"]["core_h"] > 0, metrics
        assert rows[name]["params"]["results/run.json"]["data"]["machine"] == "simcluster", rows[name]["params"]
        # DVC's table holds numbers only (text is run.json's, shown with the params), nothing unmeasured as null
        assert all(measure(v) for v in leaves(metrics)), metrics
    # ... so DVC subtracts every metric of two trials, and its plots get numbers
    diff = json.loads(dvc(other, "exp", "diff", names[0], names[1], "--all", "--json", env=env).stdout)
    compared = diff["metrics"]["results/metrics.json"]
    assert {"val_loss", "cost.core_h", "computation_fraction"} <= set(compared), sorted(compared)
    assert all(measure(entry["diff"]) for entry in compared.values()), compared
    strategy = rows[names[1]]["params"]["params.yaml"]["data"]["train"]["strategy"]
    assert diff["params"]["results/run.json"]["strategy"]["new"] == strategy, diff["params"]["results/run.json"]
    revs = [rows[name]["rev"] for name in names[:2]]
    plots = json.loads(dvc(other, "plots", "diff", *revs, "--json", env=env).stdout)["data"]
    assert sorted(plots) == ["Epoch time (s)", "Loss", "Throughput (samples/s)"], sorted(plots)
    for title, [plot] in plots.items():
        values = plot["content"]["data"]["values"]
        assert len({v["rev"] for v in values}) == 2, title  # both trials drawn
        numeric = ("epoch", "step", "train_loss", "val_loss", "train_time_s", "samples_per_s", "lr")
        assert all(measure(v[c]) for v in values for c in numeric), (title, values[:2])
    # Data linked from the shared cache, not copied.
    work = sweep["dir"] / "work" / "lrgrid-000" / "data"
    linked = [p for p in work.rglob("*") if p.is_symlink()]
    assert linked and all(str(p.resolve()).startswith(str(store / "dvc-cache")) for p in linked[:20])


@pytest.mark.slurm
@pytest.mark.slow
def test_status_counts_best_and_cost(sweep):
    out = vx(sweep["repo"], "sweep", "status", "lrgrid", env=sweep["env"]).stdout
    assert "6 trials: 6 done, 0 running, 0 pending, 0 failed, 0 pruned" in out, out
    states = [json.loads((sweep["dir"] / "tasks" / f"{i}.json").read_text()) for i in range(6)]
    best = min(states, key=lambda t: t["metric"])
    assert f"best so far: {best['experiment']} val_loss {best['metric']:.6g}" in out, out
    total = sum(t["cost"]["core_h"] for t in states)
    assert total > 0 and f"cost so far: {total:.4f} core-hours" in out, out
    # The allocations: every attempt of every task, failed trials in their own sweep.
    alloc = sum(t["allocation"]["core_h"] for t in states)
    attempts = sum(t["allocation"]["attempts"] for t in states)
    assert attempts == 6 + 3, states  # three tasks were requeued once
    line = f"allocated so far: {alloc:.4f} core-hours, 0.0000 GPU-hours over {attempts} task attempt(s)"
    assert line in out and "1 attempt(s) killed without notice are not counted" in out, out
    for t in [t for t in states if not t["allocation"]["unmeasured"]]:
        # a task's allocation holds its training (bar the second between the job's and the task's start);
        # not so when an attempt went unmeasured: the training counts the lost one up to its last epoch
        assert t["allocation"]["wall_s"] > t["cost"]["wall_s"] - 2 * t["allocation"]["attempts"], t
    bad = json.loads((sweep["store"] / "sweeps" / "badgrid" / "tasks" / "0.json").read_text())
    assert bad["state"] == "failed" and bad["cost"] is None
    assert bad["allocation"]["attempts"] == 1 and bad["allocation"]["core_h"] > 0, bad
    out = vx(sweep["repo"], "sweep", "status", "badgrid", env=sweep["env"]).stdout
    assert f"allocated so far: {bad['allocation']['core_h']:.4f} core-hours" in out, out


def mlflow_rest(url: str, path: str, body: dict | None = None) -> dict:
    """One call of the MLflow REST API (GET, or POST with a JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


@pytest.mark.slurm
@pytest.mark.slow
def test_the_mlflow_ui_on_the_team_store_finds_the_trials_by_the_sweep_tag_and_by_a_cost(sweep, tmp_path):
    """`mlflow ui` over the team store, searched through its REST API as its run list does: one run per trial
    (no per-rank rows), found by the sweep's tag and by a cost figure, each with its trial and experiment."""
    vx(sweep["repo"], "sweep", "status", "lrgrid", env=sweep["env"])  # merges the finished trials (once)
    names = [f"lrgrid-{n:03d}" for n in range(6)]
    with mlflow_served("ui", f"sqlite:///{sweep['store'] / 'mlflow' / 'mlflow.db'}", tmp_path) as url:
        exp = mlflow_rest(url, "experiments/get-by-name?experiment_name=sweep-lrgrid")["experiment"]

        def search(where: str) -> list[dict]:
            body = {"experiment_ids": [exp["experiment_id"]], "filter": where, "max_results": 100}
            return mlflow_rest(url, "runs/search", body).get("runs") or []

        def named(runs: list[dict]) -> list[str]:
            return sorted(r["info"]["run_name"] for r in runs)

        by_tag = search("tags.sweep = 'lrgrid'")
        # one row per trial: no -rankN rows, and of a requeued trial its last attempt only
        assert named(by_tag) == names, named(by_tag)
        assert named(search("metrics.`cost.core_h` > 0 and tags.sweep = 'lrgrid'")) == names
        assert named(search("")) == names
        for run in by_tag:
            name = run["info"]["run_name"]
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert tags["dvc.experiment"] == name and tags["machine"] == "simcluster", tags
            assert metrics["cost.core_h"] > 0 and np.isfinite(metrics["val_loss"]), metrics
            assert run["info"]["status"] == "FINISHED"
            # its artifacts in the team store, not in the trial's clone: the model a teammate downloads
            assert run["info"]["artifact_uri"].startswith((sweep["store"] / "mlflow" / "artifacts").as_uri())
            listed = mlflow_rest(url, f"artifacts/list?run_id={run['info']['run_id']}&path=model").get("files")
            assert [f["path"] for f in listed or []] == ["model/model.pt"], listed


@pytest.mark.slurm
@pytest.mark.slow
def test_a_requeued_task_resumes_at_its_snapshot(sweep):
    assert sweep["requeued_at"] is not None
    state = json.loads((sweep["dir"] / "tasks" / f"{REQUEUED}.json").read_text())
    assert state["state"] == "done" and state["restarts"] >= 1, state
    # both attempts are counted: the task's allocations (the requeue's SIGTERM ended the first) and the training
    assert state["allocation"]["attempts"] == 2 and state["allocation"]["unmeasured"] == 0, state["allocation"]
    assert state["cost"]["attempts"] == 2, state["cost"]
    log = Path(state["log"]).read_text()
    assert "USDT:" not in log  # the profiler's probes stay in the stage log, out of the task's
    after = "\n".join(log.splitlines()[sweep["requeued_at"] :])
    assert "requeued: re-entering" in after, after[-3000:]
    m = re.search(r"train: resuming from .* at epoch (\d+)", after)
    assert m and int(m.group(1)) > 1, after[-3000:]
    # The same trial uninterrupted, on the local machine: the same metrics.
    repo = sweep["repo"]
    lr, seed = LRS[REQUEUED // 2], SEEDS[REQUEUED % 2]
    dvc(repo, "exp", "run", "-n", "reference", "-S", f"train.lr={lr}", "-S", f"train.seed={seed}", env=sweep["local"])
    ref = read_metrics(repo / "results" / "metrics.json")
    got = read_metrics(sweep["dir"] / "work" / state["experiment"] / "results" / "metrics.json")
    assert got["epochs"] == ref["epochs"] == EPOCHS, (got["epochs"], ref["epochs"])
    np.testing.assert_allclose(got["val_loss"], ref["val_loss"], rtol=RTOL)
    np.testing.assert_allclose(got["train_loss"], ref["train_loss"], rtol=RTOL)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("how", ["time limit signal", "node failure"])
def test_a_task_stopped_by_the_time_limit_or_a_node_failure_is_requeued_and_resumes(sweep, how):
    index, at = (SIGNALLED, "signalled_at") if how == "time limit signal" else (CRASHED, "crashed_at")
    assert sweep[at] is not None
    state = json.loads((sweep["dir"] / "tasks" / f"{index}.json").read_text())
    assert state["state"] == "done" and state["restarts"] >= 1, state
    after = "\n".join(Path(state["log"]).read_text().splitlines()[sweep[at] :])
    if how == "time limit signal":
        assert re.search(r"virgo: step ended with exit code 85[\s\S]*virgo: requeueing job", after), after[-3000:]
    assert "requeued: re-entering" in after, after[-3000:]
    m = re.search(r"train: resuming from .* at epoch (\d+)", after)
    assert m and int(m.group(1)) > 1, after[-3000:]
    assert state["metric"] is not None and np.isfinite(state["metric"])
    # a lost node gives its attempt no end: counted as unmeasured; the training counts it to its last epoch
    assert state["allocation"]["attempts"] == 2, state["allocation"]
    assert state["allocation"]["unmeasured"] == (1 if how == "node failure" else 0), state["allocation"]
    assert state["cost"]["attempts"] == 2, state["cost"]


@pytest.mark.slurm
@pytest.mark.slow
def test_a_failed_trial_is_listed_with_its_log(sweep):
    out = vx(sweep["repo"], "sweep", "status", "badgrid", env=sweep["env"]).stdout
    assert "1 trials: 0 done, 0 running, 0 pending, 1 failed" in out, out
    m = re.search(r"failed: badgrid-000 \(exit code \d+\); log (\S+)", out)
    assert m, out
    assert "train.global_batch_size: 64 is larger than the training split" in Path(m.group(1)).read_text()


def _task_again(sweep, index: int) -> subprocess.CompletedProcess:
    """The array task ``index`` started once more, as Slurm restarts a requeued task (same array job id)."""
    env = {
        **sweep["env"],
        "SLURM_ARRAY_JOB_ID": sweep["job_id"],
        "SLURM_ARRAY_TASK_ID": str(index),
        "SLURM_RESTART_COUNT": "9",
    }
    return sh([str(BIN / "python"), "-m", "virgo_exps.sweeps.task", str(sweep["dir"])], sweep["repo"], env=env)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_task_requeued_after_its_trial_was_recorded_keeps_the_record(sweep):
    """A node lost after the trial's experiment was recorded (during the push, or before the task wrote
    its state) requeues the task: it neither runs the trial again nor records it as failed."""
    path = sweep["dir"] / "tasks" / "0.json"
    before = json.loads(path.read_text())
    assert before["state"] == "done"
    again = _task_again(sweep, 0)
    assert "is already done; pushing it again" in again.stderr, again.stderr[-3000:]
    assert json.loads(path.read_text()) == before
    # Requeued between `dvc exp run` and the state: the recorded experiment is taken, not run again.
    path.write_text(json.dumps({**before, "state": "running"}))
    again = _task_again(sweep, 0)
    out = again.stdout + again.stderr
    assert "lrgrid-000 is already recorded" in out and "Running stage 'train'" not in out, out[-3000:]
    after = json.loads(path.read_text())
    assert after["state"] == "done" and after["metric"] == before["metric"], after
    assert after["cost"] == before["cost"]


@pytest.mark.slurm
@pytest.mark.slow
def test_a_requeued_task_keeps_a_damaged_record_aside_and_ends_with_its_trial_recorded(sweep):
    """A requeued task whose record was damaged (a garbage line) keeps the damaged file aside, named, and
    ends with its trial recorded again: the same experiment and metric, never a trial counted twice."""
    path = sweep["dir"] / "tasks" / "0.json"
    before = json.loads(path.read_text())
    assert before["state"] == "done"
    path.write_bytes(b"\x00\xffnot what we wrote\n" + path.read_bytes())
    again = _task_again(sweep, 0)
    out = again.stdout + again.stderr
    assert "Traceback" not in out, out[-3000:]
    m = re.search(r"0\.json: damaged \((.*)\); kept as (0\.json\.damaged-\d+); the task runs its trial afresh", out)
    assert m, out[-3000:]
    aside = path.with_name(m.group(2))
    assert aside.read_bytes().startswith(b"\x00\xffnot what we wrote")
    after = json.loads(path.read_text())
    assert after["state"] == "done" and after["experiment"] == before["experiment"], after
    assert after["metric"] == before["metric"], (after["metric"], before["metric"])
    shown = vx(sweep["repo"], "sweep", "status", "lrgrid", env=sweep["env"]).stdout
    assert "0 failed" in shown and "damaged" not in shown, shown
    aside.unlink()


@pytest.mark.slurm
@pytest.mark.slow
def test_a_submission_sbatch_refuses_can_be_made_again(sweep, tmp_path):
    """sbatch refusing the array (here: a partition the cluster does not have) leaves nothing that blocks
    the same submission once the profile is right."""
    repo, env = sweep["repo"], sweep["env"]
    sh(["git", "reset", "-q", "--hard", "HEAD"], repo)
    bad = repo / "machines" / "nopart"
    bad.mkdir()
    profile = (repo / "machines" / "simcluster" / "machine.yaml").read_text()
    (bad / "machine.yaml").write_text(profile.replace("partition: null", "partition: nosuchpart"))
    (bad / "env.sh").write_text((repo / "machines" / "simcluster" / "env.sh").read_text())
    grid = ["sweep", "submit", "--grid", "resubmit", "-S", "train.lr=0.002"]
    refused = vx(repo, *grid, env={**env, "VIRGO_MACHINE": "nopart"}, check=False)
    assert refused.returncode == 2 and "sbatch failed" in refused.stderr, refused.stderr
    submitted = vx(repo, *grid, "--parsable", env=env)
    job = submitted.stdout.strip()
    assert job.isdigit(), submitted.stdout  # --parsable: the id alone, for scripts
    sweep["cluster"].slurm("scancel", job, check=False)
    wait_until(lambda: not squeue(sweep["cluster"], job), timeout=120, what=f"job {job} cancelled")


@pytest.mark.slurm
@pytest.mark.slow
def test_a_submission_stopped_right_after_sbatch_is_recorded_not_submitted_again(sweep, tmp_path):
    """`sweep submit` killed after sbatch queued the array but before the job id reached sweep.json (here
    an sbatch wrapper kills it the moment sbatch returns): the next `sweep submit` finds that array by the
    submission's mark and records it, and submits nothing new."""
    import shutil

    repo, env, cluster = sweep["repo"], sweep["env"], sweep["cluster"]
    sh(["git", "reset", "-q", "--hard", "HEAD"], repo)
    real = shutil.which("sbatch", path=env["PATH"])
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "sbatch").write_text(
        f'#!/bin/sh\nout=$("{real}" "$@"); rc=$?\necho "$out" > "{tmp_path}/job"\nkill -9 $PPID\nexit $rc\n'
    )
    (shim / "sbatch").chmod(0o755)
    grid = ["sweep", "submit", "--grid", "stopped", "-S", "train.lr=0.002", "--parsable"]
    killed = vx(repo, *grid, env={**env, "PATH": f"{shim}:{env['PATH']}"}, check=False)
    assert killed.returncode == -9, killed.stderr
    queued = (tmp_path / "job").read_text().strip().split(";")[0]
    directory = sweep["store"] / "sweeps" / "stopped"
    assert json.loads((directory / "sweep.json").read_text())["job_id"] is None  # what the kill left
    try:
        again = vx(repo, *grid, env=env)
        assert again.stdout.strip() == queued, (again.stdout, queued)
        assert "was submitted by an earlier `sweep submit` that stopped before recording it" in again.stderr
        arrays = cluster.slurm("squeue", "-h", "-n", "virgo-sweep-stopped", "-o", "%F", check=False).stdout.split()
        assert set(arrays) == {queued}, arrays  # one array, not two
        assert json.loads((directory / "sweep.json").read_text())["job_id"] == queued
    finally:
        cluster.slurm("scancel", queued, check=False)
        wait_until(lambda: not squeue(cluster, queued), timeout=120, what=f"job {queued} cancelled")


@pytest.mark.slurm
@pytest.mark.slow
def test_a_submission_stopped_right_before_sbatch_is_submitted_once_when_run_again(sweep, tmp_path):
    """`sweep submit` killed after it prepared the sweep (its branch pushed, sweep.json written) but before
    sbatch ran (here an sbatch wrapper kills it instead of running sbatch): nothing was queued, and the next
    `sweep submit` queues exactly one array and records it."""
    repo, env, cluster = sweep["repo"], sweep["env"], sweep["cluster"]
    sh(["git", "reset", "-q", "--hard", "HEAD"], repo)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "sbatch").write_text("#!/bin/sh\nkill -9 $PPID\nexit 1\n")
    (shim / "sbatch").chmod(0o755)
    grid = ["sweep", "submit", "--grid", "stopped-before", "-S", "train.lr=0.002", "--parsable"]
    killed = vx(repo, *grid, env={**env, "PATH": f"{shim}:{env['PATH']}"}, check=False)
    assert killed.returncode == -9, killed.stderr
    assert not cluster.slurm("squeue", "-h", "-n", "virgo-sweep-stopped-before", "-o", "%F", check=False).stdout.split()
    directory = sweep["store"] / "sweeps" / "stopped-before"
    again = vx(repo, *grid, env=env)
    queued = again.stdout.strip()
    try:
        assert queued.isdigit(), again.stdout + again.stderr
        assert "was submitted by an earlier" not in again.stderr
        listing = cluster.slurm("squeue", "-h", "-n", "virgo-sweep-stopped-before", "-o", "%F", check=False)
        arrays = listing.stdout.split()
        assert set(arrays) <= {queued}, arrays  # one array at most in the queue: this one (it may have ended)
        assert json.loads((directory / "sweep.json").read_text())["job_id"] == queued
    finally:
        cluster.slurm("scancel", queued, check=False)
        wait_until(lambda: not squeue(cluster, queued), timeout=120, what=f"job {queued} cancelled")
