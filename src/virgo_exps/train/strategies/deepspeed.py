"""Microsoft DeepSpeed (ZeRO stage 0 by default), launched by torchrun or `deepspeed`.

DeepSpeed owns the backward pass and the optimiser step (``engine.backward``,
``engine.step``), which is why the strategy interface has ``backward_and_step``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from virgo_exps.train.strategies.torchdist import TorchDistStrategy, backend


class DeepSpeedStrategy(TorchDistStrategy):
    name = "deepspeed"

    def init(self) -> None:
        import deepspeed

        self._read_env()
        self._pick_device()
        deepspeed.init_distributed(dist_backend=backend(), timeout=self._timeout())
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._unlink_shm_buffer()

    def _unlink_shm_buffer(self) -> None:
        """Remove the name of this rank's shared-memory all-reduce buffer once every rank has mapped it.

        When all ranks are on one node, DeepSpeed's CPU communication gives each rank a buffer
        in /dev/shm (``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``,
        about 69 MB) and never removes it: every run would leave one per rank in the node's
        memory, and a killed run too. The ranks open each other's buffers while DeepSpeed
        initialises, so after a barrier the names are no longer needed; the mappings stay
        valid and the kernel frees the memory when the last rank exits, however it exits.
        """
        self.barrier()
        name = "_".join(
            (
                "deepspeed_allreduce_buffer",
                str(os.getuid()),
                os.environ.get("MASTER_ADDR", ""),
                os.environ.get("MASTER_PORT", ""),
                str(self.rank),
            )
        )
        Path("/dev/shm", name).unlink(missing_ok=True)

    def wrap(self, model, optimizer, micro_batch):
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            # No clipping, as in every other strategy. Set explicitly: this DeepSpeed
            # clips at norm 1.0 when the key is absent, which silently changes the
            # loss trajectory whenever a gradient norm exceeds 1.
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": int(os.environ.get("VIRGO_ZERO_STAGE", "0"))},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        engine, optimizer, _, _ = deepspeed.initialize(model=model.to(self.device), optimizer=optimizer, config=config)
        return engine, optimizer

    def backward_and_step(self, loss, model, optimizer):
        model.backward(loss)
        model.step()

    def optimizer_state(self, optimizer):
        return optimizer.state_dict()
