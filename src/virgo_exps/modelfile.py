"""The model file every study's train stage writes (``results/model.pt``), and what is generic about a network.

The file holds the weights, the arguments its study's model factory builds the network from, the data
normalisation and ``sha256``, a checksum of all of it, verified on every load: a flipped byte is named,
never loaded into wrong weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from virgo_exps.config import DamagedInputError
from virgo_exps.gitrun import git
from virgo_exps.store import restore_hint


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------
# The model file: a checksum of its content, verified on every load
# --------------------------------------------------------------------------

MODEL_FORMAT = 1


class CorruptModelError(DamagedInputError):
    """The model file cannot be read, or its content does not match its checksum."""


def _digest(payload: dict) -> str:
    """SHA-256 of the content of a model file: every tensor's name, dtype, shape
    and bytes (in name order), then the other entries as canonical JSON."""
    h = hashlib.sha256()
    for name in sorted(payload["model"]):
        t = payload["model"][name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    rest = {k: v for k, v in payload.items() if k not in ("model", "sha256")}
    h.update(json.dumps(rest, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_file_content(state_dict: dict, model_args: dict, norm: dict | None, **extra) -> dict:
    """What the train stage saves to ``results/model.pt`` (with ``torch.save``):
    the weights, the arguments of the study's model factory, the data normalisation,
    any ``extra`` entries (plain JSON-like values), and ``sha256``, the checksum
    of all of it that :func:`load_model` verifies."""
    payload = {"model": state_dict, "model_args": dict(model_args), "norm": norm, **extra, "format": MODEL_FORMAT}
    payload["sha256"] = _digest(payload)
    return payload


def _fix(path) -> str:
    tracked = git(Path(path).parent, "ls-files", "--error-unmatch", "--", Path(path).name, check=False)
    if tracked.returncode == 0:  # an output git holds (`cache: false`), as the Virgo study's model is
        return (
            f"git holds it: 'git checkout -- {path}' restores the committed one, "
            "or rerun 'dvc repro --force --single-item train'"
        )
    return restore_hint(path, path, "train")


def load_model(path, map_location: str | torch.device = "cpu") -> dict:
    """Read a model file written by the train stage and verify its checksum.

    Returns the saved dict (``model`` state dict, ``model_args``, ``norm``).
    A file that cannot be unpickled, has no checksum, or whose content does not
    match it raises :class:`CorruptModelError` naming the file and the fix.
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CorruptModelError(
            f"{path}: the model file is damaged ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); {_fix(path)}"
        ) from exc
    if not isinstance(payload, dict) or "sha256" not in payload or "model" not in payload:
        raise CorruptModelError(f"{path}: not a model file with a checksum (no 'sha256' entry); {_fix(path)}")
    if _digest(payload) != payload["sha256"]:
        raise CorruptModelError(
            f"{path}: the model file is damaged (its content does not match its sha256 checksum); {_fix(path)}"
        )
    return payload
