"""The sequence study's per-experiment report: the accuracy it reached, epoch by epoch."""

from __future__ import annotations

import csv
from pathlib import Path

from virgo_exps import fsio
from virgo_exps.provenance import read_metrics


def build(metrics_path: Path, epochs_path: Path, out: Path, title: str) -> Path:
    metrics = read_metrics(metrics_path)  # metrics.json with the run.json beside it (strategy, device, ...)
    rows = list(csv.DictReader(epochs_path.open()))
    lines = [
        f"# {title}",
        "",
        "## Classification",
        "",
        f"Validation accuracy {metrics['val_accuracy']:.3f} after {metrics['epochs']} epochs "
        f"({metrics['strategy']}, {metrics['world_size']} process(es)).",
        "",
        "| epoch | train loss | val loss | val accuracy |",
        "| --- | --- | --- | --- |",
        *(
            f"| {r['epoch']} | {float(r['train_loss']):.4f} | {float(r['val_loss']):.4f} | "
            f"{float(r['val_accuracy']):.3f} |"
            for r in rows
        ),
    ]
    out.mkdir(parents=True, exist_ok=True)
    fsio.write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
    return out / "report.md"
