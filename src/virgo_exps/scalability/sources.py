"""Where the scalability report gets its experiments from.

Four sources, each giving a list of :class:`Run` (one finished training run)
and a list of notes about what was left out and why:

- :func:`load_dvc`: the experiments of the current baseline in ``dvc exp show
  --json`` (plus the workspace and the baseline commit when they carry metrics
  that no experiment already has), optionally only some of them by name;
- :func:`load_mlflow`: the finished top-level runs of an MLflow experiment
  (teammates' runs on a shared server included);
- :func:`load_files`: ``metrics.json`` files or folders holding them.

Per-epoch training times (for the spread when a configuration ran only once)
come from ``epochs.csv``: the experiment's commit for DVC (read with ``git
show``, which changes nothing), the file beside ``metrics.json`` for files,
the metric history for MLflow. The first epoch is warm-up and never counted.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virgo_exps import dvcrun
from virgo_exps.config import DamagedInputError
from virgo_exps.paths import EPOCHS_FILE, METRICS_FILE, MODEL_FILE, run_file
from virgo_exps.provenance import read_metrics
from virgo_exps.records import merge

SOFTWARE_FILE = "version.lock"
# An epoch timed while the host's load per core (load_avg in epochs.csv: mean
# runnable tasks per core over the epoch) exceeded this shared the CPUs with
# other work: its time is not the run's own. A run keeps its cores busy (about
# 1.0); a quarter more is someone else. An epoch during which another job's
# process ran on a rank's GPU (gpu_other_procs > 0) is not the run's own
# either: its load is read as infinite.
LOAD_LIMIT = 1.25
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


def epoch_load(load: float | None, gpu_others: float | None) -> float | None:
    """The load an epoch is judged by: the host's load per core, or infinite when the GPU was shared."""
    if gpu_others is not None and gpu_others > 0:
        return math.inf
    return load


class SourceError(RuntimeError):
    """A source cannot be read at all (no DVC repository, unknown experiment, ...)."""


