"""A tracking server's password reaches no log, file or param (real `mlflow server` with basic auth).

The pipeline runs through ``dvc exp run`` with the credentials in
MLFLOW_TRACKING_USERNAME/PASSWORD; then the train stage is run again with them
inside MLFLOW_TRACKING_URI, which is refused with one line before MLflow is
used (MLflow prints that URI in its ``View run ... at:`` lines, which the
launcher copies into the stage log). After each run every file the run could
write is searched for the password: the checkout (logs, results, checkpoints,
version.lock, DVC's cache and temporary files, git), the server's store and
artifacts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import BIN, make_repo, sh, tool_env
from test_tracking import PASSWORD, server  # noqa: F401 - `server` is the module's MLflow server fixture
from virgo_exps.config import ConfigError
from virgo_exps.train.tracking import check_tracking_uri, redact

pytestmark = pytest.mark.slow


def leaks(*roots: Path) -> list[Path]:
    """Every file under ``roots`` that holds the password (as text or inside binary data)."""
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and PASSWORD.encode() in path.read_bytes():
                found.append(path)
    return found


def runs_named(url: str, name: str, monkeypatch) -> list:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("virgo-exps")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")


@pytest.fixture(scope="module")
def served(server, tmp_path_factory):  # noqa: F811 - the imported fixture, requested by name
    """The whole pipeline on the local machine, tracked on the server, credentials in the environment."""
    url, home = server
    repo = make_repo(
        tmp_path_factory.mktemp("secrets") / "repo",
        {"generate": {"n_samples": 20, "chunk_size": 10}, "train": {"epochs": 1, "profile_steps": 0}},
    )
    env = tool_env(
        {
            "VIRGO_MACHINE": "local",
            "MLFLOW_TRACKING_URI": url,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        }
    )
    proc = sh([str(BIN / "dvc"), "exp", "run", "-n", "served"], repo, env, check=False)
    return url, home, repo, proc


def test_password_from_the_environment_is_in_no_file_of_the_run(served, monkeypatch):
    url, home, repo, proc = served
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "View run served at:" in out and f"{url}/#/experiments/" in out  # MLflow's own line, as it is
    [run] = runs_named(url, "served", monkeypatch)
    assert "val_loss" in run.data.metrics
    assert PASSWORD not in repr(run.data.params) + repr(run.data.tags)
    assert list((repo / "logs" / "train").glob("served-local-*.out")), "the stage log is among the files searched"
    assert (repo / ".dvc" / "cache").is_dir()
    assert leaks(repo, home) == []
    assert PASSWORD not in out


def test_password_in_the_tracking_uri_is_refused_and_in_no_file(served, monkeypatch):
    url, home, repo, first = served
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    host = url.split("://", 1)[1]
    env = tool_env({"VIRGO_MACHINE": "local", "MLFLOW_TRACKING_URI": f"http://admin:{PASSWORD}@{host}"})
    proc = sh([str(BIN / "dvc"), "exp", "run", "-n", "in-uri", "-f", "-s", "train"], repo, env, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    line = (
        f"error: MLFLOW_TRACKING_URI: holds a user name or password (http://***@{host}), which MLflow would "
        "print into the training logs; set MLFLOW_TRACKING_URI to the address alone and the credentials in "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )
    assert line in out.splitlines(), out[-3000:]
    [log] = (repo / "logs" / "train").glob("in-uri-local-*.out")
    assert line in log.read_text().splitlines()
    assert "View run" not in log.read_text()
    assert runs_named(url, "in-uri", monkeypatch) == []
    assert leaks(repo, home) == []
    assert PASSWORD not in out


def _file_digests(*roots: Path) -> dict[str, bytes]:
    import hashlib

    return {
        str(p): hashlib.sha256(p.read_bytes()).digest()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_password_in_the_tracking_uri_is_refused_by_the_first_stage_before_any_output(served):
    """The whole pipeline, a changed param: refused before generate runs, outputs byte-identical, no leak."""
    url, home, repo, first = served
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    host = url.split("://", 1)[1]
    env = tool_env({"VIRGO_MACHINE": "local", "MLFLOW_TRACKING_URI": f"http://admin:{PASSWORD}@{host}"})
    # The workspace as the baseline commit: `dvc exp run` first resets outputs to its baseline's.
    sh([str(BIN / "dvc"), "checkout"], repo)
    sh("git add -A && git commit -q --allow-empty -m 'pipeline results'", repo)
    before = _file_digests(repo / "data", repo / "results")
    proc = sh([str(BIN / "dvc"), "exp", "run", "-n", "in-uri-first", "-S", "generate.seed=7"], repo, env, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert f"error: MLFLOW_TRACKING_URI: holds a user name or password (http://***@{host})" in out, out[-3000:]
    assert "Running stage 'generate'" not in out, out[-3000:]
    assert _file_digests(repo / "data", repo / "results") == before
    check = sh([str(BIN / "virgo-exps"), "check"], repo, env, check=False)
    assert check.returncode == 2, check.stdout + check.stderr
    assert f"MLFLOW_TRACKING_URI: holds a user name or password (http://***@{host})" in check.stderr
    sh(["git", "checkout", "params.yaml"], repo)
    assert PASSWORD not in out + check.stdout + check.stderr
    assert leaks(repo, home) == []


def test_password_in_the_environment_of_a_slurm_job_is_refused_by_the_first_stage(tmp_path):
    """Slurm keeps a copy of a job's environment on the controller: no password may go there."""
    repo = make_repo(tmp_path / "repo")
    line = (
        "error: MLFLOW_TRACKING_PASSWORD: is set, and on SLURM machine 'simcluster' Slurm would store it with "
        "the job's environment on the controller; put the credentials in ~/.mlflow/credentials"
    )
    slurm = tool_env({"VIRGO_MACHINE": "simcluster", "MLFLOW_TRACKING_PASSWORD": PASSWORD})
    proc = sh([str(BIN / "dvc"), "exp", "run", "-n", "pw-slurm"], repo, slurm, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert any(ln.startswith(line) for ln in out.splitlines()), out[-3000:]
    assert "Running stage 'generate'" not in out and not (repo / "data" / "raw.zarr").exists()
    check = sh([str(BIN / "virgo-exps"), "check"], repo, slurm, check=False)
    assert check.returncode == 2 and check.stderr.startswith(line), check.stdout + check.stderr
    # The same variable on the local machine reaches no job environment: accepted.
    local = sh([str(BIN / "virgo-exps"), "check"], repo, {**slurm, "VIRGO_MACHINE": "local"}, check=False)
    assert local.returncode == 0, local.stdout + local.stderr
    assert PASSWORD not in out + check.stdout + check.stderr + local.stdout + local.stderr
    assert leaks(repo) == []


def test_credentials_are_found_wherever_they_are_in_the_uri():
    for uri in (
        "http://u:p@h:5000",
        "https://token@h",
        "http://u:p@ss/w?rd#x@h:5000/path",
        "postgresql://u:pw@db:5432/mlflow",
    ):
        with pytest.raises(ConfigError, match=r"^MLFLOW_TRACKING_URI: holds a user name or password") as err:
            check_tracking_uri(uri)
        assert "p@ss" not in str(err.value) and "pw@" not in str(err.value) and ":p@" not in str(err.value)
    for uri in ("http://127.0.0.1:5000", "sqlite:////home/a@b/mlflow.db", "file:///x@y/mlruns", "databricks", ""):
        check_tracking_uri(uri)
        assert redact(uri) == uri
    assert redact("http://u:p@ss@h:5000/x") == "http://***@h:5000/x"
