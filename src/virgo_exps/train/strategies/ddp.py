"""PyTorch DistributedDataParallel, launched by torchrun (one process per device)."""

from __future__ import annotations

import torch.distributed as dist
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
        return DistributedDataParallel(model, device_ids=ids), optimizer

    def _no_sync(self, model):
        return model.no_sync()  # the gradients are averaged once, in the cycle's last backward pass
