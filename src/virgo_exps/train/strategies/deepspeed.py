"""Microsoft DeepSpeed (ZeRO stage 0 by default), launched by torchrun or `deepspeed`.

DeepSpeed owns the backward pass and the optimiser step (``engine.backward``,
``engine.step``), which is why the strategy interface has ``zero_grad``, ``backward`` and ``step``.

ZeRO stages 1 and 2 split the optimiser state (and the gradients) over the ranks; stage 3 the weights too:
outside a forward or backward pass each rank's module holds empty placeholders. The whole weights of a
snapshot and of model.pt are then gathered from every rank, in their own dtype (fp32 stays fp32, exactly).
"""

from __future__ import annotations

import os
import pwd
import stat
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from virgo_exps.train.outcome import RunFailed
from virgo_exps.train.strategies.torchdist import TorchDistStrategy, backend

# DeepSpeed's shared-memory communication is a small C++ extension that every process loads through
# torch.utils.cpp_extension, under a lock file in the user's extension folder. A process killed while
# it holds the lock (a load takes seconds, the first build about a minute) leaves it behind, and every
# later DeepSpeed process of that user on the node waits for it forever, without a word.
SHM_EXTENSION = "deepspeed_shm_comm"
STALE_BUILD_LOCK_S = 600.0


def _not_ours(path: Path) -> str | None:
    """None: nothing at ``path``; "": a file of ours, for our user only; else what is wrong with it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        return f"belongs to user {owner}"
    if st.st_mode & 0o077:
        return f"is open to other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def extension_lock_files() -> list[Path]:
    """The lock files of DeepSpeed's shared-memory extension that torch would wait for."""
    folder = os.environ.get("TORCH_EXTENSIONS_DIR")
    if folder:
        return [Path(folder) / SHM_EXTENSION / "lock"]
    from torch.utils.cpp_extension import get_default_build_root

    return sorted(Path(get_default_build_root()).glob(f"*/{SHM_EXTENSION}/lock"))


def remove_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove the extension's lock files older than ``max_age_s`` (left by a killed process); say so."""
    removed = []
    for lock in extension_lock_files():
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > max_age_s:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            print(
                f"train: removed {lock}, left {age / 60:.0f} minutes ago by a process that died while loading "
                f"DeepSpeed's shared-memory extension (a load takes seconds); every DeepSpeed process would "
                "have waited for it",
                file=sys.stderr,
            )
    return removed


# The parts of a ZeRO 1/2 optimiser's state that DeepSpeed reads back when the world size is the same.
ZERO_STATE_KEYS = (
    "base_optimizer_state",
    "single_partition_of_fp32_groups",
    "group_paddings",
    "param_alignment_paddings",
    "partition_count",
    "ds_version",
    "dynamic_loss_scale",
    "overflow",
    "clip_grad",
)
# The same for ZeRO 3: the torch optimiser's state over this rank's flat fp32 partition, and the partition
# itself (the weights' master copy, from which DeepSpeed also restores the module's own partition).
ZERO3_STATE_KEYS = (
    "optimizer_state_dict",
    "fp32_flat_groups",
    "partition_count",
    "dynamic_loss_scale",
    "overflow",
    "ds_zero_partition_groups",
)


