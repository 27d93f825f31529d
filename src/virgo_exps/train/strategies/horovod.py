"""Horovod with its gloo controller (CPU) or NCCL (GPU builds), launched by horovodrun or srun."""

from __future__ import annotations

import torch

from virgo_exps.launch.strategy_table import HOROVOD_MISSING
from virgo_exps.train.strategies.base import Strategy


def _hvd():
    try:
        import horovod.torch as hvd
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise RuntimeError(f"{HOROVOD_MISSING} ({exc})") from None
    return hvd


class HorovodStrategy(Strategy):
    name = "horovod"

    def init(self) -> None:
        hvd = _hvd()
        hvd.init()
        self.rank = hvd.rank()
        self.world_size = hvd.size()
        self.local_rank = hvd.local_rank()
        self._pick_device()

    def wrap(self, model, optimizer, micro_batch):
        hvd = _hvd()
        model = model.to(self.device)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        optimizer = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            op=hvd.Average,
            # the gradients are averaged once, after the accumulation cycle's last backward pass
            backward_passes_per_step=self.grad_accum_steps,
            compression=hvd.Compression.fp16 if self.grad_compression == "fp16" else hvd.Compression.none,
        )
        return model, optimizer

    def zero_grad(self, optimizer):
        optimizer.zero_grad()  # Horovod's optimizer wrapper predates zero_grad(set_to_none=...)

    def step(self, model, optimizer):
        if self.scaler is None and not self.grad_clip:
            optimizer.step()
            return
        # Unscaling and clipping need the averaged gradients: wait for them, then step without waiting again.
        optimizer.synchronize()
        self._unscale_and_clip(model, optimizer)
        with optimizer.skip_synchronize():
            self._apply(optimizer)

    def all_reduce(self, tensor, op="sum"):
        if self.world_size == 1:
            return tensor
        hvd = _hvd()
        if op == "sum":
            return hvd.allreduce(tensor, op=hvd.Sum)
        if op == "max":
            return hvd.allreduce(tensor, op=hvd.Max)
        raise ValueError(op)

    def all_gather_object(self, obj):
        if self.world_size == 1:
            return [obj]
        return _hvd().allgather_object(obj)

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        return _hvd().broadcast_object(obj, root_rank=0)

    def barrier(self):
        if self.world_size > 1:
            _hvd().allreduce(torch.zeros(1), name="barrier")

    def shutdown(self):
        _hvd().shutdown()
