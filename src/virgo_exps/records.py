"""Records as the tools users open read them: flat keys with finite numbers only.

optuna-dashboard sorts and filters a trial's user attributes, and MLflow keeps metrics, only when each is
a number under its own key; a nested ``cost`` mapping shows as one JSON string. :func:`numbers` flattens a
record's numeric leaves to dotted keys and leaves out text, booleans, None and non-finite values.
"""

from __future__ import annotations

import math
from typing import Any


def numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"cost": {"core_h": 0.1, "slurm_job": None}}`` -> ``{"cost.core_h": 0.1}``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = value
    return out
