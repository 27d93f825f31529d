"""A rank that stops making progress is noticed, named with its host, and the run ends.

The train stage as DVC runs it (launcher, real torchrun, 2 DDP ranks on CPU); rank 1 is made to hang
at a step (VIRGO_FAULT_HANG) and the machine profile's stall_limit is a few seconds.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import yaml

from conftest import make_repo, sh, tool_env, train_stage_cmd, write_images

LIMIT = 6


@pytest.mark.slow
def test_a_stuck_rank_ends_the_run_with_one_line_naming_it(tmp_path):
    repo = make_repo(tmp_path / "repo")
    write_images(repo / "data" / "images.zarr", seed=5)
    profile = repo / "machines" / "local" / "machine.yaml"
    spec = yaml.safe_load(profile.read_text())
    spec["stall_limit"] = LIMIT
    profile.write_text(yaml.safe_dump(spec))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(strategy="ddp", procs_per_node=2, epochs=2, global_batch_size=8, profile_steps=0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    started = time.monotonic()
    proc = sh(
        train_stage_cmd("params.yaml", "out"), repo, tool_env({"VIRGO_FAULT_HANG": "1:3"}), check=False, timeout=600
    )
    took = time.monotonic() - started
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    lines = [ln for ln in out.splitlines() if "made no progress" in ln]
    assert len(lines) == 1, out[-3000:]
    host = socket.gethostname()
    assert lines[0].startswith(f"error: train: rank 1 on {host} (last seen at epoch 1, step "), lines[0]
    assert f"made no progress for {LIMIT} s (stall_limit of the machine profile)" in lines[0]
    assert took < 300, took  # not the hour the stuck rank would sleep
    assert not (repo / "out" / "metrics.json").exists()
    marked = [json.loads(p.read_text()) for p in (repo / ".virgo" / "snapshots").glob("*/status.json")]
    assert [(m["status"], m["rank"], m["host"], m["epoch"]) for m in marked] == [("stalled", 1, host, 1)], marked
