"""The sequences: class k is a sine of 4 (k + 1) cycles per sequence plus noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from virgo_exps import provenance, store
from virgo_exps.preflight import DataNeeds


def make_splits(cfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(cfg.seed)
    labels = rng.integers(0, cfg.classes, cfg.n_samples)
    t = np.arange(cfg.length) / cfg.length
    x = np.sin(2 * np.pi * 4 * (labels[:, None] + 1) * t[None, :])
    x = (x + cfg.noise * rng.standard_normal(x.shape))[:, None, :].astype(np.float32)  # (N, 1 channel, L)
    y = labels.astype(np.float32)[:, None]  # the trainer's split store holds float32; the loss takes the class
    n_val = max(1, round(cfg.n_samples * cfg.val_fraction))
    return {"train": (x[n_val:], y[n_val:]), "val": (x[:n_val], y[:n_val])}


def write(cfg, flat_params: dict, out: Path) -> None:
    """The split store the trainer reads (``<split>/x``, ``<split>/y``), stamped, published whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = store.partial_path(out)
    group = zarr.open_group(str(partial), mode="w")
    for split, (x, y) in make_splits(cfg).items():
        for name, a in (("x", x), ("y", y)):
            group.create_array(f"{split}/{name}", data=a, chunks=(64, *a.shape[1:]), compressors=store.compressors())
    group.attrs[provenance.KEY] = provenance.stamp("data", flat_params)
    group.attrs["complete"] = True
    store.publish(partial, out)


def data_needs(p, machine, up_to_date):
    cfg = p.sequences
    size = 0 if "data" in up_to_date(("data",)) else cfg.n_samples * (cfg.length + 1) * 4
    return DataNeeds(
        outputs=(("sequences", "data/sequences.zarr", size),),
        peaks=((2 * cfg.n_samples * (cfg.length + 1) * 8, "data: the sequences in memory"),),
        subject=f"sequences.n_samples: {cfg.n_samples} sequences",
        lower="lower sequences.n_samples (or sequences.length)",
    )
