"""The rows of the scalability report's summary table: one per group and world size.

A row holds the figures of one world size of a group (epoch time and throughput with their spread,
speedup and efficiency against the group's own baseline, computation fraction, loss, GPU and cost
figures) and its flags on figures to distrust; beside the rows, the notes on epochs timed under foreign
load and what the runs cost (:func:`cost_total`, in words :func:`cost_line`).
:func:`virgo_exps.scalability.report.summarize` puts them together; its module says how each figure is
computed.
"""

from __future__ import annotations

import numpy as np

from virgo_exps.scalability.runs import LOAD_LIMIT, Run
from virgo_exps.scalability.runs import _number as _num

TOL = 1e-9


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
