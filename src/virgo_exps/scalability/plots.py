"""PNG figures of the scalability report (matplotlib, Agg backend).

Each figure needs some data; when it is missing (one world size per
strategy, no GPU, no profiler data) the figure is not drawn and the reason is
returned instead, so the report never holds an empty plot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
# Labels, titles and stamps carry names from params and experiments: a `$` in them is text, not TeX math.
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

DPI = 110


@dataclass
class Plot:
    file: str
    title: str
    caption: str


def _colors(groups: pd.DataFrame) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {s: cmap(i % 10) for i, s in enumerate(dict.fromkeys(groups["series"]))}


def _lines(groups: pd.DataFrame):
    """(label, series, rows sorted by world size): one line per strategy, split by processes per
    node when a strategy has two layouts of the same world size (1x4 and 2x2)."""
    for series, g in groups.groupby("series", sort=False):
        g = g.sort_values(["world_size", "nodes"])
        if g["world_size"].is_unique:
            yield series, series, g
        else:
            for ppn, part in g.groupby("procs_per_node"):
                yield f"{series}, {ppn}/node", series, part


def _yerr(center, lo, hi) -> np.ndarray:
    c, lo, hi = (np.asarray(x, dtype=float) for x in (center, lo, hi))
    lo = np.where(np.isnan(lo), c, lo)
    hi = np.where(np.isnan(hi), c, hi)
    return np.vstack([np.clip(c - lo, 0, None), np.clip(hi - c, 0, None)])


def _world_axis(ax, worlds, log: bool = True) -> None:
    worlds = sorted({int(w) for w in worlds})
    if log:
        ax.set_xscale("log", base=2)
    ax.set_xticks(worlds)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    lo, hi = worlds[0], worlds[-1]
    ax.set_xlim(lo / 1.4, hi * 1.4) if log else ax.set_xlim(lo - 0.5, hi + 0.5)
    ax.set_xlabel("world size (processes)")


def _log_y(ax) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    # Label the 2s and 5s between powers of ten too: a scaling plot often spans less than a decade.
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


def _save(fig, path: Path, stamp: str | None = None, flagged: list[str] | None = None) -> None:
    """Save with the origin line (machine, device, commit, date, --stamp) and the flagged figures, if any,
    written on the image: they travel with it."""
    fig.tight_layout()
    bottom = 0.0
    if flagged:
        fig.text(
            0.005,
            0.03 if stamp else 0.005,
            "FLAGGED: " + "; ".join(flagged),
            ha="left",
            va="bottom",
            fontsize=7,
            color="#b00000",
            wrap=True,
        )
        bottom += 0.04
    if stamp:
        fig.text(0.995, 0.005, stamp, ha="right", va="bottom", fontsize=7, color="0.35")
        bottom += 0.03
    if bottom:
        fig.subplots_adjust(bottom=min(0.45, fig.subplotpars.bottom + bottom))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _flag_text(groups: pd.DataFrame, codes: tuple[str, ...]) -> list[str]:
    out = []
    for _, r in groups.iterrows():
        mine = [f for f in str(r.get("flags") or "").split("; ") if f and f in codes]
        if mine:
            out.append(f"{r['series']} @ {r['world_size']}: {', '.join(mine)}")
    return out


def _mark_flags(ax, g: pd.DataFrame, column: str, codes: tuple[str, ...], labelled: list) -> None:
    """A red ring around every point whose row carries one of ``codes``; one legend entry per axes."""
    hit = g[[any(c in str(f or "") for c in codes) for f in g.get("flags", pd.Series([""] * len(g)))]]
    if hit.empty:
        return
    ax.scatter(
        hit["world_size"].to_numpy(dtype=float),
        hit[column].to_numpy(dtype=float),
        s=220,
        facecolors="none",
        edgecolors="#d00000",
        linewidths=2,
        zorder=5,
        label=None if labelled else "flagged (see table)",
    )
    labelled.append(True)


def _scaling_plot(
    groups,
    column,
    lo_col,
    hi_col,
    ylabel,
    title,
    path,
    ideal: str | None,
    colors,
    only_scaling: bool = False,
    stamp: str | None = None,
    flags: tuple[str, ...] = (),
    log: bool = True,
) -> None:
    fig, ax = plt.subplots(figsize=(6.6, 4.6))
    worlds, shared_ideal, labelled, shown = [], {}, [], []
    for label, series, g in _lines(groups):
        if only_scaling and g["world_size"].nunique() < 2:
            continue
        w = g["world_size"].to_numpy(dtype=float)
        y = g[column].to_numpy(dtype=float)
        worlds += list(w)
        shown.append(g)
        ax.errorbar(
            w,
            y,
            yerr=_yerr(y, g[lo_col], g[hi_col]),
            marker="o",
            capsize=3,
            color=colors[series],
            label=label,
            linewidth=1.6,
        )
        _mark_flags(ax, g, column, flags, labelled)
        if ideal == "per-series" and len(w) > 1:
            base = g.iloc[0]
            ideal_y = base[column] * (w / base["world_size"]) ** (-1 if column == "epoch_time_s" else 1)
            ax.plot(w, ideal_y, linestyle="--", color=colors[series], alpha=0.5, linewidth=1)
        if ideal == "speedup":
            bw = int(g["baseline_world_size"].iloc[0])
            shared_ideal.setdefault(bw, []).append((label, series, max(w)))
    if ideal == "speedup":
        # Ideal linear speedup starts at each strategy's own baseline: one black
        # line when they all share it, else one dashed line per strategy.
        for bw, members in sorted(shared_ideal.items()):
            for label, series, top in members if len(shared_ideal) > 1 else [("", None, max(worlds))]:
                xs = np.array([bw, top], dtype=float)
                ax.plot(
                    xs,
                    xs / bw,
                    linestyle="--",
                    linewidth=1,
                    alpha=0.6 if series is None else 0.7,
                    color="black" if series is None else colors[series],
                    label="ideal (linear)" if series is None else f"ideal {label} (from world {bw})",
                )
    if ideal == "efficiency":
        ax.axhline(1.0, linestyle="--", color="black", alpha=0.6, linewidth=1, label="ideal (100%)")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 100:.0f}%"))
        top = max(1.1, float(np.nanmax(groups[hi_col].to_numpy(dtype=float))) * 1.05)
        ax.set_ylim(0, top)
    elif log:
        _log_y(ax)
    if ideal == "per-series":
        ax.plot([], [], linestyle="--", color="grey", label="ideal (dashed, from each baseline)")
    _world_axis(ax, worlds)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path, stamp, _flag_text(pd.concat(shown), flags) if shown and flags else None)


def _labels(groups: pd.DataFrame) -> list[str]:
    return [
        f"{s.replace(', ', chr(10))}\n{w} ({n}x{p})"
        for s, w, n, p in zip(groups["series"], groups["world_size"], groups["nodes"], groups["procs_per_node"])
    ]


def _bar_fig(n: int, rows: int = 1):
    return plt.subplots(rows, 1, figsize=(max(6.4, 1.3 * n + 2.0), 3.9 * rows + 0.4), squeeze=False)


def _computation_plot(groups, path, colors, stamp: str | None = None) -> None:
    fig, axes = _bar_fig(len(groups))
    ax = axes[0, 0]
    frac = groups["computation_fraction"].to_numpy(dtype=float)
    x = np.arange(len(groups))
    ax.bar(x, frac, color="tab:blue", label="computation")
    ax.bar(x, 1 - frac, bottom=frac, color="tab:orange", alpha=0.7, label="other\n(communication,\nwaiting, data)")
    comp_s = groups["compute_s_per_epoch"].to_numpy(dtype=float)
    other_s = groups["other_s_per_epoch"].to_numpy(dtype=float)
    for xi, f, cs, os_ in zip(x, frac, comp_s, other_s):
        # Percentages alone hide how much time it is: the seconds per epoch beside them.
        ax.text(xi, f / 2, f"{f * 100:.0f}%\n{cs:.3g} s", ha="center", va="center", color="white", fontsize="small")
        ax.text(
            xi,
            min(0.985, f + (1 - f) / 2) if f < 0.9 else 0.985,
            f"{(1 - f) * 100:.0f}%, {os_:.3g} s",
            ha="center",
            va="center" if f < 0.9 else "top",
            color="black",
            fontsize="x-small",
        )
    ax.set_xticks(x, _labels(groups), fontsize="small")
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 100:.0f}%"))
    ax.set_ylabel("share of profiled step time\n(label: seconds per epoch)")
    ax.set_xlabel("group, world size (nodes x processes per node)")
    ax.set_title("Computation vs other time per training step")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(fig, path, stamp)


def _energy_plot(groups, path, colors, stamp: str | None = None) -> None:
    fig, axes = _bar_fig(len(groups), rows=2)
    x = np.arange(len(groups))
    c = [colors[s] for s in groups["series"]]
    e = groups["gpu_energy_wh"].to_numpy(dtype=float)
    axes[0, 0].bar(x, e, color=c, yerr=_yerr(e, groups["gpu_energy_wh_min"], groups["gpu_energy_wh_max"]), capsize=3)
    axes[0, 0].set_ylabel("Wh per run (all GPUs)")
    axes[0, 0].set_title("GPU energy")
    per = groups["gpu_energy_wh_per_sample"].to_numpy(dtype=float) * 1000
    axes[1, 0].bar(x, per, color=c)
    axes[1, 0].set_ylabel("mWh per training sample")
    for ax in axes[:, 0]:
        ax.set_xticks(x, _labels(groups), fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    axes[1, 0].set_xlabel("group, world size (nodes x processes per node)")
    _save(fig, path, stamp)


def _utilization_plot(groups, path, colors, stamp: str | None = None) -> None:
    fig, axes = _bar_fig(len(groups))
    ax = axes[0, 0]
    x = np.arange(len(groups))
    ax.bar(x, groups["gpu_utilization_pct"].to_numpy(dtype=float), color=[colors[s] for s in groups["series"]])
    ax.set_xticks(x, _labels(groups), fontsize="small")
    ax.set_ylim(0, 100)
    ax.set_ylabel("GPU utilisation (%), mean over ranks")
    ax.set_xlabel("group, world size (nodes x processes per node)")
    ax.set_title("GPU utilisation")
    ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path, stamp)


SPREAD = ("spread>difference",)
SPEED = ("efficiency>100%", "speedup>world")


def _mode(g: pd.DataFrame) -> str:
    """'strong scaling' / 'weak scaling' for the title when every group shares it."""
    modes = {str(m).split(" ")[0] for m in g.get("scaling", pd.Series(dtype=str))}
    return f", {modes.pop()} scaling" if len(modes) == 1 else ""


def make_plots(report, out: Path, stamp: str | None = None) -> tuple[list[Plot], list[tuple[str, str]]]:
    """Draw every figure the data allows into ``out``; return (drawn, [(skipped title, why)]).

    ``stamp``: a line printed in the corner of every figure (where the figures come from); flagged figures
    are ringed in red and listed on the image."""
    g = report.groups
    colors = _colors(g)
    plots: list[Plot] = []
    skipped: list[tuple[str, str]] = []
    out = Path(out)
    mode = _mode(g)

    _scaling_plot(
        g,
        "epoch_time_s",
        "epoch_time_s_min",
        "epoch_time_s_max",
        "training time per epoch (s)",
        f"Epoch time (warm-up and validation excluded{mode})",
        out / "epoch_time.png",
        "per-series",
        colors,
        stamp=stamp,
        flags=SPREAD,
    )
    plots.append(
        Plot(
            "epoch_time.png",
            "Epoch time",
            "Median training time per epoch against world size (log-log), one line per group; "
            "dashed: ideal scaling from each group's smallest world size. Error bars: see 'spread over'. "
            "Red rings: spread wider than the differences it should resolve.",
        )
    )

    scaling = [s for s, part in g.groupby("series", sort=False) if part["world_size"].nunique() >= 2]
    if scaling:
        left_out = [s for s in dict.fromkeys(g["series"]) if s not in scaling]
        extra = f" Not shown (one world size only): {', '.join(left_out)}." if left_out else ""
        _scaling_plot(
            g,
            "speedup",
            "speedup_lo",
            "speedup_hi",
            "speedup (baseline epoch time / epoch time)",
            f"Speedup vs the smallest world size of each group{mode}",
            out / "speedup.png",
            "speedup",
            colors,
            only_scaling=True,
            stamp=stamp,
            flags=SPEED,
        )
        plots.append(
            Plot(
                "speedup.png",
                "Speedup",
                "Speedup against the smallest world size of the same group (log-log); dashed: ideal "
                "linear speedup. Error bars pair the extremes of both groups. Red rings: above the "
                "world size or above 100% efficiency." + extra,
            )
        )
        _scaling_plot(
            g,
            "efficiency",
            "efficiency_lo",
            "efficiency_hi",
            "parallel efficiency",
            f"Parallel efficiency (speedup / relative world size{mode})",
            out / "efficiency.png",
            "efficiency",
            colors,
            only_scaling=True,
            stamp=stamp,
            flags=SPEED,
        )
        plots.append(
            Plot(
                "efficiency.png",
                "Parallel efficiency",
                "Speedup divided by world size / baseline world size; 100% is perfect scaling; red "
                "rings: above 100%, a figure to check." + extra,
            )
        )
    else:
        why = "every group ran at a single world size, so there is no speedup to show"
        skipped += [("Speedup", why), ("Parallel efficiency", why)]

    if "val_loss" in g and g["val_loss"].notna().any():
        _scaling_plot(
            g.dropna(subset=["val_loss"]),
            "val_loss",
            "val_loss_min",
            "val_loss_max",
            "final validation loss",
            "Final validation loss vs world size",
            out / "val_loss.png",
            None,
            colors,
            stamp=stamp,
            log=False,
        )
        plots.append(
            Plot(
                "val_loss.png",
                "Final validation loss",
                "Validation loss after the last epoch against world size (bars: min-max over runs): "
                "adding processes must not change convergence.",
            )
        )
    else:
        skipped.append(("Final validation loss", "no experiment recorded val_loss"))

    if g["samples_per_s"].notna().any():
        _scaling_plot(
            g.dropna(subset=["samples_per_s"]),
            "samples_per_s",
            "samples_per_s_min",
            "samples_per_s_max",
            "training samples / s",
            f"Training throughput{mode.replace(', ', ' (', 1) + ')' if mode else ''}",
            out / "throughput.png",
            "per-series",
            colors,
            stamp=stamp,
        )
        plots.append(
            Plot(
                "throughput.png",
                "Throughput",
                "Training samples per second against world size (log-log); dashed: ideal linear growth "
                "from each group's smallest world size.",
            )
        )
    else:
        skipped.append(("Throughput", "no experiment recorded samples_per_s"))

    comp = g.dropna(subset=["computation_fraction"])
    if not comp.empty:
        _computation_plot(comp, out / "computation.png", colors, stamp)
        missing = len(g) - len(comp)
        plots.append(
            Plot(
                "computation.png",
                "Computation vs other",
                "Share of profiled training-step time in computation kernels (torch profiler) and the rest "
                "(communication, synchronisation, data loading), each with the seconds per epoch it "
                "stands for (share x epoch time)."
                + (f" {missing} configuration(s) without profiler data are not shown." if missing else ""),
            )
        )
    else:
        skipped.append(("Computation vs other", "no experiment has a computation fraction (profiler off)"))

    energy = g.dropna(subset=["gpu_energy_wh"])
    if not energy.empty:
        _energy_plot(energy, out / "gpu_energy.png", colors, stamp)
        plots.append(
            Plot(
                "gpu_energy.png",
                "GPU energy",
                "Top: GPU energy of a run summed over ranks (median over runs, bars min-max). "
                "Bottom: energy per training sample.",
            )
        )
    else:
        skipped.append(("GPU energy", "no experiment measured GPU energy (no NVIDIA GPU was used)"))
    util = g.dropna(subset=["gpu_utilization_pct"])
    if not util.empty:
        _utilization_plot(util, out / "gpu_utilization.png", colors, stamp)
        plots.append(Plot("gpu_utilization.png", "GPU utilisation", "Mean GPU utilisation over ranks and run time."))
    else:
        skipped.append(("GPU utilisation", "no experiment measured GPU utilisation (no NVIDIA GPU was used)"))
    return plots, skipped
