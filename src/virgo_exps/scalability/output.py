"""What the scalability report shows and writes.

The console text, and one folder written atomically (:func:`write_report`): console.txt,
scalability.csv, scalability.json, the figures (:mod:`virgo_exps.scalability.plots`) and index.html
(:mod:`virgo_exps.scalability.html`). Every figure and the page carry where they come from
(:func:`stamp_text`); :data:`DEFINITIONS`, what each column means, goes into the JSON and onto the page.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from virgo_exps import fsio
from virgo_exps.scalability.html import render
from virgo_exps.scalability.plots import make_plots
from virgo_exps.scalability.report import Report
from virgo_exps.scalability.runs import _number as _num
from virgo_exps.scalability.summary import cost_line

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
