"""Porting is proven: a second, tiny study (tests/tiny_study) runs through the machinery unchanged.

The tiny study brings only what is study-specific: a data stage writing the
split store the trainer reads, a model factory, and its params (train in
params.yaml, its own data section in study.yaml, checked by the same
validator). Its copy is a fresh git + DVC repository with no src/ of its own:
it runs the installed virgo_exps (launcher, trainer, strategies, SLURM,
tracking, provenance) as a user's project would, as a job on the test Slurm
cluster (a port's local runs, with a study that replaces every hook:
tests/test_port.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import virgo_exps
from conftest import BIN, ROOT, sh, tool_env

STUDY = ROOT / "tests" / "tiny_study"
SRC = ROOT / "src"


def tree_sha256(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def make_tiny_repo(dest: Path) -> Path:
    """The tiny study as its own project: its files, the machine profiles, git and DVC; nothing of src/."""
    shutil.copytree(STUDY, dest, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "dvc.yaml.in").rename(dest / "dvc.yaml")
    for machine in ("local", "slurm"):
        shutil.copytree(ROOT / "machines" / machine, dest / "machines" / machine)
    (dest / ".gitignore").write_text("/logs/\n/mlflow/\n/.virgo/\n__pycache__/\n")
    env = tool_env()
    sh(["git", "init", "-q", "-b", "main"], dest, env)
    sh([str(BIN / "dvc"), "init", "-q"], dest, env)
    sh(["git", "add", "-A"], dest, env)
    sh(["git", "commit", "-q", "-m", "tiny study"], dest, env)
    return dest


def exp_run(repo: Path, env: dict, *sets: str) -> str:
    args = [a for s in sets for a in ("-S", s)]
    proc = sh([str(BIN / "dvc"), "exp", "run", *args], repo, env, check=False, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def finished(repo: Path, epochs: int, world: int, strategy: str) -> dict:
    """metrics.json and a model file with its checksum, as the machinery writes them for any study."""
    from virgo_exps.modelfile import load_model

    metrics = json.loads((repo / "results" / "metrics.json").read_text())
    assert metrics["epochs"] == epochs and metrics["world_size"] == world and metrics["strategy"] == strategy
    assert metrics["parameters"] == 225  # the tiny study's network (2 -> 8 -> 1 channels, 3x3), not Virgo's
    assert metrics["val_loss"] < 1.0 and metrics["provenance"]["data"]
    model = load_model(repo / "results" / "model.pt")  # verifies the sha256 the trainer wrote
    assert model["model_args"] == {"name": "tinyconv", "in_channels": 2}
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 3, padding=1))
    net.load_state_dict(model["model"])
    rows = (repo / "results" / "epochs.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + epochs
    return metrics


@pytest.fixture(scope="module")
def src_before():
    """The package the tiny study runs is this checkout's src/, and running it changes nothing there."""
    assert Path(virgo_exps.__file__).resolve().is_relative_to(SRC)
    digest = tree_sha256(SRC)
    yield digest
    assert tree_sha256(SRC) == digest, "running the tiny study modified src/"


def test_the_tiny_study_owns_nothing_of_the_machinery():
    files = {p.relative_to(STUDY).as_posix() for p in STUDY.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files == {"dvc.yaml.in", "params.yaml", "study.yaml", "stages/tiny.py", "stages/data.py", "stages/train.py"}
    code = sum(len((STUDY / f).read_text().splitlines()) for f in files if f.endswith(".py"))
    assert code < 200, f"{code} lines"
    for f in SRC.rglob("*.py"):
        assert "tiny_study" not in f.read_text(), f"{f} knows the tiny study"


@pytest.mark.slurm
@pytest.mark.slow
def test_the_tiny_study_runs_on_slurm(slurm_cluster, tmp_path, src_before):
    repo = make_tiny_repo(tmp_path / "tiny")
    env = {k: v for k, v in tool_env().items() if not k.startswith("SLURM_")}
    env.update(slurm_cluster.env)
    env.update(VIRGO_MACHINE="slurm", OMP_NUM_THREADS="1")
    out = exp_run(repo, env, "train.strategy=ddp", "train.procs_per_node=2")
    job = re.search(r"submitted (?:batch )?job (\d+)", out)
    assert job, out[-3000:]
    finished(repo, epochs=3, world=2, strategy="ddp")
    logs = list((repo / "logs" / "train").glob(f"*-{job.group(1)}.out"))
    assert logs and "epoch 3/3" in logs[0].read_text()
