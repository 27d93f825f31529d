"""Typed, validated configuration read from ``params.yaml``.

Every stage loads the whole file through :func:`load_params`, so a bad value is
reported before any stage starts work, and it is reported the same way
everywhere: one line naming the key, the value and what is allowed.

Each section is a frozen dataclass. A field's type annotation is the type a
value must have in YAML (an ``int`` is accepted where a ``float`` is expected,
never the reverse); the ``check`` metadata holds the constraint and the text
shown when it fails. :func:`validate` checks a mapping against such a
dataclass; it is the one validator of the project: params sections here, the
machine profiles (:mod:`virgo_exps.machines`) and any file a study adds.

The machinery reads ``train`` and ``report``. A study adds its own sections
through a :class:`StudySpec` it registers as an entry point (group
``virgo_exps.studies``); this module never imports a study. A params file
without a study's sections leaves them None, and that study's check is skipped.

The defaults of the dataclasses are the committed values of ``params.yaml``
(``tests/test_config.py`` holds them equal), so ``virgo-exps params`` shows
what a run uses when a key is left out.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A value in params.yaml is missing, unknown, of the wrong type or impossible."""


# Bounds on what a params file may hold: its size, and the length of any string in it.
MAX_YAML_BYTES = 64 * 1024
MAX_STRING = 500


class DamagedInputError(RuntimeError):
    """A file a stage reads (a store chunk, the model) does not match its checksum.

    Its message is one line: which file, what is wrong, and how to restore it.
    """


# The default of a key that must be given (a machine profile's ``kind``).
REQUIRED = dataclasses.MISSING


def spec(
    default: Any,
    check: Callable[[Any], bool] | None = None,
    allowed: str = "",
    doc: str = "",
    hint: str = "",
    result: bool = True,
):
    """A validated key: its default (or REQUIRED), the constraint, the allowed values in words, its meaning,
    and a hint added to a wrong-type message. ``result=False`` for a key that cannot change what its stage
    writes (how many workers, a retry budget): the only keys a stage's params in ``dvc.yaml`` may leave out."""
    metadata = {"check": check, "allowed": allowed, "doc": doc, "hint": hint, "result": result}
    if isinstance(default, dict):  # a mutable default: a fresh copy for every instance
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


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


# The values train.strategy may take. How each one is launched and which class
# trains is virgo_exps.launch.strategy_table (a test holds its rows equal to
# these names); the names live here so that validating params.yaml does not
# make every stage depend on the launch table.
STRATEGIES = ("single", "ddp", "deepspeed", "horovod")  # named here only; launch.strategy_table has their rows


@dataclass(frozen=True)
class TrainConfig:
    """Model, optimisation and resources of the training stage."""

    strategy: str = spec("single", *_choice(*STRATEGIES), doc="distribution strategy")
    nodes: int = spec(1, _positive, "an integer > 0", "nodes (SLURM machines); must be 1 on the local machine")
    procs_per_node: int = spec(1, _positive, "an integer > 0", "training processes per node")
    model: str = spec(
        "decoder",
        lambda v: v.strip() != "",
        "a network the study's model factory builds (its check names them)",
        "network to train, one of the study's",
    )
    epochs: int = spec(5, _positive, "an integer > 0", "total epochs (absolute: a resumed run stops here too)")
    global_batch_size: int = spec(32, _positive, "an integer > 0", "samples per optimiser step over all processes")
    lr: float = spec(1e-3, lambda v: 0.0 < v < 10.0, "a number between 0 and 10 (exclusive)", "learning rate")
    lr_scaling: str = spec("none", *_choice("none", "linear"), doc="multiply lr by world size ('linear') or not")
    weight_decay: float = spec(0.0, _non_negative, "a number >= 0", "AdamW weight decay")
    seed: int = spec(0, _seed, SEED_RANGE, "seed of weights init and shuffling")
    warmup_steps: int = spec(20, _non_negative, "an integer >= 0", "steps of linear learning-rate warm-up")
    profile_steps: int = spec(5, _non_negative, "an integer >= 0 (0: off)", "steps profiled with the torch profiler")
    max_requeues: int = spec(
        3, _non_negative, "an integer >= 0", "time-outs/preemptions tolerated before failing", result=False
    )
    zero_stage: int = spec(
        0,
        lambda v: v in (0, 1, 2, 3),
        "0, 1, 2 or 3",
        "DeepSpeed's ZeRO stage: 0 (off), 1 (optimiser state split over the ranks), 2 (and gradients), "
        "3 (and weights, gathered whole for snapshots and model.pt)",
    )
    dist_backend: str = spec(
        "auto",
        *_choice("auto", "nccl", "gloo"),
        doc="collectives of ddp and deepspeed (auto: NCCL with GPUs, else gloo)",
    )
    grad_accum_steps: int = spec(
        1,
        _positive,
        "an integer > 0",
        "micro-batches per optimiser step in each process (gradient accumulation); global_batch_size stays the "
        "samples per step, so a micro-batch is global_batch_size / (processes x grad_accum_steps)",
    )
    grad_clip: float = spec(
        0.0, _non_negative, "a number >= 0 (0: off)", "largest gradient norm (clipped before each step)"
    )
    precision: str = spec(
        "fp32",
        *_choice("fp32", "bf16", "fp16"),
        doc="autocast of forward passes: bf16, or fp16 with a gradient scaler (its state is in the snapshot)",
    )
    compile: bool = spec(False, None, "true or false", "torch.compile the network (its forward pass)")
    lr_schedule: str = spec(
        "constant",
        *_choice("constant", "cosine"),
        doc="after the warm-up: constant, or cosine decay to lr_floor x lr at the last step of train.epochs",
    )
    lr_floor: float = spec(
        0.0, lambda v: 0.0 <= v < 1.0, "a number >= 0 and < 1", "cosine: the last learning rate as a fraction of lr"
    )
    grad_compression: str = spec(
        "none",
        *_choice("none", "fp16"),
        doc="the gradients' format in the allreduce: fp16 halves the bytes sent (ddp: a communication hook, "
        "horovod: its fp16 compression)",
    )


