"""The per-experiment report: training curves as PNG and a summary in Markdown."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
# Labels, titles and stamps carry names from params and experiments: a `$` in them is text, not TeX math.
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _one_line(value) -> str:
    """``value`` as one line of printable text: line breaks and other control characters become spaces."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    return " ".join(text.split())


def md_text(value) -> str:
    """Text from params or a run as literal Markdown: one line, HTML escaped, markup characters backslashed.

    A line break in ``report.title`` would start a new block (a second heading, a raw
    ``<script>`` line); ``<``, ``>`` and ``&`` would be read as HTML.
    """
    text = html.escape(_one_line(value), quote=False)
    return re.sub(r"([\\`*_\[\]{}#|!~])", r"\\\1", text)


def md_code(value) -> str:
    """``value`` as a Markdown code span (literal, also for ``<``): fenced by more backticks than it holds."""
    text = _one_line(value)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _fmt(v) -> str:
    if v is None:
        return "not measured"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _plot(df: pd.DataFrame, columns: list[str], ylabel: str, title: str, path: Path, log: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for col in columns:
        ax.plot(df["epoch"], df[col], marker="o", label=col)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build(metrics_path: Path, epochs_path: Path, out: Path, title: str, experiment: str = "workspace") -> Path:
    """Write ``out/report.md`` and its PNGs atomically (a temporary folder renamed at the end)."""
    metrics = json.loads(Path(metrics_path).read_text())
    df = pd.read_csv(epochs_path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _plot(df, ["train_loss", "val_loss"], "MSE loss", "Loss per epoch", tmp / "loss.png", log=True)
    _plot(df, ["train_time_s", "val_time_s"], "seconds", "Time per epoch", tmp / "epoch_time.png")
    _plot(df, ["samples_per_s"], "samples / s", "Training throughput", tmp / "throughput.png")
    gpu_note = (
        "GPU utilisation and energy: not measured (no NVIDIA GPU was used)."
        if metrics.get("gpu_energy_wh") is None
        else f"GPU energy: {_fmt(metrics['gpu_energy_wh'])} Wh, "
        f"utilisation {_fmt(metrics.get('gpu_utilization_pct'))} %."
    )
    rows = "\n".join(f"| {md_text(k)} | {md_text(_fmt(v))} |" for k, v in sorted(metrics.items()))
    table = df.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else df.to_string(index=False)
    text = f"""# {md_text(title)}

Experiment: {md_code(experiment)}; strategy {md_code(metrics.get("strategy"))} \
on {md_text(metrics.get("world_size"))} process(es).
The epoch time and throughput figures exclude the first (warm-up) epoch and validation.

| metric | value |
|---|---|
{rows}

{gpu_note}

![loss](loss.png)
![epoch time](epoch_time.png)
![throughput](throughput.png)

## Per epoch

{table if table.startswith("|") else "```" + chr(10) + table + chr(10) + "```"}
"""
    (tmp / "report.md").write_text(text)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out / "report.md"


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
