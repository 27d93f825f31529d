"""MLflow tracking against a real `mlflow server` with basic auth on loopback."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from conftest import BIN, make_repo, mlflow_served, sh, tool_env, write_images
from virgo_exps.provenance import read_metrics

pytestmark = pytest.mark.slow

# Made at run time, so the only place it can be found is where it leaked to.
PASSWORD = "pw-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on 127.0.0.1, stopped by pid afterwards."""
    home = tmp_path_factory.mktemp("mlflow-server")
    env = {"MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key"}
    args = ("--app-name", "basic-auth", "--default-artifact-root", str(home / "artifacts"))
    with mlflow_served("server", f"sqlite:///{home / 'store.db'}", home, args, env) as url:
        yield url, home


def run_train(repo: Path, env: dict):
    cmd = [
        str(BIN / "python"),
        "stages/train.py",
        "--data",
        "data/images.zarr",
        "--checkpoints",
        "out/ck",
        "--model",
        "out/model.pt",
        "--metrics",
        "out/metrics.json",
        "--epochs",
        "out/epochs.csv",
        "--ranks",
        "out/ranks.json",
    ]
    return sh(cmd, repo, tool_env(env), check=False)


def test_runs_go_to_the_server_and_the_password_goes_nowhere(tmp_path, server):
    url, home = server
    repo = make_repo(tmp_path / "repo", {"train": {"epochs": 2, "profile_steps": 0}})
    write_images(repo / "data" / "images.zarr", n_train=32, n_val=8)
    env = {
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        "DVC_EXP_NAME": "served-exp",
        # MLflow publishes a sample only after a whole interval: a short one, for a run that may last ~1 s
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1",
    }
    proc = run_train(repo, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD)
    try:
        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("virgo-exps")
        runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'served-exp'")
        assert len(runs) == 1
        run = runs[0]
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == [1, 2]
        assert PASSWORD not in repr(run.data.params) + repr(run.data.tags)
        # what a user of the MLflow UI filters and opens, through the server's REST API: the run found by
        # a cost figure, its training data as a dataset input (the digest of metrics.json's provenance),
        # the trained model as an artifact
        by_cost = client.search_runs([exp.experiment_id], filter_string="metrics.`cost.core_h` > 0")
        assert run.info.run_id in {r.info.run_id for r in by_cost}
        stamp = read_metrics(repo / "out" / "metrics.json")["provenance"]
        inputs = [(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs]
        assert inputs == [("data/images.zarr", stamp["data"])], inputs
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
        # ... registered in the server's model registry, and MLflow's system metrics sampled while it trained
        [version] = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        assert version.name == "virgo-exps" and version.source.endswith("/model"), version
        assert version.tags["dvc.experiment"] == "served-exp"
        assert f"mlflow: model registered as virgo-exps version {version.version}" in proc.stderr
        assert run.data.metrics["system/cpu_utilization_percentage"] >= 0, sorted(run.data.metrics)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert not (repo / "mlflow").exists(), "a server run must not create the local store"
    # The password is in no file of the experiment: outputs, logs, version.lock, checkpoints.
    for path in repo.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert PASSWORD.encode() not in path.read_bytes(), path
    assert PASSWORD not in proc.stdout + proc.stderr


def test_a_wrong_password_fails_with_a_clear_message(tmp_path, server):
    url, _ = server
    repo = make_repo(tmp_path / "repo", {"train": {"epochs": 1, "profile_steps": 0}})
    write_images(repo / "data" / "images.zarr", n_train=32, n_val=8)
    proc = run_train(
        repo,
        {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong-password"},
    )
    assert proc.returncode != 0
    assert "refused the credentials" in proc.stderr
    assert "wrong-password" not in proc.stdout + proc.stderr
