"""Typed, validated configuration read from ``params.yaml``.

Every stage loads the whole file through :func:`load_params`, so a bad value is
reported before any stage starts work, and it is reported the same way
everywhere: one line naming the key, the value and what is allowed.

Each section is a frozen dataclass. A field's type annotation is the type a
value must have in YAML (an ``int`` is accepted where a ``float`` is expected,
never the reverse); the ``check`` metadata holds the constraint and the text
shown when it fails.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A value in params.yaml is missing, unknown, of the wrong type or impossible."""


class DamagedInputError(RuntimeError):
    """A file a stage reads (a store chunk, the model) does not match its checksum.

    Its message is one line: which file, what is wrong, and how to restore it.
    """


def _spec(default: Any, check: Callable[[Any], bool] | None = None, allowed: str = "", doc: str = ""):
    return field(default=default, metadata={"check": check, "allowed": allowed, "doc": doc})


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


# Seeds go to numpy (SeedSequence, default_rng) and torch (manual_seed, and
# the sampler's seed * 1_000_003 + epoch, which must stay below 2**64): the
# 32-bit range every one of them accepts.
SEED_MAX = 2**32 - 1
SEED_RANGE = f"an integer from 0 to {SEED_MAX} (2**32 - 1)"
# Every other integer reaches numpy or torch as a 64-bit integer.
INT_MAX = 2**63 - 1


def _seed(v) -> bool:
    return 0 <= v <= SEED_MAX


def _choice(*options):
    return (lambda v: v in options), "one of " + ", ".join(repr(o) for o in options)


STRATEGIES = ("single", "ddp", "deepspeed", "horovod")
MODELS = ("decoder", "unet")


@dataclass(frozen=True)
class GenerateConfig:
    """Synthetic main + auxiliary channels (see virgo_exps.study.generate)."""

    seed: int = _spec(42, _seed, SEED_RANGE, "seed of the whole data set; sample i depends only on (seed, i)")
    n_samples: int = _spec(256, _positive, "an integer > 0", "number of samples (each: 1 main + n_aux channels)")
    n_aux: int = _spec(3, lambda v: 1 <= v <= 64, "an integer from 1 to 64", "auxiliary channels per sample")
    duration: float = _spec(16.0, lambda v: 1.0 <= v <= 600.0, "seconds, from 1 to 600", "length of each series")
    sample_rate: int = _spec(500, lambda v: 64 <= v <= 16384, "Hz, from 64 to 16384", "sampling rate of every channel")
    chunk_size: int = _spec(64, _positive, "an integer > 0", "samples per zarr chunk and per unit of parallel work")
    workers: int = _spec(0, _non_negative, "an integer >= 0 (0: all cores)", "local worker processes")


@dataclass(frozen=True)
class PreprocessConfig:
    """Q-transform images, 64x64 patches, split and normalisation."""

    fmin: float = _spec(10.0, _positive, "a frequency in Hz > 0", "lower edge of the Q-transform band")
    fmax: float = _spec(150.0, _positive, "a frequency in Hz > 0", "upper edge of the Q-transform band (< Nyquist)")
    whiten: bool = _spec(False, None, "true or false", "whiten each channel before the Q-transform (as gwpy does)")
    patch_size: int = _spec(
        64,
        lambda v: 8 <= v <= 512,
        "an integer from 8 to 512",
        "side of the square patch cut around the main channel's peak",
    )
    val_fraction: float = _spec(
        0.2, lambda v: 0.0 < v < 1.0, "a fraction strictly between 0 and 1", "share of samples held out for validation"
    )
    split_seed: int = _spec(0, _seed, SEED_RANGE, "seed of the train/validation split")
    batch_size: int = _spec(32, _positive, "an integer > 0", "samples transformed at once")
    workers: int = _spec(0, _non_negative, "an integer >= 0 (0: all cores)", "local worker processes")
    device: str = _spec("cpu", *_choice("cpu", "cuda"), doc="where the Q-transforms run")


@dataclass(frozen=True)
class TrainConfig:
    """Model, optimisation and resources of the training stage."""

    strategy: str = _spec("single", *_choice(*STRATEGIES), doc="distribution strategy")
    nodes: int = _spec(1, _positive, "an integer > 0", "nodes (SLURM machines); must be 1 on the local machine")
    procs_per_node: int = _spec(1, _positive, "an integer > 0", "training processes per node")
    model: str = _spec("decoder", *_choice(*MODELS), doc="network: small convolutional decoder or U-Net")
    epochs: int = _spec(3, _positive, "an integer > 0", "total epochs (absolute: a resumed run stops here too)")
    global_batch_size: int = _spec(32, _positive, "an integer > 0", "samples per optimiser step over all processes")
    lr: float = _spec(1e-3, lambda v: 0.0 < v < 10.0, "a number between 0 and 10 (exclusive)", "learning rate")
    lr_scaling: str = _spec("none", *_choice("none", "linear"), doc="multiply lr by world size ('linear') or not")
    weight_decay: float = _spec(0.0, _non_negative, "a number >= 0", "AdamW weight decay")
    seed: int = _spec(0, _seed, SEED_RANGE, "seed of weights init and shuffling")
    warmup_steps: int = _spec(20, _non_negative, "an integer >= 0", "steps of linear learning-rate warm-up")
    profile_steps: int = _spec(5, _non_negative, "an integer >= 0 (0: off)", "steps profiled with the torch profiler")
    max_requeues: int = _spec(3, _non_negative, "an integer >= 0", "time-outs/preemptions tolerated before failing")


