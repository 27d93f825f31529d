"""The cross-experiment scalability report: numbers, tables, files.

Runs (see :mod:`virgo_exps.scalability.sources`) are counted once per result
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
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from virgo_exps import fsio
from virgo_exps.scalability import groups as grouping
from virgo_exps.scalability.sources import LOAD_LIMIT, Run
from virgo_exps.scalability.sources import _number as _num
from virgo_exps.train import outcome

GROUP_PARAMS = ("train.strategy", "train.nodes", "train.procs_per_node")
TOL = 1e-9

DEFINITIONS = {
    "group": "runs pooled as repeats: equal in every parameter but the seed and the scaling axis (nodes, "
    "processes per node; global batch size too under weak scaling), and in machine, device, software "
    "(version.lock) and data; labelled by what differs between groups",
    "scaling": "strong: the global batch is fixed, so each process gets a smaller share as processes are added; "
    "weak: the global batch grows with the world size (fixed batch per process)",
    "epoch_time_s": "median training time of one epoch (s); the first epoch (warm-up), validation and epochs "
    "timed under a host load above its cores are excluded; median over runs of each run's median",
    "spread": "error bars and *_min/*_max/*_q25/*_q75: over repeated runs of the configuration when there are two "
    "or more, otherwise over the timed epochs of its single run (epoch-to-epoch noise only); "
    "spread_over says which",
    "samples_per_s": "training throughput, median over timed epochs, then over runs",
    "speedup": "baseline epoch time / epoch time; the baseline is the smallest world size of the same group "
    "(column baseline), never a run of another group; the range pairs the extremes of both "
    "(conservative)",
    "ideal_speedup": "world size / baseline world size",
    "efficiency": "speedup / ideal_speedup (1 = perfect scaling)",
    "speedup_vs_single": "epoch time of the one-process 'single' run of the same configuration (same machine, "
    "device, software, data and params) / epoch time",
    "computation_fraction": "share of profiled step time spent in computation kernels (torch profiler), median over "
    "runs; compute_s_per_epoch and other_s_per_epoch split the epoch time by it (other: "
    "communication, synchronisation, data loading)",
    "val_loss": "validation loss after the last epoch, median over runs (min-max in val_loss_min/max): scaling "
    "should not change it",
    "flags": "figures to check before use: efficiency above 100 %, speedup above the world size (superlinear: "
    "usually a baseline measured under other conditions), spread wider than the median difference to "
    "the neighbouring world sizes of the group, or for a group of one world size to the other groups "
    "at that world size (the difference is not resolved)",
    "gpu_energy_wh": "GPU energy of a whole run summed over ranks (Wh), median over runs; gpu_energy_wh_total sums "
    "the group's runs",
    "gpu_energy_wh_per_sample": "GPU energy per training sample processed (Wh), median over runs",
    "core_h": "core-hours of a run: allocated CPU cores x wall time (the job's cores on SLURM), median over runs; "
    "core_h_total sums the group's runs (the report's total is under Cost)",
    "cpu_eff": "CPU time used / core-hours allocated, median over runs (1 = every allocated core busy throughout)",
    "gpu_h": "GPU-hours: GPUs x wall time, summed over the group's runs",
}


def cost_of(run: Run, key: str) -> float | None:
    """A figure of the run's ``cost`` (nested in metrics.json, flattened as ``cost.<key>`` by some sources)."""
    nested = run.metrics.get("cost")
    return _num(nested.get(key) if isinstance(nested, dict) else run.metrics.get(f"cost.{key}"))


def cost_total(runs: list[Run]) -> dict:
    """What the runs cost together; ``runs_without`` counts those that recorded no cost."""
    core = [v for v in (cost_of(r, "core_h") for r in runs) if v is not None]
    gpu = [v for v in (cost_of(r, "gpu_h") for r in runs) if v is not None]
    return {
        "core_h": float(sum(core)) if core else None,
        "gpu_h": float(sum(gpu)) if gpu else None,
        "runs": len(core),
        "runs_without": len(runs) - len(core),
    }


