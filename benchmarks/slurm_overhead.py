"""What submitting a stage to SLURM costs, compared with running its command directly.

    python benchmarks/slurm_overhead.py                 # 5 repeats, a 2 s stage
    python benchmarks/slurm_overhead.py --repeat 3 --work 0

Uses the Slurm cluster of ``SLURM_CONF`` when ``scontrol ping`` answers,
otherwise starts a one-node cluster on this machine (slurmsim, needs
root). The "stage" is a python script that sleeps ``--work`` seconds, so the
numbers measure the machinery, not the CPU. Prints ONE JSON object:

* ``direct_s``: ``python work.py`` (median, and every run in ``runs``).
* ``launcher_s``: the same through :func:`virgo_exps.launch.launcher.run` on a
  ``kind: slurm`` machine: batch script, ``sbatch -W``, scheduling, the batch
  shell and ``srun``, the watcher noticing the end (polls every 0.5 s).
* ``overhead_s``: median launcher - median direct (the goal is <= 2 s).
* ``sbatch_wait_s``: the same batch script with a bare ``sbatch -W`` (no
  watcher), which learns about the end only at its own 2 s / 8 s / 32 s polls.
* ``detect_s``: from the job's end (its last log line, time-stamped by the
  job) to the launcher's return, per run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAGE = """\
import sys
from virgo_exps.launch import launcher as launch
from virgo_exps.config import TrainConfig
sys.exit(launch.run("bench", ["work.py"], TrainConfig()))
"""
WORK = """\
import sys, time
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else {work})
print("work done at %.6f" % time.time(), flush=True)
"""


def _scontrol_ok(env: dict) -> bool:
    try:
        return subprocess.run(["scontrol", "ping"], env=env, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def cluster(tmp: Path):
    env = dict(os.environ)
    if env.get("SLURM_CONF") and _scontrol_ok(env):
        yield env, f"existing cluster (SLURM_CONF={env['SLURM_CONF']})"
        return
    sys.path.insert(0, str(ROOT / "src"))
    from slurmsim import SimCluster

    sim = SimCluster(tmp / "slurm", nodes=1)
    sim.start()
    try:
        yield sim.command_env(), "slurmsim, 1 node on this machine"
    finally:
        sim.stop()


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout + proc.stderr


def summary(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "runs": [round(v, 3) for v in values],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--work", type=float, default=2.0, help="seconds the stage's command sleeps")
    parser.add_argument("--no-sbatch-wait", action="store_true", help="skip the bare sbatch -W comparison")
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="virgo-slurm-bench-") as tmpdir:
        tmp = Path(tmpdir)
        work = tmp / "work"
        work.mkdir()
        (work / "dvc.yaml").write_text("stages: {}\n")  # marks the repository root for virgo_exps.paths
        shutil.copytree(ROOT / "machines" / "slurm", work / "machines" / "slurm")
        (work / "stage.py").write_text(STAGE)
        (work / "work.py").write_text(WORK.format(work=args.work))
        with cluster(tmp) as (env, where):
            env = {k: v for k, v in env.items() if not k.startswith(("VIRGO_", "DVC_"))}
            env.update(VIRGO_HOME=str(work), DVC_EXP_NAME="bench", PYTHONPATH=str(ROOT / "src"))
            direct, launcher, detect, bare = [], [], [], []
            for _ in range(args.repeat):
                direct.append(timed([python, "work.py"], work, env)[0])
                elapsed, out = timed([python, "stage.py"], work, {**env, "VIRGO_MACHINE": "slurm"})
                end = time.time()
                launcher.append(elapsed)
                done = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("work done at")]
                if done:
                    detect.append(end - done[-1])
                if not args.no_sbatch_wait:
                    script = work / "logs" / "bench" / "bench.sbatch"
                    bare.append(timed(["sbatch", "-W", "--parsable", str(script)], work, env)[0])
            sinfo = subprocess.run(["sbatch", "--version"], env=env, capture_output=True, text=True).stdout.strip()
    result = {
        "cluster": where,
        "slurm": sinfo,
        "work_s": args.work,
        "repeat": args.repeat,
        "direct_s": summary(direct),
        "launcher_s": summary(launcher),
        "overhead_s": round(statistics.median(launcher) - statistics.median(direct), 3),
        "detect_s": summary(detect) if detect else None,
        "sbatch_wait_s": summary(bare) if bare else None,
        "sbatch_wait_overhead_s": round(statistics.median(bare) - statistics.median(direct), 3) if bare else None,
        "goal_overhead_s": 2.0,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
