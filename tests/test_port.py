"""Porting, literally: the repository with the Virgo study taken out and another study dropped in.

The steps are those of "Porting to your study" in ARCHITECTURE.md. The copy holds the project's files
without its tests; the Virgo study is removed (its package ``src/virgo_exps/study/``, its stages, its
params, ``dvc.yaml``, ``dvc.lock``, its committed results, presets and the ignore list of its data) and
the sequence study of ``tests/port_study/`` takes its place. That study differs in every hook: its own data stage (1-D
sequences it generates), a classifier trained with cross-entropy and SGD with momentum, accuracy as a
validation metric, its own budget and its own report. The copy is installed into its own environment
(the entry point ``virgo_exps.studies`` of the unchanged ``pyproject.toml`` now finds the sequence study)
and driven as a user would, through real ``virgo-exps`` and ``dvc exp run``, locally and on the test
Slurm cluster (a DDP job, and a grid sweep as a job array that maximises the study's accuracy). Every
file outside the study is byte-identical to this repository's before and after.
"""

from __future__ import annotations

import csv
import grp
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

from conftest import BIN, ROOT, _project_files, free_port, sh, tool_env, wait_until
from virgo_exps.provenance import read_metrics

PORT = ROOT / "tests" / "port_study"
# What the Virgo study is, in the repository: removed by a port.
STUDY_PATHS = (
    "src/virgo_exps/study/",
    "stages/",
    "params.yaml",
    "dvc.yaml",
    "dvc.lock",
    "results/",
    "checkpoints/",
    "presets/",
    "data/",
)
KEPT_STAGES = ("stages/environment.py",)  # the machinery's first stage stays


def is_study(rel: str) -> bool:
    return rel not in KEPT_STAGES and any(rel == p or rel.startswith(p) for p in STUDY_PATHS)


def machinery_digests(root: Path, files: list[str]) -> dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in files}


