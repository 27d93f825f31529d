"""The cross-experiment scalability report's numbers: :func:`summarize` turns runs into a :class:`Report`.

Runs (see :mod:`virgo_exps.scalability.runs`) are counted once per result
and pooled only when everything but the seed is equal (see
:mod:`virgo_exps.scalability.groups`: all parameters but the scaling axis,
plus machine, device, software and data). Each such group is a series of
world sizes (nodes x processes per node). For each world size of a group:

- epoch time: the median over runs of each run's median training time per
  epoch, where a run's epochs exclude the first (warm-up) epoch, validation
  and epochs timed while the host was loaded beyond its cores (where the
  load was recorded);
- spread: with two or more runs (other seeds) min/max and quartiles over
  those runs; with one run, over its timed epochs (epoch-to-epoch noise
  only); the ``spread_over`` column says which;
- throughput (samples/s), the same way;
- speedup against the smallest world size OF THE SAME GROUP (the
  ``baseline`` column names it; a group without a one-process run says so),
  with a conservative range from the extremes of both; parallel efficiency =
  speedup / (world / baseline world); ``speedup_vs_single`` against the
  one-process ``single`` run of an otherwise equal configuration;
- computation fraction with the seconds per epoch it stands for, final
  validation loss, GPU utilisation and energy where they were measured;
- cost (train/cost.py): core-hours per run and in total, CPU efficiency,
  GPU-hours, over every run of a group, and the total of the report;
- flags for figures to distrust: efficiency above 100 %, speedup above the
  world size, spread wider than the differences to neighbouring groups.

Nothing here fails on missing measurements: it becomes a note in the console
output and on the HTML page, and the plot that would need it is skipped with
the reason.

The rows of the summary table are computed in :mod:`virgo_exps.scalability.summary`;
:mod:`virgo_exps.scalability.output` shows and writes the report.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from virgo_exps.gitrun import git
from virgo_exps.scalability import groups as grouping
from virgo_exps.scalability.runs import Run
from virgo_exps.scalability.runs import _number as _num
from virgo_exps.scalability.summary import _add_speedup, _flag, _group_row, _load_notes, cost_of, cost_total
from virgo_exps.train import outcome

GROUP_PARAMS = ("train.strategy", "train.nodes", "train.procs_per_node")


@dataclass
class Report:
    groups: pd.DataFrame
    experiments: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    by: tuple[str, ...] = ()
    varying: list[str] = field(default_factory=list)
    common: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    split_on: dict[str, list[str]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    duplicates: dict[str, str] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)  # cost_total of the runs reported


def _param(run: Run, key: str):
    return run.params.get(key, run.metrics.get(key.split(".")[-1]))


def _git_head(repo: str | os.PathLike | None) -> str | None:
    if repo is None:
        return None
    try:
        proc = git(repo, "rev-parse", "HEAD", check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def provenance(runs: list[Run], repo: str | os.PathLike | None = None, now: _dt.datetime | None = None) -> dict:
    """Where the figures come from: machines, devices, commits of the runs, the date of the report."""
    commits = sorted({r.commit[:8] for r in runs if r.commit}) or ([h[:8]] if (h := _git_head(repo)) else [])
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return {
        "machines": sorted({r.machine or "unknown" for r in runs}),
        "devices": sorted({r.device or "unknown" for r in runs}),
        "commits": commits,
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
    }


def summarize(
    runs: list[Run],
    by: tuple[str, ...] | list[str] = (),
    source_notes: list[str] | None = None,
    sources: list[str] | None = None,
    repo: str | os.PathLike | None = None,
) -> Report:
    """Count each result once, group what is comparable and compute every figure (no files written)."""
    by = tuple(by)
    notes = list(source_notes or [])
    runs, dropped = grouping.dedupe(list(runs))
    if dropped:
        pairs = "; ".join(f"{a} = {b}" for a, b in dropped.items())
        notes.append(
            f"{len(dropped)} duplicate result(s) counted once (same commit, or same params and identical "
            f"metrics and model: a re-run that trained nothing, or the workspace holding an experiment's "
            f"results): {pairs}"
        )
    usable = []
    for r in runs:
        failed = outcome.metrics_refusal(r.metrics, losses=("val_loss",))
        if failed:
            notes.append(f"{r.name} left out (not a successful run: {failed})")
        elif r.epoch_time is None or r.epoch_time <= 0:
            notes.append(f"{r.name} left out (no epoch time in its metrics)")
        else:
            usable.append(r)
    groups_of = grouping.assign(usable)
    keyed: dict[tuple, list[Run]] = {}
    label: dict[tuple, str] = {}
    for r in usable:
        key = groups_of.of(r)
        extra = [k for k in by if grouping._short(k) + "=" not in groups_of.label[key]]
        label[key] = groups_of.label[key] + "".join(f", {grouping._short(k)}={_param(r, k)}" for k in extra)
        keyed.setdefault((key, r.world_size, r.nodes, r.procs_per_node), []).append(r)
    order = sorted(keyed, key=lambda k: (label[k[0]], k[1], k[2]))
    rows = [_group_row(label[k[0]], groups_of.scaling[k[0]], keyed[k]) for k in order]
    # What sets groups apart but is not in their labels (it differs only with the strategy): a column.
    unlabelled = [k for k in groups_of.split_on if k not in groups_of.in_label]
    for row, k in zip(rows, order):
        cfg = groups_of.config[k[0]]
        row["differs"] = ", ".join(f"{grouping._short(x)}={cfg.get(x, '-')}" for x in unlabelled)
    peers = {label[k[0]]: tuple((a, b) for a, b in k[0] if a != "strategy") for k in order}
    if groups_of.split_on:
        detail = "; ".join(f"{k} ({', '.join(v)})" for k, v in groups_of.split_on.items())
        notes.insert(
            0,
            f"not all experiments are comparable: split into separate groups on {detail}. "
            "Runs are pooled only when everything but the seed and the scaling axis is equal",
        )
    if rows:
        notes += _add_speedup(rows, peers)
        notes += _flag(rows)
    groups = pd.DataFrame(rows)
    notes += _load_notes(usable)

    all_params = sorted({k for r in usable for k in r.params})
    varying = [k for k in all_params if len({json.dumps(r.params.get(k), sort_keys=True) for r in usable}) > 1]
    common = {k: usable[0].params.get(k) for k in all_params if k not in varying} if usable else {}
    if rows:
        modes = sorted({r["scaling"] for r in rows})
        notes.append("scaling: " + "; ".join(modes))
        by_epoch = [r["series"] + f" @ {r['world_size']}" for r in rows if r["spread_over"].endswith("(1 run)")]
        if by_epoch:
            notes.append(
                "error bars of " + ", ".join(by_epoch) + " show epoch-to-epoch spread within one run, not "
                "run-to-run variation; repeat them (e.g. `dvc exp run -S train.seed=1`) for run-to-run bars"
            )
        no_spread = [r["series"] + f" @ {r['world_size']}" for r in rows if r["spread_over"] == "none"]
        if no_spread:
            notes.append(
                "no spread for " + ", ".join(no_spread) + ": one run with a single timed epoch (or no "
                "per-epoch data); repeat the run or train more epochs for error bars"
            )
        one_epoch = sorted({r.name for r in usable if (r.metrics.get("epochs") or 2) < 2})
        if one_epoch:
            notes.append(
                "runs with one epoch have no warm-up-free epoch; their time includes warm-up: " + ", ".join(one_epoch)
            )
        missing_gpu = [r["series"] + f" @ {r['world_size']}" for r in rows if r["gpu_energy_wh"] is None]
        if len(missing_gpu) == len(rows):
            notes.append(
                "GPU utilisation and energy: not measured in any experiment (no NVIDIA GPU was used); no GPU plots"
            )
        elif missing_gpu:
            notes.append("GPU utilisation and energy: not measured for " + ", ".join(missing_gpu))
        if all(r["computation_fraction"] is None for r in rows):
            notes.append("computation fraction: not measured (train.profile_steps = 0); no computation plot")
    else:
        notes.append("no experiment with an epoch time: nothing to report")

    exp_rows = []
    for r in usable:
        exp_rows.append(
            {
                "name": r.name,
                "source": r.source,
                "series": label[groups_of.of(r)],
                "nodes": r.nodes,
                "procs_per_node": r.procs_per_node,
                "world_size": r.world_size,
                "epoch_time_s": r.epoch_time,
                "samples_per_s": r.throughput,
                "timed_epochs": r.metrics.get("timed_epochs"),
                "excluded_epochs": len(r.excluded),
                "val_loss": _num(r.metrics.get("val_loss")),
                "computation_fraction": _num(r.metrics.get("computation_fraction")),
                "gpu_energy_wh": _num(r.metrics.get("gpu_energy_wh")),
                "core_h": cost_of(r, "core_h"),
                "cpu_eff": cost_of(r, "cpu_eff"),
                "machine": r.machine,
                "device": r.device,
                "software": grouping._short_hash(r.software),
                "data": grouping._short_hash(r.data),
                "rev": (r.rev or "")[:8] or None,
                "duplicates": ", ".join(a for a, b in dropped.items() if b == r.name) or None,
                **{k: r.params.get(k) for k in varying if k not in GROUP_PARAMS},
            }
        )
    experiments = pd.DataFrame(exp_rows)
    if not experiments.empty:
        experiments = experiments.sort_values(["series", "world_size", "name"], kind="stable").reset_index(drop=True)
    return Report(
        groups,
        experiments,
        notes,
        by,
        varying,
        common,
        list(sources or []),
        groups_of.split_on,
        provenance(usable or runs, repo),
        dropped,
        cost_total(usable),
    )
