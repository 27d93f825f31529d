"""The strategy interface: everything the trainer needs to know about distribution.

The trainer calls only these methods, so the training loop is the same code
for a single process, PyTorch DDP, DeepSpeed and Horovod. A strategy reads its
rank and world size from the environment its launcher sets (torchrun, srun,
horovodrun); see :mod:`virgo_exps.launch.launcher` for how those are started.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Strategy(ABC):
    """One way of running the training loop on one or many processes."""

    name: str = "base"

    def __init__(self) -> None:
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0
        self.device = torch.device("cpu")
        self.zero_stage = 0  # train.zero_stage (DeepSpeed)
        self.dist_backend = "auto"  # train.dist_backend (ddp, deepspeed)
        self.grad_compression = "none"  # train.grad_compression (ddp, horovod)
        self.grad_accum_steps = 1  # train.grad_accum_steps: backward passes per optimiser step
        self.grad_clip = 0.0  # train.grad_clip: largest gradient norm, 0: off
        self.scaler: torch.amp.GradScaler | None = None  # train.precision fp16 (set by the trainer)

    # -- life cycle -------------------------------------------------------
    @abstractmethod
    def init(self) -> None:
        """Join the process group (if any) and pick this process's device."""

    def shutdown(self) -> None:  # noqa: B027 - optional: most strategies have nothing to leave
        """Leave the process group."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _pick_device(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")

    # -- model and optimisation -------------------------------------------
    @abstractmethod
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int) -> tuple[Any, Any]:
        """Return (model, optimizer) ready for distributed training."""

    # One optimiser step is zero_grad, then backward once per micro-batch of the accumulation cycle
    # (``last`` on the cycle's last), then step.
    def zero_grad(self, optimizer: Any) -> None:
        optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, model: Any, optimizer: Any, last: bool) -> None:
        """One micro-batch's backward pass: its share of the step's mean loss (scaled for fp16)."""
        if self.grad_accum_steps > 1:
            loss = loss / self.grad_accum_steps
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        with contextlib.nullcontext() if last else self._no_sync(model):
            loss.backward()

    def _no_sync(self, model: Any) -> contextlib.AbstractContextManager:
        """Where gradients are reduced between processes during backward: not before the cycle's last."""
        return contextlib.nullcontext()

    def step(self, model: Any, optimizer: Any) -> None:
        self._unscale_and_clip(model, optimizer)
        self._apply(optimizer)

    def _unscale_and_clip(self, model: Any, optimizer: Any) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # the norm is clipped on the true gradients
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.unwrap(model).parameters(), self.grad_clip)

    def _apply(self, optimizer: Any) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped when a gradient is not finite; the scale then shrinks
            self.scaler.update()
        else:
            optimizer.step()

    def unwrap(self, model: Any) -> nn.Module:
        """The plain nn.Module (for saving and evaluation)."""
        return getattr(model, "module", model)

    def model_state(self, model: Any) -> dict:
        """The network's whole state dict (snapshots, model.pt). Every rank calls it: a strategy that splits
        the weights over the ranks gathers them, which takes them all."""
        return self.unwrap(model).state_dict()

    def load_model_state(self, model: Any, state: dict) -> None:
        """Put a whole state dict (:meth:`model_state`'s) into the network; every rank calls it."""
        self.unwrap(model).load_state_dict(state)

    def torch_optimizer(self, optimizer: Any) -> torch.optim.Optimizer:
        """The torch optimiser whose learning rate the schedule sets (inside a strategy's wrapper)."""
        return optimizer

    # Whether each rank holds only a part of the optimiser state (DeepSpeed's ZeRO): then a snapshot keeps
    # every rank's part, and each rank loads its own; else rank 0's state is the whole.
    partitioned_optimizer = False

    def optimizer_state(self, optimizer: Any) -> dict:
        """This rank's optimiser state."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: Any, state: Any) -> None:
        """Load what :meth:`optimizer_state` gave: rank 0's, or with a partitioned optimiser every rank's part
        (a list by rank) or this rank's own."""
        optimizer.load_state_dict(state)

    # -- collectives --------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce a small CPU/device tensor over all ranks (op: sum or max)."""
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:  # noqa: B027 - optional: one process has nobody to wait for
        pass


def env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default