@dataclass
class Run:
    """One finished training run, whatever it was read from."""

    name: str
    source: str  # experiment | workspace | commit | mlflow | file
    metrics: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)  # flat: {"train.seed": 0, ...}
    epoch_times: list[float] | None = None  # timed epochs only (warm-up epoch dropped)
    epoch_throughput: list[float] | None = None
    rev: str | None = None
    # Content hashes where the source has them (path -> hash): the train
    # stage's inputs (version.lock, the data) and outputs (the model).
    deps: dict[str, str] = field(default_factory=dict)
    outs: dict[str, str] = field(default_factory=dict)
    commit: str | None = None  # the git commit the run was made from (DVC baseline, MLflow tag)
    tags: dict[str, str] = field(default_factory=dict)
    epoch_load: list[float | None] | None = None  # host load / cores of the timed epochs, where recorded

    def __post_init__(self) -> None:
        # A finished run continued with more epochs records its parent's epochs too (the curves); its
        # timing is its own: from metrics' first_timed_epoch on (the lists start at epoch 2).
        first = _number(self.metrics.get("first_timed_epoch"))
        skip = int(first) - 2 if first is not None and first > 2 else 0
        if skip:
            for name in ("epoch_times", "epoch_throughput", "epoch_load"):
                values = getattr(self, name)
                if values is not None and len(values) > skip:
                    setattr(self, name, values[skip:])

    def _value(self, metric: str, param: str, default=None):
        v = self.metrics.get(metric)
        return v if v is not None else self.params.get(param, default)

    @property
    def strategy(self) -> str:
        return str(self._value("strategy", "train.strategy", "unknown"))

    @property
    def nodes(self) -> int:
        return int(self._value("nodes", "train.nodes", 1))

    @property
    def procs_per_node(self) -> int:
        return int(self._value("procs_per_node", "train.procs_per_node", 1))

    @property
    def world_size(self) -> int:
        w = self.metrics.get("world_size")
        return int(w) if w is not None else self.nodes * self.procs_per_node

    def _text(self, metric: str, tag: str) -> str | None:
        v = self.metrics.get(metric)
        if v is None:
            v = self.tags.get(tag)
        return None if v is None or v == "" else str(v)

    @property
    def machine(self) -> str | None:
        return self._text("machine", "machine")

    @property
    def device(self) -> str | None:
        return self._text("device", "device")

    @property
    def software(self) -> str | None:
        """Hash of version.lock (what changes results in the environment), where known."""
        return self.deps.get(SOFTWARE_FILE)

    @property
    def code(self) -> str | None:
        """Digest of the train stage's code (metrics.json's provenance, or the MLflow run's tag), where known."""
        stamp = self.metrics.get("provenance")
        v = stamp.get("code") if isinstance(stamp, dict) else None
        return v or self.tags.get("code") or None

    @property
    def data(self) -> str | None:
        """Digest of the training data (metrics.json's provenance: the data store's own stamp), where known."""
        stamp = self.metrics.get("provenance")
        v = stamp.get("data") if isinstance(stamp, dict) else None
        return v or self.tags.get("data") or None

    @property
    def model_hash(self) -> str | None:
        return self.outs.get(MODEL_FILE)

    @property
    def contaminated(self) -> list[int]:
        """Indices (into the timed epochs) of epochs timed while the host was loaded beyond its cores."""
        if not self.epoch_load or not self.epoch_times or len(self.epoch_load) != len(self.epoch_times):
            return []
        return [i for i, v in enumerate(self.epoch_load) if v is not None and v > LOAD_LIMIT]

    @property
    def excluded(self) -> list[int]:
        """The contaminated epochs that are left out: all of them, unless no epoch would remain."""
        bad = self.contaminated
        return bad if len(bad) < len(self.epoch_times or []) else []

    def _clean(self, values: list[float] | None) -> list[float] | None:
        bad = set(self.excluded)
        if not bad or not values or len(values) != len(self.epoch_times or []):
            return values
        return [v for i, v in enumerate(values) if i not in bad]

    @property
    def clean_epoch_times(self) -> list[float] | None:
        return self._clean(self.epoch_times)

    @property
    def clean_epoch_throughput(self) -> list[float] | None:
        return self._clean(self.epoch_throughput)

    @property
    def epoch_time(self) -> float | None:
        """Median time of the timed epochs; epochs timed under foreign load are left out when others remain."""
        if self.excluded:
            return float(_median(self.clean_epoch_times))
        v = _number(self.metrics.get("epoch_time_s_median"))
        if v is None and self.epoch_times:
            v = float(_median(self.epoch_times))
        return v

    @property
    def throughput(self) -> float | None:
        clean = self.clean_epoch_throughput
        if self.excluded and clean:
            return float(_median(clean))
        v = _number(self.metrics.get("samples_per_s"))
        if v is None and self.epoch_throughput:
            v = float(_median(self.epoch_throughput))
        return v


