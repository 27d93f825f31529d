"""The Virgo study's params: its sections of ``params.yaml`` and the rules across them.

The machinery finds this study through its entry point (group ``virgo_exps.studies`` in
``pyproject.toml``), never by an import: :data:`STUDY` names the sections the study adds to
``train`` and ``report``, the check across them, and which sections describe the data (runs that
differ there are never pooled by the scalability report). Validation is the machinery's one
validator (:func:`virgo_exps.config.validate`), through the ``spec`` of each field.
"""

from __future__ import annotations

from dataclasses import dataclass

from virgo_exps.config import SEED_RANGE, ConfigError, StudySpec, _choice, _non_negative, _positive, _seed, spec
from virgo_exps.study.qtiling import max_frequency

# The study's networks (virgo_exps.study.models): the values train.model may take.
MODELS = ("decoder", "unet")


@dataclass(frozen=True)
class GenerateConfig:
    """Synthetic main + auxiliary channels (see virgo_exps.study.generate)."""

    seed: int = spec(42, _seed, SEED_RANGE, "seed of the whole data set; sample i depends only on (seed, i)")
    n_samples: int = spec(512, _positive, "an integer > 0", "number of samples (each: 1 main + n_aux channels)")
    n_aux: int = spec(3, lambda v: 1 <= v <= 64, "an integer from 1 to 64", "auxiliary channels per sample")
    duration: float = spec(16.0, lambda v: 1.0 <= v <= 600.0, "seconds, from 1 to 600", "length of each series")
    sample_rate: int = spec(500, lambda v: 64 <= v <= 16384, "Hz, from 64 to 16384", "sampling rate of every channel")
    chunk_size: int = spec(64, _positive, "an integer > 0", "samples per zarr chunk and per unit of parallel work")
    workers: int = spec(0, _non_negative, "an integer >= 0 (0: all cores)", "local worker processes", result=False)


@dataclass(frozen=True)
class PreprocessConfig:
    """Q-transform images, 64x64 patches, split and normalisation."""

    fmin: float = spec(10.0, _positive, "a frequency in Hz > 0", "lower edge of the Q-transform band")
    fmax: float = spec(150.0, _positive, "a frequency in Hz > 0", "upper edge of the Q-transform band (< Nyquist)")
    whiten: bool = spec(False, None, "true or false", "whiten each channel before the Q-transform (as gwpy does)")
    patch_size: int = spec(
        64,
        lambda v: 8 <= v <= 512,
        "an integer from 8 to 512",
        "side of the square patch cut around the main channel's peak",
    )
    val_fraction: float = spec(
        0.2, lambda v: 0.0 < v < 1.0, "a fraction strictly between 0 and 1", "share of samples held out for validation"
    )
    split_seed: int = spec(0, _seed, SEED_RANGE, "seed of the train/validation split")
    batch_size: int = spec(32, _positive, "an integer > 0", "samples transformed at once", result=False)
    workers: int = spec(0, _non_negative, "an integer >= 0 (0: all cores)", "local worker processes", result=False)
    device: str = spec("cpu", *_choice("cpu", "cuda"), doc="where the Q-transforms run")


def check(p) -> None:
    """The Virgo study's rules across its sections and ``train`` (only for a params file that has them)."""
    if p.train.model not in MODELS:
        raise ConfigError(
            f"train.model: {p.train.model!r} is not allowed; expected one of {', '.join(repr(m) for m in MODELS)}"
        )
    nyquist = p.generate.sample_rate / 2
    if p.preprocess.fmin >= p.preprocess.fmax:
        raise ConfigError(f"preprocess.fmin: {p.preprocess.fmin} must be below preprocess.fmax ({p.preprocess.fmax})")
    if p.preprocess.fmax >= nyquist:
        raise ConfigError(
            f"preprocess.fmax: {p.preprocess.fmax} Hz must be below the Nyquist frequency "
            f"({nyquist} Hz for generate.sample_rate={p.generate.sample_rate})"
        )
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
    if p.train.global_batch_size > n_train:
        raise ConfigError(
            f"train.global_batch_size: {p.train.global_batch_size} is larger than the training split "
            f"({n_train} samples); lower it or raise generate.n_samples"
        )
    # The Q-transform grid has 1000 time bins and 0.5 Hz frequency bins.
    freq_bins = int((p.preprocess.fmax - p.preprocess.fmin) / 0.5)
    if p.preprocess.patch_size > min(1000, freq_bins):
        raise ConfigError(
            f"preprocess.patch_size: {p.preprocess.patch_size} does not fit the Q-transform grid "
            f"(1000 time bins x {freq_bins} frequency bins for {p.preprocess.fmin}-{p.preprocess.fmax} Hz)"
        )


STUDY = StudySpec(
    name="Virgo",
    sections={"generate": GenerateConfig, "preprocess": PreprocessConfig},
    check=check,
    data_sections=("generate", "preprocess"),
    data_needs="virgo_exps.study.budget:data_needs",
    machine_check="virgo_exps.study.budget:check_device",
)
