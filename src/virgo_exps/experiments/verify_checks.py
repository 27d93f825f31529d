"""The checks of ``virgo-exps verify`` (:mod:`virgo_exps.experiments.verify`), each adding what it
found to a :class:`Report`: provenance stamps against params, the outcome in the metrics files, DVC
cache objects and git-held outputs against their MD5, ``dvc status``, and every chunk of every store.

A check reads its files through a source of :mod:`virgo_exps.experiments.verify_sources` (the
workspace or an experiment), except those that only a workspace has (``dvc status``, the stores).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from virgo_exps import dvcrun, provenance
from virgo_exps.experiments.verify_sources import Experiment, Workspace, cache_dir, uncached_outs
from virgo_exps.store import missing_chunks
from virgo_exps.train.outcome import metrics_refusal

FIX_CORRUPT = "restore it with `dvc checkout --relink {path}`, or `dvc pull {path}` if the cache copy is bad too"


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return (
            [f"ok: {c}" for c in self.checked]
            + [f"note: {n}" for n in self.notes]
            + [f"FAIL: {p}" for p in self.problems]
        )


def _stage_outs(spec: dict) -> list[str]:
    outs = []
    for key in ("outs", "metrics", "plots"):
        for entry in spec.get(key) or []:
            outs.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return outs


def _read_stamp(src, rel: str) -> tuple[dict | None, str | None]:
    """(stamp, error) of an output: zarr root attributes, the model file, or run.json."""
    files = src.files(rel)
    if not files:
        return None, None
    by_rel = dict(files)
    try:
        if "zarr.json" in by_rel:
            meta = json.loads(by_rel["zarr.json"].read_text())
            return (meta.get("attributes") or {}).get(provenance.KEY), None
        if rel.endswith(".json") and "" in by_rel:
            data = json.loads(by_rel[""].read_text())
            return (data.get(provenance.KEY) if isinstance(data, dict) else None), None
        if rel.endswith((".pt", ".pth")) and "" in by_rel:
            from virgo_exps.modelfile import load_model  # verifies the file's sha256 checksum (torch)

            obj = load_model(by_rel[""])
            return obj.get(provenance.KEY), None
    except FileNotFoundError:
        return None, None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None, None


def _lock_params(lock: dict, stage: str) -> dict[str, Any]:
    raw = (((lock.get("stages") or {}).get(stage) or {}).get("params") or {}).get("params.yaml") or {}
    return provenance.flatten(raw) if any(isinstance(v, dict) for v in raw.values()) else dict(raw)


def check_stamps(src, report: Report, dvc_yaml: Path) -> None:
    params_text = src.text("params.yaml")
    if params_text is None:
        report.problems.append(f"{src.label}: no params.yaml")
        return
    used = provenance.used_params(text=params_text)
    lock = yaml.safe_load(src.text("dvc.lock") or "") or {}
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    digests: dict[str, str] = {}

    def digest_of(rel: str) -> str | None:
        if rel not in digests:
            files = src.files(rel)
            digests[rel] = provenance.digest_files(files) if files else None
        return digests[rel]

    for stage, spec in stages.items():
        keys_given = provenance.select(used, stage, dvc_yaml)
        in_lock = _lock_params(lock, stage)
        for rel in _stage_outs(spec):
            st, err = _read_stamp(src, rel)
            if err:
                report.problems.append(f"{rel}: cannot be read ({err}); {FIX_CORRUPT.format(path=rel)}")
                continue
            if not st:
                if rel.endswith((".zarr", ".pt", "run.json")) and src.files(rel):
                    report.notes.append(f"{rel}: no provenance stamp (made by an older version): not checked")
                continue
            bad = False
            if "params" in st and isinstance(st["params"], dict):
                for key, was, now in provenance.differences(st["params"], keys_given):
                    lock_says = f"; dvc.lock says {key}={in_lock[key]!r}" if key in in_lock else ""
                    report.problems.append(
                        f"{rel}: made with {key}={was!r} but params.yaml has {key}={now!r}{lock_says}: "
                        f"the output does not match its params; {provenance.fix_hint(stage)}"
                    )
                    bad = True
                for rel_in, want in (st.get("inputs") or {}).items():
                    have = digest_of(rel_in)
                    if have is not None and have != want:
                        report.problems.append(
                            f"{rel}: made from {rel_in} with digest {want}, but {rel_in} now has digest {have}: "
                            f"the output is not that of its inputs; {provenance.fix_hint(stage)}"
                        )
                        bad = True
            else:  # the short form in run.json
                expected = provenance.params_digest(keys_given)
                if st.get("params") != expected:
                    model = [o for o in _stage_outs(spec) if o.endswith((".pt", ".pth"))]
                    full = _read_stamp(src, model[0])[0] if model else None
                    named = ""
                    if full and full.get("params_sha256") == st.get("params"):
                        diffs = provenance.differences(full["params"], keys_given)
                        named = "".join(f"; made with {k}={w!r}, params.yaml has {k}={n!r}" for k, w, n in diffs)
                    report.problems.append(
                        f"{rel}: made with other {stage} params than params.yaml gives (digest {st.get('params')}, "
                        f"expected {expected}){named}: the output does not match its params; "
                        f"{provenance.fix_hint(stage)}"
                    )
                    bad = True
            if not bad:
                where = f"inside image {st['image']}" if st.get("image") else "outside any container image"
                report.checked.append(f"{rel}: made with the params of params.yaml ({stage}), {where}")


def check_dvc_status(repo: Path, report: Report) -> None:
    try:
        proc = dvcrun.run(["status", "--json"], repo, timeout=None)
    except dvcrun.DvcError as exc:
        report.problems.append(str(exc))
        return
    try:
        status = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        report.problems.append("`dvc status --json` did not print JSON")
        return
    stale = False
    for stage, changes in status.items():
        real = [c for c in changes if c != "always changed"]
        if real:
            stale = True
            report.problems.append(
                f"dvc.lock vs files: stage {stage}: {json.dumps(real)}: the workspace is not "
                "what dvc.lock records; `dvc exp run` (or `dvc checkout` to restore the outputs)"
            )
    if not stale:
        report.checked.append("dvc.lock vs files: `dvc status` has nothing to reproduce")


def check_cache(src, report: Report, lock: dict) -> None:
    """Every cache object of every output in dvc.lock has the MD5 it is stored under."""
    cache = src.cache if isinstance(src, Experiment) else cache_dir(src.repo)
    n = 0
    uncached = uncached_outs(yaml.safe_load(src.text("dvc.yaml") or "") or {})
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            md5 = out.get("md5")
            if not md5 or out["path"] in uncached:
                continue
            rel = out["path"]
            objects = [("", md5)]
            if md5.endswith(".dir"):
                manifest = cache / "files" / "md5" / md5[:2] / md5[2:]
                if not manifest.is_file():
                    report.problems.append(f"{rel}: not in the DVC cache ({md5}); `dvc pull {rel}` (or `dvc exp pull`)")
                    continue
                objects = [(e["relpath"], e["md5"]) for e in json.loads(manifest.read_text())]
            for sub, obj_md5 in objects:
                obj = cache / "files" / "md5" / obj_md5[:2] / obj_md5[2:]
                where = f"{rel}/{sub}" if sub else rel
                if not obj.is_file():
                    report.problems.append(f"{where}: not in the DVC cache; `dvc pull {rel}` (or `dvc exp pull`)")
                    continue
                h = hashlib.md5()
                with open(obj, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                n += 1
                if h.hexdigest() != obj_md5:
                    report.problems.append(
                        f"{where}: the DVC cache object {obj} is corrupt (its MD5 is {h.hexdigest()}, not {obj_md5}): "
                        f"remove it and `dvc pull {rel}`, or rerun the stage that makes it"
                    )
    report.checked.append(f"DVC cache: {n} object(s) of the outputs in dvc.lock have the right MD5")


def _chunks(arr) -> Iterable[tuple[int, ...]]:
    return itertools.product(*(range(n) for n in arr.cdata_shape))


def check_stores(repo: Path, report: Report, dvc_yaml: Path) -> None:
    """Read and decode every chunk of every array of every zarr output in the workspace."""
    import zarr  # heavy (numpy and the codecs): only the workspace's chunk check reads zarr

    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    for spec in stages.values():
        for rel in _stage_outs(spec):
            path = repo / rel
            if not (path / "zarr.json").is_file():
                continue
            try:
                group = zarr.open_group(str(path), mode="r")
                arrays = [(name, a) for name, a in group.members(max_depth=None) if isinstance(a, zarr.Array)]
            except Exception as exc:
                report.problems.append(
                    f"{rel}: cannot be opened ({type(exc).__name__}: {exc}); " + FIX_CORRUPT.format(path=rel)
                )
                continue
            n, bad = 0, False
            for name, arr in arrays:
                for key in missing_chunks(path, arr):  # zarr reads a missing chunk as zeros, silently
                    report.problems.append(f"{rel}: chunk {key} is missing; " + FIX_CORRUPT.format(path=rel))
                    bad = True
                for idx in _chunks(arr):
                    try:
                        arr.blocks[idx]
                    except Exception as exc:
                        report.problems.append(
                            f"{rel}: array {name}, chunk {'.'.join(map(str, idx))} cannot be read "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                            + FIX_CORRUPT.format(path=rel)
                        )
                        bad = True
                    n += 1
            if not bad:
                report.checked.append(f"{rel}: read all {n} chunk(s) of {len(arrays)} array(s)")


def dvc_md5(files: list[tuple[str, bytes]]) -> str:
    """DVC's MD5 of a folder output: the MD5 of its sorted (relpath, MD5) list as JSON, with ``.dir``."""
    entries = sorted(
        ({"md5": hashlib.md5(data).hexdigest(), "relpath": sub} for sub, data in files), key=lambda e: e["relpath"]
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def check_git_outputs(src: Experiment, report: Report, lock: dict) -> None:
    """Every output git holds (``cache: false``: metrics, per-epoch rows, version.lock) has, in the
    experiment's commit, the MD5 its dvc.lock records: an edit after the run shows here (in a workspace,
    `dvc status` finds it)."""
    n = 0
    for name, stage in (lock.get("stages") or {}).items():
        for out in stage.get("outs") or []:
            rel, md5 = out.get("path"), out.get("md5")
            if rel not in src.uncached or not md5:
                continue
            held = src.git_files(rel)
            if held is None:
                report.problems.append(f"{rel}: in dvc.lock of stage '{name}' but not in the experiment's commit")
                continue
            n += len(held)
            got = dvc_md5(held) if md5.endswith(".dir") else hashlib.md5(held[0][1]).hexdigest()
            if got != md5:
                report.problems.append(
                    f"{rel}: its content in the experiment (MD5 {got}) is not what stage '{name}' wrote "
                    f"(dvc.lock: {md5}); it was changed after the run: do not trust it, rerun the experiment"
                )
    report.checked.append(f"git-held outputs: {n} file(s) match their MD5 in dvc.lock")


def check_outcome(src, report: Report, dvc_yaml: Path) -> None:
    """Each metrics file of ``dvc.yaml`` is a successful run's (:func:`virgo_exps.train.outcome.metrics_refusal`,
    the rule the trainer, the sweeps and the scalability report apply too)."""
    for rel in (yaml.safe_load(dvc_yaml.read_text()) or {}).get("metrics") or []:
        why = src.trust(rel) if isinstance(src, Workspace) else None
        if why:
            fix = f"remove it, then `git checkout -- {rel}` or rerun the train stage"
            report.problems.append(f"{rel}: not read: {why}; {fix}")
            continue
        try:
            text = src.text(rel)
        except OSError as exc:
            report.problems.append(f"{rel}: cannot be read ({exc.strerror}); {FIX_CORRUPT.format(path=rel)}")
            continue
        if text is None:
            continue
        try:
            metrics = json.loads(text)
        except ValueError as exc:
            report.problems.append(f"{rel}: not JSON ({exc}); {FIX_CORRUPT.format(path=rel)}")
            continue
        why = metrics_refusal(metrics)
        if why:
            report.problems.append(f"{rel}: not a successful run's result: {why}; rerun the train stage")
        else:
            report.checked.append(f"{rel}: a successful run's (every loss finite, every epoch done)")
