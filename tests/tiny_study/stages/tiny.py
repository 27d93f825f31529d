"""The tiny study: its params, its data and its networks (everything study-specific)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from virgo_exps.config import REQUIRED, ConfigError, spec, validate


@dataclass(frozen=True)
class DataConfig:
    n_samples: int = spec(REQUIRED, lambda v: v >= 8, "an integer >= 8", "samples in both splits")
    channels: int = spec(2, lambda v: 1 <= v <= 8, "an integer from 1 to 8", "input channels")
    size: int = spec(8, lambda v: 4 <= v <= 64, "an integer from 4 to 64", "side of each square field")
    val_fraction: float = spec(0.25, lambda v: 0 < v < 1, "a number strictly between 0 and 1", "validation share")
    seed: int = spec(0, lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1", "seed of the data")


def load_study(path: str | Path) -> DataConfig:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if set(raw) != {"data"}:
        raise ConfigError(f"{path}: expected one section 'data', got {sorted(raw)}")
    return DataConfig(**validate(DataConfig, raw["data"], "data"))


def make_splits(cfg: DataConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random fields x and a target y: a fixed mix of the channels shifted by one pixel, plus noise."""
    rng = np.random.default_rng(cfg.seed)
    x = rng.standard_normal((cfg.n_samples, cfg.channels, cfg.size, cfg.size)).astype(np.float32)
    weights = np.linspace(1.0, -0.5, cfg.channels, dtype=np.float32)[None, :, None, None]
    y = (np.roll(x, 1, axis=-1) * weights).sum(axis=1, keepdims=True)
    y += 0.05 * rng.standard_normal(y.shape).astype(np.float32)
    n_val = max(1, round(cfg.n_samples * cfg.val_fraction))
    return {"train": (x[n_val:], y[n_val:]), "val": (x[:n_val], y[:n_val])}


MODELS = ("tinyconv",)


def build(name: str, in_channels: int):
    """The study's model factory: ``train.model`` and the input channels -> an untrained network."""
    from torch import nn

    if name not in MODELS:
        raise ConfigError(f"train.model: {name!r} is not a network of this study; expected one of {MODELS}")
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))
