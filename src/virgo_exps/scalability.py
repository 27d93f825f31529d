"""The cross-experiment scalability report: numbers, tables, files.

Runs (see :mod:`virgo_exps.scalability_sources`) are grouped by configuration:
strategy, nodes and processes per node (world size = nodes x processes), plus
any parameter named with ``by``. For each group:

- epoch time: the median over runs of each run's median training time per
  epoch, where a run's epochs exclude the first (warm-up) epoch and
  validation (as ``results/metrics.json`` defines it);
- spread: with two or more runs of the configuration (other seeds, repeated
  experiments) min/max and quartiles over those runs; with one run, over its
  timed epochs (epoch-to-epoch noise only, which says nothing about how much
  a repeated run would differ); the ``spread_over`` column says which;
- throughput (samples/s), the same way;
- speedup against the smallest world size OF THE SAME STRATEGY (the
  ``baseline`` column names it), with a conservative range from the extremes
  of both groups; parallel efficiency = speedup / (world / baseline world);
  when a one-process ``single`` run exists, ``speedup_vs_single`` puts every
  strategy on that common footing as well;
- computation fraction, GPU utilisation and energy (median Wh per run, total
  Wh over the group's runs, Wh per training sample) where they were measured.

Nothing here fails on missing measurements: it becomes a note in the console
output and on the HTML page, and the plot that would need it is skipped with
the reason.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .scalability_sources import Run
from .scalability_sources import _number as _num

GROUP_PARAMS = ("train.strategy", "train.nodes", "train.procs_per_node")
# Parameters that leave the time of a training epoch alone: runs that differ
# only in these are repeats of one configuration.
TIMING_NEUTRAL = {
    "train.seed", "train.lr", "train.lr_scaling", "train.weight_decay", "train.epochs", "train.max_requeues",
    "train.warmup_steps", "train.profile_steps", "generate.seed", "generate.workers", "preprocess.split_seed",
    "preprocess.batch_size", "report.title",
}

DEFINITIONS = {
    "epoch_time_s": "median training time of one epoch (s); the first epoch (warm-up) and validation are excluded; "
                    "median over runs of each run's median",
    "spread": "error bars and *_min/*_max/*_q25/*_q75: over repeated runs of the configuration when there are two "
              "or more, otherwise over the timed epochs of its single run (epoch-to-epoch noise only); "
              "spread_over says which",
    "samples_per_s": "training throughput, median over timed epochs, then over runs",
    "speedup": "baseline epoch time / epoch time; the baseline is the smallest world size of the same strategy "
               "(column baseline); the range pairs the extremes of both groups (conservative)",
    "ideal_speedup": "world size / baseline world size",
    "efficiency": "speedup / ideal_speedup (1 = perfect scaling)",
    "speedup_vs_single": "epoch time of the one-process 'single' run / epoch time (a common reference for all strategies)",
    "computation_fraction": "share of profiled step time spent in computation kernels (torch profiler), median over runs",
    "gpu_energy_wh": "GPU energy of a whole run summed over ranks (Wh), median over runs; gpu_energy_wh_total sums "
                     "the group's runs",
    "gpu_energy_wh_per_sample": "GPU energy per training sample processed (Wh), median over runs",
}


@dataclass
class Report:
    groups: pd.DataFrame
    experiments: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    by: tuple[str, ...] = ()
    varying: list[str] = field(default_factory=list)
    common: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


def _param(run: Run, key: str):
    return run.params.get(key, run.metrics.get(key.split(".")[-1]))


def series_of(run: Run, by: tuple[str, ...] = ()) -> str:
    return run.strategy + "".join(f", {k.split('.')[-1]}={_param(run, k)}" for k in by)


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
        return {prefix: center, f"{prefix}_min": None, f"{prefix}_max": None, f"{prefix}_q25": None,
                f"{prefix}_q75": None}
    q25, q75 = np.percentile(values, [25, 75])
    return {prefix: center, f"{prefix}_min": float(min(values)), f"{prefix}_max": float(max(values)),
            f"{prefix}_q25": float(q25), f"{prefix}_q75": float(q75)}


def _group_row(series: str, runs: list[Run]) -> dict:
    first = runs[0]
    times = [r.epoch_time for r in runs]
    t_vals, spread = _spread(times, first.epoch_times if len(runs) == 1 else None)
    thr = [r.throughput for r in runs if r.throughput is not None]
    s_vals, _ = _spread(thr, first.epoch_throughput if len(runs) == 1 else None)
    energies = [v for v in (_num(r.metrics.get("gpu_energy_wh")) for r in runs) if v is not None]
    row = {
        "series": series, "strategy": first.strategy, "nodes": first.nodes, "procs_per_node": first.procs_per_node,
        "world_size": first.world_size, "n_runs": len(runs), "runs": ";".join(r.name for r in runs),
        **_stats("epoch_time_s", _median(times), t_vals), "spread_over": spread,
        **_stats("samples_per_s", _median(thr), s_vals),
        "computation_fraction": _median(r.metrics.get("computation_fraction") for r in runs),
        "gpu_utilization_pct": _median(r.metrics.get("gpu_utilization_pct") for r in runs),
        "gpu_energy_wh": _median(energies), "gpu_energy_wh_min": min(energies) if energies else None,
        "gpu_energy_wh_max": max(energies) if energies else None,
        "gpu_energy_wh_total": float(sum(energies)) if energies else None,
        "gpu_energy_wh_per_sample": _median(r.metrics.get("gpu_energy_wh_per_sample") for r in runs),
    }
    return row


def _add_speedup(rows: list[dict], by_values: dict[str, tuple]) -> list[str]:
    """Speedup/efficiency per series against its smallest world size; returns notes."""
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
        if len({r["world_size"] for r in mine}) < 2:
            notes.append(f"speedup/efficiency: '{series}' ran at one world size only ({base['world_size']}); "
                         "its speedup is 1 by definition; run more process counts to measure scaling")
    refs = {by_values[r["series"]]: r for r in rows if r["strategy"] == "single" and r["world_size"] == 1}
    for r in rows:
        ref = refs.get(by_values[r["series"]])
        r["speedup_vs_single"] = ref["epoch_time_s"] / r["epoch_time_s"] if ref else None
    return notes


def summarize(runs: list[Run], by: tuple[str, ...] | list[str] = (), source_notes: list[str] | None = None,
              sources: list[str] | None = None) -> Report:
    """Group the runs and compute every figure of the report (no files written)."""
    by = tuple(by)
    notes = list(source_notes or [])
    usable = []
    for r in runs:
        if r.epoch_time is None or r.epoch_time <= 0:
            notes.append(f"{r.name} left out (no epoch time in its metrics)")
        else:
            usable.append(r)
    keyed: dict[tuple, list[Run]] = {}
    by_values: dict[str, tuple] = {}
    for r in usable:
        s = series_of(r, by)
        by_values[s] = tuple(str(_param(r, k)) for k in by)
        keyed.setdefault((s, r.world_size, r.nodes, r.procs_per_node), []).append(r)
    rows = [_group_row(key[0], keyed[key]) for key in sorted(keyed, key=lambda k: (k[0], k[1], k[2]))]
    if rows:
        notes += _add_speedup(rows, by_values)
    groups = pd.DataFrame(rows)

    all_params = sorted({k for r in usable for k in r.params})
    varying = [k for k in all_params if len({json.dumps(r.params.get(k), sort_keys=True) for r in usable}) > 1]
    common = {k: usable[0].params.get(k) for k in all_params if k not in varying} if usable else {}
    mixed = [k for k in varying if k not in TIMING_NEUTRAL and k not in GROUP_PARAMS and k not in by]
    if mixed:
        detail = "; ".join(f"{k} ({', '.join(sorted({str(r.params.get(k)) for r in usable}))})" for k in mixed)
        notes.append(f"parameters that change the work per epoch also vary across the experiments and are mixed "
                     f"within groups: {detail}. Separate them with --by KEY or pick experiments with --exp")
    if rows:
        by_epoch = [r["series"] + f" @ {r['world_size']}" for r in rows if r["spread_over"].endswith("(1 run)")]
        if by_epoch:
            notes.append("error bars of " + ", ".join(by_epoch) + " show epoch-to-epoch spread within one run, not "
                         "run-to-run variation; repeat them (e.g. `dvc exp run -S train.seed=1`) for run-to-run bars")
        no_spread = [r["series"] + f" @ {r['world_size']}" for r in rows if r["spread_over"] == "none"]
        if no_spread:
            notes.append("no spread for " + ", ".join(no_spread) + ": one run with a single timed epoch (or no "
                         "per-epoch data); repeat the run or train more epochs for error bars")
        one_epoch = sorted({r.name for r in usable if (r.metrics.get("epochs") or 2) < 2})
        if one_epoch:
            notes.append("runs with one epoch have no warm-up-free epoch; their time includes warm-up: "
                         + ", ".join(one_epoch))
        missing_gpu = [r["series"] + f" @ {r['world_size']}" for r in rows if r["gpu_energy_wh"] is None]
        if len(missing_gpu) == len(rows):
            notes.append("GPU utilisation and energy: not measured in any experiment (no NVIDIA GPU was used); "
                         "no GPU plots")
        elif missing_gpu:
            notes.append("GPU utilisation and energy: not measured for " + ", ".join(missing_gpu))
        if all(r["computation_fraction"] is None for r in rows):
            notes.append("computation fraction: not measured (train.profile_steps = 0); no computation plot")
    else:
        notes.append("no experiment with an epoch time: nothing to report")

    exp_rows = []
    for r in usable:
        exp_rows.append({
            "name": r.name, "source": r.source, "series": series_of(r, by), "nodes": r.nodes,
            "procs_per_node": r.procs_per_node, "world_size": r.world_size, "epoch_time_s": r.epoch_time,
            "samples_per_s": r.throughput, "timed_epochs": r.metrics.get("timed_epochs"),
            "computation_fraction": _num(r.metrics.get("computation_fraction")),
            "gpu_energy_wh": _num(r.metrics.get("gpu_energy_wh")),
            "rev": (r.rev or "")[:8] or None,
            **{k: r.params.get(k) for k in varying if k not in GROUP_PARAMS},
        })
    experiments = pd.DataFrame(exp_rows)
    if not experiments.empty:
        experiments = experiments.sort_values(["series", "world_size", "name"], kind="stable").reset_index(drop=True)
    return Report(groups, experiments, notes, by, varying, common, list(sources or []))


# -- presentation ---------------------------------------------------------------

def _fmt(v, spec: str = ".4g") -> str:
    v = _num(v) if not isinstance(v, str) else v
    if v is None:
        return "-"
    return v if isinstance(v, str) else format(v, spec)


def _pct(v) -> str:
    v = _num(v)
    return "-" if v is None else f"{v * 100:.0f}%"


def display_table(report: Report) -> pd.DataFrame:
    """The summary as strings: what the console and the HTML page show."""
    g = report.groups
    if g.empty:
        return pd.DataFrame()
    out = pd.DataFrame({
        "strategy": g["series"], "nodes": g["nodes"], "procs/node": g["procs_per_node"], "world": g["world_size"],
        "runs": g["n_runs"],
        "epoch s": [_fmt(v) for v in g["epoch_time_s"]],
        "epoch s min-max": [f"{_fmt(a)}-{_fmt(b)}" for a, b in zip(g["epoch_time_s_min"], g["epoch_time_s_max"])],
        "spread over": g["spread_over"],
        "samples/s": [_fmt(v) for v in g["samples_per_s"]],
        "baseline": [f"world {w}" for w in g["baseline_world_size"]],
        "speedup": [_fmt(v, ".3g") for v in g["speedup"]],
        "efficiency": [_pct(v) for v in g["efficiency"]],
    })
    if g["speedup_vs_single"].notna().any():
        out["vs single"] = [_fmt(v, ".3g") for v in g["speedup_vs_single"]]
    if g["computation_fraction"].notna().any():
        out["compute %"] = [_pct(v).rstrip("%") for v in g["computation_fraction"]]
    if g["gpu_energy_wh"].notna().any() or g["gpu_utilization_pct"].notna().any():
        out["GPU util %"] = [_fmt(v, ".0f") for v in g["gpu_utilization_pct"]]
        out["GPU Wh/run"] = [_fmt(v) for v in g["gpu_energy_wh"]]
        out["GPU Wh total"] = [_fmt(v) for v in g["gpu_energy_wh_total"]]
        out["Wh/sample"] = [_fmt(v, ".3g") for v in g["gpu_energy_wh_per_sample"]]
    return out


def console_text(report: Report) -> str:
    lines = ["Scalability report: " + (", ".join(report.sources) or "runs given")]
    table = display_table(report)
    if not table.empty:
        lines += ["", table.to_string(index=False), ""]
        bases = dict(zip(report.groups["series"], report.groups["baseline"]))
        lines.append("Speedup baselines (smallest world size of each strategy): "
                     + "; ".join(f"{s} -> {b.split(' @ ', 1)[1]}" for s, b in bases.items()))
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


def write_report(report: Report, out: str | os.PathLike, title: str = "Scalability",
                 stamp: str | None = None) -> Path:
    """Write console.txt, scalability.csv/.json, the PNGs and index.html into ``out`` atomically.

    ``stamp``: where the figures come from (e.g. "CPU, simulated cluster"), printed on each PNG."""
    from .scalability_html import render
    from .scalability_plots import make_plots

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        plots, skipped = make_plots(report, tmp, stamp) if not report.groups.empty else ([], [])
        (tmp / "console.txt").write_text(console_text(report))
        report.groups.to_csv(tmp / "scalability.csv", index=False)
        doc = {
            "title": title, "stamp": stamp, "sources": report.sources, "group_by": ["train.strategy", *report.by,
                                                                    "train.nodes", "train.procs_per_node"],
            "definitions": DEFINITIONS, "notes": report.notes,
            "groups": _records(report.groups), "experiments": _records(report.experiments),
            "common_params": _jsonable(report.common),
            "plots": {p.file: p.title for p in plots}, "skipped_plots": {t: why for t, why in skipped},
        }
        (tmp / "scalability.json").write_text(json.dumps(doc, indent=2) + "\n")
        (tmp / "index.html").write_text(render(report, plots, skipped, f"{title} ({stamp})" if stamp else title, display_table(report), DEFINITIONS))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
