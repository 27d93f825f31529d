"""The trainer under every strategy, with real torchrun / horovodrun processes on CPU (gloo).

- Every strategy on 2 processes follows the single-process loss trajectory on
  the same global batch within ``RTOL`` (only the order of floating-point
  sums differs).
- An interrupted-then-resumed run ends with bit-identical weights and losses.
- A crash on one rank ends the run with a non-zero exit and names the rank.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import (
    BIN,
    image_repo,
    sh,
    shm_left_behind,
    tool_env,
    train_stage_cmd,
    wait_until,
)
from virgo_exps.provenance import read_metrics

RTOL = 1e-4  # observed: ~1e-6 between DDP/DeepSpeed on 2 ranks and a single process
EPOCHS = 3
N_TRAIN, N_VAL, GLOBAL_BATCH = 64, 16, 8  # 8 steps per epoch

HOROVOD = (BIN / "horovodrun").exists()
needs_horovod = pytest.mark.skipif(not HOROVOD, reason="Horovod is not built in this venv (make horovod)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return image_repo(tmp_path_factory, "trainer")


def train(
    repo: Path,
    name: str,
    strategy: str = "single",
    procs: int = 1,
    env: dict | None = None,
    epochs: int = EPOCHS,
    fresh: bool = True,
    popen: bool = False,
    extra: dict | None = None,
):
    """Run the train stage as DVC would (launcher + workers); outputs under out/<name>/; ``extra``: more
    train params."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(
        strategy=strategy,
        procs_per_node=procs,
        epochs=epochs,
        global_batch_size=GLOBAL_BATCH,
        warmup_steps=3,
        profile_steps=2,
    )
    params["train"].update(extra or {})
    pfile = repo / f"params-{name}.yaml"
    pfile.write_text(yaml.safe_dump(params))
    out = repo / "out" / name
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    cmd = train_stage_cmd(pfile.name, f"out/{name}")
    full_env = tool_env(env)
    if popen:
        return subprocess.Popen(
            cmd, cwd=repo, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ), out
    proc = sh(cmd, repo, full_env, check=False, timeout=600)
    return proc, out


def losses(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "epochs.csv")[["epoch", "train_loss", "val_loss"]]


def weights(out: Path) -> dict:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def baseline(workdir):
    proc, out = train(workdir, "single")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def deepspeed_runner(workdir: Path) -> dict:
    """The environment that makes the local machine start DeepSpeed with its own runner (which, unlike
    torchrun, sets LOCAL_SIZE, so DeepSpeed's shared-memory all-reduce is used on CPU)."""
    profile = workdir / "machines" / "local-deepspeed"
    profile.mkdir(exist_ok=True)
    (profile / "machine.yaml").write_text("kind: local\ndeepspeed_launcher: deepspeed\n")
    return {"VIRGO_MACHINE": "local-deepspeed"}


