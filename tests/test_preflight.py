"""Values that cannot work are refused by the first stage, before any output is touched.

One pipeline run (module fixture) gives a repository with data and results;
then each bad value goes through the real ``dvc exp run -S ...``: DVC must
fail in the 'environment' stage with one ``error:`` line and the line that
says how to restore params.yaml, ``data/`` and ``results/`` must be
byte-identical afterwards, ``virgo-exps check`` must print the same line,
and ``git checkout params.yaml`` must bring the committed file back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from conftest import BIN, ROOT, make_repo, sh, tool_env, update_params
from virgo_exps.config import ConfigError, params_from_dict

HINT = "`git checkout params.yaml` restores the committed values"


def outputs_hashes(repo) -> dict[str, str]:
    """sha256 of every file under data/ and results/, by path."""
    found = {}
    for folder in ("data", "results"):
        for path in sorted((repo / folder).rglob("*")):
            if path.is_file():
                found[path.relative_to(repo).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A repository after one whole pipeline run, its outputs committed as the baseline."""
    repo = make_repo(tmp_path_factory.mktemp("preflight") / "repo", {"train": {"epochs": 1}})
    sh([str(BIN / "dvc"), "exp", "run"], repo)
    sh(["git", "add", "dvc.lock", "version.lock"], repo)
    sh(["git", "commit", "-q", "-m", "results"], repo)
    hashes = outputs_hashes(repo)
    assert "results/metrics.json" in hashes and any(p.startswith("data/raw.zarr/") for p in hashes)
    return repo, hashes


@dataclass(frozen=True)
class Case:
    name: str
    sets: tuple[str, ...]  # -S values, as a user types them
    line: str  # the start of the error line
    pattern: str = ""  # a regular expression the line must also match
    skip: str = ""  # why this machine cannot show the case


def _cases() -> list[Case]:
    cores = os.cpu_count() or 1
    procs = 2 ** math.ceil(math.log2(cores + 1))  # more than the cores, and divides the global batch
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    return [
        Case(
            "nodes-on-local",
            ("train.strategy=ddp", "train.nodes=2"),
            "error: train.nodes: 2 nodes need a SLURM machine; the local machine runs one node "
            "(set VIRGO_MACHINE=<cluster profile> or train.nodes=1)",
        ),
        Case(
            "procs-over-cores",
            ("train.strategy=ddp", f"train.procs_per_node={procs}", f"train.global_batch_size={procs}"),
            f"error: train.procs_per_node: {procs} processes do not fit the {cores} cores of machine 'local'; "
            "lower it or run on a cluster",
            skip="more than 32 cores" if procs > 32 else "",
        ),
        Case(
            "horovod-not-built",
            ("train.strategy=horovod",),
            "error: train.strategy: 'horovod' needs Horovod, which is not built in this environment; "
            "run `make horovod`",
        ),
        Case(
            "cuda-without-gpu",
            ("preprocess.device=cuda",),
            "error: preprocess.device: 'cuda' is not available: ",
            pattern=r"; set preprocess.device=cpu$",
            skip="this machine has a CUDA GPU" if gpu else "",
        ),
        Case(
            "seed-too-large",
            ("train.seed=99999999999999999999999",),
            "error: train.seed: 99999999999999999999999 is not allowed; expected an integer from 0 to "
            "4294967295 (2**32 - 1)",
        ),
        Case(
            "integer-beyond-64-bits",
            ("train.epochs=100000000000000000000",),
            "error: train.epochs: 100000000000000000000 is out of range; numpy and torch take 64-bit "
            "integers, at most 9223372036854775807",
        ),
        Case(
            "data-over-disk",
            ("generate.n_samples=100000000000",),
            "error: generate.n_samples: 100000000000 samples need up to ",
            pattern=r"need up to [\d.]+ TB on disk \(raw series [\d.]+ TB \+ images [\d.]+ TB.*\) but "
            r"[\d.]+ [kMGT]?B are free on the file system of data/; lower generate.n_samples",
        ),
        Case(
            "blank-title",
            ("report.title='   '",),
            "error: report.title: '   ' is not allowed; expected a string with at least one visible character",
        ),
    ]


CASES = _cases()


def without_free_space(line: str) -> str:
    """The line without what is free or available: that changes from one moment to the next."""
    return re.sub(r"[\d.]+ [kMGT]?B are (free|available)", r"... are \1", line)