def cost_line(total: dict) -> str:
    if total["core_h"] is None:
        return "Cost: not recorded by any run (runs made before the trainer recorded cost figures)"
    line = f"Cost: {total['core_h']:.4g} core-hours in total over {total['runs']} run(s)"
    if total["gpu_h"]:
        line += f", {total['gpu_h']:.4g} GPU-hours"
    if total["runs_without"]:
        line += f"; {total['runs_without']} run(s) recorded no cost and are not counted"
    return line


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


def _median(values) -> float | None:
    vals = [v for v in (_num(x) for x in values) if v is not None]
    return float(np.median(vals)) if vals else None


def _spread(per_run: list[float], per_epoch: list[float] | None) -> tuple[list[float], str]:
    if len(per_run) >= 2:
        return per_run, f"{len(per_run)} runs"
    if per_epoch and len(per_epoch) >= 2:
        return list(per_epoch), f"{len(per_epoch)} epochs (1 run)"
    return per_run, "none"


def _stats(prefix: str, center: float | None, values: list[float]) -> dict:
    if center is None or not values:
        return {
            prefix: center,
            f"{prefix}_min": None,
            f"{prefix}_max": None,
            f"{prefix}_q25": None,
            f"{prefix}_q75": None,
        }
    q25, q75 = np.percentile(values, [25, 75])
    return {
        prefix: center,
        f"{prefix}_min": float(min(values)),
        f"{prefix}_max": float(max(values)),
        f"{prefix}_q25": float(q25),
        f"{prefix}_q75": float(q75),
    }


def _group_row(series: str, scaling: str, runs: list[Run]) -> dict:
    first = runs[0]
    times = [r.epoch_time for r in runs]
    t_vals, spread = _spread(times, first.clean_epoch_times if len(runs) == 1 else None)
    thr = [r.throughput for r in runs if r.throughput is not None]
    s_vals, _ = _spread(thr, first.clean_epoch_throughput if len(runs) == 1 else None)
    energies = [v for v in (_num(r.metrics.get("gpu_energy_wh")) for r in runs) if v is not None]
    losses = [v for v in (_num(r.metrics.get("val_loss")) for r in runs) if v is not None]
    epoch_time = _median(times)
    comp = _median(r.metrics.get("computation_fraction") for r in runs)
    core_h = [v for v in (cost_of(r, "core_h") for r in runs) if v is not None]
    gpu_h = [v for v in (cost_of(r, "gpu_h") for r in runs) if v is not None]
    row = {
        "series": series,
        "strategy": first.strategy,
        "nodes": first.nodes,
        "procs_per_node": first.procs_per_node,
        "world_size": first.world_size,
        "scaling": scaling,
        "machine": first.machine,
        "device": first.device,
        "n_runs": len(runs),
        "runs": ";".join(r.name for r in runs),
        **_stats("epoch_time_s", epoch_time, t_vals),
        "spread_over": spread,
        **_stats("samples_per_s", _median(thr), s_vals),
        "computation_fraction": comp,
        "compute_s_per_epoch": comp * epoch_time if comp is not None and epoch_time is not None else None,
        "other_s_per_epoch": (1 - comp) * epoch_time if comp is not None and epoch_time is not None else None,
        "val_loss": _median(losses),
        "val_loss_min": min(losses) if losses else None,
        "val_loss_max": max(losses) if losses else None,
        "gpu_utilization_pct": _median(r.metrics.get("gpu_utilization_pct") for r in runs),
        "gpu_energy_wh": _median(energies),
        "gpu_energy_wh_min": min(energies) if energies else None,
        "gpu_energy_wh_max": max(energies) if energies else None,
        "gpu_energy_wh_total": float(sum(energies)) if energies else None,
        "gpu_energy_wh_per_sample": _median(r.metrics.get("gpu_energy_wh_per_sample") for r in runs),
        "excluded_epochs": sum(len(r.excluded) for r in runs),
        "core_h": _median(core_h),
        "core_h_total": float(sum(core_h)) if core_h else None,
        "cpu_eff": _median(cost_of(r, "cpu_eff") for r in runs),
        "gpu_h": float(sum(gpu_h)) if gpu_h else None,
    }
    return row


