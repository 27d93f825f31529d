"""Sweeps through DVC's queue, failed experiments, and resuming an experiment with more epochs.

All through the real tools (dvc exp run --queue, dvc queue start, the celery
workers DVC starts) on a copy of the repository with tiny params.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, dvc_queue_status, make_repo, sh, tool_env

pytestmark = pytest.mark.slow

# The Q-transform resolves up to ~80 Hz at the tiny sample rate.
PARAMS = {"preprocess": {"fmax": 64.0}}


def dvc(repo, *args, check=True, env=None, timeout=900):
    return sh([str(BIN / "dvc"), *args], repo, env=env or tool_env(), check=check, timeout=timeout)


def vx(repo, *args, check=True, env=None):
    """Our CLI's share/failures/resume commands (stand-alone module until cli.py wires them)."""
    return sh([str(BIN / "python"), "-m", "virgo_exps.cli.share", *args], repo, env=env or tool_env(), check=check)


def queue_status(repo) -> dict[str, str]:
    rows = {}
    for line in dvc_queue_status(repo).splitlines():
        m = re.match(r"^([0-9a-f]{7,})\s+(\S+)\s+.*\s(\w+)\s*$", line.strip())
        if m:
            rows[m.group(2)] = m.group(3)
    return rows


def exp_ref_names(repo) -> set[str]:
    """Names of the experiments in the repository's refs: a git read of a few milliseconds."""
    out = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout
    return {line.rsplit("/", 1)[-1] for line in out.split()}


def wait_queue(repo, names, timeout=420) -> dict[str, str]:
    """The queue's status once every one of ``names`` succeeded or failed.

    `dvc queue status` costs a second of CPU, which the experiments it waits for would miss on two
    cores: it is asked when every experiment has its ref (a success), and otherwise every ~15 s (a
    failure leaves no ref)."""
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        if set(names) <= exp_ref_names(repo) or polls % 5 == 0:
            status = queue_status(repo)
            if all(status.get(n) in ("Success", "Failed") for n in names):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"queue did not finish in {timeout}s: {status}")
        polls += 1
        time.sleep(3)


def queue_start(repo, jobs: int, env=None):
    """`dvc queue start`: its workers are daemons that keep the caller's stdout open, so no pipes here."""
    log = repo / ".dvc" / "tmp" / "queue-start.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        rc = subprocess.run(
            [str(BIN / "dvc"), "queue", "start", "-j", str(jobs)],
            cwd=repo,
            env=env or tool_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=120,
        ).returncode
    assert rc == 0, log.read_text()[-3000:]


def wait_workers_gone(repo, timeout=60):
    """Workers of an earlier `dvc queue start` would run new tasks with their own environment."""
    deadline = time.monotonic() + timeout
    while "Worker status: 0 active, 0 idle" not in dvc_queue_status(repo):
        if time.monotonic() > deadline:
            raise AssertionError("DVC queue workers did not stop")
        time.sleep(2)


def stop_workers(repo):
    dvc(repo, "queue", "stop", check=False)


def exp_rows(repo) -> dict[str, dict]:
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    rows = {}
    for rev in shown:
        for exp in rev.get("experiments") or []:
            for run in exp["revs"]:
                rows[run["name"]] = run
    return rows


