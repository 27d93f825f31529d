"""The sequence study's side of training: a 1-D convolutional classifier, cross-entropy, SGD with momentum."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from virgo_exps.train.trainer import ModelFactory


def build(name: str, in_channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(in_channels, 16, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(16, 16, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(8),
        nn.Flatten(),
        nn.Linear(16 * 8, CLASSES_MAX),
    )


CLASSES_MAX = 16  # the output layer covers every allowed sequences.classes


class CrossEntropy(nn.Module):
    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), y.long().view(-1))


def evaluate(out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    labels = y.long().view(-1)
    return {
        "loss": F.cross_entropy(out.float(), labels, reduction="none"),
        "accuracy": (out.argmax(dim=1) == labels).double(),
    }


def sgd(parameters, lr: float, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)


def factory() -> ModelFactory:
    return ModelFactory(
        build, code=(Path(__file__),), loss=CrossEntropy, optimizer=sgd, evaluate=evaluate, metrics=("accuracy",)
    )