def venv_without_horovodrun(dest: Path) -> tuple[dict, list[str]]:
    """This venv seen through a folder without ``horovodrun``: Horovod is "not built" there.

    Returns the environment (that folder's python first on PATH, as after
    activating it) and the ``virgo-exps check`` command run by that python.
    """
    real = BIN.parent
    (dest / "bin").mkdir(parents=True)
    (dest / "pyvenv.cfg").write_text((real / "pyvenv.cfg").read_text())
    (dest / "lib").symlink_to(real / "lib", target_is_directory=True)
    for name in ("python", "python3"):
        (dest / "bin" / name).symlink_to(real / "bin" / name)
    env = tool_env()
    env["PATH"] = f"{dest / 'bin'}{os.pathsep}{env['PATH']}"
    check = [str(dest / "bin" / "python"), "-c", "from virgo_exps.cli.main import main; main(['check'])"]
    return env, check


def assert_refused(
    repo, before: dict, sets: tuple[str, ...], line: str, pattern: str = "", env=None, check_cmd=None
) -> None:
    """``dvc exp run -S <sets>`` fails in the first stage with ``line``; nothing else changes."""
    committed = (repo / "params.yaml").read_bytes()
    lock = (repo / "version.lock").read_bytes()
    args = [a for value in sets for a in ("-S", value)]
    proc = sh([str(BIN / "dvc"), "exp", "run", *args], repo, env=env, check=False)
    text = proc.stdout + proc.stderr
    try:
        assert proc.returncode == 255, text
        assert "failed to reproduce 'environment'" in text, text
        assert "Running stage 'generate'" not in text and "Running stage 'train'" not in text, text
        errors = [row for row in text.splitlines() if row.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(line), text
        assert re.search(pattern, errors[0]), errors[0]
        assert (
            f"params.yaml differs from the last commit (`dvc exp run -S` writes its values there before "
            f"any stage runs): {HINT}" in text.splitlines()
        ), text
        assert outputs_hashes(repo) == before
        assert (repo / "version.lock").read_bytes() == lock
        # DVC left the refused value in params.yaml: the check sees it and says the same.
        assert (repo / "params.yaml").read_bytes() != committed
        check = sh(check_cmd or [str(BIN / "virgo-exps"), "check"], repo, env=env, check=False)
        assert check.returncode == 2, check.stdout + check.stderr
        assert without_free_space(check.stderr.splitlines()[0]) == without_free_space(errors[0])
        assert HINT in check.stderr.splitlines()[1]
        assert check.stdout == ""
    finally:
        sh(["git", "checkout", "params.yaml"], repo)  # what the hint tells the user to do
    assert (repo / "params.yaml").read_bytes() == committed


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refused_in_the_first_stage_with_outputs_untouched(ran, case, tmp_path):
    if case.skip:
        pytest.skip(case.skip)
    repo, before = ran
    env = check_cmd = None
    if case.name == "horovod-not-built" and (BIN / "horovodrun").exists():
        env, check_cmd = venv_without_horovodrun(tmp_path / "venv")
    assert_refused(repo, before, case.sets, case.line, case.pattern, env=env, check_cmd=check_cmd)


@pytest.mark.slow
def test_data_over_memory_is_not_refused(ran):
    """Images larger than memory: training reads its node's copy through the page cache, so the check passes."""
    import psutil

    from virgo_exps.store import format_bytes

    repo, _ = ran
    patch, per_sample = 128, 4 * 128 * 128 * 4  # images of 1 main + 3 aux channels, float32
    n = math.ceil(1.1 * psutil.virtual_memory().available / per_sample)  # images = 1.1 x memory
    raw = n * 4 * 1024 * 4  # TINY: 4 s at 256 Hz
    if 2 * (raw + n * per_sample) > 0.8 * shutil.disk_usage(repo).free:
        pytest.skip(f"{format_bytes(2 * (raw + n * per_sample))} of data would not fit the disk")
    update_params(repo, {"generate": {"n_samples": n}, "preprocess": {"patch_size": patch}})
    try:
        check = sh([str(BIN / "virgo-exps"), "check"], repo, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        memory = re.search(r"~([\d.]+) ([kMGT]?)B of memory", check.stdout)
        assert memory, check.stdout
        assert float(memory[1]) * 1000 ** " kMGT".index(memory[2] or " ") < n * per_sample / 10, check.stdout
    finally:
        sh(["git", "checkout", "params.yaml"], repo)


@pytest.mark.slow
def test_check_passes_on_the_committed_params_and_prints_the_budget(ran):
    repo, _ = ran
    proc = sh([str(BIN / "virgo-exps"), "check"], repo)
    assert re.fullmatch(
        r"params.yaml: valid; machine: local \(local\); data needs up to [\d.]+ [kMGT]?B on disk "
        r"\([\d.]+ [kMGT]?B free\), ~[\d.]+ [kMGT]?B of memory \([\d.]+ [kMGT]?B available\)\n",
        proc.stdout,
    )
    assert proc.stderr == ""  # params.yaml equals the commit: no hint


# -- single functions, on constructed inputs -------------------------------------


def _params(**train):
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update(train)
    return params_from_dict(raw)


def test_memory_budget_names_the_numbers():
    from virgo_exps.preflight import Budget, check_budget

    params = _params()
    fits = Budget(
        outputs=(("raw series", 10**6), ("images", 10**6)),
        subject=f"generate.n_samples: {params.generate.n_samples} samples",
        lower="lower generate.n_samples (or generate.n_aux, generate.duration, generate.sample_rate, "
        "preprocess.patch_size)",
        disk=4 * 10**6,
        disk_free=10**9,
        copies=2,
        cache_disk=0,
        cache_free=0,
        memory=10**6,
        memory_what="preprocess: split indices",
        memory_free=10**9,
    )
    check_budget(params, fits)
    with pytest.raises(ConfigError) as err:
        check_budget(params, replace(fits, memory=3 * 10**10, memory_free=2 * 10**10))
    assert str(err.value) == (
        f"generate.n_samples: {params.generate.n_samples} samples need ~30.0 GB of memory (preprocess: split "
        "indices) but 20.0 GB are available on this machine; lower generate.n_samples "
        "(or generate.n_aux, generate.duration, generate.sample_rate, preprocess.patch_size)"
    )
    with pytest.raises(ConfigError, match=r"in DVC's cache .* but 1.0 kB are free on its file system"):
        check_budget(params, replace(fits, copies=1, cache_disk=10**6, cache_free=1000))


@pytest.mark.parametrize(
    "dvc_config,copies", [("", 2), ('[cache]\n    type = "reflink,symlink"\n', 1)], ids=["copies", "links-only"]
)
def test_estimate_counts_the_stores_per_copy_and_each_training_process(tmp_path, monkeypatch, dvc_config, copies):
    from pathlib import Path

    from virgo_exps.machines import Machine
    from virgo_exps.preflight import estimate

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(dvc_config)
    monkeypatch.chdir(tmp_path)
    for name in ("DVC_ROOT", "VIRGO_HOME"):
        monkeypatch.delenv(name, raising=False)
    params = _params(strategy="ddp", procs_per_node=2)
    g = params.generate
    budget = estimate(params, Machine(name="local", kind="local", path=Path(tmp_path)))
    sizes = dict(budget.outputs)
    assert sizes["raw series"] == g.n_samples * (1 + g.n_aux) * int(round(g.duration * g.sample_rate)) * 4
    assert sizes["images"] == g.n_samples * (1 + g.n_aux) * params.preprocess.patch_size**2 * 4
    assert (budget.copies, budget.cache_disk) == (copies, 0)  # the cache is beside data/
    assert budget.disk == copies * (sizes["raw series"] + sizes["images"])
    # training maps one copy of the images per node: no memory peak of its own, whatever procs_per_node
    assert not budget.memory_what.startswith("train")
    single = estimate(_params(strategy="single", procs_per_node=1), Machine(name="local", kind="local", path=tmp_path))
    assert single.memory == budget.memory


def test_slurm_profile_refuses_more_processes_than_gpus(monkeypatch):
    from virgo_exps.machines import load_machine
    from virgo_exps.preflight import check_machine

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    booster = load_machine("juwels-booster")  # 4 GPUs a node
    with pytest.raises(ConfigError, match=r"container.image: /p/project/CHANGE-ME/virgo-exps/virgo.sif does not exist"):
        check_machine(_params(strategy="ddp", procs_per_node=4, global_batch_size=32), booster)
    booster = dataclasses.replace(booster, container=None)  # the jobs in the modules and the venv
    check_machine(_params(strategy="ddp", procs_per_node=4, global_batch_size=32), booster)
    with pytest.raises(ConfigError) as err:
        check_machine(_params(strategy="ddp", procs_per_node=8, global_batch_size=32), booster)
    assert str(err.value).startswith(
        "train.procs_per_node: 8 processes per node but machine 'juwels-booster' requests 4 GPU(s) per node"
    )


@pytest.mark.parametrize("key,value", [("generate", 2**32), ("preprocess", -1)])
def test_every_seed_has_the_32_bit_range(key, value):
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    name = "split_seed" if key == "preprocess" else "seed"
    raw[key][name] = value
    with pytest.raises(
        ConfigError,
        match=rf"^{key}.{name}: {value} is not allowed; expected an integer from 0 to "
        r"4294967295",
    ):
        params_from_dict(raw)
    raw[key][name] = 2**32 - 1
    params_from_dict(raw)