STRATEGIES = ["ddp", "deepspeed", pytest.param("horovod", marks=[pytest.mark.horovod, needs_horovod])]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_follow_the_single_process_trajectory(workdir, baseline, strategy):
    """DDP under torchrun, Horovod under horovodrun, DeepSpeed under DeepSpeed's own runner (a
    profile with `deepspeed_launcher: deepspeed`; DeepSpeed under torchrun: the resume tests)."""
    env = deepspeed_runner(workdir) if strategy == "deepspeed" else None
    start = time.time()
    proc, out = train(workdir, f"{strategy}-2", strategy, procs=2, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # DeepSpeed's shared-memory all-reduce buffers (about 69 MB a rank) do not outlive the run
    assert shm_left_behind(start) == []
    if strategy == "deepspeed":
        assert "-m deepspeed.launcher.runner --num_nodes=1 --num_gpus=2" in proc.stderr
    ref, got = losses(baseline), losses(out)
    assert len(got) == EPOCHS
    np.testing.assert_allclose(got["train_loss"], ref["train_loss"], rtol=RTOL)
    np.testing.assert_allclose(got["val_loss"], ref["val_loss"], rtol=RTOL)
    # Learning happened, so the comparison is not between two flat lines.
    assert ref["val_loss"].iloc[-1] < ref["val_loss"].iloc[0]
    metrics = read_metrics(out / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["strategy"] == strategy
    assert 0.0 < metrics["computation_fraction"] <= 1.0
    ranks = yaml.safe_load((out / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,procs",
    [
        ("single", 1),
        ("ddp", 2),
        ("deepspeed", 2),
        pytest.param("horovod", 2, marks=[pytest.mark.horovod, needs_horovod]),
    ],
)
def test_interrupted_then_resumed_run_is_bit_identical(workdir, strategy, procs):
    name = f"resume-{strategy}"
    full, full_out = train(workdir, f"{name}-full", strategy, procs)
    assert full.returncode == 0, full.stderr[-3000:]
    # Stop in the middle of epoch 2 (8 steps an epoch), as a SLURM signal would.
    first, out = train(workdir, name, strategy, procs, env={"VIRGO_FAULT_STOP_AT_STEP": "11"})
    assert first.returncode != 0
    status = yaml.safe_load((out / "checkpoints" / "status.json").read_text())
    live = Path(status.pop("snapshot"))
    assert status == {"status": "interrupted", "epoch": 1, "step_in_epoch": 3, "global_step": 11}
    # The running state is kept outside the output folder, in the checkout's .virgo/snapshots.
    assert live.parent.parent == workdir / ".virgo" / "snapshots" and live.is_file()
    assert not (out / "checkpoints" / "snapshot.pt").exists()
    assert not (out / "model.pt").exists()
    second, _ = train(workdir, name, strategy, procs, fresh=False)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"train: resuming from {live.relative_to(workdir)} at epoch 2, step 3 (status interrupted)" in second.stderr
    # Complete: the final snapshot is the output, the running state is gone.
    assert not live.parent.exists()
    final = yaml.safe_load((out / "checkpoints" / "status.json").read_text())
    assert final["status"] == "complete" and final["epoch"] == EPOCHS
    a, b = weights(full_out), weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    pd.testing.assert_frame_equal(losses(full_out), losses(out), check_exact=True)


@pytest.mark.slow
def test_more_epochs_continue_from_the_final_snapshot(workdir, baseline):
    proc, out = train(workdir, "extend", epochs=2)
    assert proc.returncode == 0
    shorter = read_metrics(out / "metrics.json")["cost"]
    proc, _ = train(workdir, "extend", epochs=EPOCHS, fresh=False)
    assert proc.returncode == 0 and "resuming from" in proc.stderr
    for key, value in weights(baseline).items():
        assert torch.equal(value, weights(out)[key])
    # the longer run's record counts its own epochs only: the shorter run's record has the first two
    record = read_metrics(out / "metrics.json")
    longer = record["cost"]
    assert shorter["attempts"] == longer["attempts"] == 1
    # and its timing covers its own epoch only (the curves keep all three)
    rows = pd.read_csv(out / "epochs.csv")
    assert list(rows["epoch"]) == [1, 2, 3]
    assert record["first_timed_epoch"] == 3 and record["timed_epochs"] == 1
    assert record["epoch_time_s_median"] == pytest.approx(rows["train_time_s"].iloc[2], rel=1e-12)
    from virgo_exps.scalability.sources import load_files

    (run,), _ = load_files([out])
    assert run.epoch_times == [pytest.approx(rows["train_time_s"].iloc[2], rel=1e-12)]
    # the same final snapshot reused to write the outputs again: nothing inherited either
    (out / "metrics.json").unlink()
    proc, _ = train(workdir, "extend", epochs=EPOCHS, fresh=False)
    assert proc.returncode == 0 and "reusing" in proc.stderr, proc.stderr[-2000:]
    again = read_metrics(out / "metrics.json")
    assert again["first_timed_epoch"] == 3
    again = again["cost"]
    assert again["attempts"] == 1 and again["wall_s"] < longer["wall_s"] + shorter["wall_s"]


@pytest.mark.slow
def test_a_changed_config_starts_afresh(workdir, baseline):
    shutil.rmtree(workdir / "out" / "lr", ignore_errors=True)
    shutil.copytree(baseline / "checkpoints", workdir / "out" / "lr" / "checkpoints")
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["train"]["lr"] = 0.01
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        proc, _ = train(workdir, "lr", fresh=False)
    finally:
        params["train"]["lr"] = 0.001
        (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    assert proc.returncode == 0
    assert "not resuming" in proc.stderr and "train.lr" in proc.stderr


@pytest.mark.slow
def test_a_lock_left_by_a_killed_deepspeed_load_does_not_hang_the_next_run(workdir, tmp_path, monkeypatch):
    """torch's extension loader waits forever for a lock file that a killed process left: the DeepSpeed
    strategy removes one older than a load could be, says so, and trains."""
    from torch.utils.cpp_extension import get_default_build_root

    from virgo_exps.train.strategies.deepspeed import SHM_EXTENSION, STALE_BUILD_LOCK_S

    folder = tmp_path / "extensions"
    built = sorted(Path(get_default_build_root()).glob(f"*/{SHM_EXTENSION}"))
    if built:  # the extension as the earlier DeepSpeed runs built it (else this run builds it, about a minute)
        shutil.copytree(built[0], folder / SHM_EXTENSION)
    lock = folder / SHM_EXTENSION / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(lock, (old, old))
    env = {**deepspeed_runner(workdir), "TORCH_EXTENSIONS_DIR": str(folder)}
    proc, out = train(workdir, "stale-lock", "deepspeed", procs=2, env=env, epochs=1, popen=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"the run hung on the extension's lock:\n{output[-3000:]}") from None
    assert proc.returncode == 0, output[-3000:]
    assert f"train: removed {lock}, left 11 minutes ago by a process that died" in output, output[-3000:]
    assert (out / "metrics.json").is_file()
    # a fresh lock (a load under way in another process) is left alone
    from virgo_exps.train.strategies.deepspeed import remove_stale_build_locks

    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(folder))
    assert remove_stale_build_locks() == [] and lock.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy", ["ddp", "deepspeed", pytest.param("horovod", marks=[pytest.mark.horovod, needs_horovod])]
)
def test_a_crash_on_one_rank_ends_the_run_and_names_the_rank(workdir, strategy):
    env = {"VIRGO_FAULT_CRASH": "1:2", **(deepspeed_runner(workdir) if strategy == "deepspeed" else {})}
    start = time.time()
    proc, out = train(workdir, f"crash-{strategy}", strategy, procs=2, env=env)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "training process rank 1 failed" in text
    assert not (out / "model.pt").exists()
    assert shm_left_behind(start) == []  # a failed run leaves nothing in the node's memory either


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_next_run_resumes(workdir, baseline):
    proc, out = train(workdir, "sigterm", epochs=EPOCHS, popen=True)
    lines = []
    deadline = time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1/"):
            os.kill(proc.pid, signal.SIGTERM)
            break
        assert time.time() < deadline
    lines += proc.stdout.readlines()
    rc = proc.wait(timeout=300)
    assert rc != 0, "".join(lines)
    status = yaml.safe_load((out / "checkpoints" / "status.json").read_text())
    assert status["status"] == "interrupted"
    second, _ = train(workdir, "sigterm", fresh=False)
    assert second.returncode == 0, second.stderr[-3000:]
    for key, value in weights(baseline).items():
        assert torch.equal(value, weights(out)[key])


@pytest.mark.slow
def test_a_second_training_of_the_same_output_at_once_is_refused(workdir):
    # One thread each, so that each holds one of the 2 cores' slots and both start at once (with the
    # threads the launcher gives, the second would wait for the first's cores and never meet it).
    one = {"OMP_NUM_THREADS": "1"}
    # Slow steps: the first run is still training (two epochs to go) when the second is refused.
    first, out = train(workdir, "twice", popen=True, env={"VIRGO_FAULT_STEP_SLEEP": "1.0", **one})
    try:
        wait_until(
            lambda: (out / "checkpoints" / "status.json").exists() or first.poll() is not None,
            300,
            "the first run's snapshot",
        )
        second, _ = train(workdir, "twice", fresh=False, env=one)
    finally:
        first.send_signal(signal.SIGTERM)
        rest = first.communicate(timeout=300)[0]
    assert second.returncode != 0
    assert re.search(r"another training of the same configuration is running \(pid \d+ on ", second.stderr)
    assert first.returncode != 0 and "snapshot written at epoch" in rest, rest[-3000:]


def test_only_a_prefix_of_the_requested_run_is_resumed():
    from virgo_exps.train.snapshots import snapshot_refusal

    config = {"train.lr": 0.001, "world_size": 1, "data": "d1", "code": "c1", "checkpoints": "checkpoints"}

    def snap(epoch, step=0, status="complete", **changes):
        return {"epoch": epoch, "step_in_epoch": step, "status": status, "config": {**config, **changes}}

    assert snapshot_refusal(snap(2), config, 3) is None  # more epochs continue a finished run
    assert snapshot_refusal(snap(2), config, 2) is None  # the same run: reused as is
    assert snapshot_refusal(snap(1, 3, "interrupted"), config, 2) is None
    assert snapshot_refusal(snap(2), config, 1) == (
        "it is at 2 epoch(s) (status complete), past the 1 epoch(s) requested, so it is not a prefix of this run"
    )
    assert snapshot_refusal(snap(2, 3, "interrupted"), config, 2) == (
        "it is at epoch 3, step 3 (status interrupted), past the 2 epoch(s) requested, so it is not a prefix "
        "of this run"
    )
    assert snapshot_refusal(snap(1, **{"train.lr": 0.01}), config, 3) == "configuration changed (train.lr)"
    assert snapshot_refusal(snap(1, data="d2", code="c2"), config, 3) == (
        "configuration changed (trainer code, training data)"
    )
    old = {"epoch": 1, "step_in_epoch": 0, "status": "complete", "config": {"train.lr": 0.001}}
    assert snapshot_refusal(old, config, 3).startswith("configuration changed (--checkpoints path, trainer code")
