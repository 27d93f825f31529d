"""The whole study through real `dvc exp run`, on a copy of the repository with tiny params."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
import yaml

from conftest import BIN, make_repo, sh

pytestmark = pytest.mark.slow

STAGES = {"environment", "generate", "preprocess", "train", "report"}


def exp_run(repo, *args, check=True):
    return sh([str(BIN / "dvc"), "exp", "run", *args], repo, check=check)


def stages_run(proc) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr))


def lock(repo) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())


def out_hash(repo, stage: str, path: str) -> str:
    for out in lock(repo)["stages"][stage]["outs"]:
        if out["path"] == path:
            return out["md5"]
    raise KeyError(path)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One full run shared by the tests of this module (it is the expensive part)."""
    repo = make_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    first = exp_run(repo)
    return repo, first


def test_first_run_runs_all_stages_and_writes_results(pipeline):
    repo, first = pipeline
    assert stages_run(first) == STAGES
    assert set(lock(repo)["stages"]) == STAGES
    for rel in (
        "results/model.pt",
        "results/metrics.json",
        "results/epochs.csv",
        "results/report/report.md",
        "results/report/loss.png",
        "version.lock",
        "checkpoints/snapshot.pt",
    ):
        assert (repo / rel).is_file(), rel
    metrics = json.loads((repo / "results/metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["val_loss"] > 0
    report = (repo / "results/report/report.md").read_text()
    assert "not measured (no NVIDIA GPU was used)" in report


def test_exp_show_lists_the_experiment_with_its_metrics(pipeline):
    repo, _ = pipeline
    shown = json.loads(sh([str(BIN / "dvc"), "exp", "show", "--json"], repo).stdout)
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    assert exps, shown
    run = exps[0]["revs"][0]
    data = run["data"]
    assert data["metrics"]["results/metrics.json"]["data"]["val_loss"] > 0
    assert data["params"]["params.yaml"]["data"]["train"]["epochs"] == 2
    name = run["name"]
    # The MLflow run (default local store, no server) carries the experiment's name and per-epoch metrics.
    db = repo / "mlflow" / "mlflow.db"
    assert db.exists()
    con = sqlite3.connect(db)
    runs = con.execute("select run_uuid from runs where name = ?", (name,)).fetchall()
    assert len(runs) == 1
    steps = con.execute(
        "select step from metrics where run_uuid = ? and key = 'val_loss' order by step", runs[0]
    ).fetchall()
    assert [s[0] for s in steps] == [1, 2]
    params = dict(con.execute("select key, value from params where run_uuid = ?", runs[0]).fetchall())
    assert params["train.strategy"] == "single"
    tags = dict(con.execute("select key, value from tags where run_uuid = ?", runs[0]).fetchall())
    assert len(tags["git.revision"]) == 40
    assert "sweep" not in tags  # a run outside a sweep says so by having none
    # every number of metrics.json as an MLflow metric under its dotted key; what was not measured is absent
    logged = dict(con.execute("select key, value from latest_metrics where run_uuid = ?", runs[0]).fetchall())
    assert logged["cost.core_h"] > 0 and logged["cost.wall_s"] > 0 and "cost.energy_wh" not in logged, logged


def test_rerun_changes_nothing_then_params_rerun_only_downstream(pipeline):
    repo, _ = pipeline
    again = exp_run(repo)
    assert stages_run(again) <= {"environment"}, again.stdout
    train_only = exp_run(repo, "-S", "train.lr=0.002")
    assert stages_run(train_only) == {"environment", "train", "report"}
    data = exp_run(repo, "-S", "train.lr=0.002", "-S", "generate.seed=7")
    assert stages_run(data) == STAGES


def test_same_seed_gives_identical_data_and_metrics(tmp_path, pipeline):
    repo, _ = pipeline
    exp_run(repo, "-S", "generate.seed=42", "-S", "train.lr=0.001")
    before = {p: out_hash(repo, s, p) for s, p in (("generate", "data/raw.zarr"), ("preprocess", "data/images.zarr"))}
    metrics = json.loads((repo / "results/metrics.json").read_text())
    # Recompute from nothing in a second copy: no cache, no run-cache.
    other = make_repo(tmp_path / "again")
    exp_run(other)
    after = {p: out_hash(other, s, p) for s, p in (("generate", "data/raw.zarr"), ("preprocess", "data/images.zarr"))}
    assert before == after
    again = json.loads((other / "results/metrics.json").read_text())
    assert (again["train_loss"], again["val_loss"]) == (metrics["train_loss"], metrics["val_loss"])


def test_bad_params_stop_dvc_before_any_output(tmp_path):
    repo = make_repo(tmp_path / "bad", {"train": {"strategy": "mpi"}})
    lock_file = repo / "version.lock"
    before = lock_file.read_text() if lock_file.exists() else None
    proc = exp_run(repo, check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "error: train.strategy: 'mpi' is not allowed; expected one of 'single', 'ddp'" in text
    # DVC may create empty output folders; no file may be written.
    written = [p for d in ("data", "results", "checkpoints") for p in (repo / d).rglob("*") if p.is_file()]
    assert written == []
    assert (lock_file.read_text() if lock_file.exists() else None) == before


BAD_VALUES = [
    ("train", "epochs", 0),
    ("train", "lr", "fast"),
    ("train", "nodes", 2.5),
    ("train", "unknown_key", 1),
    ("generate", "n_samples", 0),
    ("generate", "sample_rate", 10),
    ("generate", "duration", "16s"),
    ("preprocess", "fmax", 1000.0),
    ("preprocess", "patch_size", 4),
    ("preprocess", "val_fraction", 0),
    ("report", "title", ""),
]


def test_each_bad_value_fails_the_first_stage_with_one_clear_line(tmp_path):
    repo = make_repo(tmp_path / "bad-values")
    original = (repo / "params.yaml").read_text()
    (repo / "version.lock").write_text("sentinel\n")
    original_lock = "sentinel\n"
    for section, key, value in BAD_VALUES:
        params = yaml.safe_load(original)
        params[section][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        proc = sh([str(BIN / "python"), "stages/environment.py", "--out", "version.lock"], repo, check=False)
        assert proc.returncode == 2, (section, key, proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and f"{section}.{key}" in lines[0], proc.stderr
        assert (repo / "version.lock").read_text() == original_lock


def test_console_shows_progress_and_the_log_keeps_the_chatter(pipeline):
    """Two DDP ranks under torchrun: the profiler's per-rank probe lines reach the stage log, not the console."""
    repo, _ = pipeline
    proc = exp_run(repo, "-S", "train.strategy=ddp", "-S", "train.procs_per_node=2")
    console = proc.stdout + proc.stderr
    assert re.search(r"^epoch 2/2: train_loss", console, re.M), console[-3000:]
    logs = sorted((repo / "logs" / "train").glob("*-local-*.out"), key=lambda p: p.stat().st_mtime)
    log = logs[-1].read_text()
    assert "epoch 2/2: train_loss" in log
    assert "profiler_st" in log  # the torch profiler's USDT lines, one per rank
    assert "profiler_st" not in console and "USDT" not in console, console[-3000:]
