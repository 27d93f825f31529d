"""The computation fraction of a training step (once per run, before the epochs are timed): a few steps
under the profiler (:func:`virgo_exps.train.monitoring.computation_fraction`) on a throw-away copy of the
state, so that a profiled run and a resumed one follow the same trajectory."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np

from virgo_exps.train.data import ShardSampler
from virgo_exps.train.monitoring import computation_fraction
from virgo_exps.train.snapshots import rng_state, set_rng_state

if TYPE_CHECKING:  # for the annotations only: the trainer imports this module
    from virgo_exps.train.trainer import Trainer


def profile(t: Trainer) -> dict:
    """Every rank: ``train.profile_steps`` steps of ``t`` (after one warm-up step) profiled, then ``t``'s
    state put back; the fraction of time spent computing, averaged over the ranks, and each rank's own."""
    n = t.cfg.profile_steps
    s = t.strategy
    # Profile on a throw-away copy of the state: the profiled steps must not
    # change the trajectory, or a profiled run and a resumed one would differ.
    model_state = {k: v.clone() for k, v in s.model_state(t.model).items()}
    opt_state = copy.deepcopy(s.optimizer_state(t.optimizer))
    sched_state = t.scheduler.state_dict()
    scaler = s.scaler
    scaler_state = scaler.state_dict() if scaler is not None else None
    rng = rng_state()
    sampler = ShardSampler(len(t.train_set), t.cfg.global_batch_size, s.rank, s.world_size, t.cfg.seed + 7919)
    batches = list(sampler)[: n + 1]
    t.model.train()
    t.run_batch(batches[0])  # warm-up step, not profiled
    local = computation_fraction(lambda: [t.run_batch(b) for b in batches[1:]], s.device)
    s.load_model_state(t.model, model_state)
    s.load_optimizer_state(t.optimizer, opt_state)
    t.scheduler.load_state_dict(sched_state)
    if scaler is not None:
        scaler.load_state_dict(scaler_state)
    set_rng_state(rng)
    per_rank = s.all_gather_object(local)
    return {
        "computation_fraction": float(np.mean([r["fraction"] for r in per_rank])),
        "per_rank": per_rank,
        "profiled_steps": len(batches) - 1,
    }
