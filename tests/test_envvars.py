"""Every VIRGO_* environment variable is in one registry (virgo_exps.envvars, `virgo-exps env`), and none
that changes a result is read anywhere."""

from __future__ import annotations

import re

from conftest import BIN, ROOT, sh
from virgo_exps.envvars import VARIABLES

WHERE = ["src", "stages", "scripts", "machines", "Makefile"]
NAME = re.compile(r"\bVIRGO_[A-Z0-9_]*[A-Z0-9]\b")


def used_names() -> dict[str, set[str]]:
    """Each VIRGO_* name in the code, the scripts and the machine profiles, with the files it is in."""
    found: dict[str, set[str]] = {}
    for top in WHERE:
        path = ROOT / top
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            if f.suffix in (".pyc",) or "__pycache__" in f.parts:
                continue
            try:
                text = f.read_text()
            except (UnicodeDecodeError, OSError):
                continue
            for name in NAME.findall(text):
                found.setdefault(name, set()).add(str(f.relative_to(ROOT)))
    return found


def test_every_variable_the_code_reads_is_registered_and_every_registered_one_is_used():
    used = used_names()
    registered = {v.name for v in VARIABLES}
    assert len(used) > 10  # the scan finds them at all
    assert sorted(set(used) - registered) == [], {n: used[n] for n in set(used) - registered}
    assert sorted(registered - set(used)) == []


def test_the_training_reads_no_variable_but_registered_ones_that_change_no_result():
    """The two that changed results (the ZeRO stage, the collective backend) are params now; what the
    trainer reads is a fault hook of the tests, a timeout, where to keep the node's data copy, the sweep
    trial it reports to, or the MLflow experiment it logs to."""
    used = used_names()
    in_train = {n for n, files in used.items() if any(f.startswith("src/virgo_exps/train/") for f in files)}
    allowed = {"VIRGO_DIST_TIMEOUT_S", "VIRGO_NODE_DATA", "VIRGO_SWEEP_TRIAL", "VIRGO_MLFLOW_EXPERIMENT"}
    allowed |= {v.name for v in VARIABLES if v.name.startswith("VIRGO_FAULT_")}
    assert in_train <= allowed, sorted(in_train - allowed)
    assert "VIRGO_ZERO_STAGE" not in used and "VIRGO_DIST_BACKEND" not in used


def test_virgo_exps_env_lists_each_with_its_meaning():
    out = sh([str(BIN / "virgo-exps"), "env"], ROOT).stdout
    for v in VARIABLES:
        line = next(ln for ln in out.splitlines() if ln.startswith(v.name + " "))
        assert v.meaning in line and v.set_by in line, line
