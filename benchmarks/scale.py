"""The paper preset at a fraction of its 750,000 samples, through the real pipeline.

    python benchmarks/scale.py                    # one tenth: 75,000 samples
    python benchmarks/scale.py --fraction 0.01    # 7,500 samples, to check the benchmark itself

In a temporary copy of the project (benchmarks/_project.py): ``virgo-exps preset
presets/paper.yaml``, then ``generate.n_samples`` set to the fraction, and training
adapted to this one machine (1 node, ``--procs`` DDP ranks, ``--epochs`` epochs; the
paper's global batch of 1,024 and its learning rate). Each stage runs as
``dvc repro --single-item <stage>``. Prints ONE JSON object:

* ``stages``: per stage, ``dvc_s`` (the whole ``dvc repro`` of it: the command, then DVC
  hashing the outputs and copying them into its cache), ``command_s`` (the stage's own
  process, from its first to its last sample) and ``peak_memory_mb``: the largest sum,
  sampled every 0.25 s, over the processes under ``dvc`` of their proportional set size
  (PSS) without shared memory, plus the node's copies of the training data counted once
  (they are written into a private folder under /dev/shm, ``VIRGO_NODE_DATA``);
* ``stores_mb``: bytes on disk of data/raw.zarr and data/images.zarr, and of DVC's cache;
* ``samples_per_s_per_core``: generate and preprocess, samples / command seconds / cores
  (both stages use every core: ``workers: 0``);
* ``time_to_first_step_s``: the train command run directly (same data, outputs aside,
  ``train.profile_steps: 0``) until rank 0 stops after global step 1
  (``VIRGO_FAULT_STOP_AT_STEP=1``): interpreter and torch start-up, torchrun, the node's
  copy of both splits, the data and code digests, the first step and the snapshot;
* ``noop_exp_run_s`` / ``status_s``: ``dvc exp run`` with everything up to date (after
  committing dvc.lock) and ``dvc status``, with stores of this size.

The disk is checked first: the stores (uncompressed size, an upper bound), twice when
DVC's cache is a copy, must fit in 90 % of what is free, or the benchmark stops with the
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import yaml
from _project import BIN, ROOT, copy_project, env, run

PAPER_SAMPLES = 750_000


def sizes(n: int, params: dict) -> tuple[int, int]:
    """Uncompressed bytes of the raw and the image stores for ``n`` samples."""
    g, p = params["generate"], params["preprocess"]
    channels = 1 + g["n_aux"]
    raw = n * channels * int(round(g["duration"] * g["sample_rate"])) * 4
    images = n * channels * p["patch_size"] ** 2 * 4
    return raw, images


def paper_study(fraction: float) -> tuple[int, dict, int, int]:
    """Samples, params (params.yaml with presets/paper.yaml merged in) and estimated raw and images
    bytes of ``fraction`` of the paper's study."""
    n = int(round(PAPER_SAMPLES * fraction))
    preset = yaml.safe_load((ROOT / "presets" / "paper.yaml").read_text())
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    merged = {k: {**base.get(k, {}), **preset.get(k, {})} for k in base}
    return (n, merged, *sizes(n, merged))


def require_free(need: int, what: str) -> None:
    """Stop before anything is written when ``need`` bytes would not fit in the temporary folder."""
    tmp_root = Path(tempfile.gettempdir())
    free = shutil.disk_usage(tmp_root).free
    if need > 0.9 * free:
        raise SystemExit(
            f"benchmark: {what} need up to {need / 1e9:.1f} GB on {tmp_root} but {free / 1e9:.1f} GB are free; "
            "use a smaller --fraction or free space"
        )


def disk_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class TreeMemory:
    """Samples the memory of a process tree and the time its stage command ran."""

    def __init__(self, root_pid: int, node: Path, stage: str):
        self.root, self.node, self.marker = root_pid, node, f"stages/{stage}.py"
        self.peak = 0
        self.first = self.last = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        out, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def _sample(self) -> None:
        total, running = 0, False
        for pid in self._tree():
            try:
                fields = {}
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    parts = line.split()
                    if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                        fields[parts[0][:-1]] = int(parts[1]) * 1024
                total += fields.get("Pss", 0) - fields.get("Pss_Shmem", 0)
                if self.marker in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                    running = True
            except OSError:
                continue
        total += disk_bytes(self.node)
        self.peak = max(self.peak, total)
        if running:
            now = time.monotonic()
            self.first = self.first or now
            self.last = now

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.25)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_stage(repo: Path, stage: str, extra_env: dict) -> dict:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "--single-item", stage],
        cwd=repo,
        env={**env(), **extra_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with TreeMemory(proc.pid, Path(extra_env["VIRGO_NODE_DATA"]), stage) as mem:
        output, _ = proc.communicate()
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"benchmark: dvc repro {stage} failed ({proc.returncode}):\n{output[-4000:]}")
    command = (mem.last - mem.first) if mem.first is not None else None
    return {"dvc_s": round(seconds, 2), "command_s": command and round(command, 2), "peak_memory_mb": mem.peak / 2**20}


