"""Helpers shared by the strategies built on torch.distributed (DDP, DeepSpeed)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from virgo_exps.train.strategies.base import Strategy, env_int

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def backend(choice: str = "auto") -> str:
    """The collective backend of ``train.dist_backend``: NCCL where there are GPUs and gloo otherwise for
    'auto', else the one named."""
    if choice != "auto":
        return choice
    return "nccl" if torch.cuda.is_available() else "gloo"


class TorchDistStrategy(Strategy):
    """Base for strategies whose ranks come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK)."""

    def _read_env(self) -> None:
        self.rank = env_int("RANK", "SLURM_PROCID", default=0)
        self.world_size = env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
        self.local_rank = env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)

    def _timeout(self) -> datetime.timedelta:
        # A rank that dies leaves the others blocked in a collective; a finite
        # timeout turns that into an error instead of a job that hangs until
        # its time limit.
        return datetime.timedelta(seconds=float(os.environ.get("VIRGO_DIST_TIMEOUT_S", "300")))

    def all_reduce(self, tensor, op="sum"):
        if self.world_size > 1:
            t = tensor.to(self.device)
            dist.all_reduce(t, op=_OPS[op])
            return t.to(tensor.device)
        return tensor

    def all_gather_object(self, obj):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def shutdown(self):
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
