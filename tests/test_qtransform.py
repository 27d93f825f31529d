"""Batched Q-transform against gwpy's reference ``TimeSeries.q_transform``.

Every series is 16 s at 500 Hz; gwpy's default output grid for
``frange=(10, 150)`` is 1000 time bins x 280 frequency bins (0.5 Hz).
gwpy runs one series at a time, so the reference images are computed once
per module.
"""

from __future__ import annotations

import warnings
from functools import cache

import numpy as np
import pytest
import torch

from virgo_exps.study.qplan import get_plan, q_transform_grid
from virgo_exps.study.qtransform import q_transform

gwpy_timeseries = pytest.importorskip("gwpy.timeseries")

SAMPLE_RATE = 500.0
DURATION = 16.0
N_TIME = int(SAMPLE_RATE * DURATION)
FRANGE = (10.0, 150.0)
T = np.arange(N_TIME) / SAMPLE_RATE


# -- synthetic signals --------------------------------------------------------


def _white(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(N_TIME)


def _coloured(seed: int) -> np.ndarray:
    """Gaussian noise with a steep low-frequency wall and a bump at 60 Hz."""
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft(rng.standard_normal(N_TIME))
    f = np.fft.rfftfreq(N_TIME, 1.0 / SAMPLE_RATE)
    f[0] = f[1]
    asd = 1.0 + (15.0 / f) ** 3 + 3.0 * np.exp(-0.5 * ((f - 60.0) / 2.0) ** 2)
    return np.fft.irfft(spec * asd, n=N_TIME) * 1e-2


def _sine_gaussian(t0: float, f0: float, q: float, amp: float) -> np.ndarray:
    tau = q / (np.sqrt(2.0) * np.pi * f0)
    return amp * np.exp(-(((T - t0) / tau) ** 2)) * np.sin(2.0 * np.pi * f0 * (T - t0))


def _blip(t0: float, amp: float) -> np.ndarray:
    """Short broadband pulse (Ricker wavelet peaking near 80 Hz)."""
    arg = (np.pi * 80.0 * (T - t0)) ** 2
    return amp * (1.0 - 2.0 * arg) * np.exp(-arg)


SIGNALS = {
    "white": lambda: _white(1),
    "coloured": lambda: _coloured(2),
    "sine_gaussian": lambda: 0.05 * _white(3) + _sine_gaussian(8.0, 60.0, 10.0, 1.0),
    "blip": lambda: _white(4) + _blip(5.3, 12.0),
    "white+glitch": lambda: _white(5) + _sine_gaussian(11.0, 60.0, 10.0, 3.0),
    "coloured+glitches": lambda: _coloured(6) + _sine_gaussian(4.0, 60.0, 10.0, 0.5) + _blip(12.5, 2.0),
}
CASES = list(SIGNALS)


@cache
def signal(name: str) -> np.ndarray:
    return SIGNALS[name]()


@cache
def reference(name: str, whiten: bool, **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gwpy image, times and frequencies for one signal."""
    series = gwpy_timeseries.TimeSeries(signal(name), sample_rate=SAMPLE_RATE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = series.q_transform(frange=FRANGE, whiten=whiten, **kwargs)
    return (np.asarray(spec.value), np.asarray(spec.times.value), np.asarray(spec.frequencies.value))


@cache
def ours(whiten: bool) -> np.ndarray:
    """All signals through one batched call."""
    batch = np.stack([signal(name) for name in CASES])
    return q_transform(batch, SAMPLE_RATE, frange=FRANGE, whiten=whiten)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # the CI/dev boxes are small and often busy: OpenMP threads competing
    # for oversubscribed cores make torch far slower, not faster
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# -- grid ---------------------------------------------------------------------


def test_grid_matches_gwpy_axes():
    times, freqs = q_transform_grid(N_TIME, SAMPLE_RATE, frange=FRANGE)
    _, ref_times, ref_freqs = reference("white", False)
    assert times.shape == (1000,)
    assert freqs.shape == (280,)
    np.testing.assert_allclose(times, ref_times, rtol=0, atol=1e-9)
    np.testing.assert_allclose(freqs, ref_freqs, rtol=0, atol=1e-6)
    assert freqs[0] == 10.0 and freqs[1] - freqs[0] == 0.5


def test_output_shape_and_dtype():
    out = ours(False)
    assert out.shape == (len(CASES), 1000, 280)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


def test_plan_is_cached_and_reports_tiling():
    plan = get_plan(N_TIME, SAMPLE_RATE, frange=FRANGE)
    assert plan is get_plan(N_TIME, SAMPLE_RATE, frange=FRANGE)
    assert plan.shape == (1000, 280)
    assert len(plan.qs) == 4  # Q in (4, 64) at 0.2 mismatch
    assert all(np.all(np.diff(p.frequencies) > 0) for p in plan.planes)


# -- agreement with gwpy ------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_matches_gwpy_without_whitening(name):
    ref = reference(name, False)[0]
    got = ours(False)[CASES.index(name)]
    assert got.shape == ref.shape == (1000, 280)
    assert pearson(got, ref) >= 0.99
    # same plane, same splines: the values agree to float32 precision
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * ref.max())


@pytest.mark.parametrize("name", CASES)
def test_matches_gwpy_with_whitening(name):
    ref = reference(name, True)[0]
    got = ours(True)[CASES.index(name)]
    assert got.shape == ref.shape == (1000, 280)
    assert pearson(got, ref) >= 0.95


def test_glitch_is_found_where_injected():
    got = ours(False)[CASES.index("sine_gaussian")]
    times, freqs = q_transform_grid(N_TIME, SAMPLE_RATE, frange=FRANGE)
    it, jf = np.unravel_index(np.argmax(got), got.shape)
    assert abs(times[it] - 8.0) < 0.05
    assert abs(freqs[jf] - 60.0) < 3.0


def test_mean_normalisation_matches_gwpy():
    ref = reference("white+glitch", False, norm="mean")[0]
    got = q_transform(signal("white+glitch"), SAMPLE_RATE, frange=FRANGE, norm="mean")[0]
    assert pearson(got, ref) >= 0.99


def test_search_window_picks_plane_like_gwpy():
    # a loud blip at 12.5 s makes the lowest-Q plane win over the whole
    # series; a search window around the high-Q sine-Gaussian at 4 s makes
    # a high-Q plane win instead
    x = _white(7) + _blip(12.5, 20.0) + _sine_gaussian(4.0, 60.0, 40.0, 1.0)
    series = gwpy_timeseries.TimeSeries(x, sample_rate=SAMPLE_RATE)
    ref = series.q_transform(frange=FRANGE, whiten=False, gps=4.0, search=0.5)
    ref_all = series.q_transform(frange=FRANGE, whiten=False)
    assert ref.q > ref_all.q  # the window does change gwpy's choice
    got = q_transform(x, SAMPLE_RATE, frange=FRANGE, gps=4.0, search=0.5)[0]
    got_all = q_transform(x, SAMPLE_RATE, frange=FRANGE)[0]
    assert pearson(got, ref.value) >= 0.99
    assert pearson(got_all, ref_all.value) >= 0.99


@pytest.mark.parametrize(
    ("sample_rate", "duration", "frange", "kwargs"),
    [
        (1024.0, 4.0, (20.0, 300.0), {}),
        (256.0, 8.0, (0.0, float("inf")), {"qrange": (4.0, 32.0)}),
        (500.0, 5.0, (15.0, 100.0), {"mismatch": 0.1, "tres": 0.05, "fres": 1.0}),
    ],
)
def test_other_configurations_match_gwpy(sample_rate, duration, frange, kwargs):
    n = int(sample_rate * duration)
    t = np.arange(n) / sample_rate
    x = np.random.default_rng(11).standard_normal(n) + 3.0 * np.exp(-(((t - duration / 2) / 0.02) ** 2)) * np.sin(
        2.0 * np.pi * 60.0 * t
    )
    series = gwpy_timeseries.TimeSeries(x, sample_rate=sample_rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = series.q_transform(frange=frange, whiten=False, **kwargs)
        got = q_transform(x, sample_rate, frange=frange, **kwargs)[0]
        times, freqs = q_transform_grid(n, sample_rate, frange=frange, **kwargs)
    assert got.shape == ref.shape
    np.testing.assert_allclose(times, ref.times.value, atol=1e-9)
    np.testing.assert_allclose(freqs, ref.frequencies.value, atol=1e-4)
    assert pearson(got, ref.value) >= 0.99


# -- batching and input forms -------------------------------------------------


def test_batch_equals_single_samples():
    batch = ours(False)
    for i, name in enumerate(CASES[:3]):
        single = q_transform(signal(name), SAMPLE_RATE, frange=FRANGE)
        assert single.shape == (1, 1000, 280)
        np.testing.assert_allclose(single[0], batch[i], rtol=1e-4, atol=1e-5 * batch[i].max())


def test_one_dimensional_input_is_a_batch_of_one():
    x = signal("white+glitch")
    out = q_transform(x, SAMPLE_RATE, frange=FRANGE)
    assert out.shape == (1, 1000, 280)
    np.testing.assert_allclose(out[0], ours(False)[CASES.index("white+glitch")], rtol=1e-4, atol=1e-4)


def test_small_batch_size_and_torch_input_give_same_result():
    batch = np.stack([signal(name) for name in CASES])
    chunked = q_transform(torch.as_tensor(batch, dtype=torch.float32), SAMPLE_RATE, frange=FRANGE, batch_size=4)
    full = ours(False)
    for got, want in zip(chunked, full):
        assert pearson(got, want) >= 0.9999


@pytest.mark.parametrize("whiten", [False, True])
def test_gpu_code_path_gives_the_same_images(whiten, monkeypatch):
    """The torch-only path a GPU takes (torch gather and median, device output buffer), run on
    the CPU with the numpy fast paths off, against the default CPU path."""
    from virgo_exps.study import qbackend

    batch = np.stack([signal(name) for name in CASES])
    monkeypatch.setattr(qbackend, "CPU_NUMPY_PATHS", False)
    torch_path = q_transform(batch, SAMPLE_RATE, frange=FRANGE, whiten=whiten, device="cpu")
    monkeypatch.setattr(qbackend, "CPU_NUMPY_PATHS", True)
    for got, want in zip(torch_path, ours(whiten)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_out_argument_is_filled_in_place():
    x = np.stack([signal("white"), signal("blip")])
    buf = np.full((2, 1000, 280), np.nan, dtype=np.float32)
    ret = q_transform(x, SAMPLE_RATE, frange=FRANGE, out=buf)
    assert ret is buf
    assert np.isfinite(buf).all()
    with pytest.raises(ValueError):
        q_transform(x, SAMPLE_RATE, frange=FRANGE, out=np.empty((1, 1000, 280), dtype=np.float32))


def test_rejects_bad_input():
    x = signal("white").copy()
    x[10] = np.nan
    with pytest.raises(ValueError):
        q_transform(x, SAMPLE_RATE, frange=FRANGE)
    with pytest.raises(ValueError):
        q_transform(np.zeros((2, 2, N_TIME)), SAMPLE_RATE, frange=FRANGE)
    with pytest.raises(ValueError):
        q_transform(signal("white"), SAMPLE_RATE, frange=FRANGE, norm="max")
