"""Outputs carry the params they were made with; `virgo-exps verify` and the next stage catch a mismatch;
`virgo-exps run` records no experiment when nothing changed. Real dvc on a tiny copy of the repository.

The tests share one pipeline run and run in file order (later ones change the workspace).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from conftest import BIN, make_repo, sh, tool_env
from virgo_exps.experiments.verify_sources import exp_refs, same_as_baseline

pytestmark = pytest.mark.slow


def dvc(repo, *args, check=True):
    return sh([str(BIN / "dvc"), *args], repo, check=check)


def virgo(repo, *args, check=True):
    return sh([str(BIN / "virgo-exps"), *args], repo, check=check)


def exp_names(repo) -> list[str]:
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    return [run["name"] for rev in shown for exp in (rev.get("experiments") or []) for run in exp["revs"]]


def set_lock_param(repo, stage: str, section: str, key: str, value) -> None:
    """Edit dvc.lock behind DVC's back, as the refused second `dvc exp run` leaves it."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    lock["stages"][stage]["params"]["params.yaml"][f"{section}.{key}"] = value
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def set_param(repo, section: str, key: str, value) -> None:
    text = (repo / "params.yaml").read_text()
    params = yaml.safe_load(text)
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("verify") / "repo")
    first = virgo(repo, "run")
    return repo, first


def test_outputs_carry_their_params_and_input_digests(ran):
    repo, first = ran
    assert "Stages run: environment, generate, preprocess, train, report" in first.stdout
    raw = json.loads((repo / "data/raw.zarr/zarr.json").read_text())["attributes"]["provenance"]
    assert raw["stage"] == "generate" and raw["params"]["generate.n_samples"] == 40
    assert "generate.workers" not in raw["params"]  # not a dvc.yaml param: it does not change the data
    images = json.loads((repo / "data/images.zarr/zarr.json").read_text())["attributes"]["provenance"]
    assert images["params"]["preprocess.patch_size"] == 16 and list(images["inputs"]) == ["data/raw.zarr"]
    assert images["upstream"] == raw
    model = torch.load(repo / "results/model.pt", weights_only=False)["provenance"]
    assert model["params"]["train.seed"] == 0 and "train.max_requeues" not in model["params"]
    assert model["upstream"] == images and list(model["inputs"]) == ["data/images.zarr"]
    metrics = json.loads((repo / "results/run.json").read_text())["provenance"]
    from virgo_exps.provenance import stage_code_digest

    code = stage_code_digest("train", repo / "dvc.yaml")
    assert metrics == {"params": model["params_sha256"], "data": model["inputs"]["data/images.zarr"], "code": code}
    assert code and len(code) == 16


def test_run_with_nothing_changed_records_no_experiment(ran):
    repo, _ = ran
    before = exp_names(repo)
    assert len(before) == 1, before
    again = virgo(repo, "run")
    assert "Pipeline is up to date, no experiment recorded" in again.stdout, again.stdout
    assert "results/metrics.json" in again.stdout and "(missing)" not in again.stdout
    assert "Running stage" not in again.stdout + again.stderr
    assert exp_names(repo) == before


def test_only_a_plain_run_is_checked_first():
    from virgo_exps.cli.main import _plain_run

    assert _plain_run([]) and _plain_run(["-n", "x", "-q"]) and _plain_run(["--name=x", "-m", "note"])
    for args in (["-S", "train.lr=0.1"], ["--queue"], ["-f"], ["train"], ["-n", "x", "--run-all"]):
        assert not _plain_run(args), args  # DVC alone decides


def test_verify_passes_on_a_consistent_workspace(ran):
    repo, _ = ran
    out = virgo(repo, "verify")
    assert out.returncode == 0
    assert "verify: workspace: every check passed" in out.stdout
    for rel in ("data/raw.zarr", "data/images.zarr", "results/model.pt", "results/run.json"):
        assert f"ok: {rel}: made with the params of params.yaml" in out.stdout, out.stdout
    assert re.search(r"ok: data/images.zarr: read all \d+ chunk\(s\) of 8 array\(s\)", out.stdout), out.stdout
    assert "ok: dvc.lock vs files" in out.stdout


