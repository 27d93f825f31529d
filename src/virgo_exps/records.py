"""Records as the tools users open read them: flat keys with finite numbers only.

optuna-dashboard sorts and filters a trial's user attributes, and MLflow keeps metrics, only when each is
a number under its own key; a nested ``cost`` mapping shows as one JSON string. :func:`numbers` flattens a
record's numeric leaves to dotted keys and leaves out text, booleans, None and non-finite values.

DVC compares and sorts metrics only when they are numbers: a run's record is kept as two files,
``metrics.json`` (the measures: :func:`split`'s first part) and ``run.json`` beside it (what describes the run:
device, machine, strategy, provenance, the SLURM job, flags), which the report stage reads as params so that
``dvc exp show`` lists it with the params. :func:`merge` puts the two back together for the readers.
"""

from __future__ import annotations

import math
from typing import Any


def is_measure(value: Any) -> bool:
    """A finite number (a flag is not one): what DVC subtracts, MLflow keeps and a loss must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"cost": {"core_h": 0.1, "slurm_job": None}}`` -> ``{"cost.core_h": 0.1}``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numbers(value, f"{name}."))
        elif is_measure(value):
            out[name] = value
    return out


# Numbers that name rather than measure: kept with the description (a job id has no meaningful difference).
IDENTIFIERS = frozenset({"cost.slurm_job"})


def split(record: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """(measures, description) of a nested record, each nested as the record is: finite numbers go to the
    first, text, flags and identifiers to the second; None and non-finite values (not measured) to neither."""
    measures: dict[str, Any] = {}
    description: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            inner_m, inner_d = split(value, f"{name}.")
            if inner_m:
                measures[key] = inner_m
            if inner_d:
                description[key] = inner_d
        elif is_measure(value):
            (description if name in IDENTIFIERS else measures)[key] = value
        elif value is not None and not isinstance(value, float):  # None, NaN, inf: not measured
            description[key] = value
    return measures, description


def merge(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """The two parts of :func:`split` as one record again (nested mappings merged key by key)."""
    out = dict(first)
    for key, value in second.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
