"""Distribution strategies; :func:`get_strategy` picks one by ``train.strategy``.

Which class runs which strategy is a column of the strategy table
(:mod:`virgo_exps.launch.strategy_table`); its module is imported only when
that strategy is asked for, so a missing optional package (Horovod) matters
only to those who choose it.
"""

from __future__ import annotations

from virgo_exps.train.strategies.base import Strategy


def get_strategy(name: str) -> Strategy:
    from virgo_exps.launch.strategy_table import STRATEGY_TABLE

    if name not in STRATEGY_TABLE:
        raise ValueError(f"train.strategy: unknown strategy {name!r}")
    return STRATEGY_TABLE[name].load()()


__all__ = ["Strategy", "get_strategy"]
