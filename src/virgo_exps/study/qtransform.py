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
   the options, so it is computed once and cached (see :func:`get_plan`).
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
   ``1e-7`` are dropped).

Optional whitening mirrors gwpy's default ``whiten=True`` path: a median
averaged Welch ASD (Hann window, gwpy's default FFT length and 50 % overlap),
linearly resampled to the data's frequency resolution, turned into a
``fduration``-long FIR filter by inverse-spectrum truncation and applied by
FFT convolution to the detrended, edge-tapered series.

Everything after the tiling runs in torch, on CPU by default (the FFTs and
matrix products use all intra-op threads) or on any ``device`` given; on CPU
the bin gather and the median use numpy (``take``/``partition``), which is
markedly faster there than the torch equivalents.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from virgo_exps.study.qtiling import SQRT11 as _SQRT11
from virgo_exps.study.qtiling import q_values as _q_values
from virgo_exps.study.qtiling import step_mismatch as _step_mismatch

__all__ = [
    "QTransformPlan",
    "get_plan",
    "q_transform",
    "q_transform_grid",
    "whiten_batch",
]

# Spline weights smaller than this are dropped from the sparse time maps.
_SPLINE_TOL = 1e-7
# Target number of complex tile cells held at once (bounds peak memory).
_CELLS_PER_CHUNK = 24_000_000


# --------------------------------------------------------------------------
# Tiling (pure python/numpy; cached)
# --------------------------------------------------------------------------


def _frequency_range(
    frange: tuple[float, float],
    qs: Sequence[float],
    duration: float,
    sample_rate: float,
) -> tuple[float, float]:
    """Resolve the scanned band; the top is capped so the widest tile fits."""
    fmin, fmax = float(frange[0]), float(frange[1])
    if fmin == 0:
        fmin = 50.0 * max(qs) / (2.0 * math.pi * duration)
    ceiling = sample_rate / 2.0 / (1.0 + _SQRT11 / min(qs))
    if math.isinf(fmax):
        fmax = ceiling
    elif fmax > ceiling:
        warnings.warn(
            f"upper frequency of {fmax} Hz is too high for the given Q range, resetting to {ceiling} Hz",
            stacklevel=3,
        )
        fmax = ceiling
    return fmin, fmax


def _row_frequencies(
    q: float,
    frange: tuple[float, float],
    duration: float,
    mismatch: float,
) -> list[float]:
    """Central frequencies of one plane, snapped down to the FFT grid."""
    fmin, fmax = frange
    root = math.sqrt(2.0 + q * q)
    span = math.log(fmax / fmin) * root / 2.0
    nrows = int(max(1, math.ceil(span / _step_mismatch(mismatch))))
    step = span / nrows
    df = 1.0 / duration
    freqs: list[float] = []
    previous = None
    for i in range(nrows):
        f = fmin * math.exp(2.0 / root * (i + 0.5) * step) // df * df
        if f != previous:  # consecutive duplicates collapse into one row
            freqs.append(f)
        previous = f
    return freqs


def _tile_count(q: float, f: float, duration: float, mismatch: float) -> int:
    """Number of time tiles of a row, rounded up to a power of two."""
    needed = duration * 2.0 * math.pi * f / q / _step_mismatch(mismatch)
    return int(2 ** math.ceil(math.log(needed, 2)))


def _row_layout(
    q: float,
    f: float,
    ntiles: int,
    duration: float,
    sample_rate: float,
    n_time: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Gather indices and weights that build one row's inverse-FFT input.

    The row's spectrum is the data spectrum around ``f`` (bins ``f*T + 1 + k``,
    ``|k| <= half``) times a bi-square window, zero-padded to ``ntiles`` and
    rotated into FFT order.  Returned as, for each of the ``ntiles`` slots,
    the rFFT bin to read (``nbins`` = an always-zero bin) and its weight.  The
    weight also folds in the one-sided amplitude normalisation of the
    spectrum (``2/N``, ``1/N`` at DC) so that un-normalised energies match.
    """
    qprime = q / _SQRT11
    width = 2 * int(f / qprime * duration) + 1
    half = (width - 1) // 2
    offsets = np.arange(-half, half + 1)
    x = offsets / duration * qprime / f
    amp = ntiles / (duration * sample_rate) * math.sqrt(315.0 * qprime / (128.0 * f))
    window = (1.0 - x * x) ** 2 * amp
    bins = np.round(offsets + 1 + f * duration).astype(np.int64)
    nbins = n_time // 2 + 1
    scale = np.where(bins == 0, 1.0, 2.0) / n_time
    valid = (bins >= 0) & (bins < nbins)
    bins = np.where(valid, bins, nbins)
    window = np.where(valid, window * scale, 0.0)

    pad = ntiles - width
    if pad < 0:
        raise ValueError(
            f"row at {f} Hz (Q={q}) has a window wider than its tile count",
        )
    left = int((pad - 1) / 2.0)
    slot_bin = np.full(ntiles, nbins, dtype=np.int64)
    slot_w = np.zeros(ntiles, dtype=np.float64)
    slot_bin[left : left + width] = bins
    slot_w[left : left + width] = window
    # inverse-FFT order: slot i of the FFT input is padded slot order[i]
    order = np.fft.ifftshift(np.arange(ntiles))
    return slot_bin[order], slot_w[order]


def _tile_times(ntiles: int, duration: float) -> np.ndarray:
    """Start times of the tiles of a row (the spline knots in time)."""
    dt = duration / ntiles
    t = np.arange(0.0, 0.0 + ntiles * dt, dt)
    return t[:ntiles]


def _spline_matrix(knots: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Dense linear map: samples at ``knots`` -> interpolating cubic spline
    (not-a-knot, i.e. FITPACK's ``s=0`` spline) evaluated at ``points``,
    extrapolating with the end polynomials outside the knots.

    With ``A`` the B-spline collocation matrix at the knots and ``E`` the
    B-spline basis at ``points``, the map is ``E @ inv(A)``; it is obtained
    as ``solve(A.T, E.T).T`` with one banded solve, in O(n * len(points)).
    """
    from scipy.interpolate import BSpline, make_interp_spline
    from scipy.linalg import solve_banded

    n = knots.size
    if n < 8:  # tiny rows/planes: lower degree if needed, brute force
        if n == 1:
            return np.ones((points.size, 1))
        spline = make_interp_spline(knots, np.eye(n), k=min(3, n - 1))
        return spline(points, extrapolate=True)
    k = 3
    t = np.concatenate([np.repeat(knots[0], k + 1), knots[2:-2], np.repeat(knots[-1], k + 1)])
    colloc = BSpline.design_matrix(knots, t, k)
    basis = BSpline.design_matrix(points, t, k, extrapolate=True)
    # banded LAPACK solve of colloc.T @ M.T = basis.T
    coo = colloc.T.tocoo()
    offs = coo.col - coo.row
    upper, lower = int(max(offs.max(), 0)), int(max(-offs.min(), 0))
    banded = np.zeros((upper + lower + 1, n))
    banded[upper + coo.row - coo.col, coo.col] = coo.data
    return solve_banded((lower, upper), banded, basis.T.toarray()).T


def _band_blocks(
    mat: np.ndarray,
    per_block_cost: int = 700,
) -> list[tuple[int, int, int, int]]:
    """Split the columns of a banded ``(nout, nin)`` map into a few blocks,
    each with the range of inputs it needs: ``(c0, c1, r0, r1)``.

    Picks the block count that minimises multiply-adds plus a fixed
    per-GEMM overhead (expressed in multiply-adds per output time).
    """
    nout, nin = mat.shape
    best: tuple[float, list[tuple[int, int, int, int]]] | None = None
    for nblocks in (1, 2, 3, 4, 6, 8):
        if nblocks > nout:
            break
        edges = np.linspace(0, nout, nblocks + 1).round().astype(int)
        blocks = []
        work = 0
        for c0, c1 in zip(edges[:-1], edges[1:]):
            used = np.nonzero(np.any(mat[c0:c1] != 0, axis=0))[0]
            r0, r1 = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
            blocks.append((int(c0), int(c1), r0, r1))
            work += (c1 - c0) * (r1 - r0)
        cost = work + per_block_cost * nblocks
        if best is None or cost < best[0]:
            best = (cost, blocks)
    assert best is not None
    return best[1]


@dataclass
class _Group:
    """Rows of one plane that share a tile count."""

    ntiles: int
    rows: slice  # position of these rows within the plane
    slot_bin: np.ndarray  # (nrows, ntiles) int64
    slot_w: np.ndarray  # (nrows, ntiles) float32


@dataclass
class _Plane:
    q: float
    frequencies: np.ndarray  # (nrows,) central frequencies
    groups: list[_Group]
    freq_map: np.ndarray  # (nfreq_out, nrows) spline map across rows


@dataclass
class QTransformPlan:
    """Precomputed tiling and resampling operators for one configuration.

    Build with :func:`get_plan` (cached).  Attributes ``times`` and
    ``frequencies`` are the output grid; ``planes`` the Q tiling.
    """

    n_time: int
    sample_rate: float
    duration: float
    frange: tuple[float, float]
    qs: tuple[float, ...]
    times: np.ndarray
    frequencies: np.ndarray
    planes: list[_Plane]
    time_maps: dict[int, Any]  # ntiles -> scipy.sparse.csr_matrix
    _device_cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n_cells(self) -> int:
        """Number of tiles over all planes (work per series)."""
        return sum(g.slot_bin.size for p in self.planes for g in p.groups)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.times.size, self.frequencies.size)

    # -- torch side ---------------------------------------------------------
    @staticmethod
    def _csr(mat: Any, device: torch.device) -> torch.Tensor:
        import scipy.sparse

        mat = scipy.sparse.csr_matrix(mat)
        with warnings.catch_warnings():
            # torch flags sparse CSR support as "beta"; it is all we need
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                torch.as_tensor(mat.indptr.astype(np.int64)),
                torch.as_tensor(mat.indices.astype(np.int64)),
                torch.as_tensor(mat.data.astype(np.float32)),
                size=mat.shape,
                check_invariants=True,
            ).to(device)

    def tensors(self, device: torch.device) -> dict[str, Any]:
        """Operators as torch tensors on ``device`` (cached per device)."""
        key = str(device)
        cached = self._device_cache.get(key)
        if cached is not None:
            return cached
        planes = []
        for plane in self.planes:
            groups = []
            for g in plane.groups:
                groups.append(
                    {
                        "ntiles": g.ntiles,
                        "nrows": g.slot_bin.shape[0],
                        "index": torch.as_tensor(g.slot_bin.reshape(-1), device=device),
                        "index_np": np.ascontiguousarray(g.slot_bin.reshape(-1)),
                        "weight": torch.as_tensor(g.slot_w, dtype=torch.float32, device=device),
                    }
                )
            planes.append(
                {
                    "groups": groups,
                    "nrows": plane.frequencies.size,
                    "freq_blocks": [
                        (
                            c0,
                            c1,
                            r0,
                            r1,
                            torch.as_tensor(plane.freq_map[c0:c1, r0:r1].T.copy(), dtype=torch.float32, device=device),
                        )
                        for c0, c1, r0, r1 in _band_blocks(plane.freq_map)
                    ],
                }
            )
        time_maps = {n: self._csr(mat, device) for n, mat in self.time_maps.items()}
        cached = {"planes": planes, "time_maps": time_maps}
        self._device_cache[key] = cached
        return cached


