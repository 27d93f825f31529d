"""MLflow tracking: one run per experiment, named after the DVC experiment.

By default the runs go to a SQLite store in the main checkout
(``mlflow/mlflow.db``, git-ignored), which needs no server. Set
``MLFLOW_TRACKING_URI`` (and ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` for a
server with basic auth) to use a team server instead. Credentials are read by
MLflow from the environment and never written by us anywhere. A user name or
password inside ``MLFLOW_TRACKING_URI`` is refused (:func:`check_tracking_uri`):
MLflow prints that URI in its ``View run ... at:`` lines, which end up in the
stage logs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

from virgo_exps.config import ConfigError
from virgo_exps.gitrun import git
from virgo_exps.paths import experiment_name, main_checkout

EXPERIMENT = os.environ.get("VIRGO_MLFLOW_EXPERIMENT", "virgo-exps")


def default_tracking_uri() -> str:
    store = main_checkout() / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _userinfo(uri: str) -> tuple[str, str, str] | None:
    """(scheme://, user:password, the rest) of a URI whose address holds credentials, else None.

    Everything up to the last '@' counts: a password typed without percent-encoding
    may itself contain '@', '/', '?' or '#'. URIs without an address (``sqlite:///``,
    ``file:///``) have none.
    """
    if "://" not in uri:
        return None
    scheme, rest = uri.split("://", 1)
    if rest.startswith("/") or "@" not in rest:
        return None
    user, host = rest.rsplit("@", 1)
    return f"{scheme}://", user, host


def redact(uri: str) -> str:
    """A URI safe to print: user:password@ replaced by ***@."""
    parts = _userinfo(uri)
    return f"{parts[0]}***@{parts[2]}" if parts else uri


def check_tracking_uri(uri: str | None = None) -> None:
    """Refuse credentials inside the tracking URI (``MLFLOW_TRACKING_URI`` by default).

    MLflow prints the tracking URI in its own ``View run ... at: <uri>`` lines,
    which the launcher copies into ``logs/<stage>/*.out``; a password there
    would be in every log. Credentials belong in MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD, which MLflow reads and nothing prints.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "") if uri is None else uri
    if _userinfo(uri) is None:
        return
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        what = (
            "set MLFLOW_TRACKING_URI to the address alone and the credentials in MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD"
        )
    else:
        what = (
            "set MLFLOW_TRACKING_URI without them and give the password the database client's own way "
            "(for PostgreSQL: ~/.pgpass or PGPASSWORD)"
        )
    raise ConfigError(
        f"MLFLOW_TRACKING_URI: holds a user name or password ({redact(uri)}), which MLflow would print "
        f"into the training logs; {what}"
    )


def git_revision(cwd: Path | None = None) -> str:
    rev = os.environ.get("DVC_EXP_BASELINE_REV")
    try:
        out = git(cwd, "rev-parse", "HEAD", check=False, timeout=10)
        if out.returncode == 0:
            rev = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return rev or "unknown"


class TrackingError(RuntimeError):
    """The tracking store cannot be used (bad credentials, unreachable server)."""


class Tracker:
    """Thin wrapper so the trainer does not import MLflow on every rank."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.run = None
        self._mlflow = None

    def start(self, params: dict[str, Any], tags: dict[str, str], artifacts: list[Path]) -> None:
        if not self.enabled:
            return
        check_tracking_uri()
        import mlflow
        from mlflow.exceptions import MlflowException

        self._mlflow = mlflow
        # Decide before set_tracking_uri(), which exports MLFLOW_TRACKING_URI itself.
        local_store = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = tracking_uri()
        mlflow.set_tracking_uri(uri)
        artifact_location = None
        if local_store:
            artifact_location = (main_checkout() / "mlflow" / "artifacts").as_uri()
        try:
            if mlflow.get_experiment_by_name(EXPERIMENT) is None:
                mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_location)
        except MlflowException as exc:
            text = str(exc)
            if "401" in text or "Unauthorized" in text or "403" in text:
                raise TrackingError(
                    f"MLflow server {redact(uri)} refused the credentials: check MLFLOW_TRACKING_USERNAME "
                    "and MLFLOW_TRACKING_PASSWORD (or unset MLFLOW_TRACKING_URI for the local store)"
                ) from None
            raise TrackingError(f"MLflow tracking at {redact(uri)} failed: {text.splitlines()[0][:300]}") from None
        mlflow.set_experiment(EXPERIMENT)
        name = experiment_name()
        # MLflow's system metrics (CPU, memory, disk, network; GPU with NVML) sampled every 10 s
        # (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) while the run trains; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false
        # turns them off.
        system = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() not in ("false", "0")
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start and stop lines
        self.run = mlflow.start_run(run_name=name, log_system_metrics=system)
        mlflow.set_tags({"dvc.experiment": name, "git.revision": git_revision(), **tags})
        mlflow.log_params(params)
        for path in artifacts:
            if Path(path).exists():
                mlflow.log_artifact(str(path))
        print(f"mlflow: run {self.run.info.run_id} ({name}) in {redact(uri)}", file=sys.stderr)

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id while it is open (run.json keeps it: the link from a result to its run)."""
        return self.run.info.run_id if self.run is not None else None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is not None:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)

    def log_rank_runs(self, per_rank: list[dict[str, float]]) -> None:
        """One nested run per rank, tagged with its rank, for per-rank figures."""
        if self.run is None:
            return
        for rank, metrics in enumerate(per_rank):
            with self._mlflow.start_run(run_name=f"{experiment_name()}-rank{rank}", nested=True):
                self._mlflow.set_tag("rank", str(rank))
                self.log_metrics(metrics)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self.run is not None and Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=folder)

    def register_model(self, folder: str = "model") -> None:
        """The run's model artifact (``folder``) as a new version of the registered model named after the
        MLflow experiment, tagged with the DVC experiment; a store without a model registry says so in one
        line and the run goes on (its model stays an artifact of the run)."""
        if self.run is None:
            return
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        try:
            try:
                client.get_registered_model(EXPERIMENT)
            except MlflowException:
                client.create_registered_model(EXPERIMENT, description="models trained by virgo-exps' train stage")
            version = client.create_model_version(
                EXPERIMENT,
                source=f"{self.run.info.artifact_uri}/{folder}",
                run_id=self.run.info.run_id,
                tags={"dvc.experiment": experiment_name()},
            )
        except MlflowException as exc:
            print(f"mlflow: the model is not registered ({str(exc).splitlines()[0][:200]})", file=sys.stderr)
            return
        print(f"mlflow: model registered as {EXPERIMENT} version {version.version}", file=sys.stderr)

    def log_dataset(self, path: Path, digest: str) -> None:
        """The training data as the run's dataset input (context ``training``): its path, and its digest,
        the one of metrics.json's provenance (the data store's own stamp)."""
        if self.run is None:
            return
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # a local path reads as a local artifact source more than one way
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(path).resolve()))
        self._mlflow.log_input(MetaDataset(source, name=str(path), digest=digest), context="training")

    def end(self, status: str = "FINISHED") -> None:
        if self.run is not None:
            self._mlflow.end_run(status=status)
            self.run = None
