"""MLflow tracking against a real `mlflow server` with basic auth on loopback."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, make_repo, sh, tool_env, write_images

pytestmark = pytest.mark.slow

# Made at run time, so the only place it can be found is where it leaked to.
PASSWORD = "pw-" + secrets.token_hex(12)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on 127.0.0.1, stopped by pid afterwards."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = tool_env(
        {
            "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
        }
    )
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{home / 'store.db'}",
            "--default-artifact-root",
            str(home / "artifacts"),
            "--workers",
            "1",
        ],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                proc.kill()
                pytest.fail("mlflow server did not start:\n" + (home / "server.log").read_text()[-3000:])
            time.sleep(1)
    yield url, home
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    log.close()


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
        stamp = json.loads((repo / "out" / "metrics.json").read_text())["provenance"]
        inputs = [(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs]
        assert inputs == [("data/images.zarr", stamp["data"])], inputs
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
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
