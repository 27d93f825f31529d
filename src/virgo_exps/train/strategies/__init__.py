"""Distribution strategies; :func:`get_strategy` picks one by ``train.strategy``."""

from __future__ import annotations

from virgo_exps.train.strategies.base import Strategy


def get_strategy(name: str) -> Strategy:
    # Imports are local so that a missing optional package (Horovod) only
    # matters to users who ask for that strategy.
    if name == "single":
        from virgo_exps.train.strategies.single import SingleStrategy

        return SingleStrategy()
    if name == "ddp":
        from virgo_exps.train.strategies.ddp import DDPStrategy

        return DDPStrategy()
    if name == "deepspeed":
        from virgo_exps.train.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy()
    if name == "horovod":
        from virgo_exps.train.strategies.horovod import HorovodStrategy

        return HorovodStrategy()
    raise ValueError(f"train.strategy: unknown strategy {name!r}")


__all__ = ["Strategy", "get_strategy"]
