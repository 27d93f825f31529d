"""Node memory and throughput of the training data loader: one mapped copy per node against
the former loader, which read the whole split into every process.

    python benchmarks/loader.py                 # 16,384 training samples (1 GiB of float32)
    python benchmarks/loader.py --n 4096        # smaller

Prints ONE JSON object:

* ``memory``: for 1 and 2 ranks on the same split, each loader, the peak memory of the
  node sampled every 20 ms while the ranks open the split and read every sample once:
  cgroup-like, i.e. the proportional set size (PSS) of the ranks without their shared
  memory, plus the node's copy counted once (the blocks of the files in the copy's folder,
  a private one under /dev/shm). ``data_mb`` is that peak minus the same sum taken before
  the ranks open the split (the interpreters and torch); ``ratio_2_over_1`` is the 2-rank
  peak over the 1-rank peak, for the data and for the whole node.
* ``open_s``: seconds to open the split in that process (decompressing the store into the
  node's copy, or into the process's memory).
* ``throughput``: one process, each loader: samples/s of ``batch()`` over random local
  batches (the training loop's access), median of 5 epochs after one warm-up epoch;
  ``ratio_mapped_over_in_memory`` is the mapped loader's rate over the former one's.

The store is written in the preprocess stage's layout and codecs (blosc-zstd + crc32c,
chunks of 256 samples), with 3 auxiliary channels in and 1 channel out of 64 x 64.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHANNELS, PATCH, CHUNK, BATCH = 3, 64, 256, 128


def make_store(path: Path, n: int) -> None:
    import zarr

    from virgo_exps.store import compressors

    rng = np.random.default_rng(0)
    group = zarr.open_group(str(path), mode="w")
    for split, rows in (("train", n), ("val", max(CHUNK, n // 8))):
        x = group.create_array(
            f"{split}/x",
            shape=(rows, CHANNELS, PATCH, PATCH),
            chunks=(CHUNK, CHANNELS, PATCH, PATCH),
            dtype="float32",
            compressors=compressors(),
        )
        y = group.create_array(
            f"{split}/y",
            shape=(rows, 1, PATCH, PATCH),
            chunks=(CHUNK, 1, PATCH, PATCH),
            dtype="float32",
            compressors=compressors(),
        )
        for start in range(0, rows, CHUNK):
            k = min(CHUNK, rows - start)
            x[start : start + k] = rng.standard_normal((k, CHANNELS, PATCH, PATCH), dtype=np.float32)
            y[start : start + k] = rng.standard_normal((k, 1, PATCH, PATCH), dtype=np.float32)
    group.attrs["complete"] = True


class InMemory:
    """The former loader: the whole split read into this process's memory."""

    def __init__(self, store: Path, split: str):
        import torch
        import zarr

        from virgo_exps.store import read

        group = zarr.open_group(str(store), mode="r")
        self.x = torch.from_numpy(np.asarray(read(group[f"{split}/x"], store), dtype=np.float32))
        self.y = torch.from_numpy(np.asarray(read(group[f"{split}/y"], store), dtype=np.float32))

    def batch(self, indices):
        import torch

        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x.index_select(0, idx), self.y.index_select(0, idx)

    def __len__(self):
        return self.x.shape[0]

    def close(self):
        self.x = self.y = None


def open_loader(kind: str, store: Path):
    if kind == "mapped":
        from virgo_exps.train.data import ImageDataset

        return ImageDataset(store, "train")
    return InMemory(store, "train")


def epoch(ds, rank: int, world: int, seed: int) -> float:
    """Seconds to read this rank's share of one shuffled epoch, in local batches."""
    from virgo_exps.train.data import ShardSampler

    sampler = ShardSampler(len(ds), BATCH * world, rank, world, seed)
    t0 = time.perf_counter()
    for indices in sampler:
        x, y = ds.batch(indices)
        float(x[0, 0, 0, 0]) + float(y[0, 0, 0, 0])
    return time.perf_counter() - t0


def task_rank(args) -> None:
    """One rank: say ready, wait for the go, open the split, read it all once, say done."""
    import torch  # noqa: F401  (imported before the baseline is taken, as in training)

    print("ready", flush=True)
    sys.stdin.readline()
    ds = open_loader(args.kind, Path(args.store))
    epoch(ds, args.rank, args.world, seed=1)
    print("done", flush=True)
    sys.stdin.readline()
    ds.close()


