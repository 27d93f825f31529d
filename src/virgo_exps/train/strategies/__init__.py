"""Distribution strategies; :func:`get_strategy` picks one by ``train.strategy``.

Which class runs which strategy is a column of the strategy table
(:mod:`virgo_exps.launch.strategy_table`); its module is imported only when
that strategy is asked for, so a missing optional package (Horovod) matters
only to those who choose it.
"""

from __future__ import annotations

from virgo_exps.launch.strategy_table import strategy_row
from virgo_exps.train.strategies.base import Strategy


def get_strategy(name: str, train=None) -> Strategy:
    """The strategy named ``name``, set up with the ``train`` params (ZeRO stage, backend, accumulation, clipping,
    compression)."""
    strategy = strategy_row(name).load()()  # an unknown name: the table's one refusal
    if train is not None:
        strategy.zero_stage = train.zero_stage
        strategy.dist_backend = train.dist_backend
        strategy.grad_accum_steps = train.grad_accum_steps
        strategy.grad_clip = train.grad_clip
        strategy.grad_compression = train.grad_compression
    return strategy


__all__ = ["Strategy", "get_strategy"]
