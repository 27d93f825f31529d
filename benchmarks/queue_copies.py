"""What a queued experiment costs before it computes anything, at two dataset sizes.

    python benchmarks/queue_copies.py                  # 512 and 8192 samples (several minutes on 2 cores)
    python benchmarks/queue_copies.py --sizes 128 1024 # quicker

For each size, a copy of the project in a temporary git repository runs the
pipeline once (1 epoch), then queues an experiment that changes only
``generate.workers`` (how many processes generate the data, not what they
generate: no stage depends on it) and runs it with ``dvc queue start``. DVC
builds that experiment's temporary workspace under ``.dvc/tmp/exps/`` from the
cache, with the repository's ``cache.type``, checks every stage and reruns
none, so the time and the disk of the experiment are its set-up cost. Both are measured for the
project's setting (``reflink,symlink``: links to the read-only cache) and for
DVC's default (``reflink,copy``: a full copy of ``data/`` on file systems
without reflinks).

Prints ONE JSON object: per link type and size, the experiment's wall time
(``dvc queue start`` to done), the peak disk of ``.dvc/tmp/exps`` (sampled
every 0.1 s, ``du``-style: blocks actually used) and the size of ``data/``;
and the large/small ratio of each (goal for the project setting: <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from _project import copy_project, env, run


def _disk_bytes(path: Path) -> int:
    """Blocks in use under ``path`` (links count as their own few bytes, as du does)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def _make_repo(dest: Path, n_samples: int, cache_type: str) -> None:
    copy_project(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["generate"].update(n_samples=n_samples, workers=0)
    params["train"].update(epochs=1, warmup_steps=2, profile_steps=2)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["dvc", "config", "cache.type", cache_type], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "benchmark copy"], dest)


def _queued_experiment(repo: Path) -> tuple[float, int]:
    """Wall time and peak disk of one queued experiment that reruns no stage."""
    run(["dvc", "exp", "run", "--queue", "-n", "bench-setup", "-S", "generate.workers=1"], repo)
    exps = repo / ".dvc" / "tmp" / "exps"
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            if exps.exists():
                peak[0] = max(peak[0], _disk_bytes(exps))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    # The workers are daemons that keep stdout open: no pipes.
    subprocess.run(
        ["dvc", "queue", "start", "-j", "1"],
        cwd=repo,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        proc = subprocess.run(["dvc", "queue", "status"], cwd=repo, env=env(), capture_output=True, text=True)
        # DVC reads its workers' state files while they write them: a failed look is tried again.
        status = proc.stdout if proc.returncode == 0 else ""
        line = next((ln for ln in status.splitlines() if "bench-setup" in ln), "")
        if "Success" in line:
            break
        if "Failed" in line:
            raise SystemExit(
                f"benchmark: the queued experiment failed:\n{status}\n"
                + run(["dvc", "queue", "logs", "bench-setup"], repo)[-3000:]
            )
        time.sleep(0.2)
    else:
        raise SystemExit("benchmark: the queued experiment did not finish within 30 min")
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env(), capture_output=True)
    return elapsed, peak[0]


def measure(n_samples: int, cache_type: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="virgo-bench-queue-", ignore_cleanup_errors=True) as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        _make_repo(repo, n_samples, cache_type)
        print(f"[{cache_type} {n_samples}] first run of the pipeline", file=sys.stderr, flush=True)
        run(["dvc", "exp", "run"], repo)
        run(["git", "add", "-A"], repo)
        run(["git", "commit", "-q", "-m", "baseline"], repo)
        print(f"[{cache_type} {n_samples}] queued experiment", file=sys.stderr, flush=True)
        seconds, peak = _queued_experiment(repo)
        return {
            "experiment_s": round(seconds, 2),
            "tmp_exps_peak_bytes": peak,
            "data_bytes": _disk_bytes(repo / "data"),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[512, 8192], metavar=("SMALL", "LARGE"))
    parser.add_argument("--link-types", nargs="+", default=["reflink,symlink", "reflink,copy"])
    args = parser.parse_args()
    small, large = args.sizes
    out: dict = {"sizes": [small, large]}
    for cache_type in args.link_types:
        a, b = measure(small, cache_type), measure(large, cache_type)
        out[cache_type] = {
            str(small): a,
            str(large): b,
            "experiment_time_ratio": round(b["experiment_s"] / a["experiment_s"], 3),
            "extra_disk_ratio": round(max(b["tmp_exps_peak_bytes"], 1) / max(a["tmp_exps_peak_bytes"], 1), 3),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