def task_throughput(args) -> None:
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds = open_loader(args.kind, Path(args.store))
    opened = time.perf_counter() - t0
    epoch(ds, 0, 1, seed=0)  # warm-up
    times = [epoch(ds, 0, 1, seed=s) for s in range(1, 6)]
    n = len(ds) // BATCH * BATCH
    print(json.dumps({"samples_per_s": n / float(np.median(times)), "open_s": opened}))
    ds.close()


def _pss_without_shmem(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        fields = {}
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    fields[parts[0][:-1]] = int(parts[1]) * 1024
        except OSError:
            continue
        total += fields.get("Pss", 0) - fields.get("Pss_Shmem", 0)
    return total


def _folder_bytes(folder: Path) -> int:
    total = 0
    for p in folder.iterdir():
        try:
            total += p.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def node_peak(kind: str, store: Path, world: int, node: Path) -> dict:
    env = dict(os.environ, VIRGO_NODE_DATA=str(node), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--task",
                "rank",
                "--kind",
                kind,
                "--store",
                str(store),
                "--rank",
                str(r),
                "--world",
                str(world),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    pids = [p.pid for p in procs]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    before = _pss_without_shmem(pids) + _folder_bytes(node)
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    peak = before
    done = 0
    os.set_blocking(procs[0].stdout.fileno(), True)
    import selectors

    sel = selectors.DefaultSelector()
    for p in procs:
        sel.register(p.stdout, selectors.EVENT_READ)
    while done < world:
        peak = max(peak, _pss_without_shmem(pids) + _folder_bytes(node))
        for key, _ in sel.select(timeout=0.02):
            line = key.fileobj.readline()
            if line.strip() == "done":
                done += 1
                sel.unregister(key.fileobj)
            elif not line:
                raise SystemExit(f"benchmark: a {kind} rank ended early")
    peak = max(peak, _pss_without_shmem(pids) + _folder_bytes(node))
    for p in procs:
        p.stdin.write("end\n")
        p.stdin.flush()
    for p in procs:
        p.wait(timeout=120)
    left = sorted(q.name for q in node.iterdir())
    return {"peak_mb": peak / 2**20, "before_mb": before / 2**20, "data_mb": (peak - before) / 2**20, "left": left}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384, help="training samples")
    ap.add_argument("--task", choices=["rank", "throughput"])
    ap.add_argument("--kind", choices=["mapped", "in_memory"])
    ap.add_argument("--store")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    args = ap.parse_args()
    if args.task == "rank":
        return task_rank(args)
    if args.task == "throughput":
        return task_throughput(args)

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        store = Path(tmp) / "images.zarr"
        make_store(store, args.n)
        node = Path(tempfile.mkdtemp(prefix="virgo-loader-bench-", dir="/dev/shm"))
        try:
            memory = {}
            for kind in ("mapped", "in_memory"):
                one, two = (node_peak(kind, store, w, node) for w in (1, 2))
                memory[kind] = {
                    "1_rank": one,
                    "2_ranks": two,
                    "ratio_2_over_1": two["peak_mb"] / one["peak_mb"],
                    "data_ratio_2_over_1": two["data_mb"] / one["data_mb"],
                }
            env = dict(os.environ, VIRGO_NODE_DATA=str(node), OMP_NUM_THREADS="1")
            rate, opened = {}, {}
            for kind in ("in_memory", "mapped"):
                out = subprocess.run(
                    [sys.executable, __file__, "--task", "throughput", "--kind", kind, "--store", str(store)],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                measured = json.loads(out.strip().splitlines()[-1])
                rate[kind], opened[kind] = measured["samples_per_s"], measured["open_s"]
        finally:
            shutil.rmtree(node, ignore_errors=True)
    split_mb = args.n * (CHANNELS + 1) * PATCH * PATCH * 4 / 2**20
    print(
        json.dumps(
            {
                "train_samples": args.n,
                "split_mb": split_mb,
                "memory": memory,
                "throughput": {
                    "samples_per_s": rate,
                    "ratio_mapped_over_in_memory": rate["mapped"] / rate["in_memory"],
                    "local_batch": BATCH,
                },
                # seconds to open the split in one process: decompress it into the node's copy, or into memory
                "open_s": opened,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
