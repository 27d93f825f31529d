"""What a training step computes around the strategy's own work: the learning-rate schedule
(``train.lr_schedule``) and the precision of the forward pass (``train.precision``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch


def lr_factor(cfg, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate of step ``step`` as a fraction of ``train.lr``: a linear warm-up, then constant or
    a cosine decay to ``train.lr_floor`` at the last step of ``train.epochs``.

    The constant schedule does not depend on train.epochs, so a run continued with more epochs is the
    same as one trained that many epochs in one go; a cosine one does (epochs are then in the snapshot key).
    """
    warmup = cfg.warmup_steps

    def warm(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup else 1.0

    if cfg.lr_schedule == "constant":
        return warm
    total, floor = max(1, cfg.epochs * steps_per_epoch - 1), cfg.lr_floor
    return lambda step: (
        warm(step) * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
    )


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``train.precision`` around a forward pass: nothing for fp32, else torch's autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
