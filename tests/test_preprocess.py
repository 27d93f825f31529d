"""Preprocessing: Q-transform patches, split, train-only normalisation, layout."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import zarr

from virgo_exps.study import generate as G
from virgo_exps.study import imagestore, normalise, samples
from virgo_exps.study import preprocess as P
from virgo_exps.study.params import GenerateConfig, PreprocessConfig
from virgo_exps.study.patches import find_windows

GEN = GenerateConfig(seed=11, n_samples=30, n_aux=3, duration=4.0, sample_rate=500, chunk_size=8, workers=1)
PRE = PreprocessConfig(patch_size=32, val_fraction=0.2, split_seed=5, batch_size=8)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    raw = root / "raw.zarr"
    G.generate(GEN, raw, workers=1, progress=False)
    out = root / "images.zarr"
    summary = P.preprocess(raw, PRE, out, progress=False, workers=1)
    return raw, out, summary


@pytest.fixture(scope="module")
def by_hand(stores):
    """Full Q-transform images of every sample, computed directly."""
    from virgo_exps.study.qtransform import q_transform

    raw, _, _ = stores
    x = zarr.open_group(str(raw), mode="r")["strain"][:]
    img = q_transform(x.reshape(-1, x.shape[-1]), GEN.sample_rate, frange=(PRE.fmin, PRE.fmax), whiten=PRE.whiten)
    return img.reshape(x.shape[0], x.shape[1], *img.shape[1:])


def _load(out: Path) -> tuple[dict, dict]:
    g = zarr.open_group(str(out), mode="r")
    arrays = {f"{s}/{k}": g[f"{s}/{k}"][:] for s in ("train", "val") for k in ("x", "y", "index", "window")}
    return arrays, dict(g.attrs)


def test_layout_and_attrs(stores):
    raw, out, summary = stores
    a, attrs = _load(out)
    n_val = round(30 * 0.2)
    assert summary["n_train"] == 30 - n_val and summary["n_val"] == n_val and summary["samples_per_s"] > 0
    p = PRE.patch_size
    assert a["train/x"].shape == (30 - n_val, 3, p, p) and a["train/x"].dtype == np.float32
    assert a["train/y"].shape == (30 - n_val, 1, p, p)
    assert a["val/x"].shape == (n_val, 3, p, p) and a["val/y"].shape == (n_val, 1, p, p)
    assert a["train/window"].shape == (30 - n_val, 2)
    assert np.isfinite(a["train/x"]).all() and np.isfinite(a["val/y"]).all()
    assert attrs["complete"] is True and attrs["patch_size"] == p
    assert attrs["params"] == asdict(PRE)
    gen_attrs = dict(zarr.open_group(str(raw), mode="r").attrs)
    gen_attrs.pop("complete")
    assert attrs["generate"] == gen_attrs
    assert attrs["grid"]["n_time"] == 1000 and attrs["grid"]["n_freq"] == 280
    assert attrs["channels_x"] == ["aux1", "aux2", "aux3"]
    g = zarr.open_group(str(out), mode="r")
    assert g["train/x"].chunks[0] == min(imagestore.OUT_CHUNK, 30 - n_val)
    # the layout the training stage reads
    from virgo_exps.train.data import ImageDataset

    ds = ImageDataset(out, "train")
    assert len(ds) == 30 - n_val and ds.n_channels == 3


def test_split_is_disjoint_covering_and_seeded(stores):
    _, out, _ = stores
    a, _ = _load(out)
    tr, va = a["train/index"], a["val/index"]
    assert len(va) == round(30 * PRE.val_fraction)
    assert np.intersect1d(tr, va).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(30))
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)
    exp_tr, exp_va = normalise.split_indices(30, PRE.val_fraction, PRE.split_seed)
    assert np.array_equal(tr, exp_tr) and np.array_equal(va, exp_va)
    other = normalise.split_indices(30, PRE.val_fraction, PRE.split_seed + 1)[1]
    assert not np.array_equal(other, va)


def test_same_window_for_all_channels_and_values_match_by_hand(stores, by_hand):
    _, out, _ = stores
    a, attrs = _load(out)
    norm, p = attrs["norm"], PRE.patch_size
    x_mean, x_std = np.array(norm["x_mean"]), np.array(norm["x_std"])
    n_t, n_f = by_hand.shape[2:]
    for split in ("train", "val"):
        for k, i in enumerate(a[f"{split}/index"]):
            t0, f0 = a[f"{split}/window"][k]
            assert 0 <= t0 <= n_t - p and 0 <= f0 <= n_f - p
            expect = np.log1p(np.maximum(by_hand[i, :, t0 : t0 + p, f0 : f0 + p], 0))
            x = a[f"{split}/x"][k] * x_std[:, None, None] + x_mean[:, None, None]
            y = a[f"{split}/y"][k, 0] * norm["y_std"] + norm["y_mean"]
            np.testing.assert_allclose(y, expect[0], atol=2e-4)
            np.testing.assert_allclose(x, expect[1:], atol=2e-4)
            # the window is centred on the smoothed main image's peak (unless clipped)
            smooth = find_windows(by_hand[i : i + 1, 0], p)[0]
            assert (t0, f0) == tuple(smooth)
            # the loudest pixel is in the window's time span (along a broadband
            # glitch the smoothed peak may sit elsewhere in frequency)
            ti = np.unravel_index(np.argmax(by_hand[i, 0]), (n_t, n_f))[0]
            assert t0 <= ti < t0 + p


def test_window_lands_on_a_main_channel_glitch(stores):
    _, out, _ = stores
    a, attrs = _load(out)
    grid, p = attrs["grid"], PRE.patch_size
    hits = 0
    ids = np.concatenate([a["train/index"], a["val/index"]])
    wins = np.concatenate([a["train/window"], a["val/window"]])
    for i, (t0, _) in zip(ids, wins):
        t_lo, t_hi = grid["t0"] + t0 * grid["dt"], grid["t0"] + (t0 + p) * grid["dt"]
        glitches = [g for g in samples.catalog(GEN, int(i)) if g["role"] in ("coupled", "main_only")]
        hits += any(t_lo - 0.1 <= g.get("t0_main", g["t0"]) <= t_hi + 0.1 for g in glitches)
    assert hits >= 0.9 * len(ids)


def test_normalisation_is_fitted_on_train_only(stores, by_hand):
    _, out, _ = stores
    a, attrs = _load(out)
    norm = attrs["norm"]
    # normalised training data: mean 0, std 1 per channel
    tx, ty = a["train/x"].astype(np.float64), a["train/y"].astype(np.float64)
    np.testing.assert_allclose(tx.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(tx.std(axis=(0, 2, 3)), 1, atol=1e-5)
    assert abs(ty.mean()) < 1e-5 and abs(ty.std() - 1) < 1e-5
    # validation data is normalised with the same statistics, so not exactly
    vx = a["val/x"].astype(np.float64)
    assert np.abs(vx.mean(axis=(0, 2, 3))).max() > 1e-3
    # the statistics equal those computed by hand from the training patches only
    p = PRE.patch_size

    def patches(split):
        out = []
        for k, i in enumerate(a[f"{split}/index"]):
            t0, f0 = a[f"{split}/window"][k]
            out.append(np.log1p(np.maximum(by_hand[i, :, t0 : t0 + p, f0 : f0 + p], 0)))
        return np.array(out, dtype=np.float64)

    tr = patches("train")
    np.testing.assert_allclose(norm["x_mean"], tr[:, 1:].mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(norm["x_std"], tr[:, 1:].std(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(norm["y_mean"], tr[:, 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(norm["y_std"], tr[:, 0].std(), rtol=1e-5)
    both = np.concatenate([tr, patches("val")])
    assert not np.allclose(norm["x_mean"], both[:, 1:].mean(axis=(0, 2, 3)), rtol=1e-5)


def test_moments_match_numpy():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(50, 3, 4, 4))
    m = normalise.Moments(3)
    for a, b in ((0, 7), (7, 7), (7, 20), (20, 50)):
        m.add(data[a:b])
    np.testing.assert_allclose(m.mean, data.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(m.std, data.std(axis=(0, 2, 3)), rtol=1e-12)


def test_find_windows_clips_to_the_image():
    img = np.zeros((3, 100, 50), dtype=np.float32)
    img[0, 2, 3] = 10  # corner
    img[1, 99, 49] = 10  # opposite corner
    t, f = np.meshgrid(np.arange(100), np.arange(50), indexing="ij")
    img[2] = np.exp(-((t - 50) ** 2 + (f - 25) ** 2) / 8.0)  # a blob in the middle
    w = find_windows(img, 16)
    assert w.tolist() == [[0, 0], [84, 34], [42, 17]]


def test_incomplete_source_is_refused(tmp_path):
    parts = tmp_path / "raw.parts"
    G.generate_part(GEN, parts, 0, 2, workers=1, progress=False)
    with pytest.raises(RuntimeError, match="incomplete"):
        P.preprocess(parts, PRE, tmp_path / "img.zarr", progress=False, workers=1)
    assert not any(p.name.startswith("img.zarr") for p in tmp_path.iterdir())


def test_rerun_is_identical_and_replaces_the_output_atomically(stores, tmp_path):
    raw, out, _ = stores
    ref, ref_attrs = _load(out)
    again = tmp_path / "again.zarr"
    for _ in range(2):  # the second run replaces an existing store
        P.preprocess(raw, PRE, again, progress=False, workers=1)
        other, other_attrs = _load(again)
        assert other_attrs == ref_attrs
        assert all(other[k].tobytes() == ref[k].tobytes() for k in ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.zarr"]


@pytest.mark.slow
def test_identical_across_worker_counts_and_batch_sizes(stores, tmp_path):
    """workers and batch_size are declared as never changing a result (not params of the stage in dvc.yaml)."""
    raw, out, _ = stores
    ref, ref_attrs = _load(out)
    P.preprocess(raw, replace(PRE, batch_size=3), tmp_path / "w2.zarr", progress=False, workers=2)
    other, other_attrs = _load(tmp_path / "w2.zarr")
    assert other_attrs["params"].pop("batch_size") == 3  # the stamp records the value it ran with
    ref_attrs["params"].pop("batch_size")
    assert other_attrs == ref_attrs
    for k in ref:
        assert other[k].tobytes() == ref[k].tobytes(), k


@pytest.mark.slow
def test_whitened_variant(stores, tmp_path):
    raw, _, _ = stores
    cfg = replace(PRE, whiten=True, patch_size=16)
    summary = P.preprocess(raw, cfg, tmp_path / "w.zarr", progress=False, workers=1)
    a, attrs = _load(tmp_path / "w.zarr")
    assert summary["whiten"] is True and attrs["params"]["whiten"] is True
    assert a["train/x"].shape[1:] == (3, 16, 16)
    np.testing.assert_allclose(a["train/x"].astype(np.float64).mean(axis=(0, 2, 3)), 0, atol=1e-5)
