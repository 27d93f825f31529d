"""Our cost figures against Slurm's accounting, on a real Slurm with slurmdbd and MariaDB.

``slurm_accounting`` (tests/slurm_fixtures.py) starts a one-node cluster of
2 CPUs whose slurmctld records every job in slurmdbd, backed by MariaDB, as a
site's does. A real training (DDP, 2 processes, torchrun in the job step) runs
as a job through the train stage; then ``sacct -j`` for that job must agree
with the ``cost`` the run wrote in metrics.json:

- AllocCPUS equals our allocated cores, exactly;
- our wall time starts with the job (Start, within ``START_S``) and ends
  when the epochs end, which metrics.json's time stamps; Slurm's End comes
  after that by the job's tail (outputs written, the processes' exit), so
  Elapsed equals our wall time plus that tail within ``START_S``, and the tail
  is at most ``TAIL_S``;
- TotalCPU equals our CPU time within ``CPU_TOL_S`` seconds or ``CPU_TOL_REL``
  of it (the tail's CPU is Slurm's only);
- CPUTimeRAW is AllocCPUS x Elapsed, the core-hours a site bills.

Without accounting, and without sacct, the accounting report says why in one
line and keeps our figures.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import BIN, make_repo, sh, write_images
from test_slurm_launch import Running, cluster_env, job_id_of, train_cmd
from test_slurmsim import _ports
from virgo_exps.provenance import read_metrics
from virgo_exps.train import cost

# They compare our wall clock with Slurm's to the second: alone (`make test` runs `serial` after the rest).
pytestmark = pytest.mark.serial
START_S = 2.0  # Slurm's times are whole seconds; the batch script starts within a second of Start
TAIL_S = 20.0  # epochs' end to the job's end; seen here: 5-8 s on a loaded 2-core machine
CPU_TOL_S, CPU_TOL_REL = 5.0, 0.10  # seen here: 2.7-3 s of 15-17 s

on_slurm = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(slurm_accounting, tmp_path_factory) -> tuple[Path, dict, str]:
    """A 2-process DDP training run as a Slurm job; (repo, its cost, the job id from the launcher's output)."""
    repo = make_repo(tmp_path_factory.mktemp("accounting") / "repo")
    write_images(repo / "data" / "images.zarr", n_train=128)
    env = cluster_env(slurm_accounting)
    proc = sh(train_cmd(repo, "acct", strategy="ddp", procs=2, epochs=8), repo, env, check=False, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    metrics = read_metrics(repo / "out" / "acct" / "metrics.json")
    return repo, metrics["cost"], job_id_of(output)


def _accounted(cluster, job: str, timeout: float = 60) -> dict:
    """sacct's figures once the job is recorded as finished (slurmctld reports to slurmdbd shortly after)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            usage = cost.sacct_usage(job, env=cluster.command_env())
            if usage["state"] == "COMPLETED" and usage["cpu_s"]:
                return usage
        except cost.AccountingUnavailable as exc:
            usage = {"error": str(exc)}
        if time.monotonic() > deadline:
            raise AssertionError(f"sacct has no finished record of job {job} after {timeout:.0f} s: {usage}")
        time.sleep(1)


def _times(cluster, job: str) -> tuple[float, float]:
    """The job's Start and End as Unix times."""
    out = cluster.slurm("sacct", "-j", job, "-X", "-n", "-P", "-o", "Start,End").stdout.split()[0]
    start, end = out.split("|")
    return datetime.fromisoformat(start).timestamp(), datetime.fromisoformat(end).timestamp()


@pytest.mark.slurm
@pytest.mark.slow
def test_sacct_agrees_with_what_the_run_recorded(slurm_accounting, trained):
    repo, ours, job = trained
    assert ours["slurm_job"] == int(job)
    # MariaDB and slurmdbd listen below the jobs' rendezvous ports (20000 + id % 10000) as the others do
    daemons = [*_ports(slurm_accounting).values(), *slurm_accounting._state["accounting_ports"]]
    assert len(daemons) == 5 and all(p < 20000 for p in daemons), daemons
    theirs = _accounted(slurm_accounting, job)
    report = (
        f"ours: wall {ours['wall_s']:.1f} s, {ours['cores']} cores, CPU {ours['cpu_h'] * 3600:.1f} s; "
        f"sacct: elapsed {theirs['elapsed_s']:.0f} s, {theirs['alloc_cpus']} cores, CPU {theirs['cpu_s']:.1f} s"
    )
    print(report)
    assert theirs["alloc_cpus"] == ours["cores"] == 2, report
    start, end = _times(slurm_accounting, job)
    ours_end = (repo / "out" / "acct" / "metrics.json").stat().st_mtime  # written when the epochs end
    tail = end - ours_end
    print(f"job start {start:.0f}, ours {ours_end - ours['wall_s']:.1f}; tail after the epochs {tail:.1f} s")
    assert abs((ours_end - ours["wall_s"]) - start) <= START_S, report
    assert -START_S <= tail <= TAIL_S, report
    assert abs(theirs["elapsed_s"] - (ours["wall_s"] + tail)) <= START_S, report
    cpu = ours["cpu_h"] * 3600
    assert abs(theirs["cpu_s"] - cpu) <= max(CPU_TOL_S, CPU_TOL_REL * theirs["cpu_s"]), report
    assert theirs["core_h"] == pytest.approx(theirs["alloc_cpus"] * theirs["elapsed_s"] / 3600)
    # The step's MaxRSS is sampled (every 5 s) over the task's processes: both ranks and torchrun's agent.
    assert theirs["max_rss_mb"] is not None
    assert 0.5 * ours["max_rss_mb"] <= theirs["max_rss_mb"] <= 2 * ours["node_rss_mb"], (theirs, ours)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_requeued_job_is_counted_over_all_its_attempts(slurm_accounting, tmp_path):
    """USR1 mid-run (what Slurm sends before a time limit): the job is requeued and resumes. Our figures
    add up both attempts, as sacct --duplicates does; sacct's default (the last attempt) would not."""
    repo = make_repo(tmp_path / "repo")
    write_images(repo / "data" / "images.zarr", n_train=128)
    run = Running(
        train_cmd(repo, "requeued", strategy="ddp", procs=2, epochs=6),
        repo,
        cluster_env(slurm_accounting, extra={"DVC_EXP_NAME": "requeued"}),
    )
    try:
        run.wait_for(r"epoch 2/6:", timeout=300)
        job = job_id_of(run.output)
        slurm_accounting.slurm("scancel", "--signal=USR1", "--batch", job)
        rc = run.finish(timeout=600)
    finally:
        run.kill()
    assert rc == 0, run.output[-5000:]
    assert f"job {job} requeued (restart 1)" in run.output and "train: resuming from" in run.output
    ours = read_metrics(repo / "out" / "requeued" / "metrics.json")["cost"]
    theirs = _accounted(slurm_accounting, job)
    last = cost.sacct_usage(job, env=slurm_accounting.command_env())["steps"]
    report = (
        f"ours: {ours['attempts']} attempts, wall {ours['wall_s']:.1f} s, CPU {ours['cpu_h'] * 3600:.1f} s; "
        f"sacct: {theirs['attempts']} attempts, elapsed {theirs['elapsed_s']:.0f} s, CPU {theirs['cpu_s']:.1f} s"
    )
    print(report)
    assert ours["attempts"] == theirs["attempts"] == 2, report
    assert [r["State"] for r in last if r["JobID"] == job][0] == "REQUEUED", last
    # sacct without --duplicates shows the last attempt only: what a sum must not be read from
    plain = slurm_accounting.slurm("sacct", "-j", job, "-X", "-n", "-P", "-o", "JobID,State").stdout.split()
    assert plain == [f"{job}|COMPLETED"], plain
    # each attempt's tail (after its snapshot: the requeue, or the outputs) is Slurm's only
    tails = theirs["elapsed_s"] - ours["wall_s"]
    assert -2 * START_S <= tails <= 2 * TAIL_S, report
    cpu = ours["cpu_h"] * 3600
    assert abs(theirs["cpu_s"] - cpu) <= max(2 * CPU_TOL_S, CPU_TOL_REL * theirs["cpu_s"]), report
    assert ours["core_h"] == pytest.approx(2 * ours["wall_s"] / 3600, rel=1e-3)
    shown = cost.describe(
        cost.accounting_report(repo / "out" / "requeued" / "metrics.json", slurm_accounting.command_env())
    )
    assert shown.startswith("ours:  2 attempts, wall ") and f"sacct: job {job} COMPLETED, 2 attempts, " in shown, shown


@pytest.mark.slurm
@pytest.mark.slow
def test_the_accounting_command_writes_both(slurm_accounting, trained):
    repo, ours, job = trained
    _accounted(slurm_accounting, job)
    out = repo / "out" / "acct" / "cost_sacct.json"
    proc = subprocess.run(
        [str(BIN / "python"), "-m", "virgo_exps.train.cost", "out/acct/metrics.json", "--out", str(out)],
        cwd=repo,
        env=cluster_env(slurm_accounting),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    assert f"sacct: job {job} COMPLETED" in proc.stdout, proc.stdout
    saved = json.loads(out.read_text())
    assert saved["ours"] == ours and saved["sacct"]["alloc_cpus"] == ours["cores"]
    assert saved["ratio"]["cores"] == 1.0


@pytest.mark.slurm
@pytest.mark.slow
def test_without_accounting_or_sacct_the_report_says_why(slurm_accounting, trained, tmp_path):
    repo, ours, job = trained
    metrics = repo / "out" / "acct" / "metrics.json"
    # The same cluster's configuration with accounting storage off: sacct itself refuses.
    conf = tmp_path / "slurm.conf"
    lines = slurm_accounting.conf_path.read_text().splitlines()
    conf.write_text(
        "\n".join(
            "AccountingStorageType=accounting_storage/none" if line.startswith("AccountingStorageType=") else line
            for line in lines
            if not line.startswith(("AccountingStorageHost=", "AccountingStoragePort="))
        )
        + "\n"
    )
    off = cost.accounting_report(metrics, env={**slurm_accounting.command_env(), "SLURM_CONF": str(conf)})
    assert off["sacct"] is None and off["ours"] == ours
    assert "accounting storage is disabled" in off["sacct_unavailable"].lower(), off["sacct_unavailable"]
    assert cost.describe(off).splitlines()[-1].startswith("sacct: not used (")
    missing = cost.accounting_report(metrics, env={"PATH": str(tmp_path)})
    assert missing["sacct_unavailable"] == "sacct is not installed here"