def _add_speedup(rows: list[dict], peers: dict[str, tuple]) -> list[str]:
    """Speedup/efficiency of each group against its own smallest world size; returns notes.

    ``peers``: series -> its configuration without the strategy, to find the 'single' run of the same
    configuration for speedup_vs_single."""
    notes = []
    for series in dict.fromkeys(r["series"] for r in rows):
        mine = [r for r in rows if r["series"] == series]
        base = min(mine, key=lambda r: (r["world_size"], r["nodes"]))
        for r in mine:
            t, t_lo, t_hi = r["epoch_time_s"], r["epoch_time_s_min"], r["epoch_time_s_max"]
            b, b_lo, b_hi = base["epoch_time_s"], base["epoch_time_s_min"], base["epoch_time_s_max"]
            ideal = r["world_size"] / base["world_size"]
            r["baseline"] = f"{series} @ {base['world_size']} ({base['nodes']}x{base['procs_per_node']})"
            r["baseline_world_size"] = base["world_size"]
            r["ideal_speedup"] = ideal
            r["speedup"] = b / t
            r["speedup_lo"] = b_lo / t_hi
            r["speedup_hi"] = b_hi / t_lo
            r["efficiency"] = r["speedup"] / ideal
            r["efficiency_lo"] = r["speedup_lo"] / ideal
            r["efficiency_hi"] = r["speedup_hi"] / ideal
        if base["world_size"] != 1:
            notes.append(
                f"'{series}' has no 1-process run of its own: its speedup and efficiency are relative to "
                f"world size {base['world_size']}, not to one process (no baseline is borrowed from "
                "another group); run it with train.nodes=1 train.procs_per_node=1 for an absolute one"
            )
        if len({r["world_size"] for r in mine}) < 2:
            notes.append(
                f"speedup/efficiency: '{series}' ran at one world size only ({base['world_size']}); "
                "its speedup is 1 by definition; run more process counts to measure scaling"
            )
    refs = {peers[r["series"]]: r for r in rows if r["strategy"] == "single" and r["world_size"] == 1}
    for r in rows:
        ref = refs.get(peers[r["series"]])
        r["speedup_vs_single"] = ref["epoch_time_s"] / r["epoch_time_s"] if ref else None
    return notes


def _flag(rows: list[dict]) -> list[str]:
    """Mark figures to distrust (column flags); returns one note per flagged row."""
    notes = []
    for r in rows:
        flags, why = [], []
        if r["efficiency"] > 1 + TOL and r["world_size"] != r["baseline_world_size"]:
            flags.append("efficiency>100%")
            why.append(f"efficiency {r['efficiency'] * 100:.0f}% above 100%")
        if r["speedup"] > r["world_size"] + TOL:
            flags.append("speedup>world")
            why.append(f"speedup {r['speedup']:.3g} above the world size {r['world_size']}")
        mine = sorted((x for x in rows if x["series"] == r["series"]), key=lambda x: (x["world_size"], x["nodes"]))
        i = mine.index(r)
        near = [mine[j] for j in (i - 1, i + 1) if 0 <= j < len(mine)]
        if not near:  # a group of one world size: compare with the other groups at that world size
            near = [x for x in rows if x is not r and x["world_size"] == r["world_size"]]
        diffs = [abs(x["epoch_time_s"] - r["epoch_time_s"]) for x in near]
        lo, hi = r["epoch_time_s_min"], r["epoch_time_s_max"]
        if diffs and lo is not None and hi is not None:
            width, typical = hi - lo, float(np.median(diffs))
            if width > typical + TOL:
                flags.append("spread>difference")
                why.append(
                    f"epoch-time spread {width:.3g} s wider than the median difference {typical:.3g} s to "
                    "its neighbouring groups"
                )
        r["flags"] = "; ".join(flags)
        if why:
            notes.append(f"FLAG {r['series']} @ {r['world_size']}: " + "; ".join(why))
    return notes


