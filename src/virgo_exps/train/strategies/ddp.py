"""PyTorch DistributedDataParallel, launched by torchrun (one process per device)."""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from virgo_exps.train.strategies.torchdist import TorchDistStrategy, backend


class DDPStrategy(TorchDistStrategy):
    name = "ddp"

    def init(self) -> None:
        self._read_env()
        self._pick_device()
        if not dist.is_initialized():
            dist.init_process_group(backend=backend(self.dist_backend), timeout=self._timeout())
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def wrap(self, model, optimizer, micro_batch):
        model = model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
        if self.grad_compression == "fp16":  # the buckets go over the wire as fp16, are averaged back in fp32
            model.register_comm_hook(state=None, hook=default_hooks.fp16_compress_hook)
        return model, optimizer

    def _no_sync(self, model):
        return model.no_sync()  # the gradients are averaged once, in the cycle's last backward pass
