"""The training loop, identical for every strategy.

Launch (from the repository root; ``stages/train.py`` builds these for you):

    python stages/train.py --worker ...                                    # one process
    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        stages/train.py --worker ...                                      # DDP / DeepSpeed, 2 ranks
    horovodrun --gloo -np 2 -H localhost:2 python stages/train.py --worker ...  # Horovod

A run: set up the data, the study's network and optimiser and the learning-rate schedule; continue from
a snapshot if one is a prefix of this run; then, per epoch, the steps (each over train.grad_accum_steps
micro-batches), a validation and a snapshot; at the end the final metrics and the outputs. The rest is
in modules the loop calls: snapshots (train/snapshots.py), the final metrics, outputs and MLflow record
(train/outputs.py, with train/cost.py and train/monitoring.py), the computation fraction
(train/profiling.py), heartbeats and their watch (train/watchdog.py), a sweep trial's pruning
(virgo_exps/sweeps/pruning.py) and the tests' fault hooks (train/faults.py, VIRGO_FAULT_*).

Interruption: SIGUSR1 or SIGTERM sets a flag; at the next step boundary all ranks agree to stop (one tiny
all-reduce), rank 0 writes a snapshot and every rank exits with :data:`EXIT_INTERRUPTED`, which the SLURM
launcher takes as "requeue me". The local launcher turns Ctrl-C into SIGTERM.
"""

from __future__ import annotations

import functools
import signal
import sys
import time
from pathlib import Path

import torch

from virgo_exps.config import Params
from virgo_exps.launch.protocol import (
    EXIT_INTERRUPTED,
    STATUS_COMPLETE,
    STATUS_INTERRUPTED,
    STATUS_PRUNED,
    STATUS_RUNNING,
)
from virgo_exps.modelfile import count_parameters
from virgo_exps.sweeps.pruning import Pruning
from virgo_exps.train import faults, outcome, outputs, profiling, watchdog
from virgo_exps.train.data import ImageDataset, ShardSampler, eval_shard
from virgo_exps.train.factory import ModelFactory
from virgo_exps.train.factory import adamw as adamw  # the stages import it from here
from virgo_exps.train.memory import keep_freed_memory
from virgo_exps.train.monitoring import GpuMonitor, HostLoad
from virgo_exps.train.outputs import EpochRecord, TrainOutputs
from virgo_exps.train.snapshots import Snapshots
from virgo_exps.train.step import autocast, lr_factor
from virgo_exps.train.strategies import Strategy
from virgo_exps.train.watchdog import LOSS_COMPUTED, STEP_DONE, STEP_STARTED, STOP_CHECK, VALIDATING, Heartbeat


class Interrupted(Exception):
    """Raised after the snapshot is written, when a stop was requested."""


