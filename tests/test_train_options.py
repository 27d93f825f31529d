"""The switches a GPU user reaches for, on CPU through the real train stage (its launcher and workers):
gradient accumulation, mixed precision, clipping, compile and the cosine schedule; their refusals; the
learning-rate schedule as a function."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import BIN, image_repo, make_repo, sh, tool_env
from test_trainer import deepspeed_runner, losses, needs_horovod, train, weights
from virgo_exps.config import ConfigError, params_from_dict
from virgo_exps.provenance import read_metrics
from virgo_exps.study.models import build_from_file, build_model
from virgo_exps.train.snapshots import read_snapshot_file
from virgo_exps.train.step import lr_factor

# Measured on the 2-core machine (CPU): the largest relative difference in an epoch's loss between
# 1 x 32 and 1 x 4 x 8 is 1.6e-5 (2 DDP x 2 x 8: 6.6e-8); bf16 autocast moves them by at most 0.17 % from
# fp32 (the same for DDP, DeepSpeed and Horovod on 2 processes); the fp16 allreduce of 2 DDP processes by 0.04 %.
ACCUM_RTOL = 5e-5
BF16_RTOL = 0.01


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _relative(a: pd.Series, b: pd.Series) -> float:
    return float(np.max(np.abs(a.to_numpy() - b.to_numpy()) / np.abs(b.to_numpy())))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return image_repo(tmp_path_factory, "options")


@pytest.fixture(scope="module")
def fp32(workdir):
    """The reference: one process, 8 samples a step, fp32."""
    proc, out = train(workdir, "fp32")
    _ok(proc)
    return out


@pytest.mark.slow
def test_accumulated_micro_batches_follow_the_full_batch(workdir):
    """1 process x 4 micro-batches of 8 and 2 DDP processes x 2 x 8 train as 1 x 32: the same losses
    within fp32 rounding (the summation order differs)."""
    runs = {
        "1x32": ("single", 1, {"grad_accum_steps": 1}),
        "1x4x8": ("single", 1, {"grad_accum_steps": 4}),
        "2x2x8": ("ddp", 2, {"grad_accum_steps": 2}),
    }
    got = {}
    for name, (strategy, procs, extra) in runs.items():
        proc, out = train(workdir, f"accum-{name}", strategy, procs, extra={**extra, "global_batch_size": 32})
        _ok(proc)
        got[name] = losses(out)
        metrics = read_metrics(out / "metrics.json")
        assert metrics["world_size"] == procs
    ref = got["1x32"]
    assert len(ref) == 3 and ref["val_loss"].iloc[-1] < ref["val_loss"].iloc[0]  # it learned
    for name in ("1x4x8", "2x2x8"):
        for column in ("train_loss", "val_loss"):
            diff = _relative(got[name][column], ref[column])
            print(f"{name} {column}: largest relative difference from 1x32 {diff:.2e}")
            assert diff <= ACCUM_RTOL, (name, column, diff)
    # A micro-batch split differently is another computation, not the same one relabelled.
    assert not got["1x4x8"]["train_loss"].equals(ref["train_loss"]) or got["1x4x8"].equals(ref)


# DeepSpeed and Horovod accumulate two micro-batches here too (the engine's gradient_accumulation_steps,
# Horovod's backward_passes_per_step; their difference from the full batch is 1e-5, far inside the bound).
BF16_STRATEGIES = [
    ("single", 1, {}),
    ("ddp", 2, {}),
    ("deepspeed", 2, {"grad_accum_steps": 2}),
    # and a limit it never reaches: Horovod's path that waits for the averaged gradients before clipping
    # and its fp16 compression of the allreduce
    pytest.param(
        "horovod",
        2,
        {"grad_accum_steps": 2, "grad_clip": 1.0e6, "grad_compression": "fp16"},
        marks=[pytest.mark.horovod, needs_horovod],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,procs,more", BF16_STRATEGIES)
def test_bf16_autocast_trains_close_to_fp32(workdir, fp32, strategy, procs, more):
    env = deepspeed_runner(workdir) if strategy == "deepspeed" else None
    extra = {"precision": "bf16", **more}
    proc, out = train(workdir, f"bf16-{strategy}", strategy, procs, env=env, extra=extra)
    _ok(proc)
    got, ref = losses(out), losses(fp32)
    assert np.isfinite(got[["train_loss", "val_loss"]].to_numpy()).all()
    for column in ("train_loss", "val_loss"):
        diff = _relative(got[column], ref[column])
        print(f"bf16 {strategy} x{procs} {column}: largest relative difference from fp32 {diff:.2e}")
        assert 0 < diff <= BF16_RTOL, (column, diff)  # not fp32 under another name, and close to it


@pytest.mark.slow
def test_a_run_stopped_and_resumed_is_bit_identical_with_scaler_and_accumulation(workdir):
    """fp16 keeps a gradient scaler whose scale changes as it trains: it is in the snapshot, so the resumed
    run (which also accumulates micro-batches and clips) is the uninterrupted one bit for bit."""
    extra = {"precision": "fp16", "grad_clip": 0.5, "grad_accum_steps": 2}
    name = "resume-fp16-accum-clip"
    full, full_out = train(workdir, f"{name}-full", epochs=2, extra=extra)
    _ok(full)
    first, out = train(workdir, name, epochs=2, env={"VIRGO_FAULT_STOP_AT_STEP": "11"}, extra=extra)
    assert first.returncode != 0
    second, _ = train(workdir, name, epochs=2, fresh=False, extra=extra)
    _ok(second)
    assert "at epoch 2, step 3 (status interrupted)" in second.stderr
    a, b = weights(full_out), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(losses(full_out), losses(out), check_exact=True)
    snap = read_snapshot_file(out / "checkpoints" / "snapshot.pt")
    assert snap["scaler"]["scale"] > 0 and snap["scaler"]["_growth_tracker"] > 0, snap["scaler"]


# Measured on the 2-core machine (CPU, gloo, 2 processes, 3 epochs): DeepSpeed's ZeRO 2 and 3 give the losses
# of its stage 0 bit for bit (and of one process within 1.6e-8); the bound leaves room for another machine's
# rounding (the ranks' sums in another order, another optimiser kernel on the flat partition).
ZERO_RTOL = 1e-6


@pytest.fixture(scope="module")
def zero0(workdir):
    """DeepSpeed without ZeRO on 2 processes (its own runner): the reference of the ZeRO stages."""
    proc, out = train(workdir, "zero0", "deepspeed", 2, env=deepspeed_runner(workdir))
    _ok(proc)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])  # stage 1 is stage 2's code (its state is split the same way)
def test_zero_stages_train_as_stage_0_and_resume_bit_identically(workdir, fp32, zero0, stage):
    """DeepSpeed's ZeRO 2 and 3 on gloo (2 processes, its own runner): the losses of stage 0 within ZERO_RTOL
    (and of one process within the bound of every 2-process strategy); model.pt holds the whole weights (ZeRO 3
    gathers them from the ranks); stopped and resumed (each rank's part of the optimiser state, and with ZeRO 3 of
    the weights, in the snapshot), the run is the uninterrupted one bit for bit."""
    env = deepspeed_runner(workdir)
    extra = {"zero_stage": stage}
    # a final snapshot of stage 0 where this stage's output goes: not resumed, and the key is named
    shutil.rmtree(workdir / "out" / f"zero{stage}", ignore_errors=True)
    shutil.copytree(zero0 / "checkpoints", workdir / "out" / f"zero{stage}" / "checkpoints")
    proc, full = train(workdir, f"zero{stage}", "deepspeed", 2, env=env, fresh=False, extra=extra)
    _ok(proc)
    assert "configuration changed (--checkpoints path, train.zero_stage); starting afresh" in proc.stderr
    got = losses(full)
    for column in ("train_loss", "val_loss"):
        diff, single = _relative(got[column], losses(zero0)[column]), _relative(got[column], losses(fp32)[column])
        print(f"ZeRO {stage} x2 {column}: largest relative difference from stage 0 {diff:.2e}, 1 process {single:.2e}")
        assert diff <= ZERO_RTOL, (column, diff)
        assert single <= 1e-4, (column, single)
    # the whole weights, as a fresh network of the study has them, close to stage 0's
    fresh = build_model("decoder", 3).state_dict()
    mine, ref = weights(full), weights(zero0)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in fresh.items()}
    assert all(v.dtype == torch.float32 for v in mine.values())
    build_from_file(full / "model.pt")  # its checksum, and every weight loaded into a fresh network
    for key in mine:
        torch.testing.assert_close(mine[key], ref[key], rtol=1e-4, atol=1e-6)
    stop = {**env, "VIRGO_FAULT_STOP_AT_STEP": "11"}
    first, out = train(workdir, f"zero{stage}-resumed", "deepspeed", 2, env=stop, extra=extra)
    assert first.returncode != 0
    snap = read_snapshot_file(next((workdir / ".virgo" / "snapshots").glob("*/snapshot.pt")))
    assert isinstance(snap["optimizer"], list) and len(snap["optimizer"]) == 2  # each rank's part
    assert [part["zero_stage"] for part in snap["optimizer"]] == [stage, stage]
    assert {k: v.shape for k, v in snap["model"].items()} == {k: v.shape for k, v in fresh.items()}
    second, _ = train(workdir, f"zero{stage}-resumed", "deepspeed", 2, env=env, fresh=False, extra=extra)
    _ok(second)
    assert "at epoch 2, step 3 (status interrupted)" in second.stderr
    a, b = weights(full), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(losses(full), losses(out), check_exact=True)


def test_an_optimiser_state_of_another_zero_stage_is_refused_in_one_line():
    """The snapshot key holds train.zero_stage, so a snapshot of another stage is not resumed (the line that
    says so names the key); an optimiser state that still reaches the strategy is refused the same way."""
    from virgo_exps.train.outcome import RunFailed
    from virgo_exps.train.snapshots import snapshot_refusal
    from virgo_exps.train.strategies.deepspeed import DeepSpeedStrategy

    config = {"train.zero_stage": 3, "world_size": 2}
    why = snapshot_refusal({"config": {**config, "train.zero_stage": 2}, "epoch": 1}, config, 3)
    assert why == "configuration changed (train.zero_stage)"
    strategy = DeepSpeedStrategy()
    strategy.zero_stage, strategy.world_size = 3, 2
    for state in ([{"zero_stage": 2}, {"zero_stage": 2}], {"state": {}, "param_groups": []}):
        with pytest.raises(RunFailed) as err:
            strategy.load_optimizer_state(None, state)
        assert "written with train.zero_stage" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_clipping_changes_a_run_only_where_the_norm_exceeds_the_limit(workdir, fp32):
    proc, loose = train(workdir, "clip-loose", extra={"grad_clip": 1.0e6})
    _ok(proc)
    proc, tight = train(workdir, "clip-tight", extra={"grad_clip": 1.0e-3})
    _ok(proc)
    pd.testing.assert_frame_equal(losses(loose), losses(fp32), check_exact=True)
    assert _relative(losses(tight)["train_loss"], losses(fp32)["train_loss"]) > 1e-3


@pytest.mark.slow
def test_fp16_compression_of_the_allreduce_trains_close_to_fp32(workdir, fp32):
    """DDP's fp16 communication hook on 2 processes (Horovod's fp16 compression: the Horovod bf16 case)."""
    proc, out = train(workdir, "ddp-fp16-wire", "ddp", 2, extra={"grad_compression": "fp16"})
    _ok(proc)
    got, ref = losses(out), losses(fp32)
    for column in ("train_loss", "val_loss"):
        diff = _relative(got[column], ref[column])
        print(f"fp16 allreduce ddp x2 {column}: largest relative difference from fp32 {diff:.2e}")
        assert 0 < diff <= BF16_RTOL, (column, diff)  # the gradients did go through fp16


@pytest.mark.slow
def test_compile_trains_the_same_network(workdir, fp32):
    proc, out = train(workdir, "compiled", epochs=1, extra={"compile": True})
    _ok(proc)
    got, ref = losses(out), losses(fp32).iloc[:1]
    np.testing.assert_allclose(got["train_loss"], ref["train_loss"], rtol=1e-4)
    assert set(weights(out)) == set(weights(fp32))  # the state dict's keys are the network's own


@pytest.mark.slow
def test_cosine_schedule_ends_at_the_floor_and_more_epochs_start_afresh(workdir):
    extra = {"lr_schedule": "cosine", "lr_floor": 0.1}
    proc, out = train(workdir, "cosine", epochs=2, extra=extra)
    _ok(proc)
    lr = pd.read_csv(out / "epochs.csv")["lr"]
    assert lr.iloc[-1] == pytest.approx(0.1 * 1e-3, rel=1e-6)  # the epoch's last step: the floor
    # With a cosine schedule the epochs shape every step: a longer run is another run, not a continuation.
    proc, _ = train(workdir, "cosine", epochs=3, fresh=False, extra=extra)
    _ok(proc)
    assert "not resuming from out/cosine/checkpoints/snapshot.pt: configuration changed (train.epochs)" in proc.stderr
    assert pd.read_csv(out / "epochs.csv")["lr"].iloc[-1] == pytest.approx(1e-4, rel=1e-6)


def test_lr_factor_warms_up_then_holds_or_decays_to_the_floor():
    cfg = SimpleNamespace(warmup_steps=4, lr_schedule="constant", lr_floor=0.0, epochs=3)
    constant = lr_factor(cfg, 10)
    assert [constant(s) for s in (0, 1, 3, 29, 1000)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = lr_factor(SimpleNamespace(**{**vars(cfg), "lr_schedule": "cosine", "lr_floor": 0.2}), 10)
    assert cosine(0) == pytest.approx(0.25) and cosine(3) == pytest.approx(
        0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 3 / 29))
    )
    assert cosine(29) == pytest.approx(0.2) and cosine(500) == pytest.approx(0.2)
    assert all(cosine(s) >= cosine(s + 1) for s in range(3, 40))


def _params(**train) -> dict:
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["train"].update(train)
    return raw


@pytest.mark.parametrize(
    "train,words",
    [
        ({"grad_accum_steps": 3}, "train.grad_accum_steps: 3 micro-batches do not split the 32 samples"),
        ({"grad_accum_steps": 0}, "train.grad_accum_steps: 0 is not allowed; expected an integer > 0"),
        (
            {"strategy": "ddp", "procs_per_node": 2, "grad_accum_steps": 32},
            "do not split the 16 samples each of the 2 process(es)",
        ),
        ({"precision": "fp8"}, "train.precision: 'fp8' is not allowed; expected one of 'fp32', 'bf16', 'fp16'"),
        ({"strategy": "deepspeed", "precision": "fp16"}, "train.precision: 'fp16' needs a gradient scaler"),
        ({"grad_clip": -1.0}, "train.grad_clip: -1.0 is not allowed"),
        ({"lr_floor": 1.0}, "train.lr_floor: 1.0 is not allowed; expected a number >= 0 and < 1"),
        ({"compile": "yes"}, "train.compile"),
        (
            {"strategy": "deepspeed", "procs_per_node": 2, "grad_compression": "fp16"},
            "train.grad_compression: 'fp16' compresses the gradients' allreduce of ddp and horovod, but "
            "train.strategy is 'deepspeed'; set it to 'none'",
        ),
    ],
)
def test_impossible_values_are_refused_in_one_line(train, words):
    with pytest.raises(ConfigError) as err:
        params_from_dict(_params(**train))
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_the_first_stage_refuses_compile_without_a_compiler_before_any_work(tmp_path):
    """Through `dvc exp run`: the refusal is one line, and nothing of the pipeline ran."""
    repo = make_repo(tmp_path / "repo")
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "git").symlink_to(shutil.which("git"))  # the tools the stages need beside the venv's: no compiler
    env = tool_env({"PATH": f"{BIN}{os.pathsep}{bare}", "CXX": "no-such-compiler"})
    proc = sh([str(BIN / "dvc"), "exp", "run", "-S", "train.compile=true"], repo, env, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "train.compile: torch.compile on CPUs builds C++ and finds no compiler (no-such-compiler, c++)" in text
    assert not (repo / "data" / "raw.zarr").exists() and not (repo / "results" / "metrics.json").exists()
