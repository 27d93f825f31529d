"""One sample of the synthetic data set: coloured noise in every channel, transient glitches in
the auxiliary channels, and their coupling into ``main``.

Signal model
------------
Every sample is ``1 + n_aux`` time series of ``duration * sample_rate`` points. Channel 0
(``main``) plays the detector strain, channels 1.. (``aux1``, ``aux2``, ...) play witness sensors;
their noise spectra and coupling paths are the data set's channel design
(:mod:`virgo_exps.study.channels`).

* Noise: stationary coloured Gaussian noise per channel, shaped in the
  frequency domain by the channel's spectrum. The shape of each channel is
  fixed for the data set (it depends on the seed and the channel index), its
  overall level varies by ~10 % from sample to sample.
* Glitches in the auxiliary channels: sine-Gaussians (f0 ~20-140 Hz, Q 4-30),
  blips (derivative-of-Gaussian pulses a few ms long, broadband) and
  scattered-light arches (phase ``phi_m sin(2 pi f_m t)`` and its harmonics,
  whose instantaneous frequency draws arches). Their amplitude is set by their
  matched-filter SNR against the channel's noise inside the analysis band
  (10-150 Hz by default), drawn log-uniformly in 8-50.
* Coupling: most auxiliary glitches also appear in ``main``, through a
  per-channel transfer function (a band-pass: first-order high-pass, first- or
  second-order low-pass), a per-channel delay of a few ms plus a per-glitch
  jitter, and a per-glitch random amplitude (the SNR it reaches in ``main`` is
  0.35-1.2 times its SNR in the witness). Every sample has at least one coupled
  glitch, the *anchor*: a sine-Gaussian or a blip (compact, so it makes a
  clear peak), loud in ``main`` (SNR >= 15), at a random time away from the
  edges, so the main image always has a peak to cut around.
* Unpredictable part: the main channel's own noise, witness-only glitches that
  do not couple, and, in ~30 % of the samples, a main-only glitch (SNR 6-15,
  so it is seldom the loudest thing in ``main``).

Units are arbitrary but consistent: the noise floor's amplitude spectral density
is O(1) in units of one sample's white-noise variance, so the float32 values stay
well inside float32's precision. Glitch parameters of any sample are returned by
:func:`catalog`.

Reproducibility
---------------
Sample ``i`` is drawn from ``np.random.default_rng([seed, i])`` and from the
per-channel design (from ``SeedSequence(seed, spawn_key=(DESIGN_KEY, c))``),
nothing else, so any worker can produce any chunk and the store
(:mod:`virgo_exps.study.generate`) is byte-identical however the work is split
(number of workers, SLURM parts).
"""

from __future__ import annotations

import math

import numpy as np

from virgo_exps.study.channels import _Design, design_of
from virgo_exps.study.params import GenerateConfig

# --------------------------------------------------------------------------
# Glitch waveforms (unit amplitude; scaled to their SNR afterwards)
# --------------------------------------------------------------------------


