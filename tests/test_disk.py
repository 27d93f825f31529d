"""A nearly full disk: the first stage counts only what will be written, and a disk that fills during
training ends the run with one line, not a traceback.

Each test mounts a small tmpfs (root only) and fills it, so the disk is really full.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, make_repo, sh, tool_env, train_stage_cmd, write_images

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root"
)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 64 MB at tmp_path/disk, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def make(size: str) -> Path:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
        return mount

    yield make
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder: Path, leave: int) -> None:
    """Write a filler file until ``leave`` bytes are free on the file system of ``folder``."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as fh:
        fh.truncate(0)
        left = free - leave
        block = b"\0" * (1 << 20)
        while left > 0:
            fh.write(block[: min(len(block), left)])
            left -= len(block)


def check(repo):
    return sh([str(BIN / "virgo-exps"), "check"], repo, check=False, timeout=120)


def test_a_run_that_only_trains_is_not_refused_for_the_data_it_will_not_rewrite(small_disk):
    disk = small_disk("64m")
    repo = make_repo(disk / "repo")
    sh(["dvc", "repro", "preprocess"], repo, tool_env(), timeout=600)
    fill(disk, leave=20_000)
    update = yaml.safe_load((repo / "params.yaml").read_text())
    update["train"]["epochs"] = 3  # only train and report rerun
    (repo / "params.yaml").write_text(yaml.safe_dump(update, sort_keys=False))
    proc = check(repo)
    assert proc.returncode == 0, proc.stderr
    update["generate"]["seed"] = 43  # the data stages rerun: their outputs must fit
    (repo / "params.yaml").write_text(yaml.safe_dump(update, sort_keys=False))
    proc = check(repo)
    assert proc.returncode == 2 and "error: generate.n_samples: 40 samples need up to" in proc.stderr, proc.stderr
    update["generate"]["seed"] = 42
    update["preprocess"]["patch_size"] = 8  # preprocess alone reruns: its images must fit, not the raw series
    (repo / "params.yaml").write_text(yaml.safe_dump(update, sort_keys=False))
    from virgo_exps.config import load_params
    from virgo_exps.preflight import stages_up_to_date

    cwd = os.getcwd()
    os.chdir(repo)
    try:
        assert stages_up_to_date(load_params(repo / "params.yaml"), ("generate", "preprocess")) == {"generate"}
    finally:
        os.chdir(cwd)


def test_a_disk_that_fills_during_training_ends_the_run_with_one_line(small_disk, tmp_path):
    disk = small_disk("8m")
    repo = make_repo(tmp_path / "repo", {"train": {"epochs": 2, "profile_steps": 0}})
    write_images(repo / "data" / "images.zarr")
    fill(disk, leave=300_000)
    cmd = train_stage_cmd("params.yaml", str(disk / "out"))
    proc = sh(cmd, repo, tool_env(), check=False, timeout=600)
    assert proc.returncode == 4, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "the disk is full" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"error: train: cannot write {disk}/out/"), proc.stderr[-3000:]
    assert not (disk / "out" / "metrics.json").exists()