def _build_plan(
    n_time: int,
    sample_rate: float,
    frange: tuple[float, float],
    qrange: tuple[float, float],
    mismatch: float,
    tres: float | None,
    fres: float | None,
) -> QTransformPlan:
    import scipy.sparse

    duration = n_time * (1.0 / sample_rate)
    qs = _q_values(qrange, mismatch)
    band = _frequency_range(frange, qs, duration, sample_rate)

    # output grid: gwpy spans [0, ntiles * (duration / ntiles)) of the first
    # row of the chosen plane; tile counts are powers of two, so that is
    # exactly [0, duration) whichever plane is chosen.
    first_n = _tile_count(qs[0], _row_frequencies(qs[0], band, duration, mismatch)[0], duration, mismatch)
    t_end = 0.0 + first_n * (duration / first_n)
    step_t = (t_end - 0.0) / 1000.0 if tres is None else float(tres)
    times = np.arange(0.0, t_end, step_t)
    step_f = 0.5 if fres is None else float(fres)
    freqs_out = np.arange(band[0], band[1], step_f, dtype=np.float32)

    planes: list[_Plane] = []
    tile_counts: set[int] = set()
    for q in qs:
        rows = _row_frequencies(q, band, duration, mismatch)
        counts = [_tile_count(q, f, duration, mismatch) for f in rows]
        groups: list[_Group] = []
        start = 0
        while start < len(rows):
            stop = start
            while stop < len(rows) and counts[stop] == counts[start]:
                stop += 1
            layouts = [_row_layout(q, f, counts[start], duration, sample_rate, n_time) for f in rows[start:stop]]
            groups.append(
                _Group(
                    ntiles=counts[start],
                    rows=slice(start, stop),
                    slot_bin=np.stack([b for b, _ in layouts]),
                    slot_w=np.stack([w for _, w in layouts]).astype(np.float32),
                )
            )
            tile_counts.add(counts[start])
            start = stop
        frequencies = np.asarray(rows, dtype=np.float64)
        # across rows the output is clamped to the row span (no extrapolation)
        fpoints = np.clip(freqs_out.astype(np.float64), frequencies[0], frequencies[-1])
        freq_map = _spline_matrix(frequencies, fpoints)
        # negligible far-field weights would be float32 denormals (slow)
        freq_map[np.abs(freq_map) < _SPLINE_TOL] = 0.0
        planes.append(_Plane(q=q, frequencies=frequencies, groups=groups, freq_map=freq_map))

    time_maps = {}
    for n in sorted(tile_counts):
        dense = _spline_matrix(_tile_times(n, duration), times)
        dense[np.abs(dense) < _SPLINE_TOL] = 0.0
        time_maps[n] = scipy.sparse.csr_matrix(dense)

    return QTransformPlan(
        n_time=n_time,
        sample_rate=float(sample_rate),
        duration=duration,
        frange=band,
        qs=tuple(qs),
        times=times,
        frequencies=freqs_out,
        planes=planes,
        time_maps=time_maps,
    )


