"""Batched multi-Q transform on the same output grid as gwpy.

``q_transform`` computes, for a batch of equally long time series, the
normalised-energy Q-transform spectrogram that
``gwpy.timeseries.TimeSeries(x, sample_rate=sr).q_transform(...)`` returns
(for ``outseg=None``, ``logf=False``, ``highpass=None``), on exactly the same
time/frequency grid, but for the whole batch at once.  The time axis starts
at 0 (gwpy's ``t0`` of a series built without an epoch).

How it works (an Omega-style Q scan, vectorised):

1. *Tiling* - a handful of Q values spread logarithmically over ``qrange``;
   for each Q a set of logarithmically spaced central frequencies ("rows")
   whose spacing respects the allowed fractional ``mismatch``.  Every row owns
   a power-of-two number of time tiles and a bi-square window in the frequency
   domain.  All of this only depends on the series length, sample rate and
   the options, so it is computed once and cached
   (:mod:`virgo_exps.study.qplan`).
2. *Transform* - one real FFT of the whole batch.  For each plane, the rows
   sharing a tile count are formed with a single gather (spectrum bins times
   window, already laid out in inverse-FFT order) and one batched inverse FFT.
   The squared magnitude, divided by its per-row median, is the normalised
   tile energy.
3. *Plane choice* - per series, the plane with the loudest tile wins (ties go
   to the lower Q, as a strict ``>`` scan over planes in Q order would do).
4. *Regridding* - the winning plane's rows are resampled onto the common
   output grid with the same interpolating cubic splines gwpy uses (one per
   row in time, then one across rows in frequency).  Those splines are linear
   maps, so they are precomputed as matrices: a sparse one per tile count for
   time and a block-banded dense one per plane for frequency (the spline
   weights decay geometrically away from each output point; weights below
   ``1e-7`` are dropped; :mod:`virgo_exps.study.qspline`).

Optional whitening (:mod:`virgo_exps.study.qwhiten`) mirrors gwpy's default
``whiten=True`` path: a median averaged Welch ASD (Hann window, gwpy's default
FFT length and 50 % overlap), linearly resampled to the data's frequency
resolution, turned into a ``fduration``-long FIR filter by inverse-spectrum
truncation and applied by FFT convolution to the detrended, edge-tapered
series.

Everything after the tiling runs in torch, on CPU by default (the FFTs and
matrix products use all intra-op threads) or on any ``device`` given; on CPU
the bin gather and the median use numpy (``take``/``partition``), which is
markedly faster there than the torch equivalents
(:mod:`virgo_exps.study.qbackend`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from virgo_exps.study.qbackend import _median, _numpy_path
from virgo_exps.study.qplan import QTransformPlan, get_plan
from virgo_exps.study.qwhiten import whiten_batch

__all__ = ["q_transform"]

# Target number of complex tile cells held at once (bounds peak memory).
_CELLS_PER_CHUNK = 24_000_000


# --------------------------------------------------------------------------
# Transform
# --------------------------------------------------------------------------


def _resolve_device(device: Any, x: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(x, torch.Tensor):
        return x.device
    return torch.device("cpu")


def _gather_bins(spec: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """``spec[:, index]`` -> ``(batch, nrows * ntiles)`` complex tiles."""
    if _numpy_path(spec):
        # numpy's take is several times faster than torch's index_select
        # along the last axis of a complex CPU tensor
        return torch.from_numpy(np.take(spec.numpy(), group["index_np"], axis=1))
    return spec.index_select(1, group["index"])


def _plane_energies(
    spec: torch.Tensor,
    plane_t: dict[str, Any],
    norm: Any,
) -> list[torch.Tensor]:
    """Tile energies of one plane, one ``(batch, nrows, ntiles)`` tensor per
    tile count (normalised per row unless ``norm`` is false)."""
    batch = spec.shape[0]
    out = []
    for g in plane_t["groups"]:
        nrows, ntiles = g["nrows"], g["ntiles"]
        tiles = _gather_bins(spec, g).view(batch, nrows, ntiles)
        tiles.mul_(g["weight"])
        z = torch.view_as_real(torch.fft.ifft(tiles, dim=-1))
        re, im = z[..., 0], z[..., 1]
        # re^2 + im^2 as two separately rounded steps: a fused multiply-add
        # (which vectorised CPU kernels use and scalar ones do not) would make
        # the last bit depend on the CPU
        energy = torch.mul(re, re)
        energy.add_(torch.mul(im, im))
        if norm:
            if norm is True or norm == "median":
                scale = _median(energy, dim=-1)
            elif norm == "mean":
                scale = energy.mean(dim=-1)
            else:
                raise ValueError(f"invalid normalisation {norm!r}")
            energy.div_(scale.unsqueeze(-1))
        out.append(energy)
    return out


def _search_slice(
    ntiles: int,
    duration: float,
    window: tuple[float, float] | None,
) -> slice:
    """Tile indices inside the search window (gwpy ``crop`` semantics)."""
    if window is None:
        return slice(None)
    dt = duration / ntiles
    start, end = window
    i0 = None if start <= 0.0 else math.floor(start / dt)
    i1 = None if end >= ntiles * dt else math.floor(end / dt)
    return slice(i0, i1)


def _transform_chunk(
    x: torch.Tensor,
    plan: QTransformPlan,
    ops: dict[str, Any],
    norm: Any,
    search: tuple[float, float] | None,
    out: torch.Tensor,
) -> None:
    """Q-transform ``x`` (batch, time) into ``out`` (batch, ntime, nfreq)."""
    batch, nsamp = x.shape
    nbins = nsamp // 2 + 1
    # spectrum plus an always-zero bin (index ``nbins``) that the padding
    # slots of every row point to
    spec = torch.zeros(batch, nbins + 1, dtype=torch.complex64, device=x.device)
    spec[:, :nbins] = torch.fft.rfft(x, dim=-1)

    energies = []
    peaks = []
    for plane_t in ops["planes"]:
        e_plane = _plane_energies(spec, plane_t, norm)
        energies.append(e_plane)
        peak = torch.stack(
            [e[..., _search_slice(e.shape[-1], plan.duration, search)].amax(dim=(1, 2)) for e in e_plane]
        ).amax(dim=0)
        peaks.append(peak)
    # first plane with the largest peak (ties go to the lower Q)
    choice = torch.stack(peaks, dim=1).argmax(dim=1)

    ntime, nfreq = plan.shape
    for p, plane_t in enumerate(ops["planes"]):
        sel = (choice == p).nonzero().squeeze(1)
        nsel = sel.numel()
        if nsel == 0:
            continue
        # time: each row onto the output times, (nsel, ntime, nrows)
        rows = torch.empty(nsel, ntime, plane_t["nrows"], dtype=torch.float32, device=x.device)
        r0 = 0
        for g, e in zip(plane_t["groups"], energies[p]):
            nr = g["nrows"]
            # (ntiles, nr, nsel): select and transpose in one copy
            flat = e.permute(2, 1, 0)
            flat = flat.index_select(2, sel) if nsel < batch else flat.contiguous()
            flat = flat.view(g["ntiles"], nr * nsel)
            # sparse (ntime, ntiles) @ (ntiles, nr * nsel)
            resampled = torch.sparse.mm(ops["time_maps"][g["ntiles"]], flat)
            rows[:, :, r0 : r0 + nr] = resampled.view(ntime, nr, nsel).permute(2, 0, 1)
            r0 += nr
        # frequency: block-banded GEMMs across rows, written in place
        if nsel == batch:
            targets = [(rows.view(nsel * ntime, -1), out.view(nsel * ntime, nfreq))]
        else:
            targets = [(rows[i], out[b]) for i, b in enumerate(sel.tolist())]
        for src, dst in targets:
            for c0, c1, r0, r1, weights in plane_t["freq_blocks"]:
                torch.mm(src[:, r0:r1], weights, out=dst[:, c0:c1])


def q_transform(
    x: np.ndarray | torch.Tensor,
    sample_rate: float,
    frange: tuple[float, float] = (10.0, 150.0),
    qrange: tuple[float, float] = (4.0, 64.0),
    mismatch: float = 0.2,
    tres: float | None = None,
    fres: float | None = None,
    whiten: bool = False,
    fduration: float = 2.0,
    norm: str | bool = "median",
    device: str | torch.device | None = None,
    *,
    gps: float | None = None,
    search: float = 0.5,
    batch_size: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Q-transform a batch of series onto gwpy's ``q_transform`` grid.

    Parameters
    ----------
    x : array, shape ``(batch, time)`` or ``(time,)``
        Real series, all sampled at ``sample_rate``; a 1-D input is treated
        as a batch of one (the output keeps the batch axis).
    sample_rate : float
        Sampling rate in Hz.
    frange, qrange, mismatch :
        As in gwpy (``frange`` may be capped, with a warning, when the
        lowest Q's tiles would not fit below Nyquist).
    tres : float, optional
        Output time step in seconds; default ``duration / 1000``.
    fres : float, optional
        Output frequency step in Hz; default 0.5 Hz.  (Unlike gwpy, ``None``
        means the default here, not "no frequency resampling".)
    whiten : bool
        Whiten first, like gwpy's ``whiten=True`` (its default!).  gwpy's
        ``q_transform`` whitens unless told otherwise, this function does not.
    fduration : float
        Length of the whitening FIR filter, seconds.
    norm : ``'median'``, ``'mean'``, True or False
        Per-row energy normalisation (``False``: raw tile energy).
    device : torch device, optional
        Where to compute (default CPU).  The result is always a numpy array.
    gps, search : float, optional
        As in gwpy: only tiles within ``search`` seconds around ``gps``
        (seconds from the first sample) decide which Q plane is kept.
    batch_size : int, optional
        Series processed at once (default: bounded by memory, ~24 M tiles).
    out : numpy.ndarray, optional
        C-contiguous float32 array of the output shape to write into (saves
        allocating, and page-faulting, a fresh result on every call).

    Returns
    -------
    numpy.ndarray, float32, shape ``(batch, n_times, n_freqs)``
        Normalised energy; axes given by
        :func:`virgo_exps.study.qplan.q_transform_grid`.  A series
        whose row medians are zero (e.g. all zeros or a constant) yields NaN
        (gwpy raises instead).
    """
    dev = _resolve_device(device, x)
    xt = torch.as_tensor(x)
    if xt.ndim == 1:
        xt = xt[None]
    if xt.ndim != 2:
        raise ValueError(f"expected (batch, time) input, got shape {tuple(xt.shape)}")
    if xt.is_complex():
        raise ValueError("q_transform needs real-valued series")
    if not bool(torch.isfinite(xt).all()):
        raise ValueError("Input signal contains non-numerical values")
    plan = get_plan(xt.shape[-1], sample_rate, frange, qrange, mismatch, tres, fres)
    ops = plan.tensors(dev)
    if isinstance(norm, str):
        norm = norm.lower()
    if norm not in (True, False, None, "median", "mean"):
        raise ValueError(f"invalid normalisation {norm!r}")

    window = None
    if gps is not None and search is not None:
        window = (max(gps - search / 2.0, 0.0), min(gps + search / 2.0, plan.duration))

    nseries = xt.shape[0]
    shape = (nseries, *plan.shape)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {shape}")
    result = torch.from_numpy(out)

    if batch_size is None:
        batch_size = max(1, _CELLS_PER_CHUNK // max(plan.n_cells, 1))
    for start in range(0, nseries, batch_size):
        stop = min(start + batch_size, nseries)
        chunk = xt[start:stop].to(device=dev, dtype=torch.float64)
        if whiten:
            chunk = whiten_batch(chunk, sample_rate, fduration=fduration)
        if _numpy_path(dev):
            _transform_chunk(chunk, plan, ops, norm, window, result[start:stop])
        else:
            dst = torch.empty((stop - start, *plan.shape), dtype=torch.float32, device=dev)
            _transform_chunk(chunk, plan, ops, norm, window, dst)
            result[start:stop].copy_(dst)
    return out