def queued_names(proc) -> list[str]:
    return re.findall(r"Queued experiment '([^']+)'", proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The pipeline run once and committed: the baseline every queued experiment starts from."""
    repo = make_repo(tmp_path_factory.mktemp("sweeps") / "repo", PARAMS)
    dvc(repo, "exp", "run")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "baseline with results"], repo)
    yield repo
    stop_workers(repo)


def slot_count() -> int:
    from virgo_exps.machines import load_machine

    return load_machine("local").max_procs or os.cpu_count() or 1


class HeldCores:
    """Hold every core slot of the launcher, as a running training would."""

    def __init__(self, repo: Path):
        self.folder = repo / "logs" / ".slots"
        self.held = []

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        for i in range(slot_count()):
            fh = open(self.folder / f"slot-{i}.lock", "w")
            fcntl.flock(fh, fcntl.LOCK_EX)
            self.held.append(fh)
        return self

    def release(self):
        for fh in self.held:
            fh.close()
        self.held = []

    def __exit__(self, *exc):
        self.release()


def test_scaling_sweep_runs_in_the_queue_and_lands_in_the_main_checkout(base):
    repo = base
    # The two commands of a scaling test (add `-S train.nodes=1,2` on a cluster).
    queued = dvc(repo, "exp", "run", "--queue", "-S", "train.strategy=single,ddp", "-S", "train.procs_per_node=1,2")
    names = queued_names(queued)
    assert len(names) == 4, queued.stdout
    by_cfg = {}
    for name, line in zip(names, re.findall(r"Queueing with overrides '(.+)'", queued.stdout)):
        by_cfg[
            (re.search(r"strategy=(\w+)", line).group(1), int(re.search(r"procs_per_node=(\d+)", line).group(1)))
        ] = name
    trained = [by_cfg[("ddp", 1)], by_cfg[("ddp", 2)]]
    invalid = by_cfg[("single", 2)]
    with HeldCores(repo) as cores:
        queue_start(repo, 2)
        # While the cores are busy, each training says it waits, in its queue log.
        deadline = time.monotonic() + 240
        waiting = set()
        while waiting != set(trained) and time.monotonic() < deadline:
            for name in set(trained) - waiting:
                if "launch: waiting for" in dvc(repo, "queue", "logs", name, check=False).stdout:
                    waiting.add(name)
            time.sleep(2)
        cores.release()
    assert waiting == set(trained), "no 'waiting for free cores' message in the queue logs"
    status = wait_queue(repo, names)
    assert status[invalid] == "Failed", status
    assert all(status[n] == "Success" for n in names if n != invalid), status

    rows = exp_rows(repo)
    for (strategy, procs), name in by_cfg.items():
        assert name in rows, (name, sorted(rows))
        params = rows[name]["data"]["params"]["params.yaml"]["data"]["train"]
        assert (params["strategy"], params["procs_per_node"]) == (strategy, procs)
    for name in trained:
        metrics = rows[name]["data"]["metrics"]["results/metrics.json"]["data"]
        described = rows[name]["data"]["params"]["results/run.json"]["data"]  # shown by DVC as params
        assert (
            described["strategy"] == "ddp"
            and metrics["world_size"] == rows[name]["data"]["params"]["params.yaml"]["data"]["train"]["procs_per_node"]
        )
        assert metrics["val_loss"] > 0
        log = dvc(repo, "queue", "logs", name).stdout
        assert "launch: waiting for" in log and "Running stage 'train'" in log
        # Logs and MLflow runs of queued experiments are in the main checkout, not the temp workspace.
        logs = list((repo / "logs" / "train").glob(f"{name}-local-*.out"))
        assert logs and "epoch 2/2" in logs[0].read_text(), name
    assert rows[invalid].get("error"), rows[invalid]
    con = sqlite3.connect(repo / "mlflow" / "mlflow.db")
    runs = {r[0] for r in con.execute("select name from runs where status = 'FINISHED'")}
    assert set(trained) <= runs, runs
    # The baseline's own configuration reran nothing but the environment check.
    same = dvc(repo, "queue", "logs", by_cfg[("single", 1)]).stdout
    assert "Running stage 'train'" not in same

    # The failed one: status, its error line and a kept log.
    listed = json.loads(vx(repo, "failures", "--json").stdout)
    fail = {f["name"]: f for f in listed}[invalid]
    assert fail["status"] == "Failed" and fail["stage"] == "environment"
    assert fail["error"].startswith("error: train.strategy: 'single' runs one process")
    kept = repo / fail["logs"][0]
    assert kept.is_file() and "train.procs_per_node = 2" in kept.read_text()
    # It stays listed after DVC forgets it (its output is kept in logs/failed/).
    dvc(repo, "queue", "remove", invalid)
    again = {f["name"]: f for f in json.loads(vx(repo, "failures", "--json").stdout)}
    assert again[invalid]["status"] == "failed (recorded)" and again[invalid]["error"] == fail["error"]


def test_failed_training_in_queue_and_workspace_is_listed_with_error_and_log(base):
    repo = base
    crash = tool_env({"VIRGO_FAULT_CRASH": "0:1"})  # the workers of `dvc queue start` inherit its environment
    wait_workers_gone(repo)
    name = queued_names(dvc(repo, "exp", "run", "--queue", "-S", "train.lr=0.004", "-n", "crash-q"))[0]
    queue_start(repo, 1, env=crash)
    ws = dvc(repo, "exp", "run", "-S", "train.lr=0.005", "-n", "crash-ws", env=crash, check=False)
    assert ws.returncode != 0
    assert wait_queue(repo, [name])[name] == "Failed"
    found = {f["name"]: f for f in json.loads(vx(repo, "failures", "--json").stdout)}
    for exp, status in ((name, "Failed"), ("crash-ws", "failed (workspace)")):
        f = found[exp]
        assert f["status"] == status and f["stage"] == "train", f
        assert (
            f["error"] == "error: training process rank 0 failed: RuntimeError: injected fault at step 1 "
            "(VIRGO_FAULT_CRASH)"
        ), f
        train_logs = [p for p in f["logs"] if p.startswith("logs/train/")]
        assert train_logs and (repo / train_logs[0]).is_file(), f
    text = vx(repo, "failures").stdout
    assert "crash-q: Failed in stage 'train'" in text and "log: logs/train/crash-ws-local-" in text
    # A failed workspace run leaves its -S values in params.yaml: put the baseline back.
    sh(["git", "checkout", "--", "params.yaml", "dvc.lock"], repo)
    dvc(repo, "checkout", "--force")


def train_in_one_go(repo: Path, out: Path, lr: float, epochs: int) -> Path:
    """The reference: the trainer alone, fresh checkpoints, the thread count the launcher would use."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update({"lr": lr, "epochs": epochs})
    out.mkdir(parents=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    env = tool_env({"OMP_NUM_THREADS": str(slot_count())})
    sh(
        [
            str(BIN / "python"),
            "stages/train.py",
            "--worker",
            "--no-tracking",
            "--params",
            str(out / "params.yaml"),
            "--data",
            "data/images.zarr",
            "--checkpoints",
            str(out / "checkpoints"),
            "--model",
            str(out / "model.pt"),
            "--metrics",
            str(out / "metrics.json"),
            "--epochs",
            str(out / "epochs.csv"),
            "--ranks",
            str(out / "ranks.json"),
        ],
        repo,
        env=env,
    )
    return out


def same_weights(a: Path, b: Path) -> bool:
    import torch

    sa = torch.load(a, map_location="cpu", weights_only=False)["model"]
    sb = torch.load(b, map_location="cpu", weights_only=False)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def losses(path: Path) -> tuple:
    m = json.loads(path.read_text())
    return m["epochs"], m["train_loss"], m["val_loss"]


def test_resume_continues_an_experiment_in_workspace_and_queue_exactly(base, tmp_path):
    repo = base
    first = dvc(repo, "exp", "run", "-S", "train.lr=0.002", "-n", "short")
    assert "Running stage 'train'" in first.stdout
    # Somebody keeps working in the workspace meanwhile; resume restores the experiment by itself.
    dvc(repo, "exp", "run", "-S", "train.lr=0.003", "-n", "other")

    ws = vx(repo, "resume", "short", "--epochs", "3")
    assert "train: resuming from checkpoints/snapshot.pt at epoch 3" in ws.stdout + ws.stderr
    assert "epoch 1/3" not in ws.stdout + ws.stderr
    ref3 = train_in_one_go(repo, tmp_path / "ref3", 0.002, 3)
    assert losses(repo / "results/metrics.json") == losses(ref3 / "metrics.json")
    assert same_weights(repo / "results/model.pt", ref3 / "model.pt")
    assert "short-e3" in exp_rows(repo)

    queued = vx(repo, "resume", "short", "--epochs", "4", "--queue")
    assert "queued 'short-e4'" in queued.stdout
    queue_start(repo, 1)
    assert wait_queue(repo, ["short-e4"])["short-e4"] == "Success"
    log = dvc(repo, "queue", "logs", "short-e4").stdout
    assert "train: resuming from checkpoints/snapshot.pt at epoch 3" in log, log[-3000:]
    dvc(repo, "exp", "apply", "short-e4")
    ref4 = train_in_one_go(repo, tmp_path / "ref4", 0.002, 4)
    assert losses(repo / "results/metrics.json") == losses(ref4 / "metrics.json")
    assert same_weights(repo / "results/model.pt", ref4 / "model.pt")

    refused = vx(repo, "resume", "short", "--epochs", "2", check=False)
    assert refused.returncode == 1 and "already trained 2 epoch(s)" in refused.stderr
    missing = vx(repo, "resume", "nope", "--epochs", "5", check=False)
    assert missing.returncode == 1 and "no experiment 'nope'" in missing.stderr


def test_a_grid_without_a_metric_optimises_the_studys_objective():
    from virgo_exps.config import objective
    from virgo_exps.sweeps.spec import from_grid

    assert objective() == ("val_loss", "minimize")  # the Virgo study's StudySpec.objective
    plain = from_grid("g", ["train.lr=0.001,0.01"], 1)
    assert (plain.metric, plain.direction) == ("val_loss", "minimize")
    named = from_grid("g", ["train.lr=0.001,0.01"], 1, metric="samples_per_s", direction="maximize")
    assert (named.metric, named.direction) == ("samples_per_s", "maximize")
    assert from_grid("g", ["train.lr=0.001"], 1, metric="cost.core_h").direction == "minimize"
