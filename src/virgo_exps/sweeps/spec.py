"""What a sweep tries: a grid of ``-S`` overrides or a search space, its metric and its budget.

A sweep comes from a YAML file (``sweeps/lr-wd.yaml``) or from ``-S`` lists on the command line
(:func:`from_grid`). Either way it is checked here, before anything is submitted, by the project's one
validator (:func:`virgo_exps.config.validate`): every error is one line naming the key, what is wrong
and what to do. A parameter must be a key of params.yaml (``train.lr``), and its range must lie inside
the values that key allows, so a trial never fails on a value the sweep itself chose.

A search file::

    name: lr-wd                # optional: the file name without .yaml
    metric: val_loss           # a key of results/metrics.json (dotted for nested)
    direction: minimize
    trials: 8                  # the budget
    parallel: 2                # trials at once (the array throttle)
    pruner: median             # stop trials whose validation loss lags the median; or none
    parameters:
      train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-1}
      train.weight_decay: {type: uniform, low: 0.0, high: 0.1}
      train.global_batch_size: {type: choice, values: [16, 32]}

A grid file has ``grid:`` (key -> list of values, tried as their cartesian product) instead of
``parameters:``. Trial ``n`` of sweep ``name`` is the DVC experiment ``f"{name}-{n:03d}"``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virgo_exps.config import ConfigError, objective, read_yaml, sections, spec, spec_fields, validate

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
KINDS = ("grid", "search")
DIRECTIONS = ("minimize", "maximize")
PRUNERS = ("median", "none")
SAMPLERS = ("tpe", "random")
TYPES = ("loguniform", "uniform", "int", "choice")
_FLOAT_HINT = " (YAML reads 1e-4 as text: write 1.0e-4)"


@dataclass(frozen=True)
class SweepSpec:
    name: str
    kind: str
    grid: tuple[dict[str, str], ...] = ()
    space: dict[str, dict] = field(default_factory=dict)
    metric: str = "val_loss"
    direction: str = "minimize"
    trials: int = 1
    parallel: int = 1
    pruner: str = "none"
    # Search only: how Optuna samples and when the median pruner starts judging.
    sampler: str = "tpe"
    seed: int | None = None
    startup_trials: int = 2
    warmup_epochs: int = 1

    def experiment(self, number: int) -> str:
        """The DVC experiment name of trial ``number``."""
        return trial_name(self.name, number)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (sweep.json); :func:`from_dict` reads it back."""
        out = dataclasses.asdict(self)
        out["grid"] = [dict(g) for g in self.grid]
        return out


def trial_name(name: str, number: int) -> str:
    return f"{name}-{number:03d}"


def from_dict(raw: dict[str, Any]) -> SweepSpec:
    """The spec written by :meth:`SweepSpec.to_dict` (sweep.json)."""
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    values = {k: v for k, v in raw.items() if k in known}
    values["grid"] = tuple({str(k): str(v) for k, v in g.items()} for g in values.get("grid", ()))
    values["space"] = {str(k): dict(v) for k, v in (values.get("space") or {}).items()}
    return SweepSpec(**values)


# --- the file's top-level keys, checked by the one validator --------------------------------------------


def _positive(v) -> bool:
    return v > 0


def _one_of(*options) -> dict:
    return {"check": lambda v: v in options, "allowed": "one of " + ", ".join(options)}


