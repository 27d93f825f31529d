"""The study's side of training: its networks, their code, its loss, its optimiser and its validation figures
(:class:`ModelFactory`, given by the study's train stage), with the defaults of a study that gives none."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


def adamw(parameters, lr: float, cfg) -> torch.optim.Optimizer:
    """AdamW with ``train.weight_decay``: an optimiser a study may choose (:class:`ModelFactory`)."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=cfg.weight_decay)


def per_sample_mse(out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The validation figure of a study that gives none: each sample's mean squared error."""
    return {"loss": ((out.float() - y) ** 2).flatten(1).mean(dim=1)}


@dataclass(frozen=True)
class ModelFactory:
    """The study's side of training, given by its train stage: its networks, the code that defines them,
    its loss and its optimiser.

    The trainer reads the split store (``<split>/x``, ``<split>/y``, see
    :mod:`virgo_exps.train.data`), builds the network with ``build``, computes
    ``loss()`` of its output and the targets and steps ``optimizer(parameters,
    lr, train params)``; everything else (strategies, snapshots, outputs,
    tracking) is the same for every study. A study that gives no loss or
    optimiser trains with mean squared error and AdamW.
    """

    build: Callable[[str, int], nn.Module]  # (train.model, input channels) -> an untrained network
    code: tuple[Path, ...] = ()  # the files that define them (and the loss, the optimiser): in the snapshot key
    loss: Callable[[], nn.Module] = nn.MSELoss
    optimizer: Callable[..., torch.optim.Optimizer] = adamw
    # (output, targets) of a validation batch -> per-sample figures: "loss" and the study's own metrics
    # (each averaged over the whole validation split: val_loss, val_<name> in metrics.json and MLflow)
    evaluate: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] = per_sample_mse
    metrics: tuple[str, ...] = ()  # the names evaluate gives besides "loss" (a sweep may optimise val_<name>)
