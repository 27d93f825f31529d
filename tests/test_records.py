"""What the tools users open read: flat keys with finite numbers only."""

from __future__ import annotations

from virgo_exps.records import numbers


def test_numbers_flattens_numeric_leaves_and_leaves_out_the_rest():
    record = {
        "val_loss": 0.25,
        "epochs": 3,
        "strategy": "ddp",
        "pruned": True,
        "cost": {"core_h": 0.5, "energy_wh": None, "slurm_job": "12", "gpu": {"h": 0.0, "nan": float("nan")}},
        "inf": float("inf"),
    }
    assert numbers(record) == {"val_loss": 0.25, "epochs": 3, "cost.core_h": 0.5, "cost.gpu.h": 0.0}
    assert numbers({"a": {"b": 1}}, "m.") == {"m.a.b": 1}