def _detached(value):
    """A copy of ``value`` whose tensors are the values alone (ZeRO's fp32 partitions are views with history)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


class DeepSpeedStrategy(TorchDistStrategy):
    name = "deepspeed"

    def init(self) -> None:
        import deepspeed

        self._read_env()
        self._pick_device()
        if self.local_rank == 0:
            remove_stale_build_locks()
        self._claim_shm_name()
        deepspeed.init_distributed(dist_backend=backend(self.dist_backend), timeout=self._timeout())
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._unlink_shm_buffer()

    def _shm_buffer(self) -> Path:
        """This rank's shared-memory all-reduce buffer, named as DeepSpeed names it."""
        parts = ("deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""))
        return Path("/dev/shm", "_".join((*parts, os.environ.get("MASTER_PORT", ""), str(self.rank))))

    def _claim_shm_name(self) -> None:
        """Refuse to start when another user already holds the name of this rank's buffer.

        DeepSpeed opens the name without O_EXCL: a file planted there by another user of the node (the
        name follows from our uid and the rendezvous port, which under Slurm follows from the job id)
        would receive this rank's gradients and feed the others whatever its owner writes. A file of
        ours under the name is a killed run's, whose port came round again: removed.
        """
        path = self._shm_buffer()
        why = _not_ours(path)
        if why is None:
            return
        if why == "" or why.startswith("is open"):
            path.unlink(missing_ok=True)
        else:
            raise RunFailed(
                f"train: rank {self.rank}: {path} {why}: another user holds the name of this rank's DeepSpeed "
                "all-reduce buffer, which would carry its gradients; nothing was started. The name follows from "
                "the rendezvous port: run again (under Slurm, a new job has another port), and tell the "
                "machine's administrators"
            )

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
        path = self._shm_buffer()
        why = _not_ours(path)
        if why:  # planted between the check before the start and DeepSpeed's open: it was used
            raise RunFailed(
                f"train: rank {self.rank}: {path} {why}: DeepSpeed's all-reduce buffer of this rank was another "
                "user's file; the run is stopped before its first step and records nothing; tell the machine's "
                "administrators"
            )
        path.unlink(missing_ok=True)

    def wrap(self, model, optimizer, micro_batch):
        import deepspeed

        # Built from the train params alone (no second source): micro-batch and accumulation, clipping
        # (set even when 0: this DeepSpeed clips at norm 1.0 when the key is absent), the ZeRO stage.
        # train.precision is the trainer's autocast around the forward pass, as with every strategy.
        zero = {"stage": self.zero_stage}  # train.zero_stage, in every record
        if self.zero_stage == 3:
            # Every weight split, however small: by default DeepSpeed keeps those of up to 1e5 elements whole on
            # every rank once fetched (all of this project's networks' weights), and stage 3 would split no more
            # than stage 2. Gathering is a copy: the losses are the same either way.
            zero["stage3_param_persistence_threshold"] = 0
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": self.grad_accum_steps,
            "gradient_clipping": float(self.grad_clip),
            "zero_optimization": zero,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        engine, optimizer, _, _ = deepspeed.initialize(model=model.to(self.device), optimizer=optimizer, config=config)
        return engine, optimizer

    def zero_grad(self, optimizer):
        pass  # the engine zeroes the gradients at the end of each accumulation cycle

    def backward(self, loss, model, optimizer, last):
        # The engine divides by the accumulation steps, reduces on the cycle's last micro-batch, and its
        # step() updates the weights only there.
        model.backward(loss)
        model.step()

    def step(self, model, optimizer):
        pass  # done by the engine in the cycle's last backward

    @property
    def partitioned_optimizer(self) -> bool:
        return self.zero_stage > 0

    def model_state(self, model):
        if self.zero_stage < 3:
            return super().model_state(model)
        import deepspeed

        # ZeRO 3: every rank takes part in gathering each weight in turn (never more than one whole at once);
        # rank 0 keeps a copy in host memory, as it alone writes. Buffers are never split: every rank keeps its
        # own, so that load_model_state can put them back on every rank.
        module = self.unwrap(model)
        params = dict(module.named_parameters(remove_duplicate=False))
        state = {}
        for key, value in module.state_dict(keep_vars=True).items():
            param = params.get(key)
            if param is None:
                state[key] = value.detach().to("cpu", copy=True)
                continue
            with deepspeed.zero.GatheredParameters([param]):
                if self.is_main:
                    state[key] = param.detach().to("cpu", copy=True)
        return state

    def load_model_state(self, model, state):
        if self.zero_stage < 3:
            super().load_model_state(model, state)
            return
        import deepspeed

        # ZeRO 3: each weight in turn, gathered, set on rank 0 and split again from rank 0's values; buffers on
        # every rank. The master copy of the weights is the optimiser's partition, which load_optimizer_state
        # puts back next (and the module's partition with it).
        module = self.unwrap(model)
        params = dict(module.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for key, value in module.state_dict(keep_vars=True).items():
                param = params.get(key)
                if param is None:
                    value.copy_(state[key])
                    continue
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if self.is_main:
                        param.copy_(state[key])

    def torch_optimizer(self, optimizer):
        return optimizer.optimizer if self.zero_stage else optimizer  # ZeRO's wraps the torch one

    def optimizer_state(self, optimizer):
        state = optimizer.state_dict()
        if not self.zero_stage:
            return state
        # ZeRO 1, 2 and 3: what this DeepSpeed reads back from a rank's part (its rigid layout), in plain types,
        # so that a snapshot is read without running code (the loss scaler object stays the engine's: the
        # precisions here keep it static).
        keys = ZERO3_STATE_KEYS if self.zero_stage == 3 else ZERO_STATE_KEYS
        kept = {k: _detached(state[k]) for k in keys if k in state}
        kept["zero_stage"] = int(state["zero_stage"])
        return kept

    def load_optimizer_state(self, optimizer, state):
        # every rank's part (a snapshot) or this rank's own (the computation profile's restore)
        parts = state if isinstance(state, list) else [state]
        other = [int(p.get("zero_stage", 0)) for p in parts if int(p.get("zero_stage", 0)) != self.zero_stage]
        if other:
            raise RunFailed(
                f"train: the optimiser state to resume was written with train.zero_stage {other[0]}, but this run "
                f"has train.zero_stage {self.zero_stage}; set it back, or remove the snapshot to start afresh"
            )
        if not self.zero_stage:
            optimizer.load_state_dict(state)
            return
        parts = parts if isinstance(state, list) else parts * self.world_size  # DeepSpeed reads this rank's entry
        if self.zero_stage == 3:
            parts = [{**p, "loss_scaler": optimizer.loss_scaler} for p in parts]  # ZeRO 3 reads it back too
        optimizer.load_state_dict(parts)
