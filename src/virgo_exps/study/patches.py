"""Pass 1's work on a block of samples: Q-transform images, the window around the main channel's
peak, the patches cut there and their log scaling.

Every channel of ``batch_size`` samples at a time goes through
:func:`virgo_exps.study.qtransform.q_transform` (``frange=(fmin, fmax)``,
``whiten``, the store's sample rate), giving ``(1000, n_freq)`` images on
gwpy's grid (:func:`grid_of`). The window is centred on the peak of the *main*
image after a 5 x 5 bin box smoothing (80 ms x 2.5 Hz on the default grid): a
lone noisy pixel cannot pull the window away from a glitch's energy, and the
window centres on the glitch's bulk rather than on whichever tile the
interpolation made loudest. The ``patch_size`` square (time x frequency) is
clipped to stay inside the image and cut at the same place from every channel.
Patches are log-scaled (``log1p`` of the energy clipped at 0: median-normalised
Q energies are ~1 in noise and reach 10^2-10^3 on glitches, a heavy tail that
would otherwise make a few pixels dominate both the statistics and an MSE
loss; the clip removes the small negative overshoots of the spline
interpolation), with the same bits on every CPU (:func:`log1p_float32`).
"""

from __future__ import annotations

import decimal

import numpy as np

from virgo_exps.study.params import PreprocessConfig

SMOOTH = (5, 5)  # time bins x frequency bins of the peak-finding box filter


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
    from virgo_exps.study.qtransform import q_transform  # heavy (torch): only a process that transforms loads it

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


def grid_of(n_time: int, sample_rate: float, cfg: PreprocessConfig) -> dict:
    """Origin, step and size of the time and frequency axes of the images."""
    from virgo_exps.study.qplan import q_transform_grid  # heavy (torch): only a process that transforms loads it

    times, freqs = q_transform_grid(n_time, sample_rate, frange=(cfg.fmin, cfg.fmax))
    return {
        "t0": float(times[0]),
        "dt": float(times[1] - times[0]) if len(times) > 1 else 0.0,
        "n_time": len(times),
        "f0": float(freqs[0]),
        "df": float(freqs[1] - freqs[0]) if len(freqs) > 1 else 0.0,
        "n_freq": len(freqs),
    }


__all__ = [
    "SMOOTH",
    "cut_patches",
    "find_windows",
    "grid_of",
    "log1p_float32",
    "log_energy",
    "smoothed_peak",
    "transform_samples",
]
