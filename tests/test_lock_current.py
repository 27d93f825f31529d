"""The committed dvc.lock matches the committed code and params.

A clean checkout of the project (its tracked files, no data, no cache) is what
a new user gets from `git clone`. `dvc status` there may say that outputs are
not in the cache and that dependencies which are other stages' outputs are
missing (a fresh clone has no data), and that the always-changed first stage
looks again; nothing else. A code file or a param whose hash differs from the
lock means the committed results were made by other code: the stage would
rerun in every fresh clone and leave `dvc.lock` and `results/` modified.
Regenerate both with `make run` and commit them with the change.

Training's outputs are held by git, so the same clean checkout, once the
pipeline has run there, has retrained nothing and has no modified file: the
data stages regenerate their outputs byte for byte and nothing downstream of
them reruns.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from conftest import ROOT, _project_files, sh, tool_env


def stage_outputs() -> set[str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = set()
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for out in stage.get(key, []):
                outs.add(next(iter(out)) if isinstance(out, dict) else out)
    return outs


def stale_entries(status: dict, outputs: set[str]) -> list[str]:
    """What in `dvc status --json` says that the lock does not match the files, one line each."""
    stale = []
    for stage, entries in status.items():
        for entry in entries:
            if entry == "always changed":
                continue
            if not isinstance(entry, dict):
                stale.append(f"{stage}: {entry}")
                continue
            for kind, changes in entry.items():
                for path, what in (changes or {}).items():
                    if isinstance(what, dict):  # changed params: {file: {key: state}}
                        stale.extend(f"{stage}: {kind}: {path}: {k} {v}" for k, v in what.items())
                    elif path in outputs and what in ("deleted", "not in cache"):
                        continue  # no data in a fresh clone
                    else:
                        stale.append(f"{stage}: {kind}: {path} {what}")
    return stale


def test_stale_entries_reads_every_kind_of_change():
    status = {
        "environment": ["always changed"],
        "train": [
            {"changed deps": {"data/images.zarr": "deleted", "src/a.py": "modified"}},
            {"changed outs": {"results/model.pt": "not in cache"}},
            {"changed deps": {"params.yaml": {"train.lr": "modified"}}},
        ],
    }
    assert stale_entries(status, {"data/images.zarr", "results/model.pt"}) == [
        "train: changed deps: src/a.py modified",
        "train: changed deps: params.yaml: train.lr modified",
    ]


def clean_checkout(tmp_path: Path) -> tuple[Path, dict]:
    """The project's files (no data, no DVC cache) in a new git repository, as `git clone` gives them."""
    checkout = tmp_path / "clone"
    for rel in _project_files():
        target = checkout / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    env = tool_env()
    sh(["git", "init", "-q", "-b", "main"], checkout, env)
    sh(["git", "add", "-A"], checkout, env)
    sh(["git", "commit", "-q", "-m", "clean checkout"], checkout, env)
    return checkout, env


def test_a_clean_checkout_has_nothing_to_reproduce_but_missing_data(tmp_path):
    checkout, env = clean_checkout(tmp_path)
    proc = sh(["dvc", "status", "--json"], checkout, env)
    status = json.loads(proc.stdout or "{}")
    stale = stale_entries(status, stage_outputs())
    assert not stale, (
        "dvc.lock does not match the committed code and params (every fresh clone would rerun these "
        "stages); run `make run` and commit dvc.lock and results/ with the change:\n  " + "\n  ".join(stale)
    )


def test_the_pipeline_in_a_clean_checkout_retrains_nothing_and_modifies_nothing(tmp_path):
    checkout, env = clean_checkout(tmp_path)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    held = [s for s in ("train", "report") if s in stages]
    proc = sh(["dvc", "status", "--json", *held], checkout, env)
    outs_missing = [
        f"{stage}: {path} {what}"
        for stage, entries in json.loads(proc.stdout or "{}").items()
        for entry in entries
        if isinstance(entry, dict)
        for path, what in (entry.get("changed outs") or {}).items()
    ]
    assert not outs_missing, "outputs a fresh clone lacks or has changed:\n  " + "\n  ".join(outs_missing)
    proc = sh(["dvc", "repro"], checkout, env, timeout=600)
    ran = sorted(set(re.findall(r"Running stage '([^']+)'", proc.stdout)))
    assert set(ran) <= {"environment", "generate", "preprocess"}, f"a fresh clone reran {ran}:\n{proc.stdout[-3000:]}"
    assert "generate" in ran, proc.stdout[-3000:]  # the check above saw a real run, not a cached one
    dirty = sh(["git", "status", "--porcelain"], checkout, env).stdout
    assert dirty == "", f"the pipeline in a fresh clone modified committed files:\n{dirty}"
    status = json.loads(sh(["dvc", "status", "--json"], checkout, env).stdout or "{}")
    assert set(status) <= {"environment"}, status


def test_every_stage_is_in_the_lock():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    locked = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    assert sorted(stages) == sorted(locked), f"dvc.lock lacks {sorted(set(stages) - set(locked))}"
    assert Path(ROOT / "dvc.lock").stat().st_size < 100_000


def changed_value(value):
    """Another value of the same kind (DVC compares values, it does not validate them)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    return {"changed": True}


def test_every_param_that_can_change_a_result_reruns_its_stage(tmp_path):
    """Each key of params.yaml that can change what its stage writes (every spec field without
    ``result=False``) is a param of the stage named after its section: changed in a clean checkout, real
    `dvc status` names it. A key left out of dvc.yaml would let `dvc exp run -S key=value` skip the stage and
    record the old result under the new value."""
    from virgo_exps.config import sections, spec_fields

    checkout, env = clean_checkout(tmp_path)
    params = yaml.safe_load((checkout / "params.yaml").read_text())
    expected = set()
    for name, cls in sections().items():
        for f in spec_fields(cls):
            if f.metadata["result"] and name in params:
                params[name][f.name] = changed_value(params[name].get(f.name, f.default))
                expected.add((name, f"{name}.{f.name}"))
    assert ("train", "train.precision") in expected and ("preprocess", "preprocess.device") in expected
    (checkout / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(sh(["dvc", "status", "--json"], checkout, env).stdout or "{}")
    seen = {
        (stage, key)
        for stage, entries in status.items()
        for entry in entries
        if isinstance(entry, dict)
        for changes in entry.values()
        for what in (changes or {}).values()
        if isinstance(what, dict)
        for key in what
    }
    missing = sorted(f"{key} (stage '{stage}')" for stage, key in expected - seen)
    assert not missing, (
        "params that change a result but are not params of their stage in dvc.yaml (a change would not rerun "
        "it; add them, or declare the key with spec(..., result=False) if it cannot change the output):\n  "
        + "\n  ".join(missing)
    )
