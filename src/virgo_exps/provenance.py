"""Provenance stamps: every output says which params and which input data made it.

A stamp is a small mapping written into the output itself (zarr root
attributes, the model file, ``run.json`` beside ``metrics.json``)::

    {"stage": "train",
     "params": {"train.seed": 0, ...},          # the stage's keys of dvc.yaml, as used
     "params_sha256": "3f1c...",                 # digest of that mapping
     "inputs": {"data/images.zarr": "9ab0..."},  # digest of every input data file/folder
     "image": "sha256:7d0e...",                  # the container image it was made in, when it was
     "upstream": {...}}                          # the input's own stamp, when it has one

``run.json`` carries only the short form (``provenance.params``,
``provenance.data`` and ``provenance.code``), so that ``dvc exp show`` gains
three columns, not one per param. A stage that reads an output checks its stamp against the params it
was given (:func:`check_input`); ``virgo-exps verify`` checks every output of
a workspace or an experiment.

Only the keys a stage lists under ``params:`` in ``dvc.yaml`` are stamped:
those are the keys whose change makes DVC rerun the stage, so a stamp and a
consistent ``dvc.lock`` always agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from virgo_exps import container, fsio
from virgo_exps.config import ConfigError, DamagedInputError, as_flat_dict, params_from_dict
from virgo_exps.paths import run_file
from virgo_exps.records import merge

KEY = "provenance"
DIGEST_CHARS = 16


def stage_keys(stage: str, dvc_yaml: str | os.PathLike = "dvc.yaml") -> list[str] | None:
    """The params keys ``stage`` lists in ``dvc.yaml`` (None when there is no such file or stage)."""
    path = Path(dvc_yaml)
    if not path.is_file():
        return None
    spec = ((yaml.safe_load(path.read_text()) or {}).get("stages") or {}).get(stage)
    if spec is None:
        return None
    keys: list[str] = []
    for entry in spec.get("params") or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):  # {other_file.yaml: [keys]}: not ours to stamp
            continue
    return keys


def select(flat: dict[str, Any], stage: str, dvc_yaml: str | os.PathLike = "dvc.yaml") -> dict[str, Any]:
    """The stage's keys out of a flat ``{"section.key": value}`` mapping.

    A key naming a whole section selects every key of it. Without ``dvc.yaml``
    the stage's own section is taken.
    """
    keys = stage_keys(stage, dvc_yaml)
    if keys is None:
        keys = [stage]
    out = {}
    for key in keys:
        if key in flat:
            out[key] = flat[key]
        else:
            out.update({k: v for k, v in flat.items() if k.startswith(key + ".")})
    return dict(sorted(out.items()))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (tree or {}).items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def used_params(params_file: str | os.PathLike = "params.yaml", text: str | None = None) -> dict[str, Any]:
    """Every param as a stage uses it (validated, defaults filled in), flat."""
    raw = yaml.safe_load(Path(params_file).read_text() if text is None else text) or {}
    return as_flat_dict(params_from_dict(raw))


def params_digest(params: dict[str, Any]) -> str:
    text = json.dumps(_normal(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def _normal(params: dict[str, Any]) -> dict[str, Any]:
    # 16 and 16.0 are the same param value: YAML gives either, config widens ints.
    return {k: (float(v) if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in params.items()}


def files_of(path: Path) -> Iterable[tuple[str, Path]]:
    """(relative path, file) for a file or every file under a folder, sorted."""
    path = Path(path)
    if path.is_file():
        yield "", path
        return
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            yield full.relative_to(path).as_posix(), full


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_files(entries: Iterable[tuple[str, Path]]) -> str:
    """Digest of a file tree given as (relative path, file on disk); the order is normalised."""
    h = hashlib.sha256()
    for rel, path in sorted(entries, key=lambda e: e[0]):
        h.update(f"{rel}\0{_file_sha256(path)}\n".encode())
    return h.hexdigest()[:DIGEST_CHARS]


def data_digest(path: str | os.PathLike) -> str:
    """Digest of the bytes of a data file or folder (a zarr store): what the stage read."""
    return digest_files(files_of(Path(path)))


def stamp(
    stage: str,
    flat_params: dict[str, Any],
    inputs: dict[str, str | os.PathLike] | None = None,
    upstream: dict | None = None,
    dvc_yaml: str | os.PathLike = "dvc.yaml",
) -> dict:
    """The stamp of an output of ``stage`` made with ``flat_params`` from ``inputs`` (name -> path)."""
    params = select(flat_params, stage, dvc_yaml)
    out = {
        "stage": stage,
        "params": params,
        "params_sha256": params_digest(params),
        "inputs": {str(name): data_digest(path) for name, path in (inputs or {}).items()},
    }
    image = container.current()
    if image is not None:  # made inside a container image: which (outside any, the key is absent)
        out["image"] = image
    if upstream:
        out["upstream"] = upstream
    return out


def stage_code_digest(stage: str, dvc_yaml: str | os.PathLike = "dvc.yaml") -> str | None:
    """Digest of the code a stage ran: the contents of its dependencies in ``dvc_yaml`` that no stage
    writes (its scripts and package code; data and version.lock are other stages' outputs). None when
    there is no such dvc.yaml or stage."""
    path = Path(dvc_yaml)
    try:
        stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return None
    if stage not in stages:
        return None
    written = set()
    for spec in stages.values():
        for key in ("outs", "metrics", "plots"):
            for out in (spec or {}).get(key) or []:
                written.add(next(iter(out)) if isinstance(out, dict) else str(out))
    base = path.parent
    entries = []
    for dep in (stages[stage] or {}).get("deps") or []:
        dep = str(dep)
        if dep in written or not (base / dep).exists():
            continue
        entries += [(f"{dep}/{rel}" if rel else dep, f) for rel, f in files_of(base / dep) if "__pycache__" not in rel]
    return digest_files(entries) if entries else None


def metrics_stamp(full: dict) -> dict:
    """The short form for ``run.json``: two digests (the trainer adds the code's)."""
    data = list(full.get("inputs", {}).values())
    short = {"params": full["params_sha256"], "data": data[0] if len(data) == 1 else params_digest(full["inputs"])}
    if full.get("image"):
        short["image"] = full["image"]
    return short


def read_store_stamp(path: str | os.PathLike) -> dict | None:
    """The stamp in a zarr v3 store's root attributes (read from ``zarr.json``, no zarr needed)."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    return (json.loads(meta.read_text()).get("attributes") or {}).get(KEY)


def differences(stamped: dict[str, Any], given: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, stamped value, given value) for every stamped key the given params set otherwise.

    A key the given params do not have (defaults apply) is not compared.
    """
    out = []
    a, b = _normal(stamped), _normal(given)
    for key in sorted(a):
        if key in b and a[key] != b[key]:
            out.append((key, stamped[key], given[key]))
    return out


def fix_hint(stage: str) -> str:
    return f"rebuild it with `dvc repro --force --single-item {stage}` then `dvc repro`"


def chain_problems(
    what: str, st: dict | None, flat_given: dict[str, Any], params_file: str, dvc_yaml: str | os.PathLike = "dvc.yaml"
) -> list[str]:
    """One line per stamp in the chain of ``st`` whose params differ from ``flat_given``."""
    lines = []
    while st:
        stage = st.get("stage", "?")
        given = select(flat_given, stage, dvc_yaml)
        for key, was, now in differences(st.get("params") or {}, given):
            lines.append(
                f"{what}: made with {key}={was!r} but {params_file} has {key}={now!r}; "
                f"the output does not match its params: {fix_hint(stage)}"
            )
        st = st.get("upstream")
        if st:
            what = f"{what.split(' (')[0]} (its input, made by stage '{st.get('stage', '?')}')"
    return lines


def check_input(
    path: str | os.PathLike, params_file: str | os.PathLike = "params.yaml", dvc_yaml: str | os.PathLike = "dvc.yaml"
) -> None:
    """Refuse an input store whose stamp disagrees with the params this stage was given.

    A store without a stamp (made by an older version) passes.
    """
    st = read_store_stamp(path)
    if not st:
        return
    flat = used_params(params_file)
    problems = chain_problems(str(path), st, flat, str(params_file), dvc_yaml)
    if problems:
        more = f" (and {len(problems) - 1} more; `virgo-exps verify` lists them)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)


def _read_json_object(path: Path, what: str) -> dict:
    try:
        why = fsio.trust_refusal(path)
        if why:
            raise DamagedInputError(f"{path}: not read: {why}; {fix_hint('train')}")
        data = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise DamagedInputError(f"{path}: cannot be read ({exc.strerror}); {fix_hint('train')}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedInputError(f"{path}: not {what} (not JSON: {exc}); {fix_hint('train')}") from exc
    if not isinstance(data, dict):
        raise DamagedInputError(f"{path}: not {what} (not a JSON object); {fix_hint('train')}")
    return data


def read_metrics(path: str | os.PathLike) -> dict:
    """A run's record: ``metrics.json`` of this user's and the ``run.json`` beside it, if any, as one mapping
    (:func:`virgo_exps.records.merge`); :class:`DamagedInputError` names a file that is not a JSON object."""
    measures = _read_json_object(Path(path), "a metrics file")
    described = run_file(path)
    if not described.exists() and not described.is_symlink():
        return measures
    return merge(measures, _read_json_object(described, "a run description"))


def check_metrics(
    path: str | os.PathLike,
    params_file: str | os.PathLike = "params.yaml",
    dvc_yaml: str | os.PathLike = "dvc.yaml",
    stage: str = "train",
) -> None:
    """Refuse a run's record (``metrics.json`` and its ``run.json``) whose params digest is not that of the
    params this stage was given."""
    st = read_metrics(path).get(KEY)
    if not isinstance(st, dict) or "params" not in st:
        return
    described = run_file(path)  # the file that holds the stamp (an older record: metrics.json itself)
    where = described if described.exists() else path
    flat = used_params(params_file)
    expected = params_digest(select(flat, stage, dvc_yaml))
    if st["params"] != expected:
        raise ConfigError(
            f"{where}: made with other {stage} params than {params_file} gives (params digest {st['params']}, "
            f"expected {expected}); the output does not match its params: `virgo-exps verify` names the key; "
            f"{fix_hint(stage)}"
        )
