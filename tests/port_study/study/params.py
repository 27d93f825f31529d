"""The sequence study's params (section ``sequences``) and its rules across sections."""

from __future__ import annotations

from dataclasses import dataclass

from virgo_exps.config import SEED_RANGE, ConfigError, StudySpec, _positive, _seed, spec

MODELS = ("conv1d",)


@dataclass(frozen=True)
class SequencesConfig:
    """Noisy sines of a few frequencies, one class per frequency."""

    n_samples: int = spec(256, lambda v: v >= 16, "an integer >= 16", "number of sequences")
    length: int = spec(64, lambda v: 16 <= v <= 4096, "an integer from 16 to 4096", "samples per sequence")
    classes: int = spec(3, lambda v: 2 <= v <= 16, "an integer from 2 to 16", "classes (one frequency each)")
    noise: float = spec(0.5, _positive, "a number > 0", "standard deviation of the added noise")
    val_fraction: float = spec(0.25, lambda v: 0 < v < 1, "a number strictly between 0 and 1", "validation share")
    seed: int = spec(3, _seed, SEED_RANGE, "seed of the data")


def check(p) -> None:
    if p.train.model not in MODELS:
        raise ConfigError(f"train.model: {p.train.model!r} is not allowed; expected one of {MODELS}")
    n_train = p.sequences.n_samples - round(p.sequences.n_samples * p.sequences.val_fraction)
    if p.train.global_batch_size > n_train:
        raise ConfigError(
            f"train.global_batch_size: {p.train.global_batch_size} is larger than the training split "
            f"({n_train} sequences); lower it or raise sequences.n_samples"
        )


STUDY = StudySpec(
    name="Sequences",
    sections={"sequences": SequencesConfig},
    check=check,
    data_sections=("sequences",),
    data_needs="virgo_exps.study.data:data_needs",
    objective=("val_accuracy", "maximize"),  # a sweep that names no metric maximises accuracy
)
