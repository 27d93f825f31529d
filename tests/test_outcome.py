"""A run that does not succeed records nothing as a result (virgo_exps.train.outcome).

The diverged run is the train stage as DVC runs it (the launcher, a real
training process, MLflow into a SQLite store of its own): weight decay 1e30
makes the first steps blow the weights up.
"""

from __future__ import annotations

import math

import pytest

from conftest import make_repo, sh, tool_env, train_stage_cmd, write_images
from virgo_exps.train import outcome


def test_epoch_refusal_names_the_epoch_and_step_or_the_loss():
    assert outcome.epoch_refusal(3, 0.5, 0.4, None) is None
    why = outcome.epoch_refusal(2, math.nan, math.nan, (1, 7))
    assert why.startswith("the training loss stopped being finite at epoch 2, step 7 (rank 1)")
    assert "validation loss of epoch 1 is inf" in outcome.epoch_refusal(1, 0.5, math.inf, None)
    assert "training loss of epoch 4 is nan" in outcome.epoch_refusal(4, math.nan, 0.5, None)


@pytest.mark.parametrize(
    "metrics, why",
    [
        ({"train_loss": 0.7, "val_loss": 0.8, "epochs": 2}, None),
        ({"train_loss": 0.7, "val_loss": None, "epochs": 2}, "val_loss is None"),
        ({"train_loss": math.nan, "val_loss": 0.8, "epochs": 2}, "train_loss is nan"),
        ({"train_loss": 0.7, "val_loss": "0.8", "epochs": 2}, "val_loss is '0.8'"),
        ({"train_loss": 0.7, "val_loss": 0.8, "epochs": 0}, "epochs is 0"),
        ([], "not a mapping"),
    ],
)
def test_metrics_refusal(metrics, why):
    got = outcome.metrics_refusal(metrics)
    assert (got is None) if why is None else (why in got), got


@pytest.mark.slow
def test_a_diverged_run_records_nothing_and_says_where(tmp_path):
    repo = make_repo(tmp_path / "repo", {"train": {"epochs": 2, "profile_steps": 0, "weight_decay": 1.0e30}})
    write_images(repo / "data" / "images.zarr", n_train=64, n_val=16)
    cmd = [c for c in train_stage_cmd("params.yaml", "out") if c != "--no-tracking"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = sh(cmd, repo, tool_env({"MLFLOW_TRACKING_URI": uri, "DVC_EXP_NAME": "diverged"}), check=False)
    assert proc.returncode != 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "stopped being finite" in ln]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: train: the training loss stopped being finite at epoch 1, step ")
    for name in ("metrics.json", "model.pt", "epochs.csv", "ranks.json", "checkpoints/snapshot.pt"):
        assert not (repo / "out" / name).exists(), f"{name} written for a run that diverged"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("virgo-exps")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs if r.info.run_name == "diverged"] == ["FAILED"]
