"""The Q-transform's plan: the tiling into Q planes and rows, the output grid, and the operators
that resample onto it, computed once per configuration and cached (:func:`get_plan`).

A handful of Q values spread logarithmically over ``qrange``
(:mod:`virgo_exps.study.qtiling`); for each Q a set of logarithmically spaced
central frequencies ("rows") whose spacing respects the allowed fractional
``mismatch``. Every row owns a power-of-two number of time tiles and a
bi-square window in the frequency domain, kept as a gather of spectrum bins
and window weights already laid out in inverse-FFT order. All of this only
depends on the series length, sample rate and the options. The plan also holds
the output grid, the same as gwpy's (:func:`q_transform_grid`), and the spline
maps onto it (:mod:`virgo_exps.study.qspline`); :meth:`QTransformPlan.tensors`
gives all of it as torch tensors on a device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import scipy.sparse
import torch

from virgo_exps.study.qspline import _band_blocks, _spline_matrix
from virgo_exps.study.qtiling import SQRT11 as _SQRT11
from virgo_exps.study.qtiling import q_values as _q_values
from virgo_exps.study.qtiling import step_mismatch as _step_mismatch

__all__ = [
    "QTransformPlan",
    "get_plan",
    "q_transform_grid",
]

# Spline weights smaller than this are dropped from the sparse time maps.
_SPLINE_TOL = 1e-7


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
    """Output axes of :func:`virgo_exps.study.qtransform.q_transform` for series of ``n_time`` samples.

    Returns ``(times, frequencies)``: bin start times in seconds from the
    first sample (float64) and bin frequencies in Hz (float32), the same
    values as gwpy's ``Spectrogram.times`` / ``.frequencies`` for ``t0=0``.
    """
    plan = get_plan(n_time, sample_rate, frange, qrange, mismatch, tres, fres)
    return plan.times.copy(), plan.frequencies.copy()
