"""Which runs of the scalability report may be pooled, and which result is the same result twice.

Two runs are repeats of one configuration only when everything but the
seed is equal: every parameter except the resources that form the scaling
axis (``train.nodes``, ``train.procs_per_node``; ``train.global_batch_size``
too when it grows with the world size, i.e. weak scaling), plus the
machine, the device, the software (hash of ``version.lock``), the code
that trained (the train stage's code digest) and the data (hash of the
training data). A value a source does not know (no data hash
from MLflow, say) is the same unknown for every run of that source.

A *group* is the set of world sizes of one such configuration: a line in
the figures, the rows of one series in the table, and its own speedup
baseline. Groups are labelled by what differs between them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from virgo_exps.config import data_sections
from virgo_exps.scalability.runs import Run

SEED_KEYS = frozenset({"train.seed"})
AXIS_KEYS = frozenset({"train.nodes", "train.procs_per_node"})
STRATEGY_KEY = "train.strategy"  # the first part of every group's configuration as "strategy"
BATCH_KEY = "train.global_batch_size"
# Settings the training result cannot depend on: how often a job may be
# requeued, the title of the per-experiment report.
NEUTRAL_KEYS = frozenset({"train.max_requeues", "report.title"})
# Parameters of the data stages (the study's data sections, virgo_exps.config.data_sections): when the
# data's hash is known it says whether the data are the same (worker counts and batch sizes of
# preprocessing do not change it); when it is not, the parameters themselves must agree.
CONTEXT = ("machine", "device", "software", "code", "data")
UNKNOWN = "unknown"


def _text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def _short(key: str) -> str:
    return key.split(".", 1)[1] if key.startswith("train.") else key


def _short_hash(h: str | None) -> str:
    return UNKNOWN if not h else h.split(".")[0][:8]


def configuration(run: Run) -> dict[str, str]:
    """What must be equal for two runs to be pooled (scaling axis and seed excluded), as text."""
    data_known = run.data is not None
    data_keys = tuple(f"{name}." for name in data_sections())
    cfg = {"strategy": run.strategy}
    for k in sorted(run.params):
        if k in SEED_KEYS or k in AXIS_KEYS or k in NEUTRAL_KEYS or k == STRATEGY_KEY or k.startswith("report."):
            continue
        if data_known and data_keys and k.startswith(data_keys):
            continue
        cfg[k] = _text(run.params[k])
    cfg["machine"] = run.machine or UNKNOWN
    cfg["device"] = run.device or UNKNOWN
    cfg["software"] = _short_hash(run.software)
    cfg["code"] = _short_hash(run.code)
    cfg["data"] = _short_hash(run.data)
    return cfg


@dataclass
class Grouping:
    """The outcome of :func:`assign`: a group key and label per run, and what the groups differ in."""

    key: dict[int, tuple]  # id(run) -> group key
    label: dict[tuple, str]  # group key -> label ("ddp, lr=0.001, machine=cluster")
    scaling: dict[tuple, str]  # group key -> "strong (global batch 8)" / "weak (4 per process)"
    config: dict[tuple, dict[str, str]]  # group key -> its configuration (without the scaling axis)
    split_on: dict[str, list[str]] = field(default_factory=dict)  # key -> its values across groups
    in_label: list[str] = field(default_factory=list)  # the keys of split_on that labels name

    def of(self, run: Run) -> tuple:
        return self.key[id(run)]


def _order(text: str):
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _batch(run: Run):
    v = run.params.get(BATCH_KEY)
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def assign(runs: list[Run]) -> Grouping:
    """Group runs that differ only in seed and scaling axis; name each group by what sets it apart."""
    base: dict[tuple, list[Run]] = {}
    configs: dict[int, dict[str, str]] = {}
    for r in runs:
        cfg = configuration(r)
        configs[id(r)] = cfg
        base.setdefault(tuple((k, v) for k, v in cfg.items() if k != BATCH_KEY), []).append(r)

    keys: dict[int, tuple] = {}
    scaling: dict[tuple, str] = {}
    config: dict[tuple, dict[str, str]] = {}
    for bkey, members in base.items():
        batches = {_batch(r) for r in members}
        per_proc = {(_batch(r) / r.world_size) if _batch(r) is not None else None for r in members}
        weak = len(batches) > 1 and len(per_proc) == 1 and None not in per_proc
        for r in members:
            if weak:
                value = f"{next(iter(per_proc)):g} per process"
                mode = f"weak (global batch grows: {value})"
            else:
                b = _batch(r)
                value = UNKNOWN if b is None else f"{b:g}"
                mode = "strong (fixed global batch)" if b is None else f"strong (fixed global batch {b:g})"
            key = bkey + ((BATCH_KEY, value),)
            keys[id(r)] = key
            scaling[key] = mode
            config[key] = {**dict(bkey), BATCH_KEY: value}

    # Label each group by the keys whose values differ between groups.
    all_keys = list(dict.fromkeys(k for cfg in config.values() for k in cfg))
    split_on = {}
    for k in all_keys:
        values = sorted({cfg.get(k, "-") for cfg in config.values()}, key=_order)
        if len(values) > 1:
            split_on[k] = values
    # Labels name the keys that tell groups of one strategy apart; a key that only ever differs together
    # with the strategy (the software when only Horovod's runs list Horovod, a reference run of
    # another strategy on another machine) is in split_on and the table, not in every label.
    by_strategy: dict[str, list[dict[str, str]]] = {}
    for cfg in config.values():
        by_strategy.setdefault(cfg["strategy"], []).append(cfg)
    in_label = [
        k
        for k in split_on
        if k != "strategy" and any(len({c.get(k, "-") for c in cfgs}) > 1 for cfgs in by_strategy.values())
    ]
    labels = {}
    for key, cfg in config.items():
        labels[key] = ", ".join([cfg["strategy"]] + [f"{_short(k)}={cfg.get(k, '-')}" for k in in_label])
    return Grouping(keys, labels, scaling, config, {k: v for k, v in split_on.items() if k != "strategy"}, in_label)


def identity(run: Run) -> tuple:
    """Runs with equal identity are the same result: same params (seed included) and identical outputs
    (the metrics file's content and, where known, the model's hash)."""
    return (
        json.dumps(run.params, sort_keys=True, default=str),
        json.dumps(run.metrics, sort_keys=True, default=str),
        run.model_hash,
    )


def dedupe(runs: list[Run]) -> tuple[list[Run], dict[str, str]]:
    """Each result once: a run with the commit of an earlier one, or its params and outputs, is dropped.

    Returns the kept runs and {dropped name: kept name}."""
    kept: list[Run] = []
    by_rev: dict[str, Run] = {}
    by_identity: dict[tuple, Run] = {}
    dropped: dict[str, str] = {}
    for r in runs:
        first = (by_rev.get(r.rev) if r.rev else None) or by_identity.get(identity(r))
        if first is not None:
            dropped[r.name] = first.name
            continue
        kept.append(r)
        if r.rev:
            by_rev[r.rev] = r
        by_identity[identity(r)] = r
    return kept, dropped