def port(dest: Path) -> list[str]:
    """The repository without its tests and without the Virgo study, the sequence study dropped in; the
    files outside the study (relative paths)."""
    kept = [rel for rel in _project_files() if not rel.startswith("tests/") and not is_study(rel)]
    for rel in kept:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    shutil.copytree(PORT / "study", dest / "src" / "virgo_exps" / "study", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PORT / "stages", dest / "stages", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(PORT / "params.yaml", dest / "params.yaml")
    shutil.copy2(PORT / "dvc.yaml.in", dest / "dvc.yaml")
    return kept


def install(repo: Path, venv: Path) -> Path:
    """The copy installed (editable, no dependencies) into an environment of its own that sees this
    environment's packages; its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # after the copy's own entries: its virgo_exps (source and entry points) comes first
    (site / "zz_shared_packages.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
    )
    sh(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."],
        repo,
        tool_env(),
        timeout=300,
    )
    return venv / "bin"


def dashboard_study(journal: Path, tmp_path: Path) -> dict:
    """Study 0 of ``journal`` as optuna-dashboard's REST API gives it (the server started and stopped here)."""
    port = free_port()
    log = (tmp_path / "dashboard.log").open("w")
    server = subprocess.Popen(
        [
            str(BIN / "optuna-dashboard"),
            str(journal),
            "--storage-class",
            "JournalFileStorage",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def answer():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/0", timeout=5) as r:
                    return json.loads(r.read())
            except OSError:
                return None

        return wait_until(answer, timeout=60, what="optuna-dashboard's API", interval=0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def exp_run(repo: Path, env: dict, *sets: str) -> str:
    args = [a for s in sets for a in ("-S", s)]
    proc = sh([str(BIN / "dvc"), "exp", "run", *args], repo, env, check=False, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def test_the_machinery_knows_nothing_of_the_port():
    for f in (ROOT / "src").rglob("*.py"):
        assert "port_study" not in f.read_text() and "SequencesConfig" not in f.read_text(), f


def ported(tmp_path: Path, env: dict) -> tuple[Path, list[str], dict[str, str]]:
    """The port, committed and installed (``env``'s PATH gains its bin folder); the files outside the
    study and their digests in this repository."""
    repo = tmp_path / "port"
    kept = port(repo)
    before = machinery_digests(ROOT, kept)
    assert before == machinery_digests(repo, kept)
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-q", "-m", "the sequence study"], repo, env)
    bin_dir = install(repo, tmp_path / "venv")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    probe = sh(["python", "-c", "import virgo_exps.study, sys; print(virgo_exps.study.__file__)"], repo, env)
    assert probe.stdout.strip() == str(repo / "src" / "virgo_exps" / "study" / "__init__.py")
    return repo, kept, before


@pytest.mark.slow
def test_a_port_to_a_classification_study_runs_through_the_unchanged_machinery(tmp_path):
    env = tool_env({"OMP_NUM_THREADS": "1"})
    repo, kept, before = ported(tmp_path, env)

    # the machinery's checks and params listing find the study through its entry point
    listing = sh(["virgo-exps", "params"], repo, env).stdout
    assert "sequences:  # the Sequences study's" in listing and "generate" not in listing
    assert "params.yaml: valid; machine: local (local)" in sh(["virgo-exps", "check"], repo, env).stdout
    # the study's own rule, through the one validator, refused by the first stage before any data
    bad = sh([str(BIN / "dvc"), "exp", "run", "-S", "train.global_batch_size=4096"], repo, env, check=False)
    assert bad.returncode != 0
    assert "train.global_batch_size: 4096 is larger than the training split (192 sequences)" in bad.stdout + bad.stderr
    assert "Running stage 'data'" not in bad.stdout
    sh(["git", "checkout", "--", "params.yaml"], repo, env)

    out = exp_run(repo, env)
    assert "Running stage 'data'" in out and "launch: train on 'local'" in out
    single = read_metrics(repo / "results" / "metrics.json")
    assert single["strategy"] == "single" and single["world_size"] == 1
    assert 0.0 <= single["val_accuracy"] <= 1.0
    assert single["val_accuracy"] > 0.6, single  # 3 classes: chance is 1/3
    report = (repo / "results" / "report" / "report.md").read_text()
    assert "# Sequence classification" in report and "## Classification" in report
    assert f"Validation accuracy {single['val_accuracy']:.3f}" in report

    # DDP on two processes: the same trajectory as one process (the machinery's sampler), another record
    out = exp_run(repo, env, "train.strategy=ddp", "train.procs_per_node=2")
    assert "torch.distributed.run" in out and "Running stage 'data'" not in out
    ddp = read_metrics(repo / "results" / "metrics.json")
    assert ddp["world_size"] == 2 and ddp["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    assert ddp["val_accuracy"] == pytest.approx(single["val_accuracy"], abs=0.02)

    # verify and the scalability report read both experiments
    verified = sh(["virgo-exps", "verify"], repo, env, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    sh(["virgo-exps", "scalability", "--out", str(tmp_path / "scal")], repo, env)
    with open(tmp_path / "scal" / "scalability.csv") as fh:
        series = {row["series"]: row for row in csv.DictReader(fh)}
    assert sorted(series) == ["ddp", "single"]
    assert float(series["ddp"]["val_loss"]) == pytest.approx(single["val_loss"], rel=1e-4)

    assert machinery_digests(repo, kept) == before, "running the port changed a file outside the study"


@pytest.mark.slurm
@pytest.mark.slow
def test_the_port_trains_on_slurm_and_sweeps_for_accuracy_as_a_job_array(slurm_cluster, tmp_path):
    env = {k: v for k, v in tool_env().items() if not k.startswith("SLURM_")}
    env.update({**slurm_cluster.env, "OMP_NUM_THREADS": "1"})
    repo, kept, before = ported(tmp_path, env)
    local = {**env, "VIRGO_MACHINE": "local"}
    env["VIRGO_MACHINE"] = "slurm"
    (repo / ".slurmsim").symlink_to(slurm_cluster.workdir, target_is_directory=True)

    # DDP on two processes as a job of the test cluster
    out = exp_run(repo, env, "train.strategy=ddp", "train.procs_per_node=2")
    job = re.search(r"submitted (?:batch )?job (\d+)", out)
    assert job, out[-3000:]
    ddp = read_metrics(repo / "results" / "metrics.json")
    assert ddp["world_size"] == 2 and ddp["machine"] == "slurm" and 0.6 < ddp["val_accuracy"] <= 1.0, ddp
    sh(["git", "checkout", "--", "params.yaml"], repo, env)

    # a 3-trial grid sweep as one job array, ranked by the study's objective (no --metric: val_accuracy, maximised)
    sh([str(BIN / "dvc"), "repro", "data"], repo, local)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-q", "-m", "data"], repo, env)
    store = tmp_path / "store"
    sh(["virgo-exps", "share", "--dir", str(store), "--group", grp.getgrgid(os.getgid()).gr_name], repo, env)
    lrs = ("0.005", "0.01", "0.02")
    submitted = sh(
        [
            "virgo-exps",
            "sweep",
            "submit",
            "--grid",
            "acc",
            "-S",
            f"train.lr={','.join(lrs)}",
            "--parallel",
            "2",
        ],
        repo,
        env,
    ).stdout
    assert re.search(r"^submitted sweep acc: job array \d+ \(3 trials, 2 at a time\)", submitted, re.M), submitted
    tasks = store / "sweeps" / "acc" / "tasks"

    def states() -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(tasks.glob("*.json"))] if tasks.is_dir() else []

    wait_until(
        lambda: len(states()) == 3 and all(t.get("state") in ("done", "failed") for t in states()),
        timeout=600,
        what="the three trials",
        interval=2,
    )
    done = states()
    assert [t["state"] for t in done] == ["done"] * 3, done
    best = max(done, key=lambda t: t["metric"])
    status = sh(["virgo-exps", "sweep", "status", "acc"], repo, env).stdout
    assert "3 trials: 3 done" in status and f"best so far: {best['experiment']} val_accuracy" in status, status
    # the grid is an Optuna study too (what optuna-dashboard opens): its objective named, one trial per grid point
    journal = str(store / "sweeps" / "acc" / "optuna.journal")
    storage = JournalStorage(JournalFileBackend(journal, lock_obj=JournalFileOpenLock(journal)))
    study = optuna.load_study(study_name="acc", storage=storage)
    assert study.metric_names == ["val_accuracy"] and study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = sorted(study.get_trials(), key=lambda t: t.user_attrs["grid_index"])
    assert [t.params["train.lr"] for t in trials] == list(lrs)
    assert [t.value for t in trials] == [t["metric"] for t in sorted(done, key=lambda t: t["index"])]
    assert study.best_trial.user_attrs["experiment"] == best["experiment"]
    assert all(t.user_attrs["cost.core_h"] > 0 for t in trials)
    for t in trials:  # each trial names its MLflow run, in the store of the clone it trained in
        clone_store = (
            f"sqlite:///{store / 'sweeps' / 'acc' / 'work' / t.user_attrs['experiment'] / 'mlflow' / 'mlflow.db'}"
        )
        run = MlflowClient(tracking_uri=clone_store).get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.run_name == t.user_attrs["experiment"] and run.info.status == "FINISHED"
    # and optuna-dashboard serves it: read through its REST API
    shown = dashboard_study(Path(journal), tmp_path)
    assert shown["objective_names"] == ["val_accuracy"] and shown["directions"] == ["maximize"], shown
    values = sorted(t["values"][0] for t in shown["trials"])
    assert values == sorted(t.value for t in trials)
    attrs = {a["key"]: a["value"] for a in shown["trials"][0]["user_attrs"]}
    assert float(attrs["cost.core_h"]) > 0 and attrs["experiment"].startswith("acc-"), attrs
    assert machinery_digests(repo, kept) == before, "running the port changed a file outside the study"
