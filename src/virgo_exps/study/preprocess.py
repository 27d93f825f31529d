"""The preprocess stage: the generated store into normalised train/val patches, in two passes
over blocks of samples.

Pipeline
--------
1. Split (:mod:`virgo_exps.study.normalise`): a permutation of the sample ids
   drawn from ``split_seed`` gives the validation split (its first
   ``round(n * val_fraction)`` ids) and the training split (the rest), both
   kept in increasing id order (``<split>/index``).
2. Pass 1 (the expensive one, on all cores): the generated ``strain`` is read in
   blocks of whole generation chunks, so that reads are aligned and the
   transform batches do not depend on the number of workers. Each block goes
   through :func:`virgo_exps.study.patches.transform_samples` (Q-transform
   images, the ``patch_size`` window around the main channel's smoothed peak,
   log-scaled patches), in worker processes or here. Results are consumed in
   block order: written, un-normalised, to the final arrays
   (:mod:`virgo_exps.study.imagestore`), while per-channel moments of the
   training split are accumulated (float64, Chan et al.'s pairwise merge, in
   sample order, so the result does not depend on the number of workers).
3. Pass 2: every chunk of every split is normalised in place with the
   training statistics (:mod:`virgo_exps.study.normalise`).

The output store's layout and attributes are described in
:mod:`virgo_exps.study.imagestore`.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from virgo_exps import provenance as _provenance
from virgo_exps import store as _store
from virgo_exps.numerics import pin_mkl_branch
from virgo_exps.study.generate import open_strain
from virgo_exps.study.imagestore import _create_output, _SplitWriter
from virgo_exps.study.normalise import Moments, _normalise_chunk, split_indices
from virgo_exps.study.params import PreprocessConfig
from virgo_exps.study.patches import SMOOTH, grid_of, transform_samples

FORMAT_VERSION = 1


# --------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------

_STRAIN_CACHE: dict[str, object] = {}


def _strain(path: str):
    arr = _STRAIN_CACHE.get(path)
    if arr is None:
        arr = zarr.open_array(path, path="strain", mode="r")
        _STRAIN_CACHE.clear()
        _STRAIN_CACHE[path] = arr
    return arr


def _init_worker(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch  # heavy: a worker's; the parent of a multi-worker run never loads it

    pin_mkl_branch()  # before torch's first computation: the same bytes on every processor
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def _transform_block(path: str, start: int, stop: int, sample_rate: float, cfg: PreprocessConfig, device=None):
    block = _store.read(_strain(path), path, start, stop, stage="generate")
    patches, windows = transform_samples(block, sample_rate, cfg, device=device)
    return start, patches, windows, grid_of(block.shape[-1], sample_rate, cfg)


# --------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------


def _resolve_workers(workers: int | None, n_blocks: int, device) -> int:
    if device is not None and str(device) != "cpu":
        return 1  # one process drives the accelerator
    w = (os.cpu_count() or 1) if workers in (None, 0) else int(workers)
    return max(1, min(w, n_blocks))


def preprocess(
    gen_store: Path,
    cfg: PreprocessConfig,
    out: Path,
    progress: bool = True,
    workers: int | None = None,
    device: str | None = None,
) -> dict:
    """Turn the generated store into normalised train/val patches at ``out``.

    ``workers``: processes for the Q-transforms (None or 0: all cores; each
    gets ``cores // workers`` torch threads; 1: run here, with the calling
    process's torch thread setting). ``device``: torch device for the
    transforms (an accelerator implies one process). Returns a summary.
    """
    gen_store, out = Path(gen_store), Path(out)
    t_start = time.perf_counter()
    strain, gen_attrs = open_strain(gen_store)
    n, n_ch, n_time = strain.shape
    n_aux = n_ch - 1
    sample_rate = float(gen_attrs["sample_rate"])
    if cfg.fmax >= sample_rate / 2:
        raise ValueError(f"preprocess.fmax={cfg.fmax} Hz is not below Nyquist ({sample_rate / 2} Hz)")
    if n_aux < 1:
        raise ValueError(f"{gen_store}: no auxiliary channel")
    p = cfg.patch_size
    # (the grid, and whether the patch fits it, is known once a block has been
    # transformed: the parent then never needs torch or the tiling itself)

    train_idx, val_idx = split_indices(n, cfg.val_fraction, cfg.split_seed)
    if train_idx.size == 0 or val_idx.size == 0:
        raise ValueError(f"val_fraction {cfg.val_fraction} of {n} samples leaves an empty split")
    is_val = np.zeros(n, dtype=bool)
    is_val[val_idx] = True

    # Blocks of whole generation chunks holding at least batch_size samples:
    # aligned reads, and transform batches that do not depend on `workers`.
    gen_chunk = int(strain.chunks[0])
    block = gen_chunk * max(1, math.ceil(cfg.batch_size / gen_chunk))
    starts = list(range(0, n, block))
    nw = _resolve_workers(workers, len(starts), device)

    out.parent.mkdir(parents=True, exist_ok=True)
    _store.remove_stale_partials(out)
    partial = _store.partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)
    if progress:
        print(
            f"[preprocess] {n} samples ({train_idx.size} train, {val_idx.size} val), "
            f"{n_ch} channels, {len(starts)} blocks on {nw} worker(s), whiten={cfg.whiten}",
            file=sys.stderr,
            flush=True,
        )
    try:
        group = _create_output(partial, {"train": train_idx, "val": val_idx}, n_aux, p)
        writers = {
            "train": _SplitWriter(group, "train", train_idx, n_aux, p),
            "val": _SplitWriter(group, "val", val_idx, n_aux, p),
        }
        mx, my = Moments(n_aux), Moments(1)
        prog = _store.Progress("preprocess", n, enabled=progress)
        done = 0

        grid = None

        def consume(start: int, patches: np.ndarray, windows: np.ndarray, block_grid: dict) -> None:
            nonlocal done, grid
            grid = block_grid
            ids = np.arange(start, start + len(patches))
            val = is_val[ids]
            tr = ~val
            mx.add(patches[tr, 1:])
            my.add(patches[tr, :1])
            writers["train"].add(patches[tr], windows[tr])
            writers["val"].add(patches[val], windows[val])
            done += len(patches)
            prog.update(done)

        t1 = time.perf_counter()
        if nw == 1:
            pin_mkl_branch()
            for s in starts:
                e = min(s + block, n)
                block_data = _store.read(strain, gen_store, s, e, stage="generate")  # checksummed
                consume(
                    s,
                    *transform_samples(block_data, sample_rate, cfg, device=device),
                    grid_of(n_time, sample_rate, cfg),
                )
        else:
            threads = max(1, (os.cpu_count() or 1) // nw)
            with ProcessPoolExecutor(
                max_workers=nw, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(threads,)
            ) as pool:
                # results are consumed in block order (writes and statistics
                # then do not depend on scheduling); at most 2 blocks per
                # worker are in flight, which bounds memory.
                queue = []
                it = iter(starts)
                for s in it:
                    queue.append(pool.submit(_transform_block, str(gen_store), s, min(s + block, n), sample_rate, cfg))
                    if len(queue) >= 2 * nw:
                        break
                while queue:
                    consume(*queue.pop(0).result())
                    for s in it:
                        queue.append(
                            pool.submit(_transform_block, str(gen_store), s, min(s + block, n), sample_rate, cfg)
                        )
                        break
        for w in writers.values():
            w.close()
        t_transform = time.perf_counter() - t1

        # Pass 2: normalise in place with the training statistics.
        t2 = time.perf_counter()
        x_mean, x_std = mx.mean, mx.std
        y_mean, y_std = my.mean, my.std
        jobs = []
        for split in ("train", "val"):
            for name, mean, std in (("x", x_mean, x_std), ("y", y_mean, y_std)):
                arr = group[f"{split}/{name}"]
                c = arr.chunks[0]
                jobs += [(arr, s, min(s + c, arr.shape[0]), mean, std) for s in range(0, arr.shape[0], c)]
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as tp:
            list(tp.map(lambda j: _normalise_chunk(*j), jobs))
        for split, w in writers.items():
            group[f"{split}/window"][:] = w.windows
        t_norm = time.perf_counter() - t2

        source = {k: v for k, v in gen_attrs.items() if k != "complete"}
        group.attrs.update(
            {
                "norm": {
                    "x_mean": [float(v) for v in x_mean],
                    "x_std": [float(v) for v in x_std],
                    "y_mean": float(y_mean[0]),
                    "y_std": float(y_std[0]),
                },
                "patch_size": p,
                "params": dataclasses.asdict(cfg),
                "generate": source,
                "grid": grid,
                # q_transform lowers fmax (with a warning) when the lowest-Q tiles
                # would not fit below Nyquist; this is the band actually imaged
                "frange_effective": [grid["f0"], grid["f0"] + grid["n_freq"] * grid["df"]],
                "channels_x": list(gen_attrs.get("channels", [f"aux{k}" for k in range(1, n_ch)]))[1:],
                "channels_y": ["main"],
                "log_scale": "log1p(max(energy, 0))",
                "smoothing": list(SMOOTH),
                "n_train": int(train_idx.size),
                "n_val": int(val_idx.size),
                "format_version": FORMAT_VERSION,
                # the params and input data this store was made with (see virgo_exps.provenance)
                "provenance": _provenance.stamp(
                    "preprocess",
                    {f"preprocess.{k}": v for k, v in dataclasses.asdict(cfg).items()},
                    inputs={str(gen_store): gen_store},
                    upstream=gen_attrs.get("provenance"),
                ),
            }
        )
        group.attrs["complete"] = True  # last write
        _store.publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t_start
    summary = {
        "n_samples": n,
        "n_train": int(train_idx.size),
        "n_val": int(val_idx.size),
        "patch_size": p,
        "workers": nw,
        "whiten": cfg.whiten,
        "seconds": round(seconds, 3),
        "transform_seconds": round(t_transform, 3),
        "normalise_seconds": round(t_norm, 3),
        "samples_per_s": round(n / seconds, 2) if seconds > 0 else None,
    }
    if progress:
        print(f"[preprocess] wrote {out}: {summary}", file=sys.stderr, flush=True)
    return summary


__all__ = ["preprocess"]
