"""``virgo-exps verify``: can the results of a workspace or an experiment be trusted?

Checks, for the workspace (default) or one experiment (``--exp NAME``):

1. params vs outputs: every output's provenance stamp (see
   :mod:`virgo_exps.provenance`) against ``params.yaml`` and ``dvc.lock``, and
   the digest of the input data recorded in the stamp against that input now;
2. ``dvc.lock`` vs files: ``dvc status`` (workspace only), and every cache
   object of every output against its MD5 (a corrupted cache object is
   otherwise used silently by ``dvc checkout``);
3. the stores: every chunk of every array of every zarr output is read and
   decoded (workspace only; the codecs' checksums fail on a changed byte).

An experiment is read from its git ref and the DVC cache without applying it
(:mod:`virgo_exps.experiments.verify_sources`); the checks themselves are in
:mod:`virgo_exps.experiments.verify_checks`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from virgo_exps.experiments.verify_checks import (
    Report,
    check_cache,
    check_dvc_status,
    check_git_outputs,
    check_outcome,
    check_stamps,
    check_stores,
)
from virgo_exps.experiments.verify_sources import Experiment, Workspace, baseline_of


def verify(repo: str | Path = ".", exp: str | None = None, read_chunks: bool = True) -> Report:
    repo = Path(repo).resolve()
    report = Report()
    dvc_yaml = repo / "dvc.yaml"
    if exp is None:
        src = Workspace(repo)
    else:
        src = Experiment(repo, exp)
        base = baseline_of(repo, src.rev)
        if base:
            report.notes.append(
                f"experiment {exp} is identical to its baseline {base[:7]} (nothing changed when it "
                f"ran): it is that baseline's result, not a new one"
            )
        text = src.text("dvc.yaml")
        if text is not None:
            dvc_yaml = repo / ".dvc" / "tmp" / "verify" / "dvc.yaml"
            dvc_yaml.parent.mkdir(parents=True, exist_ok=True)
            dvc_yaml.write_text(text)
    lock = yaml.safe_load(src.text("dvc.lock") or "") or {}
    check_stamps(src, report, dvc_yaml)
    check_outcome(src, report, dvc_yaml)
    check_cache(src, report, lock)  # before `dvc status`, which deletes a corrupt object it comes across
    if exp is None:
        check_dvc_status(repo, report)
    else:
        check_git_outputs(src, report, lock)
    if exp is None and read_chunks:
        check_stores(repo, report, dvc_yaml)
    return report