@dataclass(frozen=True)
class ReportConfig:
    """Per-experiment report."""

    title: str = spec(
        "Virgo synthetic study",
        lambda v: v.strip() != "",
        "a string with at least one visible character",
        "heading of report.md",
    )


# The machinery's sections: always present (defaults when left out).
MACHINERY_SECTIONS = {"train": TrainConfig, "report": ReportConfig}
STUDY_GROUP = "virgo_exps.studies"  # the entry point group a study registers its StudySpec under


@dataclass(frozen=True)
class StudySpec:
    """What a study adds to params.yaml, found through its entry point (group ``virgo_exps.studies``).

    ``sections``: its params sections (dataclasses of :func:`spec` fields), each left out of a params file
    without it (then None); ``check``: its rules across them and ``train``, run when the file has all of
    them; ``data_sections``: those that describe the data (the scalability report never pools runs that
    differ there); ``data_needs``: ``"module:function"`` of what its data stages will write and hold in
    memory, for the first stage's disk and memory budget (a :class:`virgo_exps.preflight.DataNeeds`, from
    ``function(params, machine, up_to_date)``, where ``up_to_date(names)`` gives those of its stages DVC
    will not rerun); ``machine_check``: ``"module:function"`` of its refusals that depend on the machine
    (``function(params, machine)`` raising :class:`ConfigError`), run with the first stage's checks; both
    named, not imported, so that validating params loads none of the data stages' code.
    """

    name: str
    sections: dict[str, type]
    check: Callable[[Any], None] | None = None
    data_sections: tuple[str, ...] = ()
    data_needs: str | None = None
    machine_check: str | None = None
    objective: tuple[str, str] = ("val_loss", "minimize")  # a sweep's metric and direction unless it names one


_STUDIES: list[StudySpec] | None = None


def studies() -> list[StudySpec]:
    """The installed studies (usually one), by their entry points; loaded once per process."""
    global _STUDIES
    if _STUDIES is None:
        # importlib.metadata (~15 ms): loaded when params are read, not by every import (`virgo-exps --help`)
        from importlib.metadata import entry_points

        found = [ep.load() for ep in sorted(entry_points(group=STUDY_GROUP), key=lambda ep: ep.name)]
        bad = [s for s in found if not isinstance(s, StudySpec)]
        if bad:
            raise ConfigError(f"entry point group {STUDY_GROUP}: {bad[0]!r} is not a virgo_exps.config.StudySpec")
        _STUDIES = found
    return _STUDIES


def objective() -> tuple[str, str]:
    """The metric a sweep optimises and its direction, unless the sweep names one: the installed study's."""
    found = studies()
    return found[0].objective if found else ("val_loss", "minimize")


