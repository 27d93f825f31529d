"""One finished training run as the scalability report reads it, and the per-epoch figures it is judged by.

Every source (:mod:`virgo_exps.scalability.sources`, :mod:`virgo_exps.scalability.mlflow_source`) gives
:class:`Run` records. A run's epoch time and throughput are medians over its timed epochs: the first epoch
is warm-up and never counted, and epochs timed while other work competed for the host's CPUs or the GPU
(:data:`LOAD_LIMIT`, :func:`epoch_load`) are left out when others remain. :func:`parse_epochs_csv` reads
those figures from ``epochs.csv``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

from virgo_exps.paths import MODEL_FILE

SOFTWARE_FILE = "version.lock"
# An epoch timed while the host's load per core (load_avg in epochs.csv: mean
# runnable tasks per core over the epoch) exceeded this shared the CPUs with
# other work: its time is not the run's own. A run keeps its cores busy (about
# 1.0); a quarter more is someone else. An epoch during which another job's
# process ran on a rank's GPU (gpu_other_procs > 0) is not the run's own
# either: its load is read as infinite.
LOAD_LIMIT = 1.25


def epoch_load(load: float | None, gpu_others: float | None) -> float | None:
    """The load an epoch is judged by: the host's load per core, or infinite when the GPU was shared."""
    if gpu_others is not None and gpu_others > 0:
        return math.inf
    return load


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
