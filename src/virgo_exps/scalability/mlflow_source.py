"""The scalability report's runs from MLflow: the finished top-level runs of an experiment.

Teammates' runs on a shared tracking server included; per-rank child runs are not runs of their own. A
run's per-epoch figures come from its metric history (step = epoch), its first epoch (warm-up) dropped as
from ``epochs.csv``.
"""

from __future__ import annotations

import os
from typing import Any

from virgo_exps.paths import main_checkout
from virgo_exps.scalability.runs import Run, _median, epoch_load
from virgo_exps.scalability.sources import SourceError
from virgo_exps.train.tracking import EXPERIMENT, redact

# Logged once per epoch to MLflow (step = epoch); their "latest" value is the
# last epoch's, not the run's summary.
PER_EPOCH = (
    "train_time_s",
    "val_time_s",
    "samples_per_s",
    "train_loss",
    "val_loss",
    "lr",
    "step",
    "load_avg",
    "gpu_other_procs",
)


def _param_value(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def default_mlflow_uri() -> str:
    """MLFLOW_TRACKING_URI, else the local store of the main checkout (which must exist)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = main_checkout() / "mlflow" / "mlflow.db"
    if not db.exists():
        raise SourceError(f"no local MLflow store at {db}; set MLFLOW_TRACKING_URI for a server")
    return f"sqlite:///{db}"


def load_mlflow(
    experiment: str | None = None, tracking_uri: str | None = None, names: list[str] | None = None
) -> tuple[list[Run], list[str]]:
    from mlflow.tracking import MlflowClient  # heavy: imported only when MLflow is read

    experiment = experiment or EXPERIMENT
    uri = tracking_uri or default_mlflow_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SourceError(f"no MLflow experiment named {experiment!r} in {redact(uri)}")
    found, token, notes = [], None, []
    while True:
        page = client.search_runs(
            [exp.experiment_id], max_results=500, page_token=token, order_by=["attributes.start_time ASC"]
        )
        found.extend(page)
        token = page.token
        if not token:
            break
    runs: list[Run] = []
    for r in found:
        tags = r.data.tags
        if "mlflow.parentRunId" in tags or "rank" in tags:
            continue  # per-rank child runs
        name = r.info.run_name or r.info.run_id[:8]
        if r.info.status != "FINISHED":
            notes.append(f"MLflow run {name} left out (status {r.info.status})")
            continue
        params = {k: _param_value(v) for k, v in r.data.params.items()}
        history = {
            k: sorted(client.get_metric_history(r.info.run_id, k), key=lambda m: m.step)
            for k in ("train_time_s", "samples_per_s", "load_avg", "gpu_other_procs")
        }
        timed = {k: [m.value for m in (v[1:] if len(v) > 1 else v)] for k, v in history.items()}
        # The load of each timed epoch, matched by epoch (step) as epochs.csv's rows are: an epoch whose
        # load or GPU count was not a number has no value in MLflow, and is None here, as there.
        steps = [m.step for m in history["train_time_s"]]
        steps = steps[1:] if len(steps) > 1 else steps
        by_step = {k: {m.step: m.value for m in history[k]} for k in ("load_avg", "gpu_other_procs")}
        load = None
        if steps and history["load_avg"]:
            load = [epoch_load(by_step["load_avg"].get(e), by_step["gpu_other_procs"].get(e)) for e in steps]
        metrics = {k: v for k, v in r.data.metrics.items() if k not in PER_EPOCH}
        if "val_loss" in r.data.metrics:  # the latest value is the last epoch's: the final loss
            metrics["val_loss"] = r.data.metrics["val_loss"]
        for key in ("strategy", "nodes", "procs_per_node"):
            if f"train.{key}" in params:
                metrics[key] = params[f"train.{key}"]
        if "world_size" in metrics:
            metrics["world_size"] = int(metrics["world_size"])
        if "epoch_time_s_median" not in metrics and timed["train_time_s"]:
            metrics["epoch_time_s_median"] = _median(timed["train_time_s"])
        if timed["samples_per_s"]:
            metrics["samples_per_s"] = _median(timed["samples_per_s"])
        if metrics.get("epoch_time_s_median") is None:
            notes.append(f"MLflow run {name} left out (no epoch times)")
            continue
        runs.append(
            Run(
                name,
                "mlflow",
                metrics,
                params,
                timed["train_time_s"] or None,
                timed["samples_per_s"] or None,
                r.info.run_id,
                commit=tags.get("git.revision"),
                tags={k: tags[k] for k in ("machine", "device", "hosts", "code") if k in tags},
                epoch_load=load or None,
            )
        )
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in runs:  # the same name twice (re-run experiment): tell them apart
        if counts[r.name] > 1:
            r.name = f"{r.name} ({r.rev[:8]})"
    if names:
        runs = [r for r in runs if r.name in names or r.name.split(" (")[0] in names]
        if not runs:
            raise SourceError(f"no finished MLflow run named {', '.join(names)} in {experiment!r}")
    return runs, notes
