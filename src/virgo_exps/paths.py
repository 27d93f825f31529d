"""Where things live: the repository, the main checkout, the machine profile.

DVC runs queued experiments in temporary copies of the repository under
``<main checkout>/.dvc/tmp/exps/...`` and deletes them afterwards. Anything that
must outlive an experiment (the MLflow store, job logs) is therefore written
to the *main* checkout, which :func:`main_checkout` finds from either place.
"""

from __future__ import annotations

import os
from pathlib import Path

_TMP_MARKER = (".dvc", "tmp", "exps")

# What the train and report stages write, as dvc.yaml's commands name them (relative to the checkout;
# tests/test_stage_deps.py holds them equal): the one place the CLI, the scalability report, the sweeps
# and the cost summary read them from.
RESULTS_DIR = "results"
MODEL_FILE = "results/model.pt"
METRICS_FILE = "results/metrics.json"
EPOCHS_FILE = "results/epochs.csv"
# Beside metrics.json and epochs.csv, named after them (virgo_exps.records): what describes the run
# (text, flags, identifiers), and the epochs' rows with numbers as numbers (DVC's plots).
RUN_FILE = "results/run.json"
EPOCHS_PLOT_FILE = "results/epochs.json"
RANKS_FILE = "results/ranks.json"
TRAIN_LOG = "results/train.log"
CHECKPOINTS_DIR = "checkpoints"
REPORT_DIR = "results/report"


def run_file(metrics: str | os.PathLike) -> Path:
    """The description of the run whose measures are ``metrics`` (``run.json`` beside it)."""
    return Path(metrics).with_name("run.json")


def epochs_plot_file(epochs: str | os.PathLike) -> Path:
    """The epochs' rows for DVC's plots (``epochs.json`` beside ``epochs.csv``)."""
    return Path(epochs).with_suffix(".json")


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The directory holding dvc.yaml (DVC_ROOT when DVC runs the stage)."""
    if start is None and os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path(start or os.getcwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists():
            return candidate
    return here


def main_checkout(start: str | os.PathLike | None = None) -> Path:
    """The user's checkout, even from inside a DVC temporary workspace.

    ``VIRGO_HOME`` overrides the search (useful when the workspace lives on a
    different file system from the checkout).
    """
    if os.environ.get("VIRGO_HOME"):
        return Path(os.environ["VIRGO_HOME"]).resolve()
    root = repo_root(start)
    parts = root.parts
    for i in range(len(parts) - len(_TMP_MARKER)):
        if parts[i : i + len(_TMP_MARKER)] == _TMP_MARKER:
            return Path(*parts[:i])
    return root


def snapshot_root(start: str | os.PathLike | None = None) -> Path:
    """Where running trainings keep the snapshot they resume from: ``.virgo/snapshots`` of the main checkout.

    Outside every DVC output (DVC restores outputs from its cache before it
    reproduces an experiment) and outside the temporary workspaces of queued
    experiments (deleted when they end); git-ignored.
    """
    return main_checkout(start) / ".virgo" / "snapshots"


def experiment_name() -> str:
    """DVC's experiment name when DVC runs us, else 'workspace'."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"
