"""The cost a training run records (train/cost.py), from real runs of the train stage on CPU.

- A single process: the ``cost`` dict of metrics.json is consistent (core-hours
  = cores x wall, efficiency = CPU time over allocated time, in (0, 1.05]),
  its wall time lies between the epochs' own times and the stage's wall time
  seen from outside, and its cores are the threads the process was given.
- Two DDP processes: cores and CPU time add up over ranks, the node's memory
  is the sum of the ranks' peaks, and the CPU time is at most what the whole
  process tree used as the kernel accounted it to this test (getrusage of
  waited-for children).
- Outside SLURM, the accounting command says in one line why sacct is not used.
"""

from __future__ import annotations

import json
import resource
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import BIN, make_repo, tool_env, write_images
from test_trainer import train
from virgo_exps.provenance import read_metrics
from virgo_exps.scalability.output import write_report
from virgo_exps.scalability.report import summarize
from virgo_exps.scalability.sources import load_files
from virgo_exps.train import cost
from virgo_exps.train.snapshots import read_snapshot_file


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("cost") / "repo")
    write_images(repo / "data" / "images.zarr")
    return repo


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(workdir, name: str, strategy: str, procs: int, threads: int) -> tuple[dict, float, float, pd.DataFrame]:
    """Train; return (cost, wall seconds seen from here, CPU seconds of the process tree, epochs)."""
    cpu0, t0 = _children_cpu_s(), time.time()
    proc, out = train(workdir, name, strategy=strategy, procs=procs, env={"OMP_NUM_THREADS": str(threads)}, epochs=2)
    wall, cpu = time.time() - t0, _children_cpu_s() - cpu0
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out / "metrics.json")
    return metrics["cost"], wall, cpu, pd.read_csv(out / "epochs.csv")


def _consistent(c: dict) -> None:
    assert c["core_h"] == pytest.approx(c["cores"] * c["wall_s"] / 3600, rel=1e-3)
    assert c["cpu_eff"] == pytest.approx(c["cpu_h"] / c["core_h"], abs=1e-4)  # rounded to 4 places
    assert 0 < c["cpu_eff"] <= 1.05
    assert c["gpus"] == 0 and c["gpu_h"] == 0 and "energy_wh" not in c  # CPU only here: not measured, left out
    assert "slurm_job" not in c
    assert c["max_rss_mb"] > 100  # a process with torch loaded
    assert c["node_rss_mb"] >= c["max_rss_mb"]


@pytest.mark.slow
def test_a_single_process_records_its_cost(workdir):
    c, wall, tree_cpu, epochs = _run(workdir, "cost-single", "single", 1, threads=1)
    _consistent(c)
    assert c["cores"] == 1
    assert c["node_rss_mb"] == c["max_rss_mb"]
    # The worker's wall time covers its epochs and lies inside the stage's.
    assert (epochs["train_time_s"] + epochs["val_time_s"]).sum() < c["wall_s"] < wall
    assert c["cpu_h"] * 3600 < tree_cpu


@pytest.mark.slow
def test_two_processes_add_up(workdir):
    c, wall, tree_cpu, _ = _run(workdir, "cost-ddp", "ddp", 2, threads=1)
    _consistent(c)
    assert c["cores"] == 2
    assert c["wall_s"] < wall
    # Two ranks of about the same size: the node holds both peaks.
    assert c["node_rss_mb"] > 1.5 * c["max_rss_mb"]
    # Ours is the ranks' share of what the kernel accounted to the whole tree (launcher and torchrun besides).
    ours = c["cpu_h"] * 3600
    assert 0.3 * tree_cpu < ours < tree_cpu


@pytest.mark.slow
def test_a_resumed_run_counts_every_attempt(workdir):
    """Stopped by a signal in epoch 2, then resumed: the record is the sum of both attempts, not the last."""
    name, env = "cost-resumed", {"OMP_NUM_THREADS": "1"}
    cpu0, t0 = _children_cpu_s(), time.time()
    first, out = train(workdir, name, "ddp", 2, env={**env, "VIRGO_FAULT_STOP_AT_STEP": "11"}, epochs=2)
    wall1 = time.time() - t0
    assert first.returncode != 0 and not (out / "metrics.json").exists()
    status = json.loads((out / "checkpoints" / "status.json").read_text())
    assert status["status"] == "interrupted"
    (attempt1,) = read_snapshot_file(Path(status["snapshot"]))["cost_attempts"]
    assert attempt1["attempts"] == 1 and 0 < attempt1["wall_s"] < wall1 and attempt1["cores"] == 2
    t1 = time.time()
    second, _ = train(workdir, name, "ddp", 2, env=env, epochs=2, fresh=False)
    wall2, tree_cpu = time.time() - t1, _children_cpu_s() - cpu0
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    c = read_metrics(out / "metrics.json")["cost"]
    _consistent(c)
    assert c["attempts"] == 2 and c["cores"] == 2
    # the second attempt's own share lies inside what was seen of it from here
    this_wall = c["wall_s"] - attempt1["wall_s"]
    assert 0 < this_wall < wall2
    assert c["wall_s"] > max(attempt1["wall_s"], this_wall)
    assert c["core_h"] == pytest.approx(attempt1["core_h"] + 2 * this_wall / 3600, rel=1e-3)
    assert attempt1["cpu_h"] < c["cpu_h"] and c["cpu_h"] * 3600 < tree_cpu
    assert c["max_rss_mb"] >= attempt1["max_rss_mb"]