def _load_notes(usable: list[Run]) -> list[str]:
    notes = []
    all_loaded = []
    for r in (r for r in usable if r.contaminated):
        epochs = ", ".join(str(i + 2) for i in r.contaminated)  # timed epochs start at epoch 2
        if r.excluded:
            notes.append(
                f"{r.name}: epoch(s) {epochs} ran while other work competed for the run's CPUs (load per "
                f"core above {LOAD_LIMIT:g}) or GPU (another job's process on it) and are left out of "
                "its medians"
            )
        else:
            all_loaded.append(r.name)
    if all_loaded:
        notes.append(
            f"every timed epoch of {', '.join(all_loaded)} ran while other work competed for the CPUs "
            f"(load per core above {LOAD_LIMIT:g}) or the GPU: their times are kept but are not the "
            "runs' own; repeat them on a quiet machine"
        )
    if usable and all(r.epoch_load is None for r in usable):
        notes.append(
            "host load per epoch not recorded (no load_avg column in epochs.csv): epochs timed while "
            "other work ran on the machine cannot be recognised"
        )
    return notes


def _git_head(repo: str | os.PathLike | None) -> str | None:
    if repo is None:
        return None
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=30, check=False
        )
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


def stamp_text(report: Report, stamp: str | None = None) -> str:
    """One line for every figure and the page: machine, device, commit, date, and ``stamp`` when given."""
    p = report.provenance or {}
    parts = [
        f"machine {', '.join(p.get('machines') or ['unknown'])}",
        f"device {', '.join(p.get('devices') or ['unknown'])}",
        f"commit {', '.join(p.get('commits') or ['unknown'])}",
        p.get("date") or "",
    ]
    text = " | ".join(x for x in parts if x)
    return f"{text} | {stamp}" if stamp else text


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


# -- presentation ---------------------------------------------------------------


def _fmt(v, spec: str = ".4g") -> str:
    v = _num(v) if not isinstance(v, str) else v
    if v is None:
        return "-"
    return v if isinstance(v, str) else format(v, spec)


def _pct(v) -> str:
    v = _num(v)
    return "-" if v is None else f"{v * 100:.0f}%"


def _secs(v) -> str:
    v = _num(v)
    return "-" if v is None else f"{v:.3g} s"


def display_table(report: Report) -> pd.DataFrame:
    """The summary as strings: what the console and the HTML page show."""
    g = report.groups
    if g.empty:
        return pd.DataFrame()
    out = pd.DataFrame(
        {
            "group": g["series"],
            "scaling": [str(v).split(" ")[0] for v in g["scaling"]],
            "nodes": g["nodes"],
            "procs/node": g["procs_per_node"],
            "world": g["world_size"],
            "runs": g["n_runs"],
            "epoch s": [_fmt(v) for v in g["epoch_time_s"]],
            "epoch s min-max": [f"{_fmt(a)}-{_fmt(b)}" for a, b in zip(g["epoch_time_s_min"], g["epoch_time_s_max"])],
            "spread over": g["spread_over"],
            "samples/s": [_fmt(v) for v in g["samples_per_s"]],
            "baseline": [f"world {w}" for w in g["baseline_world_size"]],
            "speedup": [_fmt(v, ".3g") for v in g["speedup"]],
            "efficiency": [_pct(v) for v in g["efficiency"]],
        }
    )
    if g["differs"].astype(bool).any():
        out.insert(1, "also differs", g["differs"])
    if g["speedup_vs_single"].notna().any():
        out["vs single"] = [_fmt(v, ".3g") for v in g["speedup_vs_single"]]
    if g["computation_fraction"].notna().any():
        out["compute"] = [
            f"{_pct(f)} ({_secs(s)})" if _num(f) is not None else "-"
            for f, s in zip(g["computation_fraction"], g["compute_s_per_epoch"])
        ]
        out["other"] = [
            f"{_pct(1 - f)} ({_secs(s)})" if _num(f) is not None else "-"
            for f, s in zip(g["computation_fraction"], g["other_s_per_epoch"])
        ]
    if g["val_loss"].notna().any():
        out["val loss"] = [_fmt(v, ".4g") for v in g["val_loss"]]
    if g["gpu_energy_wh"].notna().any() or g["gpu_utilization_pct"].notna().any():
        out["GPU util %"] = [_fmt(v, ".0f") for v in g["gpu_utilization_pct"]]
        out["GPU Wh/run"] = [_fmt(v) for v in g["gpu_energy_wh"]]
        out["GPU Wh total"] = [_fmt(v) for v in g["gpu_energy_wh_total"]]
        out["Wh/sample"] = [_fmt(v, ".3g") for v in g["gpu_energy_wh_per_sample"]]
    if "core_h" in g and g["core_h"].notna().any():
        out["core-h/run"] = [_fmt(v, ".3g") for v in g["core_h"]]
        out["core-h total"] = [_fmt(v, ".3g") for v in g["core_h_total"]]
        out["CPU eff"] = [_pct(v) for v in g["cpu_eff"]]
        if g["gpu_h"].fillna(0).any():
            out["GPU-h total"] = [_fmt(v, ".3g") for v in g["gpu_h"]]
    out["flags"] = [f"! {f}" if f else "" for f in g["flags"]]
    return out


