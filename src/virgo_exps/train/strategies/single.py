"""One process, no communication: the baseline every other strategy is compared with."""

from __future__ import annotations

from virgo_exps.train.strategies.base import Strategy


class SingleStrategy(Strategy):
    name = "single"

    def init(self) -> None:
        self._pick_device()

    def wrap(self, model, optimizer, micro_batch):
        return model.to(self.device), optimizer