def first_step(repo: Path, extra_env: dict) -> float:
    """Seconds of the train command until rank 0 stops after global step 1."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["profile_steps"] = 0
    (repo / "params-first-step.yaml").write_text(yaml.safe_dump(params))
    out = "first-step"
    cmd = [str(BIN / "python"), "stages/train.py", "--params", "params-first-step.yaml", "--data", "data/images.zarr"]
    cmd += ["--checkpoints", f"{out}/checkpoints", "--model", f"{out}/model.pt", "--metrics", f"{out}/metrics.json"]
    cmd += ["--epochs", f"{out}/epochs.csv", "--ranks", f"{out}/ranks.json", "--no-tracking"]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=repo, env={**env(), **extra_env, "VIRGO_FAULT_STOP_AT_STEP": "1"}, capture_output=True, text=True
    )
    seconds = time.monotonic() - t0
    if "stop requested" not in proc.stderr:
        raise SystemExit(f"benchmark: the first-step run did not stop at step 1 ({proc.returncode}):\n{proc.stderr}")
    shutil.rmtree(repo / out, ignore_errors=True)
    (repo / "params-first-step.yaml").unlink()
    return seconds


def timed(cmd: list[str], repo: Path) -> float:
    t0 = time.monotonic()
    run(cmd, repo)
    return round(time.monotonic() - t0, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.1, help="of the paper's 750,000 samples (default 0.1)")
    ap.add_argument("--procs", type=int, default=2, help="DDP ranks of the train stage (default 2)")
    ap.add_argument("--epochs", type=int, default=1, help="train.epochs (default 1)")
    ap.add_argument("--keep", action="store_true", help="leave the project copy in place and print its path")
    args = ap.parse_args()
    n, merged, raw, images = paper_study(args.fraction)
    # the workspace and DVC's cache (a copy unless links are configured)
    require_free(
        2 * (raw + images),
        f"{n} samples (raw {raw / 1e9:.1f} GB + images {images / 1e9:.1f} GB, in the workspace and in DVC's cache)",
    )

    tmp = Path(tempfile.mkdtemp(prefix="virgo-scale-"))
    node = Path(tempfile.mkdtemp(prefix="virgo-scale-node-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    extra_env = {"VIRGO_NODE_DATA": str(node)}
    try:
        repo = tmp / "repo"
        repo.mkdir()
        copy_project(repo)
        run(["git", "init", "-q", "-b", "main"], repo)
        run([str(BIN / "virgo-exps"), "preset", "presets/paper.yaml"], repo)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["generate"]["n_samples"] = n
        params["train"].update(nodes=1, procs_per_node=args.procs, epochs=args.epochs)
        if args.procs == 1:
            params["train"]["strategy"] = "single"
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(["git", "add", "-A"], repo)
        run(["git", "commit", "-q", "-m", "scale benchmark"], repo)

        stages = {}
        for stage in ("environment", "generate", "preprocess"):
            stages[stage] = run_stage(repo, stage, extra_env)
        to_first_step = first_step(repo, extra_env)
        for stage in ("train", "report"):
            stages[stage] = run_stage(repo, stage, extra_env)
        run(["git", "add", "dvc.lock", "version.lock"], repo)
        run(["git", "commit", "-q", "-m", "results"], repo)
        noop = timed([str(BIN / "dvc"), "exp", "run"], repo)
        status = timed([str(BIN / "dvc"), "status"], repo)
        cores = os.cpu_count()
        metrics = json.loads((repo / "results" / "metrics.json").read_text())
        result = {
            "fraction": args.fraction,
            "n_samples": n,
            "cores": cores,
            "train": {
                "procs": args.procs,
                "epochs": args.epochs,
                "global_batch_size": params["train"]["global_batch_size"],
            },
            "stages": stages,
            "stores_mb": {
                "raw": disk_bytes(repo / "data" / "raw.zarr") / 2**20,
                "images": disk_bytes(repo / "data" / "images.zarr") / 2**20,
                "raw_uncompressed": raw / 2**20,
                "images_uncompressed": images / 2**20,
                "dvc_cache": disk_bytes(repo / ".dvc" / "cache") / 2**20,
            },
            "samples_per_s_per_core": {
                s: n / stages[s]["command_s"] / cores for s in ("generate", "preprocess") if stages[s]["command_s"]
            },
            "time_to_first_step_s": round(to_first_step, 2),
            "train_samples_per_s": metrics.get("samples_per_s"),
            "noop_exp_run_s": noop,
            "status_s": status,
            "node_copies_left": sorted(p.name for p in node.iterdir()),
        }
        if args.keep:
            result["project"] = str(repo)
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(node, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
