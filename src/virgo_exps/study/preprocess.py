"""Q-transform images, patches around the main channel's peak, split and
normalisation.

Pipeline
--------
1. Split: ``perm = default_rng(split_seed).permutation(n)``; the first
   ``round(n * val_fraction)`` ids are the validation split, the rest the
   training split; both are kept in increasing id order (``<split>/index``).
2. Pass 1 (the expensive one, on all cores): the generated ``strain`` is read in
   blocks of whole generation chunks; every channel of ``batch_size`` samples
   at a time goes through :func:`virgo_exps.study.qtransform.q_transform`
   (``frange=(fmin, fmax)``, ``whiten``, the store's sample rate), giving
   ``(1000, n_freq)`` images on gwpy's grid. The window is centred on the peak
   of the *main* image after a 5 x 5 bin box smoothing (80 ms x 2.5 Hz on the
   default grid): a lone noisy pixel cannot pull the window away from a
   glitch's energy, and the window centres on the glitch's bulk rather than
   on whichever tile the interpolation made loudest. The ``patch_size`` square
   (time x frequency) is clipped to stay inside the image and cut at the
   same place from every channel. Patches are log-scaled (``log1p`` of the
   energy clipped at 0: median-normalised Q energies are ~1 in noise and
   reach 10^2-10^3 on glitches, a heavy tail that would otherwise make a few
   pixels dominate both the statistics and an MSE loss; the clip removes the
   small negative overshoots of the spline interpolation) and written,
   un-normalised, to the final arrays, while per-channel moments of the
   training split are accumulated (float64, Chan et al.'s pairwise merge,
   in sample order, so the result does not depend on the number of workers).
3. Pass 2: every chunk of every split is normalised in place with the
   training statistics: ``x = (x - x_mean[c]) / x_std[c]`` per auxiliary
   channel, ``y = (y - y_mean) / y_std``. Standard deviations are population
   ones (ddof=0), so the training split has mean 0 and std 1 per channel
   up to float32 rounding.

Output (zarr v3 group, published atomically like the generated store)
---------------------------------------------------------------------
``train/x`` float32 (N_train, n_aux, P, P), ``train/y`` float32
(N_train, 1, P, P), ``train/index`` int64 (N_train,) original sample ids,
``train/window`` int32 (N_train, 2) first time bin and first frequency bin of
the patch on the Q-transform grid; the same under ``val/``. Root attributes:
``norm`` = {x_mean, x_std, y_mean, y_std}, ``patch_size``, ``params`` (the
preprocess parameters), ``generate`` (the source store's attributes),
``grid`` (origin, step and size of the time and frequency axes),
``frange_effective`` (the band on the grid, after q_transform's Nyquist cap),
``log_scale``, ``smoothing``, counts, and ``complete: true`` written last.
Patch pixel ``[i, j]`` of a sample with window ``(wt, wf)`` sits at time
``grid.t0 + (wt + i) * grid.dt`` and frequency ``grid.f0 + (wf + j) * grid.df``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from virgo_exps import provenance as _provenance
from virgo_exps import store as _store
from virgo_exps.study.params import PreprocessConfig

FORMAT_VERSION = 1
# Samples per chunk along axis 0 of every output array. Training reads whole
# splits or large contiguous slices; 256 samples (~12 MB of x for 3 aux
# channels and 64 x 64 patches) keep the number of files and the per-chunk
# overhead small, make each read a large sequential one that decompresses
# in parallel, and still let a rank or a DataLoader worker read a shard
# without decompressing much more than it needs.
OUT_CHUNK = 256
SMOOTH = (5, 5)  # time bins x frequency bins of the peak-finding box filter


# --------------------------------------------------------------------------
# Pieces that are also used by the tests
# --------------------------------------------------------------------------


def split_indices(n: int, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids), each sorted."""
    perm = np.random.default_rng(split_seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _box_sums(img: np.ndarray, t0: int, t1: int, f0: int, f1: int) -> np.ndarray:
    """Sums over the SMOOTH box centred on every pixel of ``[t0, t1) x [f0, f1)``
    of the 2-D ``img`` (edge pixels replicated), from a float64 integral image."""
    kt, kf = SMOOTH
    ht, hf = kt // 2, kf // 2
    rows = np.clip(np.arange(t0 - ht, t1 + ht), 0, img.shape[0] - 1)
    cols = np.clip(np.arange(f0 - hf, f1 + hf), 0, img.shape[1] - 1)
    sub = np.zeros((rows.size + 1, cols.size + 1))
    sub[1:, 1:] = img[np.ix_(rows, cols)]
    c = sub.cumsum(axis=0).cumsum(axis=1)
    return c[kt:, kf:] - c[:-kt, kf:] - c[kt:, :-kf] + c[:-kt, :-kf]


def smoothed_peak(img: np.ndarray) -> tuple[int, int]:
    """(time bin, freq bin) of the maximum of the SMOOTH box-filtered 2-D image.

    Equal to the argmax (first in row-major order) of the fully filtered
    image, but computed on a small crop: if ``s0`` is the box sum around the
    loudest pixel, a box can only sum to ``s0`` or more if it holds a pixel of
    at least ``s0 / box_area``; so only box centres within half a box of such
    pixels are evaluated (a few hundred on a glitch, instead of the 280 000
    pixels of a full image).
    """
    kt, kf = SMOOTH
    n_t, n_f = img.shape
    ti, fi = np.unravel_index(int(np.argmax(img)), img.shape)
    s0 = _box_sums(img, ti, ti + 1, fi, fi + 1)[0, 0]
    loud = img >= s0 / (kt * kf) * (1.0 - 1e-6)
    ts, fs = np.flatnonzero(loud.any(axis=1)), np.flatnonzero(loud.any(axis=0))  # bounding box
    t_lo, t_hi = max(int(ts[0]) - kt // 2, 0), min(int(ts[-1]) + kt // 2 + 1, n_t)
    f_lo, f_hi = max(int(fs[0]) - kf // 2, 0), min(int(fs[-1]) + kf // 2 + 1, n_f)
    sums = _box_sums(img, t_lo, t_hi, f_lo, f_hi)
    a, b = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return t_lo + int(a), f_lo + int(b)


def find_windows(main: np.ndarray, patch: int) -> np.ndarray:
    """Top-left (time bin, freq bin) of the ``patch`` x ``patch`` window around
    the peak of each smoothed main image ``(b, T, F)`` -> int32 ``(b, 2)``."""
    b, nt, nf = main.shape
    out = np.empty((b, 2), dtype=np.int32)
    for k in range(b):
        ti, fi = smoothed_peak(main[k])
        out[k] = (min(max(ti - patch // 2, 0), nt - patch), min(max(fi - patch // 2, 0), nf - patch))
    return out


def cut_patches(images: np.ndarray, windows: np.ndarray, patch: int) -> np.ndarray:
    """``images`` (b, C, T, F) -> (b, C, patch, patch) at each sample's window."""
    out = np.empty(images.shape[:2] + (patch, patch), dtype=np.float32)
    for k, (t0, f0) in enumerate(windows):
        out[k] = images[k, :, t0 : t0 + patch, f0 : f0 + patch]
    return out


# Distance (in float64 units in the last place) from a float32 rounding
# midpoint below which a float64 log1p is not trusted to round the right way:
# libm and numpy's SIMD kernels are within a few ulp of the exact value.
_MIDPOINT_ULPS = 64.0


def log1p_float32(x: np.ndarray) -> np.ndarray:
    """``log1p(x)`` of float32 values, correctly rounded to float32.

    numpy picks its ``log1p`` kernel at run time from the CPU's features, and
    the kernels differ in the last bit (AVX-512 vs AVX2: about 15 % of float32
    results, 8 % of float64 ones), which would make the stored images depend on
    the machine. Here the float64 result is rounded to float32, which is right
    unless it lies within a few float64 ulp of the midpoint between two float32
    values; those rare elements (about one in 10^7) are decided exactly with
    ``decimal`` (correctly rounded ``ln``). The result is the same bits on every
    CPU.
    """
    x = np.asarray(x, dtype=np.float32)
    y64 = np.log1p(x.astype(np.float64))
    y32 = y64.astype(np.float32)
    finite = np.isfinite(y64) & np.isfinite(y32)
    # the float32 neighbour on the other side of y64, and the midpoint between
    toward = np.where(y64 >= y32, np.float32(np.inf), np.float32(-np.inf))
    other = np.nextafter(y32, toward)
    mid = 0.5 * (y32.astype(np.float64) + other)  # exact in float64
    # (an ulp of a float64 y is at most |y| * 2**-52)
    close = finite & (np.abs(y64 - mid) <= (_MIDPOINT_ULPS * 2.0**-52) * np.abs(y64))
    if close.any():
        import decimal

        ctx = decimal.Context(prec=60)
        flat_x, flat_y, flat_o, flat_m = x[close], y32[close], other[close], mid[close]
        fixed = np.empty(flat_x.shape, dtype=np.float32)
        for i in range(flat_x.size):
            exact = ctx.ln(ctx.add(decimal.Decimal(1), decimal.Decimal(float(flat_x[i]))))
            m = decimal.Decimal(float(flat_m[i]))
            lo, hi = sorted((flat_y[i], flat_o[i]))
            if exact == m:  # only possible for x == 0 (log1p(0) = 0 is exact); keep
                fixed[i] = flat_y[i]
            else:
                fixed[i] = hi if exact > m else lo
        y32[close] = fixed
    return y32


def log_energy(e: np.ndarray) -> np.ndarray:
    """The log scaling applied to Q energies before normalisation (the same
    bits on every CPU: see :func:`log1p_float32`)."""
    return log1p_float32(np.maximum(e, 0.0, dtype=np.float32))


def transform_samples(
    strain: np.ndarray, sample_rate: float, cfg: PreprocessConfig, device=None
) -> tuple[np.ndarray, np.ndarray]:
    """Log-energy patches ``(b, C, P, P)`` and windows ``(b, 2)`` of a block of
    samples ``(b, C, n_time)``, ``cfg.batch_size`` samples per transform."""
    from virgo_exps.study.qtransform import q_transform

    b, n_ch, n_time = strain.shape
    p = cfg.patch_size
    patches = np.empty((b, n_ch, p, p), dtype=np.float32)
    windows = np.empty((b, 2), dtype=np.int32)
    for s in range(0, b, cfg.batch_size):
        e = min(s + cfg.batch_size, b)
        series = np.ascontiguousarray(strain[s:e]).reshape((e - s) * n_ch, n_time)
        img = q_transform(series, sample_rate, frange=(cfg.fmin, cfg.fmax), whiten=cfg.whiten, device=device)
        img = img.reshape(e - s, n_ch, *img.shape[1:])
        if img.shape[2] < p or img.shape[3] < p:
            raise ValueError(f"patch_size {p} does not fit the Q-transform grid {img.shape[2:]}")
        win = find_windows(img[:, 0], p)
        patches[s:e] = log_energy(cut_patches(img, win, p))
        windows[s:e] = win
        del img
    return patches, windows


class Moments:
    """Streaming per-channel count, mean and M2 (float64; Chan's merge)."""

    def __init__(self, k: int):
        self.n = 0
        self.mean = np.zeros(k)
        self.m2 = np.zeros(k)

    def add(self, a: np.ndarray) -> None:
        """``a``: (m, k, ...) values of k channels."""
        if a.shape[0] == 0:
            return
        a = np.moveaxis(np.asarray(a, dtype=np.float64), 1, 0).reshape(a.shape[1], -1)
        nb = a.shape[1]
        mb = a.mean(axis=1)
        m2b = ((a - mb[:, None]) ** 2).sum(axis=1)
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n

    @property
    def std(self) -> np.ndarray:
        s = np.sqrt(self.m2 / max(self.n, 1))
        return np.where(s > 0, s, 1.0)


# --------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------

_STRAIN_CACHE: dict[str, object] = {}


def _strain(path: str):
    arr = _STRAIN_CACHE.get(path)
    if arr is None:
        import zarr

        arr = zarr.open_array(path, path="strain", mode="r")
        _STRAIN_CACHE.clear()
        _STRAIN_CACHE[path] = arr
    return arr


def _init_worker(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def grid_of(n_time: int, sample_rate: float, cfg: PreprocessConfig) -> dict:
    """Origin, step and size of the time and frequency axes of the images."""
    from virgo_exps.study.qtransform import q_transform_grid

    times, freqs = q_transform_grid(n_time, sample_rate, frange=(cfg.fmin, cfg.fmax))
    return {
        "t0": float(times[0]),
        "dt": float(times[1] - times[0]) if len(times) > 1 else 0.0,
        "n_time": len(times),
        "f0": float(freqs[0]),
        "df": float(freqs[1] - freqs[0]) if len(freqs) > 1 else 0.0,
        "n_freq": len(freqs),
    }


def _transform_block(path: str, start: int, stop: int, sample_rate: float, cfg: PreprocessConfig, device=None):
    block = _store.read(_strain(path), path, start, stop, stage="generate")
    patches, windows = transform_samples(block, sample_rate, cfg, device=device)
    return start, patches, windows, grid_of(block.shape[-1], sample_rate, cfg)


# --------------------------------------------------------------------------
# Output store
# --------------------------------------------------------------------------


class _SplitWriter:
    """Collects a split's patches in sample order and writes whole output
    chunks (aligned writes only: each chunk is compressed and written once)."""

    def __init__(self, group, split: str, index: np.ndarray, n_aux: int, p: int):
        self.x, self.y = group[f"{split}/x"], group[f"{split}/y"]
        self.n = index.size
        self.chunk = self.x.chunks[0]
        self.bx = np.empty((self.chunk, n_aux, p, p), dtype=np.float32)
        self.by = np.empty((self.chunk, 1, p, p), dtype=np.float32)
        self.windows = np.zeros((self.n, 2), dtype=np.int32)
        self.pos = 0  # next position in the split
        self.fill = 0  # rows in the buffer

    def add(self, patches: np.ndarray, windows: np.ndarray) -> None:
        """Append the next samples of the split (in split order)."""
        n = len(patches)
        self.windows[self.pos : self.pos + n] = windows
        i = 0
        while i < n:
            take = min(self.chunk - self.fill, n - i)
            self.by[self.fill : self.fill + take, 0] = patches[i : i + take, 0]
            self.bx[self.fill : self.fill + take] = patches[i : i + take, 1:]
            self.fill += take
            self.pos += take
            i += take
            if self.fill == self.chunk:
                self._flush()

    def _flush(self) -> None:
        if self.fill == 0:
            return
        start = self.pos - self.fill  # the buffer holds rows [pos - fill, pos)
        self.x[start : self.pos] = self.bx[: self.fill]
        self.y[start : self.pos] = self.by[: self.fill]
        self.fill = 0

    def close(self) -> None:
        self._flush()
        if self.pos != self.n:
            raise RuntimeError(f"split writer got {self.pos} of {self.n} samples")


def _create_output(path: Path, splits: dict, n_aux: int, p: int) -> object:
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    opts = _store.array_options()
    for split, index in splits.items():
        n = int(index.size)
        c = max(1, min(OUT_CHUNK, n))
        sub = group.create_group(split)
        sub.create_array(
            "x",
            shape=(n, n_aux, p, p),
            chunks=(c, n_aux, p, p),
            dtype="float32",
            **opts,
            dimension_names=("sample", "channel", "time", "frequency"),
        )
        sub.create_array(
            "y",
            shape=(n, 1, p, p),
            chunks=(c, 1, p, p),
            dtype="float32",
            **opts,
            dimension_names=("sample", "channel", "time", "frequency"),
        )
        sub.create_array(
            "index",
            shape=(n,),
            chunks=(max(1, n),),
            dtype="int64",
            **opts,
            dimension_names=("sample",),
        )
        sub.create_array(
            "window",
            shape=(n, 2),
            chunks=(max(1, n), 2),
            dtype="int32",
            **opts,
            dimension_names=("sample", "corner"),
        )
        sub["index"][:] = index.astype(np.int64)
    return group


def _normalise_chunk(arr, start: int, stop: int, mean: np.ndarray, std: np.ndarray) -> int:
    data = np.asarray(arr[start:stop], dtype=np.float64)
    shape = (1, -1) + (1,) * (data.ndim - 2)
    data -= mean.reshape(shape)
    data /= std.reshape(shape)
    arr[start:stop] = data.astype(np.float32)
    return stop - start


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
    from virgo_exps.study.generate import open_strain

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
            for s in starts:
                e = min(s + block, n)
                block_data = _store.read(strain, gen_store, s, e, stage="generate")  # checksummed
                consume(
                    s,
                    *transform_samples(block_data, sample_rate, cfg, device=device),
                    grid_of(n_time, sample_rate, cfg),
                )
        else:
            import multiprocessing as mp

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


def open_images(path: Path):
    """The complete preprocessed group (read-only)."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    if not group.attrs.get("complete", False):
        raise RuntimeError(f"{path}: the preprocessed store is incomplete; rerun the preprocess stage")
    return group


__all__ = [
    "preprocess",
    "split_indices",
    "find_windows",
    "cut_patches",
    "log_energy",
    "log1p_float32",
    "transform_samples",
    "Moments",
    "open_images",
    "OUT_CHUNK",
]
