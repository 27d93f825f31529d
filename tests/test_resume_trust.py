"""Resuming through `dvc exp run`: only from a prefix of the requested run, and from where it stopped.

All through the real dvc (workspace runs, ``--queue`` + ``dvc queue start``) on a
copy of the repository with tiny params (3 epochs of 6 steps):

- an interrupted ``dvc exp run`` (Ctrl-C to its process group), run again,
  resumes at the step it stopped at and ends bit-identical to training in one go:
  the running snapshot lives in ``.virgo/snapshots/<key>/``, which DVC does not
  restore from its cache;
- a queued ``-S train.epochs=1`` after a 3-epoch run trains afresh (the 3-epoch
  snapshot is not a prefix) and records 1-epoch metrics, also in MLflow;
- a completed snapshot of the same configuration is reused (nothing trained),
  and the MLflow run still has every epoch's loss;
- the same interruption inside a queued experiment (SIGTERM to its stage);
- and with train as a job on a real Slurm (Ctrl-C to `dvc exp run` cancels the
  job, the trainer snapshots on Slurm's SIGTERM, the next `dvc exp run` submits
  a job that resumes).

``VIRGO_FAULT_STEP_SLEEP`` slows each step so the signal lands mid-run; it does
not change what is computed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from conftest import BIN, make_repo, sh, tool_env, wait_until
from test_sweeps import (
    PARAMS,
    dvc,
    queue_start,
    same_weights,
    stop_workers,
    train_in_one_go,
    wait_queue,
    wait_workers_gone,
)
from virgo_exps.provenance import read_metrics

pytestmark = pytest.mark.slow

EPOCHS = 3
SLOW = {"VIRGO_FAULT_STEP_SLEEP": "0.4"}
STOPPED = re.compile(r"train: stop requested; snapshot written at epoch (\d+), step (\d+)")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = make_repo(
        tmp_path_factory.mktemp("resume-trust") / "repo", {**PARAMS, "train": {"epochs": EPOCHS, "profile_steps": 0}}
    )
    dvc(repo, "repro", "preprocess", env=env(repo))
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "data"], repo)
    yield repo
    stop_workers(repo)


def env(repo: Path, extra: dict | None = None) -> dict:
    """The tools' environment, with the copy's package first: the trainer's code is part of the snapshot
    key, so every run of this module (workspace and queued) must import the same files."""
    return tool_env({"PYTHONPATH": str(repo / "src"), **(extra or {})})


def read(csv: Path) -> pd.DataFrame:
    return pd.read_csv(csv)


def live_states(repo: Path) -> list[dict]:
    root = repo / ".virgo" / "snapshots"
    return [json.loads(p.read_text()) for p in root.glob("*/status.json")] if root.is_dir() else []


def mlflow_losses(repo: Path, run_name: str) -> dict[int, float]:
    """train_loss by epoch of the last FINISHED MLflow run called ``run_name``."""
    con = sqlite3.connect(repo / "mlflow" / "mlflow.db")
    run = con.execute(
        "select run_uuid from runs where name = ? and status = 'FINISHED' order by start_time desc", (run_name,)
    ).fetchone()
    assert run, f"no finished MLflow run '{run_name}'"
    rows = con.execute("select step, value from metrics where run_uuid = ? and key = 'train_loss'", run).fetchall()
    return dict(rows)


def exp_file(repo: Path, name: str, rel: str) -> str:
    refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
    ref = [r for r in refs if r.rsplit("/", 1)[-1] == name]
    assert len(ref) == 1, refs
    return sh(["git", "show", f"{ref[0]}:{rel}"], repo).stdout


def reference(repo: Path, tmp_path: Path, lr: float, epochs: int = EPOCHS) -> Path:
    return train_in_one_go(repo, tmp_path / f"ref-{lr}-{epochs}", lr, epochs)


def assert_same_run(metrics: dict, epochs_csv: Path, model: Path, ref: Path) -> None:
    want = read_metrics(ref / "metrics.json")
    for key in ("epochs", "train_loss", "val_loss"):
        assert metrics[key] == want[key], key
    cols = ["epoch", "step", "train_loss", "val_loss", "lr"]
    pd.testing.assert_frame_equal(read(epochs_csv)[cols], read(ref / "epochs.csv")[cols], check_exact=True)
    assert same_weights(model, ref / "model.pt")


def test_an_interrupted_dvc_exp_run_resumes_where_it_stopped(repo, tmp_path):
    log = tmp_path / "cut.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "dvc"), "exp", "run", "-n", "cut"],
            cwd=repo,
            env=env(repo, SLOW),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: any(s["epoch"] >= 1 for s in live_states(repo)), 300, "a snapshot after epoch 1")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc != 0, text[-3000:]
    epoch, step = STOPPED.search(text).groups()
    assert int(epoch) >= 2, text[-3000:]
    [state] = live_states(repo)
    assert state["status"] == "interrupted" and state["epoch"] == int(epoch) - 1
    live = Path(state["snapshot"]).relative_to(repo)

    again = dvc(repo, "exp", "run", "-n", "cut-again", env=env(repo))
    text = again.stdout + again.stderr
    assert f"train: resuming from {live} at epoch {epoch}, step {step} (status interrupted)" in text, text[-3000:]
    assert f"epoch 1/{EPOCHS}:" not in text and f"epoch {EPOCHS}/{EPOCHS}:" in text
    assert live_states(repo) == [] and not (repo / live).parent.exists()
    assert json.loads((repo / "checkpoints" / "status.json").read_text())["status"] == "complete"
    ref = reference(repo, tmp_path, 0.001)
    assert_same_run(
        read_metrics(repo / "results" / "metrics.json"),
        repo / "results" / "epochs.csv",
        repo / "results" / "model.pt",
        ref,
    )
    # The resumed run's MLflow record holds every epoch, those of the snapshot included.
    want = read(ref / "epochs.csv")
    assert mlflow_losses(repo, "cut-again") == dict(zip(want["epoch"], want["train_loss"]))


def test_a_finished_snapshot_is_reused_only_for_the_same_run(repo):
    epochs_csv = read(repo / "results" / "epochs.csv")
    # Same configuration, train forced: nothing to train, the outputs come from the final snapshot.
    same = dvc(repo, "exp", "run", "-f", "-s", "train", "-n", "same", env=env(repo))
    text = same.stdout + same.stderr
    assert f"train: reusing checkpoints/snapshot.pt: all {EPOCHS} epoch(s) of this configuration are done" in text
    assert "epoch 1/" not in text
    assert mlflow_losses(repo, "same") == dict(zip(epochs_csv["epoch"], epochs_csv["train_loss"]))

    # Shorter, queued: the committed 3-epoch checkpoints/ (git holds it) is in the queued workspace; it is
    # not a prefix.
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "results"], repo)
    wait_workers_gone(repo)
    dvc(repo, "exp", "run", "--queue", "-S", "train.epochs=1", "-n", "one")
    queue_start(repo, 1, env=env(repo))
    assert wait_queue(repo, ["one"])["one"] == "Success"
    text = dvc(repo, "queue", "logs", "one").stdout
    assert (
        f"train: not resuming from checkpoints/snapshot.pt: it is at {EPOCHS} epoch(s) (status complete), "
        "past the 1 epoch(s) requested, so it is not a prefix of this run; starting afresh"
    ) in text, text[-3000:]
    assert "epoch 1/1:" in text
    metrics = json.loads(exp_file(repo, "one", "results/metrics.json"))
    first = epochs_csv.iloc[0]
    assert (metrics["epochs"], metrics["train_loss"], metrics["val_loss"]) == (
        1,
        first["train_loss"],
        first["val_loss"],
    )
    assert mlflow_losses(repo, "one") == {1: first["train_loss"]}


def test_an_interrupted_queued_experiment_resumes_in_the_next_one(repo, tmp_path):
    wait_workers_gone(repo)
    dvc(repo, "exp", "run", "--queue", "-S", "train.lr=0.002", "-n", "q-cut")
    queue_start(repo, 1, env=env(repo, SLOW))  # the workers (and the stage) inherit this environment
    wait_until(lambda: any(s["epoch"] >= 1 for s in live_states(repo)), 300, "a snapshot after epoch 1")
    stages = [
        p
        for p in psutil.process_iter(["cmdline", "cwd"])
        if (p.info["cmdline"] or [])[1:2] == ["stages/train.py"]
        and "--worker" not in p.info["cmdline"]
        # this repository's queue only: another worker's tests may run queued experiments too
        and (p.info["cwd"] or "").startswith(str(repo / ".dvc" / "tmp" / "exps"))
    ]
    assert len(stages) == 1, stages
    stages[0].send_signal(signal.SIGTERM)  # what the launcher forwards on Ctrl-C, SIGTERM or SIGHUP
    assert wait_queue(repo, ["q-cut"])["q-cut"] == "Failed"
    epoch, step = STOPPED.search(dvc(repo, "queue", "logs", "q-cut").stdout).groups()
    [state] = live_states(repo)
    assert state["status"] == "interrupted"

    wait_workers_gone(repo)
    dvc(repo, "exp", "run", "--queue", "-S", "train.lr=0.002", "-n", "q-again")
    queue_start(repo, 1, env=env(repo))
    assert wait_queue(repo, ["q-again"])["q-again"] == "Success"
    text = dvc(repo, "queue", "logs", "q-again").stdout
    assert f"train: resuming from {state['snapshot']} at epoch {epoch}, step {step} (status interrupted)" in text
    assert live_states(repo) == []
    dvc(repo, "exp", "apply", "q-again")
    assert_same_run(
        read_metrics(repo / "results" / "metrics.json"),
        repo / "results" / "epochs.csv",
        repo / "results" / "model.pt",
        reference(repo, tmp_path, 0.002),
    )


@pytest.mark.slurm
def test_an_interrupted_dvc_exp_run_on_slurm_resumes_where_it_stopped(slurm_cluster, repo, tmp_path):
    from test_slurm_launch import cluster_env

    wait_workers_gone(repo)
    job_env = cluster_env(slurm_cluster, extra={"PYTHONPATH": str(repo / "src")})
    log = tmp_path / "slurm-cut.out"
    cmd = [str(BIN / "dvc"), "exp", "run", "-S", "train.lr=0.003"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "-n", "s-cut"],
            cwd=repo,
            env={**job_env, **SLOW},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: any(s["epoch"] >= 1 for s in live_states(repo)), 300, "a snapshot after epoch 1")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the launcher cancels the job, Slurm sends SIGTERM
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc != 0, text[-3000:]
    job = re.search(r"(?:submitted|attaching to) job (\d+)", text).group(1)
    wait_until(
        lambda: live_states(repo) and live_states(repo)[0]["status"] == "interrupted", 60, "the interrupted snapshot"
    )
    [state] = live_states(repo)
    job_log = next((repo / "logs" / "train").glob(f"*-{job}.out")).read_text()
    epoch, step = STOPPED.search(job_log).groups()
    assert state["epoch"] == int(epoch) - 1 and state["step_in_epoch"] == int(step)

    again = dvc(repo, *cmd[1:], "-n", "s-again", env=job_env)
    text = again.stdout + again.stderr
    live = Path(state["snapshot"]).relative_to(repo)
    assert f"train: resuming from {live} at epoch {epoch}, step {step} (status interrupted)" in text, text[-3000:]
    assert re.search(r"job \d+ COMPLETED", text) and live_states(repo) == []
    # The reference with the job's thread count (cluster_env: OMP_NUM_THREADS=1).
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["train"]["lr"] == 0.003
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "params.yaml").write_text(yaml.safe_dump(params))
    sh(
        [
            str(BIN / "python"),
            "stages/train.py",
            "--worker",
            "--no-tracking",
            "--params",
            str(ref / "params.yaml"),
            "--data",
            "data/images.zarr",
            "--checkpoints",
            str(ref / "checkpoints"),
            "--model",
            str(ref / "model.pt"),
            "--metrics",
            str(ref / "metrics.json"),
            "--epochs",
            str(ref / "epochs.csv"),
            "--ranks",
            str(ref / "ranks.json"),
        ],
        repo,
        env={**job_env, "VIRGO_MACHINE": "local"},
    )
    assert_same_run(
        read_metrics(repo / "results" / "metrics.json"),
        repo / "results" / "epochs.csv",
        repo / "results" / "model.pt",
        ref,
    )