def test_verify_an_experiment_from_git_and_the_cache_and_one_identical_to_its_baseline(ran):
    repo, _ = ran
    first = exp_names(repo)[0]
    out = virgo(repo, "verify", "--exp", first)
    assert out.returncode == 0 and f"verify: experiment {first}: every check passed" in out.stdout, out.stdout
    assert "ok: results/model.pt: made with the params of params.yaml" in out.stdout
    # Commit the results, then let DVC record an experiment with nothing changed.
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "results"], repo)
    head = sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    dvc(repo, "exp", "run", "-n", "dup")
    assert "dup" in exp_names(repo)  # what DVC does on its own
    out = virgo(repo, "verify", "--exp", "dup")
    assert out.returncode == 0
    assert f"note: experiment dup is identical to its baseline {head[:7]}" in out.stdout, out.stdout
    assert same_as_baseline(repo) == {"dup": head}
    assert "Pipeline is up to date, no experiment recorded" in virgo(repo, "run").stdout
    missing = virgo(repo, "verify", "--exp", "nosuch", check=False)
    assert missing.returncode == 2 and "--exp nosuch: no such experiment" in missing.stderr


def commit_with(repo, rev: str, rel: str, data: bytes, tmp_path) -> str:
    """A commit of ``rev`` with ``rel`` replaced by ``data``, made with git's plumbing as a teammate's
    edited push would arrive."""
    edited = tmp_path / "edited"
    edited.write_bytes(data)
    blob = sh(["git", "hash-object", "-w", str(edited)], repo).stdout.strip()
    env = tool_env({"GIT_INDEX_FILE": str(tmp_path / "index")})
    sh(["git", "read-tree", rev], repo, env)
    sh(["git", "update-index", "--cacheinfo", f"100644,{blob},{rel}"], repo, env)
    tree = sh(["git", "write-tree"], repo, env).stdout.strip()
    return sh(["git", "commit-tree", tree, "-p", rev, "-m", "edited"], repo, env).stdout.strip()