@dataclass(frozen=True)
class ReportConfig:
    """Per-experiment report."""

    title: str = _spec(
        "Virgo synthetic study",
        lambda v: v.strip() != "",
        "a string with at least one visible character",
        "heading of report.md",
    )


@dataclass(frozen=True)
class Params:
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    # YAML already gives typed values; we only widen int -> float and refuse
    # everything else, because a silently converted "1e-3" string or a bool
    # read as 1 is how a sweep ends up training something else than intended.
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} (a boolean)")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, section: str, raw: Any):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {raw!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]}: unknown key; allowed keys in '{section}' are: {', '.join(sorted(names))}"
        )
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{section}.{f.name}"
        if f.name not in raw:
            continue
        value = _coerce(key, raw[f.name], hints[f.name])
        check = f.metadata.get("check")
        if check is not None and not check(value):
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {f.metadata['allowed']}")
        if hints[f.name] is int and not -INT_MAX - 1 <= value <= INT_MAX:
            raise ConfigError(
                f"{key}: {value!r} is out of range; numpy and torch take 64-bit integers, at most {INT_MAX}"
            )
        values[f.name] = value
    return cls(**values)


def _cross_checks(p: Params) -> None:
    nyquist = p.generate.sample_rate / 2
    if p.preprocess.fmin >= p.preprocess.fmax:
        raise ConfigError(f"preprocess.fmin: {p.preprocess.fmin} must be below preprocess.fmax ({p.preprocess.fmax})")
    if p.preprocess.fmax >= nyquist:
        raise ConfigError(
            f"preprocess.fmax: {p.preprocess.fmax} Hz must be below the Nyquist frequency "
            f"({nyquist} Hz for generate.sample_rate={p.generate.sample_rate})"
        )
    from virgo_exps.study.qtiling import max_frequency

    ceiling = max_frequency(p.generate.sample_rate)
    if p.preprocess.fmax > ceiling:
        raise ConfigError(
            f"preprocess.fmax: {p.preprocess.fmax} Hz is above the highest frequency the Q-transform resolves "
            f"at generate.sample_rate={p.generate.sample_rate} ({ceiling:.1f} Hz); lower fmax or raise the rate"
        )
    n_val = int(round(p.generate.n_samples * p.preprocess.val_fraction))
    n_train = p.generate.n_samples - n_val
    if n_val < 1 or n_train < 1:
        raise ConfigError(
            f"preprocess.val_fraction: {p.preprocess.val_fraction} of generate.n_samples={p.generate.n_samples} "
            "leaves an empty train or validation split; raise n_samples or change the fraction"
        )
    world = p.train.nodes * p.train.procs_per_node
    if p.train.global_batch_size % world:
        raise ConfigError(
            f"train.global_batch_size: {p.train.global_batch_size} is not divisible by the world size "
            f"{world} (train.nodes x train.procs_per_node); the global batch must split evenly over processes"
        )
    if p.train.global_batch_size > n_train:
        raise ConfigError(
            f"train.global_batch_size: {p.train.global_batch_size} is larger than the training split "
            f"({n_train} samples); lower it or raise generate.n_samples"
        )
    if p.train.strategy == "single" and world != 1:
        raise ConfigError(
            f"train.strategy: 'single' runs one process, but train.nodes x train.procs_per_node = {world}; "
            "choose 'ddp', 'deepspeed' or 'horovod', or set both to 1"
        )
    # The Q-transform grid has 1000 time bins and 0.5 Hz frequency bins.
    freq_bins = int((p.preprocess.fmax - p.preprocess.fmin) / 0.5)
    if p.preprocess.patch_size > min(1000, freq_bins):
        raise ConfigError(
            f"preprocess.patch_size: {p.preprocess.patch_size} does not fit the Q-transform grid "
            f"(1000 time bins x {freq_bins} frequency bins for {p.preprocess.fmin}-{p.preprocess.fmax} Hz)"
        )


def params_from_dict(raw: Any) -> Params:
    """Validate a parsed params mapping into :class:`Params` (raises ConfigError)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: expected a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Params)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; allowed sections are: {', '.join(sections)}")
    hints = get_type_hints(Params)
    built = {name: _build(hints[name], name, raw.get(name)) for name in sections}
    params = Params(**built)
    _cross_checks(params)
    return params


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise ConfigError with a one-line message."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; run from the repository root or pass --params") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return params_from_dict(raw)


def as_flat_dict(params: Params) -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}``: the form MLflow and reports use."""
    out: dict[str, Any] = {}
    for section, value in dataclasses.asdict(params).items():
        for key, v in value.items():
            out[f"{section}.{key}"] = v
    return out


def describe() -> str:
    """Every key with its default, allowed values and meaning (``virgo-exps params``)."""
    lines = []
    hints = get_type_hints(Params)
    for section in dataclasses.fields(Params):
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(hints[section.name]):
            lines.append(f"  {f.name}: {f.default!r}  # {f.metadata['doc']} ({f.metadata['allowed']})")
    return "\n".join(lines)


__all__ = [
    "ConfigError",
    "GenerateConfig",
    "PreprocessConfig",
    "TrainConfig",
    "ReportConfig",
    "Params",
    "STRATEGIES",
    "MODELS",
    "load_params",
    "params_from_dict",
    "as_flat_dict",
    "describe",
]