def _number(v) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 0}} -> {"train.seed": 0}."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def parse_epochs_csv(text: str) -> tuple[list[float] | None, list[float] | None, list[float | None] | None]:
    """Training time, throughput and host load of the timed epochs (all but the first) from epochs.csv text.

    The load (``load_avg``: runnable tasks per core over the epoch; infinite when
    ``gpu_other_procs`` says another job used the GPU) is None when the file has
    no such column (older runs)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    rows.sort(key=lambda r: int(float(r.get("epoch") or 0)))
    timed = rows[1:] if len(rows) > 1 else rows

    def column(name):
        vals = [_number(r.get(name)) for r in timed]
        vals = [v for v in vals if v is not None]
        return vals or None

    times = column("train_time_s")
    load = None
    if times and rows and "load_avg" in rows[0] and all(_number(r.get("train_time_s")) is not None for r in timed):
        load = [epoch_load(_number(r.get("load_avg")), _number(r.get("gpu_other_procs"))) for r in timed]
    return times, column("samples_per_s"), load


# -- DVC ---------------------------------------------------------------------


def _metrics_of(data: dict) -> dict | None:
    """The run's record out of ``dvc exp show``: metrics.json's measures with run.json's description (shown
    by DVC as params of the report stage)."""
    for path, entry in (data.get("metrics") or {}).items():
        values = (entry or {}).get("data")
        if (
            path.endswith("metrics.json")
            and isinstance(values, dict)
            and ("epoch_time_s_median" in values or "world_size" in values)
        ):
            described = ((data.get("params") or {}).get(str(run_file(path))) or {}).get("data")
            return merge(values, described) if isinstance(described, dict) else values
    return None


def _params_of(data: dict) -> dict:
    entry = (data.get("params") or {}).get("params.yaml") or {}
    return flatten(entry.get("data") or {})


NO_EPOCHS = (None, None, None)


def _git_epochs(repo: Path, rev: str) -> tuple:
    try:
        proc = subprocess.run(
            ["git", "show", f"{rev}:./{EPOCHS_FILE}"], cwd=repo, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return NO_EPOCHS
    return parse_epochs_csv(proc.stdout) if proc.returncode == 0 else NO_EPOCHS


def _file_epochs(path: Path) -> tuple:
    return parse_epochs_csv(path.read_text()) if path.is_file() else NO_EPOCHS


def _hashes(entries: dict | None) -> dict[str, str]:
    """{path: hash} out of the deps/outs of ``dvc exp show --json``."""
    out = {}
    for path, entry in (entries or {}).items():
        h = (entry or {}).get("hash") if isinstance(entry, dict) else None
        if h:
            out[path] = str(h)
    return out


def parse_exp_show(shown: list[dict], repo: Path | None = None) -> tuple[list[Run], list[str]]:
    """Runs out of ``dvc exp show --json`` (DVC 3): experiments first, then the workspace and the baseline
    commits when they carry results. Duplicates (the workspace after ``dvc exp run`` holds the last
    experiment's results) are removed later, by :func:`virgo_exps.scalability.groups.dedupe`."""
    runs: list[Run] = []
    times: list[str] = []
    extra: list[Run] = []
    notes: list[str] = []
    head = next((e.get("rev") for e in shown if e.get("rev") not in (None, "workspace")), None)
    for entry in shown:
        rev = entry.get("rev")
        data = entry.get("data") or {}
        if rev == "workspace":
            metrics = _metrics_of(data)
            if metrics is not None:
                t, s, load = _file_epochs(repo / EPOCHS_FILE) if repo else NO_EPOCHS
                extra.append(
                    Run(
                        "workspace",
                        "workspace",
                        metrics,
                        _params_of(data),
                        t,
                        s,
                        None,
                        _hashes(data.get("deps")),
                        _hashes(data.get("outs")),
                        head,
                        epoch_load=load,
                    )
                )
            continue
        metrics = _metrics_of(data)
        if metrics is not None:
            t, s, load = _git_epochs(repo, rev) if repo else NO_EPOCHS
            extra.append(
                Run(
                    entry.get("name") or str(rev)[:7],
                    "commit",
                    metrics,
                    _params_of(data),
                    t,
                    s,
                    rev,
                    _hashes(data.get("deps")),
                    _hashes(data.get("outs")),
                    rev,
                    epoch_load=load,
                )
            )
        for exp in entry.get("experiments") or []:
            revs = exp.get("revs") or []
            if not revs:
                continue
            tip = revs[0]
            name = exp.get("name") or tip.get("name") or str(tip.get("rev"))[:7]
            state = (exp.get("executor") or {}).get("state")
            tip_data = tip.get("data") or {}
            metrics = _metrics_of(tip_data)
            if state in ("queued", "running", "failed") or tip.get("error") or metrics is None:
                why = state or (
                    "error: " + str((tip.get("error") or {}).get("msg", ""))[:80]
                    if tip.get("error")
                    else "no results/metrics.json"
                )
                notes.append(f"experiment {name} left out ({why})")
                continue
            t, s, load = _git_epochs(repo, tip["rev"]) if repo else NO_EPOCHS
            times.append(str(tip_data.get("timestamp") or ""))
            runs.append(
                Run(
                    name,
                    "experiment",
                    metrics,
                    _params_of(tip_data),
                    t,
                    s,
                    tip.get("rev"),
                    _hashes(tip_data.get("deps")),
                    _hashes(tip_data.get("outs")),
                    rev,
                    epoch_load=load,
                )
            )
    # Oldest first, so that of two experiments with the same result the one that trained is kept.
    stamp = {id(r): t for r, t in zip(runs, times)}
    runs.sort(key=lambda r: stamp[id(r)] or "")
    return runs + extra, notes


def load_dvc(
    repo: str | os.PathLike = ".", names: list[str] | None = None, all_commits: bool = False
) -> tuple[list[Run], list[str]]:
    repo = Path(repo)
    try:
        proc = dvcrun.run(["exp", "show", "--json"] + (["--all-commits"] if all_commits else []), repo)
    except dvcrun.DvcError as exc:
        raise SourceError(str(exc)) from None
    try:
        shown = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise SourceError("`dvc exp show --json` did not print JSON") from None
    runs, notes = parse_exp_show(shown, repo)
    if names:
        missing = [n for n in names if n not in {r.name for r in runs}]
        if missing:
            known = ", ".join(sorted(r.name for r in runs)) or "none"
            raise SourceError(f"no finished experiment named {', '.join(missing)} (available: {known})")
        runs = [r for r in runs if r.name in names]
        notes = [n for n in notes if any(f"experiment {x} " in n for x in names)]
    return runs, notes


# -- MLflow ------------------------------------------------------------------


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
    from virgo_exps.paths import main_checkout

    db = main_checkout() / "mlflow" / "mlflow.db"
    if not db.exists():
        raise SourceError(f"no local MLflow store at {db}; set MLFLOW_TRACKING_URI for a server")
    return f"sqlite:///{db}"


def load_mlflow(
    experiment: str | None = None, tracking_uri: str | None = None, names: list[str] | None = None
) -> tuple[list[Run], list[str]]:
    from mlflow.tracking import MlflowClient

    from virgo_exps.train.tracking import EXPERIMENT, redact

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


# -- files -------------------------------------------------------------------


def _metrics_files(paths: list[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            direct = [c for c in (p / "metrics.json", p / METRICS_FILE) if c.is_file()]
            files.extend(direct[:1] or sorted(p.rglob("metrics.json")))
        else:
            raise SourceError(f"{p}: no such file or directory")
    return list(dict.fromkeys(f.resolve() for f in files))


def _run_dir(f: Path) -> Path:
    return f.parent.parent if f.parent.name == "results" else f.parent


def _lock_hashes(d: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Hashes of the train stage's deps and outs from a dvc.lock in the run folder, and of a version.lock
    there (its content decides, as DVC's own hash would)."""
    import hashlib

    import yaml

    deps: dict[str, str] = {}
    outs: dict[str, str] = {}
    lock = d / "dvc.lock"
    if lock.is_file():
        try:
            stage = ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).get("train") or {}
        except yaml.YAMLError:
            stage = {}
        for key, target in (("deps", deps), ("outs", outs)):
            for entry in stage.get(key) or []:
                h = entry.get("md5") or entry.get("hash") if isinstance(entry, dict) else None
                if isinstance(entry, dict) and entry.get("path") and h and h != "md5":
                    target[str(entry["path"])] = str(h)
    version = d / SOFTWARE_FILE
    if version.is_file():
        deps.setdefault(SOFTWARE_FILE, hashlib.md5(version.read_bytes()).hexdigest())
    return deps, outs


def load_files(paths: list[str | os.PathLike]) -> tuple[list[Run], list[str]]:
    """metrics.json files (or folders searched for them), with epochs.csv and params.yaml nearby if present."""
    import yaml

    files = _metrics_files(paths)
    if not files:
        raise SourceError("no metrics.json in " + ", ".join(map(str, paths)))
    dirs = [_run_dir(f) for f in files]
    common = Path(os.path.commonpath([str(d) for d in dirs])) if len(dirs) > 1 else dirs[0].parent
    runs, notes = [], []
    for f, d in zip(files, dirs):
        name = str(d.relative_to(common)) if d != common else d.name
        try:
            metrics = read_metrics(f)  # with run.json beside it
        except DamagedInputError as exc:
            notes.append(f"{f} left out ({str(exc).split('; ')[0]})")
            continue
        params = {}
        for candidate in (f.parent / "params.yaml", d / "params.yaml"):
            if candidate.is_file():
                params = flatten(yaml.safe_load(candidate.read_text()) or {})
                break
        t, s, load = _file_epochs(f.parent / "epochs.csv")
        deps, outs = _lock_hashes(d)
        runs.append(Run(name, "file", metrics, params, t, s, None, deps, outs, epoch_load=load))
    return runs, notes
