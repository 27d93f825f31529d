"""Synthetic data generation: reproducibility, content and atomic publication."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import zarr

from virgo_exps.study import channels, samples
from virgo_exps.study import generate as G
from virgo_exps.study.params import GenerateConfig

SMALL = GenerateConfig(seed=7, n_samples=20, n_aux=3, duration=4.0, sample_rate=500, chunk_size=4, workers=1)
SRC = str(Path(G.__file__).resolve().parents[2])


def _strain(path: Path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["strain"][:]


def _attrs(path: Path) -> dict:
    return dict(zarr.open_group(str(path), mode="r").attrs)


def _chunk_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "strain").glob("c.*")) if p.is_file()}


# -- reproducibility ----------------------------------------------------------


def test_sample_depends_only_on_seed_and_index():
    whole = samples.generate_chunk(SMALL, 0, 6)
    assert whole.shape == (6, 4, 2000) and whole.dtype == np.float32
    assert np.isfinite(whole).all()
    # any sub-range gives the same bytes as the corresponding slice
    assert samples.generate_chunk(SMALL, 3, 6).tobytes() == whole[3:6].tobytes()
    assert samples.generate_chunk(SMALL, 5, 6).tobytes() == whole[5:6].tobytes()
    # ... and so does a data set of another size (n_samples is not in the stream)
    bigger = replace(SMALL, n_samples=999)
    assert samples.generate_chunk(bigger, 0, 6).tobytes() == whole.tobytes()
    again = samples.generate_chunk(SMALL, 0, 6)
    assert again.tobytes() == whole.tobytes()
    other = samples.generate_chunk(replace(SMALL, seed=8), 0, 6)
    assert not np.allclose(other, whole)
    # samples differ from one another
    assert not np.allclose(whole[0], whole[1])


def test_store_is_identical_however_the_work_is_split(tmp_path):
    a, b, c, d = (tmp_path / f"{k}.zarr" for k in "abcd")
    G.generate(SMALL, a, workers=1, progress=False)
    G.generate(SMALL, b, workers=2, progress=False)
    # SLURM protocol: 3 parts, in any order, one of them run twice
    parts = G.default_parts_path(c)
    for k in (2, 0, 2, 1):
        G.generate_part(SMALL, parts, k, 3, workers=1, progress=False)
    G.finalize(SMALL, parts, c)
    assert not parts.exists()
    # explicit chunk ranges into a partial store (5 chunks)
    part_d = tmp_path / "d.partial-store"
    G.generate(SMALL, part_d, workers=1, start=3, stop=5, progress=False)
    G.generate(SMALL, part_d, workers=2, start=0, stop=3, progress=False)
    G.finalize(SMALL, part_d, d)

    ref = _strain(a)
    assert ref.shape == (20, 4, 2000)
    np.testing.assert_array_equal(ref, samples.generate_chunk(SMALL, 0, 20))
    ref_bytes, ref_attrs = _chunk_bytes(a), _attrs(a)
    assert len(ref_bytes) == 5
    for other in (b, c, d):
        assert _strain(other).tobytes() == ref.tobytes()
        assert _chunk_bytes(other) == ref_bytes  # byte-identical compressed chunks
        assert _attrs(other) == ref_attrs
    assert ref_attrs["complete"] is True
    assert ref_attrs["channels"] == ["main", "aux1", "aux2", "aux3"]
    assert ref_attrs["params"] == {k: v for k, v in asdict(SMALL).items() if k != "workers"}
    assert ref_attrs["sample_rate"] == 500 and ref_attrs["n_time"] == 2000
    arr = zarr.open_group(str(a), mode="r")["strain"]
    assert arr.chunks == (4, 4, 2000)

    other_seed = tmp_path / "e.zarr"
    G.generate(replace(SMALL, seed=8), other_seed, workers=1, progress=False)
    assert _strain(other_seed).tobytes() != ref.tobytes()


def test_finalize_refuses_missing_chunks_and_other_params(tmp_path):
    parts, out = tmp_path / "x.parts", tmp_path / "x.zarr"
    G.generate_part(SMALL, parts, 0, 3, workers=1, progress=False)
    G.generate_part(SMALL, parts, 2, 3, workers=1, progress=False)
    with pytest.raises(RuntimeError, match="chunks are missing"):
        G.finalize(SMALL, parts, out)
    assert not out.exists()
    # 5 chunks in 3 parts: [0, 1), [1, 3), [3, 5)
    assert G.missing_chunks(SMALL, parts) == [1, 2]
    with pytest.raises(ValueError, match="other generation parameters"):
        G.generate_part(replace(SMALL, seed=1), parts, 1, 3, workers=1, progress=False)
    G.generate_part(SMALL, parts, 1, 3, workers=1, progress=False)
    G.finalize(SMALL, parts, out)
    assert _attrs(out)["complete"] is True


def test_estimate_reports_size_and_time():
    cfg = GenerateConfig(n_samples=750_000, chunk_size=64, workers=4)
    est = G.estimate(cfg)
    assert est["bytes_uncompressed"] == 750_000 * 4 * 8000 * 4
    assert 0 < est["bytes_compressed"] <= est["bytes_uncompressed"]
    assert est["seconds"] > 0 and est["workers"] == 4
    assert est["summary"].startswith("750000 samples, ~96.0 GB uncompressed")


# -- content --------------------------------------------------------------------


def _whitened(cfg: GenerateConfig, x: np.ndarray) -> np.ndarray:
    d = channels.design_of(cfg)
    gain = np.where(d.in_band & (d.asd > 0), 1.0 / np.where(d.asd > 0, d.asd, 1.0), 0.0)
    return np.fft.irfft(np.fft.rfft(x, axis=-1) * gain, n=x.shape[-1], axis=-1)


def test_main_channel_spectrum():
    from scipy.signal import welch

    cfg = GenerateConfig(seed=3, n_samples=16, duration=8.0)
    x = samples.generate_chunk(cfg, 0, 16)[:, 0].astype(np.float64)
    f, p = welch(x, fs=cfg.sample_rate, nperseg=1000)
    p = p.mean(axis=0)
    at = lambda hz: p[np.argmin(np.abs(f - hz))]  # noqa: E731
    quiet = (f >= 15) & (f <= 140) & (np.abs(f - 50) > 3) & (np.abs(f - 100) > 3)
    in_band = np.median(p[quiet])
    assert in_band > 0
    assert np.median(p[f > 230]) < in_band / 3  # anti-aliasing roll-off
    assert at(3.0) > 100 * in_band  # seismic wall below the band
    assert at(50.0) > 5 * np.median(p[(f > 40) & (f < 48)])  # mains line


def test_coupled_glitches_show_in_main():
    from scipy.ndimage import uniform_filter1d

    cfg = GenerateConfig(seed=3, n_samples=24, duration=8.0)
    x = samples.generate_chunk(cfg, 0, 24).astype(np.float64)
    white = _whitened(cfg, x)  # (n, C, t): each channel by its own design ASD
    env = np.log(uniform_filter1d(white**2, size=50, axis=-1))  # 0.1 s energy envelope

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    n = len(x)
    matched = np.array([max(corr(env[i, 0], env[i, c]) for c in range(1, 4)) for i in range(n)])
    shuffled = np.array([max(corr(env[i, 0], env[(i + 1) % n, c]) for c in range(1, 4)) for i in range(n)])
    assert matched.mean() > shuffled.mean() + 0.2
    assert (matched > shuffled).mean() >= 0.8

    # every sample has a coupled anchor glitch, loud in main, away from the edges
    for i in range(n):
        cat = samples.catalog(cfg, i)
        anchor = cat[0]
        assert anchor["role"] == "coupled" and anchor["channel"] >= 1
        assert anchor["kind"] in ("sine_gaussian", "blip")
        assert anchor["snr_main"] >= 15 and 8 <= anchor["snr"] <= 50
        assert 1.0 <= anchor["t0"] <= cfg.duration - 1.0
        # the whitened main channel is loudest near one of its glitches
        t_peak = np.argmax(uniform_filter1d(white[i, 0] ** 2, size=10)) / cfg.sample_rate
        times = [g.get("t0_main", g["t0"]) for g in cat if g["role"] != "witness"]
        assert min(abs(t_peak - t) for t in times) < 0.6


# -- atomicity --------------------------------------------------------------------


def _run_generate_code(cfg: GenerateConfig, out: Path, workers: int = 1) -> list[str]:
    code = (
        "from virgo_exps.study.params import GenerateConfig\n"
        "from virgo_exps.study.generate import generate\n"
        f"generate(GenerateConfig(**{asdict(cfg)!r}), {str(out)!r}, workers={workers}, progress=False)\n"
    )
    return [sys.executable, "-c", code]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_killed_run_leaves_no_store_and_is_cleaned_up(tmp_path):
    out = tmp_path / "raw.zarr"
    big = GenerateConfig(seed=1, n_samples=200_000, duration=4.0, chunk_size=8)
    proc = subprocess.Popen(_run_generate_code(big, out), env=_env())
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(list(tmp_path.glob("raw.zarr.partial-*/strain/c.*"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the generation ended before it could be killed"
        assert list(tmp_path.glob("raw.zarr.partial-*/strain/c.*")), "no chunk was written in time"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    stale = list(tmp_path.glob("raw.zarr.partial-*"))
    assert len(stale) == 1
    # the next run removes the dead run's directory and publishes a complete store
    G.generate(SMALL, out, workers=1, progress=False)
    assert _attrs(out)["complete"] is True
    assert not stale[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.zarr"]


def test_out_is_complete_whenever_it_exists(tmp_path):
    out = tmp_path / "raw.zarr"
    cfg = GenerateConfig(seed=2, n_samples=96, duration=4.0, chunk_size=8)
    seen, bad = 0, []
    for _ in range(2):  # a first publication, then a replacement of an existing store
        proc = subprocess.Popen(_run_generate_code(cfg, out), env=_env())
        while proc.poll() is None:
            try:
                meta = json.loads((out / "zarr.json").read_text())
            except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
                time.sleep(0.002)
                continue
            seen += 1
            if meta.get("attributes", {}).get("complete") is not True:
                bad.append(meta.get("attributes"))
        assert proc.wait() == 0
    assert not bad
    assert seen > 0
    assert _attrs(out)["complete"] is True
    np.testing.assert_array_equal(_strain(out)[:4], samples.generate_chunk(cfg, 0, 4))