@dataclass(frozen=True)
class _SweepFile:
    name: str = spec("", lambda v: NAME_RE.fullmatch(v) is not None, "letters, digits, - and _ (not first)", "")
    metric: str = spec("val_loss", lambda v: v.strip() != "", "a key of results/metrics.json, e.g. val_loss")
    direction: str = spec("minimize", **_one_of(*DIRECTIONS))
    trials: int = spec(0, _positive, "an integer > 0 (the number of trials to run)")
    parallel: int = spec(1, _positive, "an integer > 0 (trials running at once)")
    pruner: str = spec("median", **_one_of(*PRUNERS))
    sampler: str = spec("tpe", **_one_of(*SAMPLERS))
    seed: int | None = spec(None, lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1, or null")
    startup_trials: int = spec(2, lambda v: v >= 0, "an integer >= 0 (complete trials before pruning starts)")
    warmup_epochs: int = spec(1, lambda v: v >= 0, "an integer >= 0 (epochs of a trial never pruned)")


@dataclass(frozen=True)
class _Range:  # loguniform, uniform
    low: float = spec(dataclasses.MISSING, None, "a number", hint=_FLOAT_HINT)
    high: float = spec(dataclasses.MISSING, None, "a number", hint=_FLOAT_HINT)
    type: str = spec("", None, "one of " + ", ".join(TYPES))
    step: float | None = spec(None, _positive, "a number > 0, or null (continuous)", hint=_FLOAT_HINT)


@dataclass(frozen=True)
class _IntRange:
    low: int = spec(dataclasses.MISSING, None, "an integer")
    high: int = spec(dataclasses.MISSING, None, "an integer")
    type: str = spec("", None, "one of " + ", ".join(TYPES))
    step: int = spec(1, _positive, "an integer > 0")
    log: bool = spec(False, None, "true or false (sample on a log scale)")


@dataclass(frozen=True)
class _Choice:
    values: tuple[str, ...] = spec(dataclasses.MISSING, lambda v: len(v) > 0, "a non-empty list of values")
    type: str = spec("", None, "one of " + ", ".join(TYPES))


_SHAPES = {"loguniform": _Range, "uniform": _Range, "int": _IntRange, "choice": _Choice}


# --- parameters: keys of params.yaml and the values they allow ------------------------------------------


def _param_field(key: str, where: str) -> tuple[dataclasses.Field, type]:
    """The params.yaml field of ``section.name`` and its type; a ConfigError naming ``where`` if none."""
    section, _, name = key.partition(".")
    known = sections()
    if section not in known or not name:
        raise ConfigError(
            f"{where}: {key!r} is not a key of params.yaml; write section.key with a section of "
            f"{', '.join(known)} (e.g. train.lr; `virgo-exps params` lists them)"
        )
    cls = known[section]
    fields = {f.name: f for f in spec_fields(cls)}
    if name not in fields:
        raise ConfigError(
            f"{where}: {key!r} is not a key of params.yaml; the keys of '{section}' are: {', '.join(fields)}"
        )
    tp = typing.get_type_hints(cls)[name]
    return fields[name], tp


def parse_value(key: str, text: str, where: str | None = None) -> Any:
    """An override's text as the typed value params.yaml will hold, checked against the key's rule.

    ``-S train.lr=1e-3`` is a number to DVC; so it is here. Raises ConfigError naming ``where``.
    """
    where = where or key
    f, tp = _param_field(key, where)
    text = str(text).strip()
    try:
        if tp is bool:
            lowered = text.lower()
            if lowered not in ("true", "false"):
                raise ValueError(text)
            value: Any = lowered == "true"
        elif tp is int:
            value = int(text)
        elif tp is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
        else:
            value = text
    except ValueError:
        names = {bool: "true or false", int: "an integer", float: "a number"}
        raise ConfigError(f"{where}: {text!r} is not {names[tp]}; {key} takes {f.metadata['allowed']}") from None
    check = f.metadata.get("check")
    if check is not None and not check(value):
        raise ConfigError(f"{where}: {text} is outside what {key} allows; use {f.metadata['allowed']}")
    return value


def _check_bound(key: str, value: Any, where: str) -> None:
    f, _ = _param_field(key, where)
    check = f.metadata.get("check")
    if check is not None and not check(value):
        raise ConfigError(f"{where}: {value!r} is outside what {key} allows; use {f.metadata['allowed']}")


def _parameter(key: str, raw: Any, where: str) -> dict[str, Any]:
    """One search parameter: ``{"type": ..., "low": ..., "high": ...}`` or ``{"type": "choice", "values": [...]}``."""
    _, tp = _param_field(key, where)
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: expected a mapping such as {{type: loguniform, low: 1.0e-4, high: 1.0e-1}}, got {raw!r}"
        )
    kind = raw.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: type: {kind!r} is not allowed; expected one of {', '.join(TYPES)}")
    shape = _SHAPES[kind]
    defaults = {f.name: f.default for f in dataclasses.fields(shape) if f.default is not dataclasses.MISSING}
    values = {**defaults, **validate(shape, raw, where, sep=": "), "type": kind}
    if kind == "choice":
        parsed = [parse_value(key, v, f"{where}: values") for v in values["values"]]
        if len(set(map(str, parsed))) != len(parsed):
            raise ConfigError(f"{where}: values: {list(values['values'])} repeats a value; list each value once")
        values["values"] = [str(v) for v in values["values"]]
        return values
    wanted = int if kind == "int" else float
    if tp is not wanted:
        use = "int" if tp is int else "choice"
        raise ConfigError(f"{where}: type: {kind} does not fit {key} ({tp.__name__}); use type: {use}")
    low, high = values["low"], values["high"]
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high}); swap them or widen the range")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: low: {low} must be > 0 on a log scale; raise it or use type: uniform")
    if kind == "loguniform" and values.get("step") is not None:
        raise ConfigError(f"{where}: step: a log range has no step; remove it or use type: uniform")
    if kind == "int" and values.get("log") and low <= 0:
        raise ConfigError(f"{where}: low: {low} must be > 0 with log: true; raise it or set log: false")
    for bound in ("low", "high"):
        _check_bound(key, values[bound], f"{where}: {bound}")
    if values.get("step") is None:
        values.pop("step", None)
    return values