def baselines_line(report: Report) -> str:
    bases = dict(zip(report.groups["series"], report.groups["baseline"]))
    return "Speedup baselines (smallest world size within each group): " + "; ".join(
        f"{s} -> {b.split(' @ ', 1)[1]}" for s, b in bases.items()
    )


def console_text(report: Report, stamp: str | None = None) -> str:
    lines = ["Scalability report: " + (", ".join(report.sources) or "runs given"), "From: " + stamp_text(report, stamp)]
    if report.split_on:
        lines.append("Split on: " + "; ".join(f"{k} ({', '.join(v)})" for k, v in report.split_on.items()))
    table = display_table(report)
    if not table.empty:
        lines += ["", table.to_string(index=False), ""]
        lines.append(baselines_line(report))
    if report.cost:
        lines.append(cost_line(report.cost))
    if report.notes:
        lines += ["", "Notes:"] + [f"  - {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return None if math.isnan(f) or math.isinf(f) else f
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def _records(df: pd.DataFrame) -> list[dict]:
    return [_jsonable(row) for row in df.astype(object).where(df.notna(), None).to_dict(orient="records")]


def write_report(report: Report, out: str | os.PathLike, title: str = "Scalability", stamp: str | None = None) -> Path:
    """Write console.txt, scalability.csv/.json, the PNGs and index.html into ``out`` atomically.

    Every figure and the page carry where they come from (machine, device, commit, date); ``stamp`` adds
    text to that line (e.g. "CPU, simulated cluster")."""
    from virgo_exps.scalability.html import render
    from virgo_exps.scalability.plots import make_plots

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = fsio.temp_path(out)
    tmp.mkdir()
    origin = stamp_text(report, stamp)
    try:
        plots, skipped = make_plots(report, tmp, origin) if not report.groups.empty else ([], [])
        (tmp / "console.txt").write_text(console_text(report, stamp))
        report.groups.to_csv(tmp / "scalability.csv", index=False)
        doc = {
            "title": title,
            "stamp": stamp,
            "origin": origin,
            "provenance": report.provenance,
            "sources": report.sources,
            "group_by": "everything but the seed and the scaling axis: params, machine, device, software, data",
            "split_on": report.split_on,
            "duplicates": report.duplicates,
            "definitions": DEFINITIONS,
            "notes": report.notes,
            "cost": report.cost,
            "groups": _records(report.groups),
            "experiments": _records(report.experiments),
            "common_params": _jsonable(report.common),
            "plots": {p.file: p.title for p in plots},
            "skipped_plots": {t: why for t, why in skipped},
        }
        (tmp / "scalability.json").write_text(json.dumps(doc, indent=2) + "\n")
        (tmp / "index.html").write_text(
            render(report, plots, skipped, title, display_table(report), DEFINITIONS, origin)
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsio.move_into_place(tmp, out)
    return out
