"""Epochs timed while other work competes for the CPUs are recognised and left out (real pipeline, real hog).

A training run through `dvc exp run` is loaded, from the end of its second
epoch to the end of its fourth, by CPU-bound processes (more than the cores),
as a colleague's job on the same login node would. epochs.csv then says so in
its ``load_avg`` column, and the scalability report leaves those epochs out of
its medians with a note. The GPU half of the rule (another job's process on a
rank's GPU) is checked on the parent-process rule with real processes.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from conftest import BIN, make_repo, sh, tool_env
from virgo_exps.scalability.runs import LOAD_LIMIT
from virgo_exps.train.monitoring import HostLoad, other_gpu_processes

# Load on the host is what these tests measure: they run alone (`make test` runs `serial` after the rest).
pytestmark = [pytest.mark.slow, pytest.mark.serial]

HOG = "while True: pass"


def _start_hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait(timeout=30)


def test_hogged_epochs_are_marked_and_left_out_of_medians(tmp_path):
    epochs = 6
    repo = make_repo(
        tmp_path / "repo",
        {
            "generate": {"n_samples": 160},
            "train": {"epochs": epochs, "global_batch_size": 4, "warmup_steps": 2, "profile_steps": 2},
        },
    )
    cores = len(os.sched_getaffinity(0))
    proc = subprocess.Popen(
        [str(BIN / "dvc"), "exp", "run"],
        cwd=repo,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    hogs: list[subprocess.Popen] = []
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"epoch 2/{epochs}:") and not hogs:
                hogs = _start_hogs(2 * cores)  # the run's own cores, twice over
            elif line.startswith(f"epoch 4/{epochs}:"):
                _stop(hogs)
        rc = proc.wait(timeout=900)
    finally:
        _stop(hogs)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0, "".join(seen[-30:])
    assert hogs, "the run never reported its second epoch:\n" + "".join(seen[-30:])

    with open(repo / "results" / "epochs.csv") as fh:
        rows = list(csv.DictReader(fh))
    load = {int(r["epoch"]): float(r["load_avg"]) for r in rows}
    assert len(load) == epochs
    # Epochs 3 and 4 ran beside the hogs; the last one, a whole epoch after them, did not.
    flagged = sorted(e for e in range(2, epochs + 1) if load[e] > LOAD_LIMIT)  # epoch 1 is warm-up
    assert {3, 4} <= set(flagged) and epochs not in flagged, load
    assert all(r["gpu_other_procs"] == "" for r in rows)  # no GPU here: not measured, not zero

    out = tmp_path / "scal"
    sh([str(BIN / "virgo-exps"), "scalability", "--metrics-files", str(repo / "results"), "--out", str(out)], repo)
    doc = json.loads((out / "scalability.json").read_text())
    (group,) = doc["groups"]
    quiet = [e for e in range(2, epochs + 1) if e not in flagged]
    assert group["excluded_epochs"] == len(flagged)
    assert group["spread_over"] == f"{len(quiet)} epochs (1 run)"
    times = {int(r["epoch"]): float(r["train_time_s"]) for r in rows}
    assert group["epoch_time_s"] == pytest.approx(statistics.median(times[e] for e in quiet), rel=1e-6)
    listed = ", ".join(str(e) for e in flagged)
    assert any(f"epoch(s) {listed} ran while other work competed for the run's CPUs" in n for n in doc["notes"])


def test_host_load_window_sees_a_hog():
    cores = len(os.sched_getaffinity(0))
    load = HostLoad(interval=0.05).start()
    try:
        hogs = _start_hogs(2 * cores)
        try:
            load.window()
            time.sleep(1.5)
            busy = load.window()
        finally:
            _stop(hogs)
    finally:
        load.stop()
    assert busy is not None and busy >= 1.5, busy


def test_other_gpu_processes_are_told_apart_by_their_launcher():
    """Two ranks of one job share a parent (torchrun, the Slurm step); a process started elsewhere does not."""
    code = (
        "import subprocess, sys, time\n"
        "ps = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']) for _ in range(2)]\n"
        "print(*[p.pid for p in ps], flush=True)\n"
        "time.sleep(60)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    rank0, rank1 = (int(p) for p in launcher.stdout.readline().split())
    try:
        assert other_gpu_processes([rank0, rank1], rank0) == []
        assert other_gpu_processes([rank0, rank1, stranger.pid], rank0) == [stranger.pid]
        assert other_gpu_processes([rank1, 999_999_999], rank0) == [999_999_999]  # not visible here: someone else's
    finally:
        for pid in (rank0, rank1):
            os.kill(pid, signal.SIGKILL)
        for p in (launcher, stranger):
            p.kill()
            p.wait()


RANK = """
import sys, threading, time
import torch
from virgo_exps.train.monitoring import HostLoad, runnable_tasks

torch.set_num_threads(2)  # with its sampler, more busy threads than cores, all of this rank
stop = time.monotonic() + 3.0
a = torch.randn(256, 256)
def spin():
    while time.monotonic() < stop:
        a @ a
if sys.argv[1] == "0":
    load = HostLoad(interval=0.05).start()
    threading.Thread(target=spin).start()
    time.sleep(0.5)
    load.window()
    raw = []
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        raw.append(runnable_tasks())
        time.sleep(0.05)
    print(load.window(), sum(raw) / len(raw), flush=True)
    load.stop()
else:
    spin()
"""


def test_a_runs_own_threads_are_not_other_work(tmp_path):
    """Two ranks under one launcher, each keeping more threads busy than the cores: the run alone."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    launcher = (
        "import subprocess, sys\n"
        f"ps = [subprocess.Popen([sys.executable, {str(script)!r}, str(r)], stdout=subprocess.PIPE, text=True) "
        "for r in (0, 1)]\n"
        "print(ps[0].communicate()[0], end='')\n"
        "ps[1].wait()\n"
    )
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    load, raw = (float(v) for v in out.stdout.split())
    cores = len(os.sched_getaffinity(0))
    assert raw / cores > LOAD_LIMIT, raw  # the host was busy beyond its cores, by the run's own threads
    assert load <= LOAD_LIMIT, (load, raw)  # which count as its two processes: the epoch is the run's own
