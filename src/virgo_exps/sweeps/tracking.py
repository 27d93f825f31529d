"""One MLflow store per team store: every trial of every sweep side by side.

Each trial trains in its own clone (``<store>/sweeps/<name>/work/<trial>/``) and logs into that clone's
SQLite store, as any run does. Those stores are merged, by ``sweep status`` and ``sweep page``, into
the team store's own, ``<store>/mlflow/mlflow.db``, one MLflow experiment per sweep
(``sweep-<name>``): one run per trial, its last attempt that ended (a requeued trial's earlier attempts are
in it: it logs the epochs it resumed from), with its params, tags, every metric's history (the curves), its
artifacts (copied into the team store's ``mlflow/artifacts/<sweep>/``), its dataset input and its
status, tagged with the sweep and the trial. Each run is merged once (the tag ``virgo.source`` names where
it came from); an earlier attempt merged before the trial's last one ended is deleted then.

Why merge rather than let the array's tasks write one SQLite file: tasks on several nodes would write it
at once over the shared file system, and SQLite's locking is not safe on NFS and the like. Here one
process writes the team store at a time, under a lock file next to it, from the login node; `mlflow ui
--backend-store-uri sqlite:///<store>/mlflow/mlflow.db` reads it. A team that runs an MLflow server
sets ``MLFLOW_TRACKING_URI`` instead, and every trial logs to the server directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import urllib.parse
from pathlib import Path
from typing import Any

from virgo_exps.experiments.teamstore import make_group_tree

STORE_DIR = "mlflow"
SOURCE_TAG = "virgo.source"


def store_uri(store_root: Path) -> str:
    return f"sqlite:///{Path(store_root) / STORE_DIR / 'mlflow.db'}"


def experiment_of(sweep: str) -> str:
    return f"sweep-{sweep}"


@contextlib.contextmanager
def _merge_lock(folder: Path):
    fd = os.open(folder / ".merge.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o660)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _group_umask():
    old = os.umask(0o007)  # what we write in the team store is the group's too
    try:
        yield
    finally:
        os.umask(old)


def _copy_run(src, target, run, experiment_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    new = target.create_run(
        experiment_id,
        start_time=run.info.start_time,
        tags={**{k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.log-model")}, **tags},
        run_name=run.info.run_name,
    )
    run_id = new.info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), 100):
        target.log_batch(run_id, params=params[i : i + 100])
    metrics: list[Metric] = []
    for key in run.data.metrics:
        metrics += [Metric(m.key, m.value, m.timestamp, m.step) for m in src.get_metric_history(run.info.run_id, key)]
    for i in range(0, len(metrics), 1000):
        target.log_batch(run_id, metrics=metrics[i : i + 1000])
    target.log_batch(run_id, tags=[RunTag(SOURCE_TAG, tags[SOURCE_TAG])])
    # The artifacts (the model, metrics.json, ...) copied into the team store, where a teammate opens them;
    # the trial's clone is the sweep's working space. The dataset input as it was.
    artifacts = _local_path(run.info.artifact_uri)
    if artifacts is not None and artifacts.is_dir() and any(artifacts.iterdir()):
        target.log_artifacts(run_id, str(artifacts))
    if run.inputs is not None and run.inputs.dataset_inputs:
        target.log_inputs(run_id, datasets=list(run.inputs.dataset_inputs))
    target.set_terminated(run_id, status=run.info.status, end_time=run.info.end_time)


def _local_path(uri: str | None) -> Path | None:
    """The folder of a ``file:`` (or plain path) artifact URI; None for a remote one."""
    if not uri:
        return None
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("", "file"):
        return Path(urllib.parse.unquote(parts.path))
    return None


def _last_attempt(src) -> Any:
    """The trial's run to show: the last attempt that ended (a requeued trial starts a run per attempt, and the
    last one logs the epochs of the attempts before it as well); the per-rank runs and a running attempt never.
    """
    ended = [
        run
        for e in src.search_experiments()
        for run in src.search_runs([e.experiment_id], filter_string="attributes.status != 'RUNNING'")
        if "mlflow.parentRunId" not in run.data.tags  # the per-rank runs: their figures are in ranks.json
    ]
    return max(ended, key=lambda r: r.info.start_time or 0, default=None)


def merge_trials(sweep_dir: Path, sweep: str, trials: dict[str, Any], group: str | None) -> tuple[int, str] | None:
    """Merge the finished trial runs of the sweep in ``sweep_dir`` into its team store's MLflow store;
    ``trials`` maps each trial's experiment name to its trial number. Return (runs merged now, the
    store's URI), or None when no trial has a store yet."""
    sweep_dir = Path(sweep_dir)
    sources = sorted((sweep_dir / "work").glob(f"*/{STORE_DIR}/mlflow.db"))
    if not sources:
        return None
    from mlflow.tracking import MlflowClient

    store_root = sweep_dir.parent.parent
    folder = store_root / STORE_DIR
    with _group_umask():
        if group:
            make_group_tree(store_root, folder, group)
        folder.mkdir(exist_ok=True)
        uri = store_uri(store_root)
        merged = 0
        with _merge_lock(folder):
            target = MlflowClient(tracking_uri=uri)
            name = experiment_of(sweep)
            exp = target.get_experiment_by_name(name)
            exp_id = (
                exp.experiment_id
                if exp is not None
                else target.create_experiment(name, artifact_location=(folder / "artifacts" / sweep).as_uri())
            )
            held = target.search_runs([exp_id], max_results=50000)
            done = {r.data.tags.get(SOURCE_TAG) for r in held}
            for db in sources:
                clone = db.parent.parent.name
                src = MlflowClient(tracking_uri=f"sqlite:///{db}")
                run = _last_attempt(src)
                if run is None:
                    continue
                source = f"{clone}:{run.info.run_id}"
                if source in done:
                    continue
                for earlier in held:  # an earlier attempt of the trial, merged before this one ended
                    if earlier.data.tags.get("dvc.experiment") == clone:
                        target.delete_run(earlier.info.run_id)
                tags = {SOURCE_TAG: source, "sweep": sweep, "dvc.experiment": clone}
                number = trials.get(clone)
                if number is None and clone.startswith(f"{sweep}-") and clone[len(sweep) + 1 :].isdigit():
                    number = int(clone[len(sweep) + 1 :])  # the trial's experiment name (spec.trial_name)
                if number is not None:
                    tags["trial"] = str(number)
                _copy_run(src, target, run, exp_id, tags)
                done.add(source)
                merged += 1
        db_file = folder / "mlflow.db"
        with contextlib.suppress(OSError):
            if db_file.stat().st_uid == os.getuid():
                os.chmod(db_file, 0o660)
    return merged, uri


__all__ = ["experiment_of", "merge_trials", "store_uri"]