def _grid(entries: dict[str, list[str]], where: str) -> tuple[dict[str, str], ...]:
    for key, options in entries.items():
        if not options:
            raise ConfigError(f"{where}: {key}: no values; give at least one")
        for v in options:
            parse_value(key, v, f"{where}: {key}")
        if len(set(options)) != len(options):
            raise ConfigError(f"{where}: {key}: {options} repeats a value; list each value once")
    keys = list(entries)
    return tuple(dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(entries[k] for k in keys)))


# --- the two ways in ----------------------------------------------------------------------------------------


def load(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; raise ConfigError with a one-line message."""
    path = Path(path)
    shown = str(path)
    if not path.exists():
        raise ConfigError(f"{shown}: file not found; give the path of a sweep file (e.g. sweeps/lr-wd.yaml)")
    raw = read_yaml(path, "sweep file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{shown}: expected a mapping of keys (name, metric, trials, parameters...), got {raw!r}")
    raw = dict(raw)
    parameters = raw.pop("parameters", None)
    grid = raw.pop("grid", None)
    if (parameters is None) == (grid is None):
        raise ConfigError(
            f"{shown}: give either parameters: (a search space) or grid: (lists of values), "
            f"{'not both' if parameters is not None else 'none is set'}"
        )
    given_trials = raw.get("trials")
    if grid is not None:
        raw["trials"] = 1  # a grid's trials are its combinations (checked below); the placeholder passes the check
    defaults = {f.name: f.default for f in dataclasses.fields(_SweepFile)}
    if "metric" not in raw:  # the study's objective (its StudySpec), direction included unless given
        defaults["metric"], defaults["direction"] = objective()
    values = {**defaults, "name": path.stem, **validate(_SweepFile, raw, shown, sep=": ")}
    if NAME_RE.fullmatch(values["name"]) is None:
        raise ConfigError(
            f"{shown}: name: {values['name']!r} is not a sweep name; use letters, digits, - and _ (set name:)"
        )
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{shown}: grid: expected a mapping of params.yaml keys to lists of values")
        entries = {}
        for key, options in grid.items():
            options = options if isinstance(options, list) else [options]
            entries[str(key)] = [_text(v) for v in options]
        combos = _grid(entries, f"{shown}: grid")
        if given_trials is not None and given_trials != len(combos):
            raise ConfigError(
                f"{shown}: trials: {given_trials!r} but the grid has {len(combos)} combinations; remove trials:"
            )
        values.update(kind="grid", grid=combos, trials=len(combos), pruner="none")
        return _finish(SweepSpec(**values))
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError(
            f"{shown}: parameters: expected a mapping of params.yaml keys to ranges, "
            "e.g. train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-1}"
        )
    if "trials" not in raw:
        raise ConfigError(f"{shown}: trials: missing; give the number of trials the search may run")
    space = {str(k): _parameter(str(k), v, f"{shown}: parameters: {k}") for k, v in parameters.items()}
    values.update(kind="search", space=space)
    return _finish(SweepSpec(**values))


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _finish(s: SweepSpec) -> SweepSpec:
    if s.parallel > s.trials:
        s = dataclasses.replace(s, parallel=s.trials)
    return s


def from_grid(
    name: str, sets: list[str], parallel: int, metric: str | None = None, direction: str | None = None
) -> SweepSpec:
    """A grid sweep from ``-S`` lists: ``["train.lr=0.001,0.01", "train.seed=0,1,2"]`` -> 6 trials, in order.
    Without a metric, the study's objective (metric and direction); a metric without a direction: minimize."""
    if metric is None:
        metric, study_direction = objective()
        direction = direction or study_direction
    direction = direction or "minimize"
    if NAME_RE.fullmatch(name or "") is None:
        raise ConfigError(f"--grid: {name!r} is not a sweep name; use letters, digits, - and _ (not first)")
    if not sets:
        raise ConfigError("-S: no parameters; give at least one, e.g. -S train.lr=0.001,0.01")
    if not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"--parallel: {parallel!r} is not allowed; expected an integer > 0")
    if direction not in DIRECTIONS:
        raise ConfigError(f"--direction: {direction!r} is not allowed; expected one of {', '.join(DIRECTIONS)}")
    if not metric.strip():
        raise ConfigError("--metric: empty; give a key of results/metrics.json, e.g. val_loss")
    entries: dict[str, list[str]] = {}
    for item in sets:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or not key or not values.strip():
            raise ConfigError(f"-S {item}: expected key=value[,value...], e.g. -S train.lr=0.001,0.01")
        if key in entries:
            raise ConfigError(f"-S {item}: {key} is given twice; list all its values in one -S")
        entries[key] = [v.strip() for v in values.split(",")]
    combos = _grid(entries, "-S")
    return _finish(
        SweepSpec(
            name=name,
            kind="grid",
            grid=combos,
            metric=metric,
            direction=direction,
            trials=len(combos),
            parallel=parallel,
            pruner="none",
        )
    )


def overrides_of(spec: SweepSpec, number: int) -> dict[str, str]:
    """The ``-S`` overrides of grid trial ``number`` (the array index)."""
    if spec.kind != "grid":
        raise ValueError(f"sweep {spec.name!r} is a search: its trials' overrides come from search.ask")
    if not 0 <= number < len(spec.grid):
        raise IndexError(f"sweep {spec.name!r} has trials 0-{len(spec.grid) - 1}, not {number}")
    return dict(spec.grid[number])


def set_args(overrides: dict[str, str]) -> list[str]:
    """``["-S", "train.lr=0.001", ...]`` for ``dvc exp run``."""
    args: list[str] = []
    for key, value in overrides.items():
        args += ["-S", f"{key}={value}"]
    return args


__all__ = [
    "SweepSpec",
    "from_dict",
    "from_grid",
    "load",
    "overrides_of",
    "parse_value",
    "set_args",
    "trial_name",
]
