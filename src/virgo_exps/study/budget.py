"""The disk and memory the Virgo data stages need (the first stage's budget), and its machine check.

Named in the study's ``StudySpec`` (``data_needs``, ``machine_check``) and loaded by
:mod:`virgo_exps.preflight` only when it checks a run, so that validating params never imports the data
stages' code.
"""

from __future__ import annotations

from virgo_exps.config import ConfigError
from virgo_exps.preflight import DataNeeds
from virgo_exps.study.channels import n_time_of
from virgo_exps.study.generate import n_chunks_of, resolve_workers

# Per chunk of the generated store, the generate stage keeps a few Python
# objects (chunk index, task bookkeeping): counted generously.
BYTES_PER_CHUNK = 200
# Per sample, preprocessing keeps the split permutation, both index arrays
# and a validation mask (3 x int64 + 1 bool) plus a window per sample.
BYTES_PER_SAMPLE_PREPROCESS = 3 * 8 + 1 + 2 * 8


def data_needs(p, machine, up_to_date):
    """The disk and memory the data stages need for the params ``p`` on ``machine`` (the first stage's
    budget, :func:`virgo_exps.preflight.estimate`); a stage DVC will not rerun adds no output."""
    g, pre = p.generate, p.preprocess
    channels = 1 + g.n_aux
    current = up_to_date(("generate", "preprocess"))
    raw = 0 if "generate" in current else g.n_samples * channels * n_time_of(g) * 4
    images = 0 if {"generate", "preprocess"} <= current else g.n_samples * channels * pre.patch_size**2 * 4
    peaks = []
    if machine.kind == "local" or not machine.data_tasks:  # else generate runs as a Slurm job array
        chunk = min(g.chunk_size, g.n_samples) * channels * n_time_of(g) * 4
        workers = max(1, min(resolve_workers(None, g.workers), n_chunks_of(g)))
        peaks.append((n_chunks_of(g) * BYTES_PER_CHUNK + 2 * workers * chunk, "generate: chunk index and buffers"))
    peaks.append((g.n_samples * BYTES_PER_SAMPLE_PREPROCESS, "preprocess: split indices"))
    return DataNeeds(
        outputs=(("raw series", "data/raw.zarr", raw), ("images", "data/images.zarr", images)),
        peaks=tuple(peaks),
        subject=f"generate.n_samples: {g.n_samples} samples",
        lower="lower generate.n_samples (or generate.n_aux, generate.duration, generate.sample_rate, "
        "preprocess.patch_size)",
    )


def check_device(p, machine) -> None:
    """``preprocess.device`` exists here (preprocessing runs on this machine, also on SLURM machines)."""
    if p.preprocess.device != "cuda":
        return
    import torch  # heavy: only for a run that asks for CUDA

    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is built without CUDA"
    elif not torch.cuda.is_available():
        why = "torch finds no CUDA GPU on this machine"
    else:
        return
    raise ConfigError(f"preprocess.device: 'cuda' is not available: {why}; set preprocess.device=cpu")
