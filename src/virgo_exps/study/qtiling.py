"""The Q tiling's geometry: plane Q values, tile steps and the frequency ceiling.

Pure Python, no numpy or torch, so that validating params (``virgo_exps.config``)
can know the highest frequency the Q-transform resolves without importing the
transform itself. :mod:`virgo_exps.study.qtransform` builds its tiles from these.
"""

from __future__ import annotations

import math

SQRT2 = math.sqrt(2.0)
SQRT11 = math.sqrt(11.0)


def step_mismatch(mismatch: float) -> float:
    """Mismatch-derived step between neighbouring tiles (Omega convention)."""
    return 2.0 * math.sqrt(mismatch / 3.0)


def q_values(qrange: tuple[float, float], mismatch: float) -> list[float]:
    """Q of every plane: log-uniform, centred inside ``qrange``."""
    qlo, qhi = float(qrange[0]), float(qrange[1])
    span = math.log(qhi / qlo) / SQRT2
    nplanes = int(max(math.ceil(span / step_mismatch(mismatch)), 1))
    step = span / nplanes
    return [qlo * math.exp(SQRT2 * step * (i + 0.5)) for i in range(nplanes)]


def max_frequency(sample_rate: float, qrange: tuple[float, float] = (4.0, 64.0), mismatch: float = 0.2) -> float:
    """The highest frequency the Q tiling can analyse at this sampling rate (gwpy's cap)."""
    qs = q_values(qrange, mismatch)
    return sample_rate / 2.0 / (1.0 + SQRT11 / min(qs))