class Trainer:
    def __init__(
        self,
        params: Params,
        strategy: Strategy,
        data: Path,
        outputs: TrainOutputs,
        tracker=None,
        models: ModelFactory | None = None,
    ):
        if models is None:
            raise TypeError("Trainer: give the study's ModelFactory (its train stage's models())")
        self.params, self.cfg, self.models, self.strategy = params, params.train, models, strategy
        self.data, self.out, self.tracker = Path(data), outputs, tracker
        self.snapshots = Snapshots(params, strategy, outputs.checkpoints)
        self.pruning = Pruning(strategy)  # a sweep trial's pruner (VIRGO_SWEEP_TRIAL); outside a sweep, nothing
        self._stop = False  # a stop was asked for (a signal)
        self._complete = False  # the outputs are written (the snapshot folder can go)
        self.history: list[EpochRecord] = []
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # steps completed in the current epoch
        self.global_step = 0
        # Partial sums of the current epoch, kept in the snapshot so a resumed
        # epoch reports the same loss as an uninterrupted one.
        self.loss_sum = torch.zeros(1, dtype=torch.float64)
        self.epoch_steps = 0
        self._first_bad: int | None = None  # this epoch's first step (1-based) whose loss was not finite
        self.pruned_at: int | None = None  # the epoch after which a sweep's pruner stopped the run
        self.own_from = 0  # epochs of the history that another (finished) run trained
        # The record's: the computation fraction (train/profiling.py), where each rank runs, the cost of the attempts
        # this run resumed from (cost.combine()), this attempt's GPU monitor, rank 0's digest of the stage's code.
        self.computation: dict | None = None
        self.placement: list[dict] = []
        self.earlier_cost: list[dict] = []
        self.gpu: GpuMonitor | None = None
        self.stage_code: str | None = None
        self._heart = Heartbeat(None, -1)  # a rank's heartbeat, from _fit on (once the run's folder is known)

    # -- set-up -----------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self._stop = True

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, request_stop)

    def _setup(self) -> None:
        s = self.strategy
        torch.manual_seed(self.cfg.seed)
        self.train_set = ImageDataset(self.data, "train")
        self.val_set = ImageDataset(self.data, "val")
        model = self.models.build(self.cfg.model, self.train_set.n_channels)
        self.n_parameters = count_parameters(model)
        if self.cfg.compile:
            model.compile()  # in place: the state dict keeps its keys (snapshots, model.pt)
        lr = self.cfg.lr * (s.world_size if self.cfg.lr_scaling == "linear" else 1)
        optimizer = self.models.optimizer(model.parameters(), lr, self.cfg)
        self.local_batch = self.cfg.global_batch_size // s.world_size
        self.micro_batch = self.local_batch // self.cfg.grad_accum_steps
        self.model, self.optimizer = s.wrap(model, optimizer, self.micro_batch)
        if self.cfg.precision == "fp16":
            s.scaler = torch.amp.GradScaler(s.device.type)
        self.sampler = ShardSampler(
            len(self.train_set), self.cfg.global_batch_size, s.rank, s.world_size, self.cfg.seed
        )
        if self.sampler.steps_per_epoch() == 0:
            raise ValueError("train.global_batch_size is larger than the training split")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            s.torch_optimizer(self.optimizer), lr_factor(self.cfg, self.sampler.steps_per_epoch())
        )
        self.loss_fn = self.models.loss()
        self.metric_names = tuple(self.models.metrics)

    # -- public -------------------------------------------------------------
    def fit(self) -> dict:
        keep_freed_memory()  # no page faults for every step's buffers
        self._install_signal_handlers()
        self._setup()
        try:
            self.snapshots.compute_digests(self.data, self.models.code)
            self.snapshots.lock()
            try:
                return self._fit()
            finally:
                self.snapshots.release(remove=self._complete)
        finally:
            # The node's copy of each split goes with its last rank (ImageDataset).
            self.train_set.close()
            self.val_set.close()

    def _fit(self) -> dict:
        s = self.strategy
        resumed = self.snapshots.load(self, self.pruning.active)
        # Every rank's heartbeat; on rank 0 the watch over all of them (machine profile's stall_limit).
        end = functools.partial(outputs.end_tracking, self, "FAILED")  # a stall ends the process
        self._heart, dog = watchdog.start_watch(
            self.snapshots.live_dir, s.rank, s.world_size, s.is_main, self.epoch + 1, self.step_in_epoch, end
        )
        try:
            return self._fit_watched(resumed)
        finally:
            if dog is not None:
                dog.stop()
            self._heart.stop()

    def _fit_watched(self, resumed: bool) -> dict:
        s = self.strategy
        gpu = self.gpu = GpuMonitor(local_rank=s.local_rank)
        gpu.start()
        host_load = HostLoad().start()
        outputs.start_record(self, resumed)  # where each rank runs; rank 0: the code's digest, MLflow
        status = "FAILED"  # how the MLflow run ends
        self.pruning.open()
        try:
            if self.cfg.profile_steps and self.computation is None:  # once per run, before epoch timing
                self.computation = profiling.profile(self)
            while self.epoch < self.cfg.epochs and self.pruned_at is None:
                host_load.window(), gpu.others_window()  # start this epoch's window
                loss_sum, train_time, steps, steps_run = self._run_epoch()
                if self._should_stop():
                    raise Interrupted
                val_loss, val_time = self._validate()
                train_loss = s.all_reduce(torch.tensor([loss_sum]), "sum").item() / max(1, steps) / s.world_size
                # Every rank decides the same (the losses are reduced, the first bad steps gathered).
                bad = [(r, b) for r, b in enumerate(s.all_gather_object(self._first_bad)) if b is not None]
                first = min(bad, key=lambda rb: (rb[1], rb[0])) if bad else None
                why = outcome.epoch_refusal(self.epoch + 1, train_loss, val_loss, first)
                if why:
                    raise outcome.RunFailed(f"train: {why}")
                rec = EpochRecord(
                    epoch=self.epoch + 1,
                    step=self.global_step,
                    train_loss=train_loss,
                    val_loss=val_loss,
                    train_time_s=train_time,
                    val_time_s=val_time,
                    samples_per_s=steps_run * self.cfg.global_batch_size / train_time if train_time > 0 else 0.0,
                    lr=self.scheduler.get_last_lr()[0],
                    metrics=self.val_metrics,
                    **outputs.busiest(s.all_gather_object((host_load.window(), gpu.others_window()))),
                )
                self.history.append(rec)
                self.epoch += 1
                self.step_in_epoch = 0
                self.snapshots.save(self, STATUS_RUNNING if self.epoch < self.cfg.epochs else STATUS_COMPLETE)
                if s.is_main:
                    outputs.say_epoch(rec, self.cfg.epochs, steps, self.sampler.steps_per_epoch())
                    outputs.log_epoch(self, rec)
                figures = {"train_loss": rec.train_loss, "val_loss": rec.val_loss, **rec.metrics}
                if self.pruning.after_epoch(rec.epoch, self.cfg.epochs, figures):
                    self.pruned_at = rec.epoch
                    break
            per_rank_gpu = s.all_gather_object(gpu.stop())
            metrics = outputs.final_metrics(self, per_rank_gpu)
            if not self.snapshots.final_written:  # all epochs came from a running snapshot, or the run was pruned
                self.snapshots.save(self, STATUS_PRUNED if self.pruned_at is not None else STATUS_COMPLETE)
            weights = s.model_state(self.model)  # every rank: ZeRO 3 gathers the split weights for rank 0
            if s.is_main:
                outputs.write_outputs(self, metrics, per_rank_gpu, weights)
            s.barrier()
            self._complete = True
            status = "FINISHED"
            return metrics
        except Interrupted:
            gpu.stop()
            self.snapshots.save(self, STATUS_INTERRUPTED)
            status = "KILLED"
            if s.is_main:
                print(
                    f"train: stop requested; snapshot written at epoch {self.epoch + 1}, "
                    f"step {self.step_in_epoch}; exiting with {EXIT_INTERRUPTED} so the job can be requeued",
                    file=sys.stderr,
                )
            raise
        finally:
            host_load.stop()
            if s.is_main:
                outputs.end_tracking(self, status)

    # -- the epoch ------------------------------------------------------------
    def _should_stop(self) -> bool:
        """Whether every rank is to stop here (one of them was signalled): the collective before each step."""
        if faults.at_step(self.strategy.rank, self.strategy.is_main, self.global_step):  # tests only
            self._stop = True
        self._heart.beat(self.epoch + 1, self.step_in_epoch + 1, STOP_CHECK)  # then waits for every rank
        flag = torch.tensor([1.0 if self._stop else 0.0])
        if self.strategy.world_size > 1:
            flag = self.strategy.all_reduce(flag, op="max")
        return bool(flag.item() > 0)

    def run_batch(self, indices: list[int]) -> torch.Tensor:
        """One optimiser step over this process's share of the global batch, in train.grad_accum_steps
        micro-batches; the step's mean loss."""
        s, accum = self.strategy, self.cfg.grad_accum_steps
        s.zero_grad(self.optimizer)
        total = None
        for i in range(accum):
            part = indices if accum == 1 else indices[i * self.micro_batch : (i + 1) * self.micro_batch]
            x, y = self.train_set.batch(part)
            x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
            with autocast(self.cfg.precision, s.device):
                loss = self.loss_fn(self.model(x), y)
            if i == 0:
                self._heart.beat(self.epoch + 1, self.step_in_epoch + 1, LOSS_COMPUTED)
            s.backward(loss, self.model, self.optimizer, last=i == accum - 1)
            total = loss.detach() if total is None else total + loss.detach()
        s.step(self.model, self.optimizer)
        self.scheduler.step()
        return total if accum == 1 else total / accum

    def _run_epoch(self) -> tuple[float, float, int, int]:
        """Train one epoch (or its remainder).

        Returns (sum of step losses over the epoch, seconds, steps in the
        epoch, steps run by this call: fewer than the epoch after a resume).
        """
        s = self.strategy
        self.model.train()
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        if self.step_in_epoch == 0:
            self.loss_sum = torch.zeros(1, dtype=torch.float64)
            self.epoch_steps = 0
            self._first_bad = None
        steps_run = 0
        s.barrier()
        t0 = time.perf_counter()
        for indices in self.sampler:
            if self._should_stop():
                raise Interrupted
            self._heart.beat(self.epoch + 1, self.step_in_epoch + 1, STEP_STARTED)
            loss = self.run_batch(indices).cpu().double()
            if self._first_bad is None and not bool(torch.isfinite(loss).all()):
                self._first_bad = self.step_in_epoch + 1
            self.loss_sum += loss
            self.epoch_steps += 1
            steps_run += 1
            self.step_in_epoch += 1
            self.global_step += 1
            self._heart.beat(self.epoch + 1, self.step_in_epoch, STEP_DONE)
        s.barrier()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        elapsed = s.all_reduce(elapsed, op="max")
        return float(self.loss_sum.item()), float(elapsed.item()), self.epoch_steps, steps_run

    @torch.no_grad()
    def _validate(self) -> tuple[float, float]:
        s = self.strategy
        self.model.eval()
        t0 = time.perf_counter()
        idx = eval_shard(len(self.val_set), s.rank, s.world_size)
        names = ["loss", *self.metric_names]
        total = torch.zeros(len(names) + 1, dtype=torch.float64)  # the sums of each figure, then the count
        module = s.unwrap(self.model)
        for start in range(0, len(idx), self.local_batch):
            x, y = self.val_set.batch(idx[start : start + self.local_batch])
            x, y = x.to(s.device), y.to(s.device)
            with autocast(self.cfg.precision, s.device):
                out = module(x)
            figures = self.models.evaluate(out, y)
            self._heart.beat(self.epoch + 1, self.step_in_epoch, VALIDATING, start + 1)
            sums = [figures[n].sum().double().cpu() for n in names]
            total += torch.stack([*sums, torch.tensor(float(len(x)), dtype=torch.float64)])
        total = s.all_reduce(total, op="sum")
        elapsed = s.all_reduce(torch.tensor([time.perf_counter() - t0], dtype=torch.float64), op="max")
        self.val_metrics = {f"val_{n}": float(total[i + 1] / total[-1]) for i, n in enumerate(self.metric_names)}
        return float(total[0] / total[-1]), float(elapsed.item())