def _loguniform(rng, lo, hi):
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _draw_glitch(rng, kind: str, d: _Design, duration: float) -> dict:
    g_lo, g_hi = d.glitch_band
    if kind == "sine_gaussian":
        f0 = _loguniform(rng, g_lo, g_hi)
        q = _loguniform(rng, 4.0, 30.0)
        tau = q / (math.sqrt(2.0) * math.pi * f0)
        p = {"freq": f0, "q": q, "tau": tau, "phase": rng.uniform(0, 2 * math.pi), "half_width": 3.0 * tau}
    elif kind == "blip":
        # Derivative of a Gaussian of width sigma: spectrum peaks at 1/(2 pi sigma).
        f_peak = rng.uniform(0.3, 0.75) * (g_lo + g_hi)
        sigma = 1.0 / (2.0 * math.pi * f_peak)
        p = {"freq": f_peak, "sigma": sigma, "sign": float(rng.choice((-1.0, 1.0))), "half_width": 5.0 * sigma}
    else:  # scattered light
        n_arch = int(rng.integers(1, 4))
        # at most half the series, arches 0.5-3 s apart
        f_mod = max(rng.uniform(0.17, 0.5), n_arch / duration)
        f_peak = rng.uniform(g_lo, g_lo + 0.35 * (g_hi - g_lo))
        n_harm = max(1, min(int(rng.integers(1, 5)), int(g_hi // f_peak)))
        p = {
            "freq": f_peak,
            "f_mod": f_mod,
            "n_arch": n_arch,
            "harmonics": n_harm,
            "phases": [float(v) for v in rng.uniform(0, 2 * math.pi, n_harm)],
            "half_width": n_arch / (4.0 * f_mod),
        }
    p["kind"] = kind
    return p


def _waveform(p: dict, t: np.ndarray, t0: float) -> np.ndarray:
    kind = p["kind"]
    if kind == "sine_gaussian":
        u = (t - t0) / p["tau"]
        return np.exp(-u * u) * np.cos(2 * np.pi * p["freq"] * (t - t0) + p["phase"])
    if kind == "blip":
        u = (t - t0) / p["sigma"]
        return p["sign"] * u * np.exp(-0.5 * u * u)
    half = p["half_width"]
    dt = t - t0
    env = np.where(np.abs(dt) < half, np.cos(0.5 * np.pi * dt / half) ** 2, 0.0)
    phi = (p["freq"] / p["f_mod"]) * np.sin(2 * np.pi * p["f_mod"] * dt + 0.5 * np.pi)
    out = np.zeros_like(t)
    for k, ph in enumerate(p["phases"], start=1):
        out += 0.6 ** (k - 1) * np.sin(k * phi + ph)
    return env * out


_KINDS = ("sine_gaussian", "blip", "scattered_light")
_KIND_P = (0.5, 0.25, 0.25)
_ANCHOR_P = (0.7, 0.3)


# --------------------------------------------------------------------------
# One sample
# --------------------------------------------------------------------------


def _snr(spec: np.ndarray, psd: np.ndarray, in_band: np.ndarray, n: int) -> float:
    """Optimal SNR of a signal with rfft ``spec`` in noise of per-bin ``psd``
    (E|N_k|^2 = n * psd_k), counted inside the analysis band only."""
    s = spec[in_band]
    return math.sqrt(float(np.sum(2.0 * (s.real**2 + s.imag**2) / (n * psd[in_band]))))


def _sample_spectrum(cfg: GenerateConfig, d: _Design, i: int, want_catalog: bool = False):
    """rfft of sample ``i`` (C, nf) complex128, and its glitch catalog."""
    n, sr = d.n_time, d.sample_rate
    n_ch = 1 + cfg.n_aux
    nf = d.freqs.size
    duration = n / sr
    rng = np.random.default_rng([cfg.seed, i])

    level = np.exp(rng.normal(0.0, 0.1, size=(n_ch, 1)))
    asd = d.asd * level
    psd = asd * asd
    # Complex Gaussian with E|Z_k|^2 = n, the rfft of unit white noise; the DC
    # and Nyquist bins of a real series are real.
    spec = rng.standard_normal((n_ch, nf, 2)).view(np.complex128)[..., 0]
    spec *= math.sqrt(n / 2.0)
    spec[:, 0] = spec[:, 0].real * math.sqrt(2.0)
    if n % 2 == 0:
        spec[:, -1] = spec[:, -1].real * math.sqrt(2.0)
    spec *= asd

    # Which glitches: at least one coupled (the first, loud in main).
    n_coupled = 1 + min(int(rng.poisson(0.6)), 3)
    n_witness = min(int(rng.poisson(0.4)), 3)
    main_only = bool(rng.random() < 0.3)
    todo = [("coupled", k) for k in range(n_coupled)] + [("witness", k) for k in range(n_witness)]
    if main_only:
        todo.append(("main_only", 0))

    t = np.arange(n) / sr
    margin = min(2.0, 0.25 * duration)
    phase_ramp = -2j * np.pi * d.freqs
    glitches = []
    for role, k in todo:
        if role == "coupled" and k == 0:
            # the anchor: compact in time and frequency, so it is the peak
            kind = _KINDS[int(rng.choice(2, p=_ANCHOR_P))]
        else:
            kind = _KINDS[int(rng.choice(3, p=_KIND_P))]
        p = _draw_glitch(rng, kind, d, duration)
        edge = max(margin, p["half_width"] + 0.05 * duration)
        t0 = rng.uniform(edge, duration - edge) if duration - edge > edge else 0.5 * duration
        ch = 0 if role == "main_only" else int(rng.integers(1, n_ch))
        if role == "main_only":
            snr = _loguniform(rng, 6.0, 15.0)
        else:
            snr = _loguniform(rng, 8.0, 50.0)
        # evaluate the waveform only where it is not negligible
        ext = 1.5 * p["half_width"]
        i0, i1 = max(0, int((t0 - ext) * sr)), min(n, int(math.ceil((t0 + ext) * sr)) + 1)
        wt = np.zeros(n)
        wt[i0:i1] = _waveform(p, t[i0:i1], t0)
        w = np.fft.rfft(wt)
        raw = _snr(w, psd[ch], d.in_band, n)
        if raw == 0.0:
            continue
        w *= snr / raw
        spec[ch] += w
        entry = {"role": role, "channel": ch, "t0": t0, "snr": snr, **p}
        if role == "coupled":
            ratio = _loguniform(rng, 0.35, 1.2)
            snr_main = min(snr * ratio, 60.0)
            if k == 0:
                snr_main = max(snr_main, 15.0)
            delay = d.delay[ch] + rng.uniform(-0.003, 0.003)
            wm = w * d.transfer[ch] * np.exp(phase_ramp * delay)
            raw_m = _snr(wm, psd[0], d.in_band, n)
            if raw_m > 0.0:
                spec[0] += wm * (snr_main / raw_m)
            entry.update(snr_main=snr_main, delay=float(delay), t0_main=float(t0 + delay))
        glitches.append(entry)
    return spec, (glitches if want_catalog else None)


def catalog(cfg: GenerateConfig, i: int) -> list[dict]:
    """The glitches of sample ``i`` (role, channel, kind, t0 [s], snr, ...)."""
    return _sample_spectrum(cfg, design_of(cfg), i, want_catalog=True)[1]


def generate_chunk(cfg: GenerateConfig, start: int, stop: int) -> np.ndarray:
    """Samples ``start..stop-1`` as float32 ``(stop - start, 1 + n_aux, n_time)``."""
    if not 0 <= start <= stop:
        raise ValueError(f"bad sample range [{start}, {stop})")
    d = design_of(cfg)
    n_ch = 1 + cfg.n_aux
    spec = np.empty((stop - start, n_ch, d.freqs.size), dtype=np.complex128)
    for j, i in enumerate(range(start, stop)):
        spec[j] = _sample_spectrum(cfg, d, i)[0]
    return np.fft.irfft(spec, n=d.n_time, axis=-1).astype(np.float32)


__all__ = [
    "catalog",
    "generate_chunk",
]