def study_sections() -> dict[str, type]:
    """The params sections of the installed studies, by name."""
    return {name: cls for study in studies() for name, cls in study.sections.items()}


def sections() -> dict[str, type]:
    """Every params section: the studies' first, then the machinery's (the order of ``virgo-exps params``)."""
    return {**study_sections(), **MACHINERY_SECTIONS}


def data_sections() -> tuple[str, ...]:
    """The sections whose values describe the data a run trains on."""
    return tuple(name for study in studies() for name in study.data_sections)


def _study_defaults() -> dict[str, Any]:
    return {name: cls() for name, cls in study_sections().items()}


@dataclass(frozen=True)
class Params:
    # The machinery's sections: always present (defaults when left out).
    train: TrainConfig = field(default_factory=TrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # The study's sections by name (``params.generate`` reads one): None when the file has no such section.
    study: dict[str, Any] = field(default_factory=_study_defaults)

    def __getattr__(self, name: str) -> Any:
        study = self.__dict__.get("study") or {}
        if name in study:
            return study[name]
        raise AttributeError(f"params have no section {name!r}")


def _type_name(tp) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list of strings"
    if origin is dict:
        return "a mapping of names to strings"
    return names.get(tp, str(tp))


def _coerce(key: str, value: Any, tp, hint: str = "") -> Any:
    # YAML already gives typed values; we only widen int -> float and refuse
    # everything else, because a silently converted "1e-3" string or a bool
    # read as 1 is how a sweep ends up training something else than intended.
    wrong = f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [a for a in options if a is not type(None)]
        if len(inner) == 1:
            try:
                return _coerce(key, value, inner[0])
            except ConfigError:
                pass
        raise ConfigError(wrong)
    if origin is tuple:  # a YAML list of strings (numbers written unquoted are taken as their text)
        if not isinstance(value, list | tuple):
            raise ConfigError(wrong)
        return tuple(_coerce(key, str(v), str) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(wrong)
        return {_coerce(key, str(k), str): _coerce(key, str(v), str) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} (a boolean){hint}")
    if not isinstance(value, tp):
        raise ConfigError(wrong)
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise ConfigError(f"{key}: a string of {len(value)} characters; at most {MAX_STRING} are allowed{hint}")
    return value


def spec_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` a file may set (those declared with :func:`spec`)."""
    return [f for f in dataclasses.fields(cls) if "allowed" in f.metadata]


def validate(
    cls,
    raw: Any,
    name: str,
    sep: str = ".",
    refusal: str = "{key}: {value!r} is not allowed; expected {allowed}",
) -> dict[str, Any]:
    """Check a parsed YAML mapping against the :func:`spec` fields of dataclass ``cls``; the values it sets.

    ``name`` and ``sep`` say how a message names a key: ``train.lr`` for a params section,
    ``machines/x/machine.yaml: time`` for a file. ``refusal`` phrases a value its check refuses.
    Every error is one :class:`ConfigError` line naming the key, what is wrong and what is expected.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    hints = get_type_hints(cls)
    fields = spec_fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(raw) - names, key=str)
    if unknown:
        raise ConfigError(
            f"{name}{sep}{unknown[0]}: unknown key; allowed keys in '{name}' are: {', '.join(sorted(names))}"
        )
    values = {}
    for f in fields:
        key = f"{name}{sep}{f.name}"
        if f.name not in raw:
            if f.default is REQUIRED and f.default_factory is REQUIRED:
                raise ConfigError(f"{key}: missing; expected {f.metadata['allowed']}")
            continue
        value = _coerce(key, raw[f.name], hints[f.name], f.metadata.get("hint", ""))
        check = f.metadata.get("check")
        if value is not None and check is not None and not check(value):
            raise ConfigError(refusal.format(key=key, value=value, allowed=f.metadata["allowed"]))
        if hints[f.name] is int and not -INT_MAX - 1 <= value <= INT_MAX:
            raise ConfigError(
                f"{key}: {value!r} is out of range; numpy and torch take 64-bit integers, at most {INT_MAX}"
            )
        values[f.name] = value
    return values


def _build(cls, section: str, raw: Any):
    return cls(**validate(cls, raw, section))


def _cross_checks(p: Params) -> None:
    for study in studies():
        if study.check is not None and all(p.study.get(name) is not None for name in study.sections):
            study.check(p)
    world = p.train.nodes * p.train.procs_per_node
    if p.train.global_batch_size % world:
        raise ConfigError(
            f"train.global_batch_size: {p.train.global_batch_size} is not divisible by the world size "
            f"{world} (train.nodes x train.procs_per_node); the global batch must split evenly over processes"
        )
    accum = p.train.grad_accum_steps
    if p.train.global_batch_size % (world * accum):
        per_process = p.train.global_batch_size // world
        raise ConfigError(
            f"train.grad_accum_steps: {accum} micro-batches do not split the {per_process} samples each of the "
            f"{world} process(es) takes per step (train.global_batch_size {p.train.global_batch_size}); choose a "
            f"divisor of {per_process}"
        )
    if p.train.precision == "fp16" and p.train.strategy == "deepspeed":
        raise ConfigError(
            "train.precision: 'fp16' needs a gradient scaler, which DeepSpeed's engine does not take (its own fp16 "
            "mode keeps the weights in fp16, another training); choose 'bf16' or 'fp32' with DeepSpeed"
        )
    if p.train.grad_compression != "none" and p.train.strategy not in ("ddp", "horovod"):
        raise ConfigError(
            f"train.grad_compression: '{p.train.grad_compression}' compresses the gradients' allreduce of ddp and "
            f"horovod, but train.strategy is '{p.train.strategy}'; set it to 'none'"
        )
    if p.train.zero_stage and p.train.strategy != "deepspeed":
        raise ConfigError(
            f"train.zero_stage: {p.train.zero_stage} is a stage of DeepSpeed's ZeRO, but train.strategy is "
            f"'{p.train.strategy}'; set it to 0 or choose 'deepspeed'"
        )
    if p.train.strategy == "single" and world != 1:
        raise ConfigError(
            f"train.strategy: 'single' runs one process, but train.nodes x train.procs_per_node = {world}; "
            "choose 'ddp', 'deepspeed' or 'horovod', or set both to 1"
        )


def params_from_dict(raw: Any) -> Params:
    """Validate a parsed params mapping into :class:`Params` (raises ConfigError)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: expected a mapping of sections, got {type(raw).__name__}")
    known = sections()
    unknown = sorted(set(raw) - set(known), key=str)
    if unknown:
        installed = "" if studies() else f" (no study is installed: none registers under {STUDY_GROUP})"
        raise ConfigError(f"{unknown[0]}: unknown section; allowed sections are: {', '.join(known)}{installed}")
    study = {name: _build(cls, name, raw[name]) if name in raw else None for name, cls in study_sections().items()}
    built = {name: _build(cls, name, raw.get(name)) for name, cls in MACHINERY_SECTIONS.items()}
    params = Params(**built, study=study)
    _cross_checks(params)
    return params


def read_yaml(path: str | os.PathLike, what: str = "params file") -> Any:
    """Parse a small YAML file we are given (params, a preset, a machine profile, a sweep) within bounds:
    at most MAX_YAML_BYTES, no aliases (``*name``: a few nested ones expand to millions of values);
    raise ConfigError with one line naming the file, the place and the fix."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; run from the repository root or pass --params") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a {what}") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES // 1024} KiB, too large for a {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); is it a {what}?") from None
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(
                    f"{path}: line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed "
                    f"in a {what}; write the values out"
                )
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise ConfigError with a one-line message."""
    return params_from_dict(read_yaml(path))


def as_flat_dict(params: Params) -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}``: the form MLflow and reports use."""
    out: dict[str, Any] = {}
    for section in sections():
        value = getattr(params, section, None)
        for key, v in (dataclasses.asdict(value) if value is not None else {}).items():
            out[f"{section}.{key}"] = v
    return out


def describe() -> str:
    """Every key with its default, allowed values and meaning (``virgo-exps params``)."""
    lines = []
    owner = {name: study.name for study in studies() for name in study.sections}
    for name, cls in sections().items():
        study = f"  # the {owner[name]} study's; leave it out for a study without it" if name in owner else ""
        lines.append(f"{name}:{study}")
        for f in spec_fields(cls):
            same = "; never changes a result" if not f.metadata["result"] else ""
            lines.append(f"  {f.name}: {f.default!r}  # {f.metadata['doc']} ({f.metadata['allowed']}{same})")
    return "\n".join(lines)


__all__ = [
    "ConfigError",
    "StudySpec",
    "TrainConfig",
    "ReportConfig",
    "Params",
    "STRATEGIES",
    "load_params",
    "params_from_dict",
    "validate",
    "spec",
    "spec_fields",
    "REQUIRED",
    "as_flat_dict",
    "describe",
]
