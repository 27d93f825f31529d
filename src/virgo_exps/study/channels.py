"""The data set's channel design: each channel's noise spectrum and each auxiliary channel's
coupling path into ``main``, both fixed for the data set.

Channel 0 (``main``) plays the detector strain, channels 1.. (``aux1``, ``aux2``, ...) play
witness sensors (:func:`channel_names`).

* Noise spectrum: a seismic wall below ~10 Hz, a 1/f component, a flat floor, a few narrow
  spectral lines (the main channel carries the 50 Hz mains line and its harmonics) and an
  anti-aliasing roll-off close to Nyquist, as an amplitude spectral density.
  :mod:`virgo_exps.study.samples` draws every sample's stationary coloured Gaussian noise from it,
  at an overall level that varies from sample to sample.
* Coupling path of auxiliary channel ``c`` into ``main``: a transfer function (a band-pass:
  first-order high-pass, first- or second-order low-pass) and a delay of a few ms.
* The analysis band (:func:`analysis_band`, 10-150 Hz by default): glitch SNRs are measured in it
  and glitches are drawn inside it.

The design of channel ``c`` is drawn from ``SeedSequence(seed, spawn_key=(DESIGN_KEY, c))`` and
nothing else: it depends on the seed and the channel index (not on ``n_aux`` or on any sample), and
is computed once per process (:func:`design_of`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from virgo_exps.study.params import GenerateConfig

# Spawn key that separates the per-channel design streams from the per-sample
# streams (which use plain [seed, i] entropy).
DESIGN_KEY = 0xD351
# Analysis band: the glitch SNRs are measured in it and the glitches live in it.
BAND_HZ = (10.0, 150.0)


@dataclass(frozen=True)
class _Design:
    sample_rate: int
    n_time: int
    freqs: np.ndarray  # (nf,)
    asd: np.ndarray  # (C, nf) amplitude spectral density, relative units
    in_band: np.ndarray  # (nf,) bool: bins inside the analysis band
    transfer: np.ndarray  # (C, nf) complex: aux c -> main (row 0 unused)
    delay: np.ndarray  # (C,) seconds (entry 0 unused)
    band: tuple[float, float]
    glitch_band: tuple[float, float]


def analysis_band(sample_rate: int) -> tuple[float, float]:
    """The band in which glitch SNRs are measured: 10-150 Hz, narrowed to
    stay under 90 % of Nyquist for low sampling rates."""
    lo, hi = BAND_HZ
    hi = min(hi, 0.45 * sample_rate)
    if hi <= lo * 1.5:
        lo = hi / 3.0
    return lo, hi


def _line(freqs, f_line, height, width):
    return height / (1.0 + ((freqs - f_line) / width) ** 2)


def _channel_asd(rng, c: int, freqs: np.ndarray, sample_rate: int, band) -> np.ndarray:
    nyq = sample_rate / 2.0
    lo, hi = band
    fs = np.maximum(freqs, 2.0)  # the wall stops growing below 2 Hz
    floor = 1.0 if c == 0 else rng.uniform(0.6, 1.3)
    wall_f = rng.uniform(6.0, 9.0)
    wall = rng.uniform(1.0, 4.0) * floor * (fs / wall_f) ** (-rng.uniform(3.0, 5.0))
    pink = rng.uniform(0.5, 2.0) * floor * (20.0 / fs)
    asd = np.sqrt(wall**2 + pink**2 + floor**2)
    lines = []
    if c == 0:  # mains and harmonics
        lines += [(50.0 * k, rng.uniform(3.0, 12.0) / k) for k in (1, 2, 3)]
    for _ in range(int(rng.integers(1, 4))):
        lines.append((rng.uniform(lo + 5.0, hi - 2.0), math.exp(rng.uniform(math.log(2.0), math.log(15.0)))))
    for f_line, height in lines:
        if f_line < 0.95 * nyq:
            asd = asd + floor * _line(freqs, f_line, height, rng.uniform(0.08, 0.3))
    asd = asd / np.sqrt(1.0 + (freqs / (0.85 * nyq)) ** 16)  # anti-aliasing roll-off
    asd[freqs < 1.0] = 0.0  # no DC / sub-Hz drift
    return asd


def _transfer(rng, freqs: np.ndarray, band) -> tuple[np.ndarray, float]:
    lo, hi = band
    f_hp = rng.uniform(0.5, 2.0) * lo
    f_lp = math.exp(rng.uniform(math.log(0.3 * hi), math.log(1.6 * hi)))
    order = int(rng.integers(1, 3))
    jf = 1j * freqs
    h = (jf / f_hp) / (1.0 + jf / f_hp) / (1.0 + jf / f_lp) ** order
    inb = (freqs >= lo) & (freqs <= hi)
    h = h / np.abs(h[inb]).max()
    delay = rng.uniform(0.002, 0.020)
    return h, delay


@functools.lru_cache(maxsize=8)
def _design(seed: int, n_aux: int, n_time: int, sample_rate: int) -> _Design:
    freqs = np.fft.rfftfreq(n_time, 1.0 / sample_rate)
    band = analysis_band(sample_rate)
    lo, hi = band
    n_ch = 1 + n_aux
    asd = np.empty((n_ch, freqs.size))
    transfer = np.zeros((n_ch, freqs.size), dtype=np.complex128)
    delay = np.zeros(n_ch)
    for c in range(n_ch):
        # Channel c's stream does not depend on n_aux: adding channels leaves
        # the existing ones as they were.
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(DESIGN_KEY, c)))
        asd[c] = _channel_asd(rng, c, freqs, sample_rate, band)
        if c > 0:
            transfer[c], delay[c] = _transfer(rng, freqs, band)
    for a in (asd, transfer, delay):
        a.setflags(write=False)
    margin = 0.07 * (hi - lo)
    return _Design(
        sample_rate=sample_rate,
        n_time=n_time,
        freqs=freqs,
        asd=asd,
        in_band=(freqs >= lo) & (freqs <= hi),
        transfer=transfer,
        delay=delay,
        band=band,
        glitch_band=(lo + margin, hi - margin),
    )


def n_time_of(cfg: GenerateConfig) -> int:
    return int(round(cfg.duration * cfg.sample_rate))


def design_of(cfg: GenerateConfig) -> _Design:
    return _design(cfg.seed, cfg.n_aux, n_time_of(cfg), cfg.sample_rate)


def channel_names(n_aux: int) -> list[str]:
    return ["main"] + [f"aux{k}" for k in range(1, n_aux + 1)]


__all__ = [
    "analysis_band",
    "channel_names",
    "design_of",
    "n_time_of",
]