@lru_cache(maxsize=16)
def _cached_plan(*key: Any) -> QTransformPlan:
    return _build_plan(*key)


def get_plan(
    n_time: int,
    sample_rate: float,
    frange: tuple[float, float] = (10.0, 150.0),
    qrange: tuple[float, float] = (4.0, 64.0),
    mismatch: float = 0.2,
    tres: float | None = None,
    fres: float | None = None,
) -> QTransformPlan:
    """Return the (cached) :class:`QTransformPlan` for these settings."""
    return _cached_plan(
        int(n_time),
        float(sample_rate),
        (float(frange[0]), float(frange[1])),
        (float(qrange[0]), float(qrange[1])),
        float(mismatch),
        None if tres is None else float(tres),
        None if fres is None else float(fres),
    )


def q_transform_grid(
    n_time: int,
    sample_rate: float,
    frange: tuple[float, float] = (10.0, 150.0),
    qrange: tuple[float, float] = (4.0, 64.0),
    mismatch: float = 0.2,
    tres: float | None = None,
    fres: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Output axes of :func:`q_transform` for series of ``n_time`` samples.

    Returns ``(times, frequencies)``: bin start times in seconds from the
    first sample (float64) and bin frequencies in Hz (float32), the same
    values as gwpy's ``Spectrogram.times`` / ``.frequencies`` for ``t0=0``.
    """
    plan = get_plan(n_time, sample_rate, frange, qrange, mismatch, tres, fres)
    return plan.times.copy(), plan.frequencies.copy()


# --------------------------------------------------------------------------
# Whitening (torch, batched) and the shared median helper
# --------------------------------------------------------------------------


def _periodic_hann(n: int, device: torch.device) -> torch.Tensor:
    return torch.hann_window(n, periodic=True, dtype=torch.float64, device=device)


# numpy fast paths for CPU tensors; off, every device takes the torch-only path
# a GPU takes (the tests compare the two on CPU).
CPU_NUMPY_PATHS = True


def _numpy_path(t: torch.Tensor | torch.device) -> bool:
    device = t if isinstance(t, torch.device) else t.device
    return CPU_NUMPY_PATHS and device.type == "cpu"


def _median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Median along ``dim``; mean of the two middle values for even sizes
    (numpy's convention; ``torch.median`` would return the lower one)."""
    n = x.shape[dim]
    if _numpy_path(x):
        # one introselect partition is much faster than sorting; the lower
        # middle value is then the largest element left of the pivot
        part = np.partition(x.detach().numpy(), n // 2, axis=dim)
        upper = np.take(part, n // 2, axis=dim)
        if n % 2:
            return torch.from_numpy(np.ascontiguousarray(upper))
        left = [slice(None)] * part.ndim
        left[dim] = slice(0, n // 2)
        lower = part[tuple(left)].max(axis=dim)
        return torch.from_numpy(0.5 * (lower + upper))
    ordered = x.sort(dim=dim).values
    upper = ordered.select(dim, n // 2)
    if n % 2:
        return upper
    return 0.5 * (ordered.select(dim, n // 2 - 1) + upper)


def _median_bias(n: int) -> float:
    """Bias of the median of ``n`` chi^2_2 periodograms (as in scipy)."""
    ii = np.arange(1, (n - 1) // 2 + 1)
    return float(1.0 + np.sum(1.0 / (2 * ii + 1) - 1.0 / (2 * ii)))


def _median_psd(
    x: torch.Tensor,
    sample_rate: float,
    nperseg: int,
    noverlap: int,
) -> torch.Tensor:
    """One-sided PSD: Hann-windowed, mean-removed segments, median average."""
    step = nperseg - noverlap
    segs = x.unfold(-1, nperseg, step)  # (B, S, nperseg)
    segs = segs - segs.mean(dim=-1, keepdim=True)
    win = _periodic_hann(nperseg, x.device)
    spec = torch.fft.rfft(segs * win, dim=-1)
    power = spec.real.square() + spec.imag.square()
    power = power / (sample_rate * win.square().sum())
    if nperseg % 2:
        power[..., 1:] *= 2.0
    else:
        power[..., 1:-1] *= 2.0
    nseg = segs.shape[-2]
    psd = _median(power, dim=-2)
    return psd / _median_bias(nseg)


def whiten_batch(
    x: torch.Tensor | np.ndarray,
    sample_rate: float,
    fduration: float = 2.0,
    fftlength: float | None = None,
) -> torch.Tensor:
    """Whiten each row of ``x`` the way gwpy's ``TimeSeries.whiten`` does
    when called from ``q_transform(whiten=True)``.

    Returns a float64 tensor on the device of ``x`` (CPU for numpy input).
    """
    from scipy.fft import next_fast_len

    x = torch.as_tensor(x, dtype=torch.float64)
    if x.ndim == 1:
        x = x[None]
    dev = x.device
    n = x.shape[-1]
    dt = 1.0 / sample_rate
    duration = n * dt
    if fftlength is None:
        fftlength = int(max(2, math.ceil(2048 * dt)))
    if fftlength == duration:
        overlap = 0.0
    else:
        overlap = 0.5 * fftlength  # recommended overlap of the Hann window
    nperseg = min(int(fftlength * sample_rate), n)
    noverlap = min(int(overlap * sample_rate), nperseg - 1)

    asd = _median_psd(x, sample_rate, nperseg, noverlap).sqrt()
    # resample the ASD onto the data's own frequency spacing (linear interp)
    df_asd = sample_rate / nperseg
    df = 1.0 / duration
    nout = int(np.rint((asd.shape[-1] - 1) * (df_asd / df) + 1))
    fnew = np.arange(0, nout, dtype=np.float64) * df
    pos = np.clip(fnew / df_asd, 0.0, asd.shape[-1] - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), asd.shape[-1] - 1)
    i1 = np.minimum(i0 + 1, asd.shape[-1] - 1)
    frac = torch.as_tensor(pos - i0, device=dev)
    i0_t = torch.as_tensor(i0, device=dev)
    i1_t = torch.as_tensor(i1, device=dev)
    asd = asd[..., i0_t] * (1 - frac) + asd[..., i1_t] * frac

    # FIR design by inverse-spectrum truncation
    transfer = 1.0 / asd
    taper = torch.as_tensor(_tukey_edges(5), device=dev)
    transfer[..., :5] *= taper[:5]
    transfer[..., -5:] *= taper[5:]
    impulse = torch.fft.irfft(transfer, dim=-1)
    ntaps = int(fduration * sample_rate)
    if not 2 <= ntaps <= n:
        raise ValueError(f"fduration={fduration} s gives {ntaps} filter taps; need 2 <= taps <= series length ({n})")
    half = ntaps // 2
    win = _periodic_hann(ntaps, dev)
    trunc = torch.zeros_like(impulse)
    trunc[..., :half] = impulse[..., :half] * win[half:ntaps]
    trunc[..., -half:] = impulse[..., -half:] * win[:half]
    fir = torch.roll(trunc, int(ntaps / 2 - 1), dims=-1)[..., :ntaps]

    # detrend, taper the edges, convolve ('same' alignment)
    data = x - x.mean(dim=-1, keepdim=True)
    edge = int(math.ceil(ntaps / 2))
    data = data.clone()
    data[..., :edge] *= win[:edge]
    data[..., -edge:] *= win[-edge:]
    nfft = next_fast_len(n + ntaps - 1, real=True)
    conv = torch.fft.irfft(
        torch.fft.rfft(data, n=nfft, dim=-1) * torch.fft.rfft(fir, n=nfft, dim=-1),
        n=nfft,
        dim=-1,
    )
    lag = (ntaps - 1) // 2
    return conv[..., lag : lag + n] * math.sqrt(2.0 * dt)


def _tukey_edges(nsamples: int) -> np.ndarray:
    """Rising and falling halves of a ``2*nsamples`` Tukey(alpha=1) window."""
    from scipy.signal.windows import tukey

    return tukey(2 * nsamples, alpha=1.0)


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
        Normalised energy; axes given by :func:`q_transform_grid`.  A series
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