def test_verify_an_experiment_whose_git_held_outputs_were_edited_after_the_run(ran, tmp_path):
    """results/metrics.json with val_loss halved, and one line of the report (a file in a folder output
    git holds) changed: verify --exp names the output and fails; the unedited experiment passes."""
    repo, _ = ran
    first = exp_names(repo)[0]
    rev = exp_refs(repo)[first]
    metrics = json.loads(sh(["git", "show", f"{rev}:results/metrics.json"], repo).stdout)
    metrics["val_loss"] /= 2
    report = sh(["git", "show", f"{rev}:results/report/report.md"], repo).stdout
    edits = {
        "results/metrics.json": (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode(),
        "results/report/report.md": report.replace("val", "VAL", 1).encode(),
    }
    for rel, data in edits.items():
        commit = commit_with(repo, rev, rel, data, tmp_path)
        out = virgo(repo, "verify", "--exp", commit, check=False)
        output = out.stdout + out.stderr
        assert out.returncode != 0, output
        named = rel if rel.endswith(".json") else "results/report"
        assert f"{named}: its content in the experiment (MD5" in output, output
        assert "it was changed after the run" in output
    ok = virgo(repo, "verify", "--exp", rev)
    assert "ok: git-held outputs:" in ok.stdout and "match their MD5 in dvc.lock" in ok.stdout, ok.stdout


def test_verify_finds_a_corrupt_cache_object(ran):
    repo, _ = ran
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["preprocess"]["outs"] if o["path"] == "data/images.zarr")
    cache = repo / ".dvc/cache/files/md5"
    entry = next(e for e in json.loads((cache / md5[:2] / md5[2:]).read_text()) if e["relpath"].startswith("train/x/c"))
    obj = cache / entry["md5"][:2] / entry["md5"][2:]
    data = bytearray(obj.read_bytes())
    obj.chmod(0o644)
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    try:
        out = virgo(repo, "verify", check=False)
        assert out.returncode == 1, out.stdout
        assert f"FAIL: data/images.zarr/{entry['relpath']}: the DVC cache object" in out.stderr, out.stderr
        assert "is corrupt" in out.stderr and "dvc pull data/images.zarr" in out.stderr
    finally:
        data[len(data) // 2] ^= 0xFF
        obj.write_bytes(bytes(data))


def test_train_refuses_data_made_with_other_preprocess_params(ran):
    repo, _ = ran
    saved = {p: (repo / p).read_text() for p in ("params.yaml", "dvc.lock")}
    try:
        set_param(repo, "preprocess", "split_seed", 1)
        set_lock_param(repo, "preprocess", "preprocess", "split_seed", 1)
        assert json.loads(dvc(repo, "status", "--json").stdout).keys() <= {"environment"}
        out = dvc(repo, "repro", "--force", "--single-item", "train", check=False)
        assert out.returncode != 0
        assert (
            "error: data/images.zarr: made with preprocess.split_seed=0 but params.yaml has preprocess.split_seed=1"
        ) in out.stderr + out.stdout, out.stderr[-3000:]
        assert "dvc repro --force --single-item preprocess" in out.stderr + out.stdout
    finally:
        for p, text in saved.items():
            (repo / p).write_text(text)
        dvc(repo, "checkout", "--force")
        # the outputs git holds (cache: false), removed by DVC before the stage ran; committed above
        sh(["git", "checkout", "HEAD", "--", "results"], repo)
    assert virgo(repo, "verify").returncode == 0


def test_a_recorded_result_of_a_diverged_run_is_no_result_for_verify_and_the_report(ran):
    """metrics.json with a loss that is not a finite number (an older trainer's record of a diverged run,
    or an edit): verify says it is no result, and the report stage refuses it with one line; the rule is
    the trainer's own (virgo_exps.train.outcome)."""
    repo, _ = ran
    path = repo / "results" / "metrics.json"
    kept = path.read_text()
    try:
        metrics = json.loads(kept)
        metrics["val_loss"] = None
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        out = virgo(repo, "verify", check=False)
        assert out.returncode == 1, out.stdout
        assert (
            "FAIL: results/metrics.json: not a successful run's result: val_loss is None, not a finite number"
        ) in out.stderr, out.stderr
        report = dvc(repo, "repro", "--force", "--single-item", "report", check=False)
        text = report.stdout + report.stderr
        assert report.returncode != 0 and "Traceback" not in text, text[-3000:]
        assert "error: results/metrics.json: not a successful run's result: val_loss is None" in text, text[-3000:]
    finally:
        path.write_text(kept)
    dvc(repo, "repro", "--single-item", "report")
    out = virgo(repo, "verify")
    assert "ok: results/metrics.json: a successful run's" in out.stdout, out.stdout


def test_params_changed_behind_dvc_are_caught_by_verify_and_the_next_stage(ran):
    """The end state of two `dvc exp run` at once (the second refused by DVC's lock after it wrote
    params.yaml): params.yaml and dvc.lock say seed 12, the outputs were made with seed 0, and
    `dvc status` is clean. Built here deterministically by editing both files behind DVC's back."""
    repo, _ = ran
    set_param(repo, "train", "seed", 12)
    set_lock_param(repo, "train", "train", "seed", 12)
    set_lock_param(repo, "report", "train", "seed", 12)  # the report's reference loss uses it too
    assert json.loads(dvc(repo, "status", "--json").stdout).keys() <= {"environment"}  # DVC sees nothing
    out = virgo(repo, "verify", check=False)
    assert out.returncode == 1, out.stdout
    assert (
        "FAIL: results/model.pt: made with train.seed=0 but params.yaml has train.seed=12; dvc.lock says train.seed=12"
    ) in out.stderr, out.stderr
    assert re.search(
        r"FAIL: results/run.json: made with other train params than params.yaml gives "
        r"\(digest \w+, expected \w+\); made with train.seed=0, params.yaml has train.seed=12",
        out.stderr,
    ), out.stderr
    assert "dvc repro --force --single-item train" in out.stderr
    assert "verify: workspace: 2 problem(s)" in out.stderr
    # the next stage that reads the metrics refuses them
    report = dvc(repo, "repro", "--force", "--single-item", "report", check=False)
    assert report.returncode != 0
    assert "error: results/run.json: made with other train params than params.yaml gives" in (
        report.stderr + report.stdout
    ), report.stderr[-3000:]
    # the same state committed: verify reads it from git and the DVC cache
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "seed 12 beside outputs of seed 0"], repo)
    out = virgo(repo, "verify", "--exp", "HEAD", check=False)
    assert out.returncode == 1
    assert "FAIL: results/model.pt: made with train.seed=0 but params.yaml has train.seed=12" in out.stderr
