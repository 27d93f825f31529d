"""Batched whitening in torch, the way gwpy's ``TimeSeries.whiten`` does it for
``q_transform(whiten=True)``.

It mirrors gwpy's default ``whiten=True`` path: a median averaged Welch ASD
(Hann window, gwpy's default FFT length and 50 % overlap), linearly resampled
to the data's frequency resolution, turned into a ``fduration``-long FIR
filter by inverse-spectrum truncation and applied by FFT convolution to the
detrended, edge-tapered series (:func:`whiten_batch`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from virgo_exps.study.qbackend import _median

__all__ = ["whiten_batch"]


def _periodic_hann(n: int, device: torch.device) -> torch.Tensor:
    return torch.hann_window(n, periodic=True, dtype=torch.float64, device=device)


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
    from scipy.fft import next_fast_len  # slow to import; q_transform loads this module also when it does not whiten

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
    from scipy.signal.windows import tukey  # slow to import; q_transform loads this module also when it does not whiten

    return tukey(2 * nsamples, alpha=1.0)