def test_attempts_combine_into_one_record():
    a = {
        "wall_s": 100.0,
        "cores": 4,
        "core_h": 4 * 100 / 3600,
        "cpu_h": 0.05,
        "max_rss_mb": 900.0,
        "node_rss_mb": 3000.0,
        "gpus": 0,
        "gpu_h": 0.0,
        "energy_wh": None,
        "slurm_job": 7,
        "attempts": 1,
        "cpu_eff": 0.45,
    }
    b = {
        **a,
        "wall_s": 50.0,
        "core_h": 4 * 50 / 3600,
        "cpu_h": 0.04,
        "max_rss_mb": 950.0,
        "node_rss_mb": 2800.0,
        "energy_wh": 2.0,
        "cpu_eff": 0.72,
    }
    c = cost.combine([a, b])
    assert c["attempts"] == 2 and c["wall_s"] == 150.0 and c["cores"] == 4 and c["slurm_job"] == 7
    assert c["core_h"] == pytest.approx(4 * 150 / 3600) and c["cpu_h"] == pytest.approx(0.09)
    assert c["cpu_eff"] == pytest.approx(0.09 / (4 * 150 / 3600), abs=1e-4)
    assert c["max_rss_mb"] == 950.0 and c["node_rss_mb"] == 3000.0
    assert c["energy_wh"] == 2.0  # the attempts that measured energy
    assert cost.combine([a]) == {**a, "cpu_eff": round(a["cpu_h"] / a["core_h"], 4)}
    with pytest.raises(ValueError):
        cost.combine([])


@pytest.mark.slow
def test_outside_slurm_the_accounting_line_says_why(workdir):
    out = workdir / "out" / "cost-single" / "metrics.json"
    if not out.exists():
        _run(workdir, "cost-single", "single", 1, threads=1)
    proc = subprocess.run(
        [str(BIN / "python"), "-m", "virgo_exps.train.cost", str(out), "--out", str(out.with_name("cost_sacct.json"))],
        capture_output=True,
        text=True,
        env=tool_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sacct: not used (the run did not run in a SLURM job)" in proc.stdout
    saved = json.loads(out.with_name("cost_sacct.json").read_text())
    assert saved["sacct"] is None and saved["ours"] == json.loads(out.read_text())["cost"]


def test_sacct_figures_are_parsed():
    assert cost.parse_duration("01:02:03") == 3723
    assert cost.parse_duration("1-00:00:01") == 86401
    assert cost.parse_duration("00:12.345") == pytest.approx(12.345)
    assert cost.parse_duration("") is None
    assert cost.parse_memory_mb("2048K") == 2.0
    assert cost.parse_memory_mb("1.5G") == 1536.0
    assert cost.parse_memory_mb("") is None


def test_slurm_cores_count_once_per_node():
    """Every rank of a node sees the job's cores on that node; they are not multiplied by the ranks."""
    rank = {"wall_s": 100.0, "cpu_s": 50.0, "max_rss_mb": 10.0, "threads": 1, "slurm_job": 7}
    ranks = [
        {**rank, "host": "n1", "node_cores": 4},
        {**rank, "host": "n1", "node_cores": 4},
        {**rank, "host": "n2", "node_cores": 4},
    ]
    c = cost.summarise(ranks, ["cuda:0", "cuda:1", "cuda:0"], 3.0)
    assert c["cores"] == 8 and c["gpus"] == 3 and c["slurm_job"] == 7
    assert c["core_h"] == pytest.approx(8 * 100 / 3600) and c["gpu_h"] == pytest.approx(3 * 100 / 3600)
    assert c["cpu_eff"] == pytest.approx(150 / 800)
    assert c["node_rss_mb"] == 20.0


@pytest.mark.slow
def test_the_scalability_report_shows_cost_per_group_and_in_total(workdir, tmp_path):
    out = workdir / "out"
    for name, strategy, procs in (("cost-single", "single", 1), ("cost-ddp", "ddp", 2)):
        if not (out / name / "metrics.json").exists():
            _run(workdir, name, strategy, procs, threads=1)
    recorded = {n: read_metrics(out / n / "metrics.json")["cost"] for n in ("cost-single", "cost-ddp")}
    runs, notes = load_files([out / "cost-single", out / "cost-ddp"])
    report = summarize(runs, source_notes=notes)
    by_world = {int(w): row for w, row in zip(report.groups["world_size"], report.groups.to_dict("records"))}
    assert by_world[1]["core_h"] == pytest.approx(recorded["cost-single"]["core_h"])
    assert by_world[2]["core_h_total"] == pytest.approx(recorded["cost-ddp"]["core_h"])
    assert by_world[2]["cpu_eff"] == pytest.approx(recorded["cost-ddp"]["cpu_eff"])
    total = sum(c["core_h"] for c in recorded.values())
    assert report.cost["core_h"] == pytest.approx(total) and report.cost["runs"] == 2
    page = write_report(report, tmp_path / "report")
    line = f"Cost: {total:.4g} core-hours in total over 2 run(s)"
    assert line in (page / "console.txt").read_text()
    assert line in (page / "index.html").read_text()
    assert "core-h/run" in (page / "index.html").read_text()
    assert json.loads((page / "scalability.json").read_text())["cost"]["core_h"] == pytest.approx(total)
