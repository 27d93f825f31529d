"""Throughput and memory of the data stages, and the speed-up over gwpy.

    python benchmarks/data.py            # full run (several minutes on 2 cores)
    python benchmarks/data.py --quick    # smaller sizes (about a minute)

Prints ONE JSON object:

* ``generate_samples_per_s``: :func:`virgo_exps.study.generate.generate` on all
  cores (wall time of the call, pool start-up included), and per core.
* ``preprocess_samples_per_s``: :func:`virgo_exps.study.preprocess.preprocess`
  on all cores, for ``whiten`` true and false (wall time of the call: worker
  start-up, reading, Q-transforms, patches, statistics, writing and
  normalising; start-up is a few seconds per run, so small runs understate
  the steady rate).
* ``ours_per_core_samples_per_s``: the same, in one process with
  ``torch.set_num_threads(1)`` (and 1 BLAS/OpenMP thread).
* ``gwpy_samples_per_s``: ``TimeSeries(x, sample_rate=500).q_transform(
  frange=(10, 150))`` on each of the 4 channels of a sample, one process,
  one thread; gwpy whitens by default, so ``whiten=True`` is the headline
  and ``whiten=False`` is reported too. gwpy only computes the images; ours
  also cuts patches, accumulates statistics and writes the store.
* ``speedup_vs_gwpy_per_core``: ours per core / gwpy, with whitening on in
  both (``..._by_whiten`` has both settings).
* ``peak_rss_mb``: generate + preprocess of N samples in a fresh process
  (all cores), max RSS of the parent and of the largest worker
  (``resource.getrusage``), for two sizes: flat memory means equal values.

Every measurement runs in its own subprocess, so imports, thread settings and
caches do not leak from one into another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DURATION, SAMPLE_RATE, N_AUX, CHUNK = 16.0, 500, 3, 64
FMIN, FMAX, PATCH, BATCH = 10.0, 150.0, 64, 32


def _gen_cfg(n: int, seed: int = 42):
    from virgo_exps.study.params import GenerateConfig

    return GenerateConfig(
        seed=seed, n_samples=n, n_aux=N_AUX, duration=DURATION, sample_rate=SAMPLE_RATE, chunk_size=CHUNK, workers=0
    )


def _pre_cfg(whiten: bool):
    from virgo_exps.study.params import PreprocessConfig

    return PreprocessConfig(
        fmin=FMIN, fmax=FMAX, whiten=whiten, patch_size=PATCH, batch_size=BATCH, val_fraction=0.2, split_seed=0
    )


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


# -- tasks run in subprocesses -------------------------------------------------


def task_generate(args) -> dict:
    from virgo_exps.study.generate import generate

    out = Path(args.dir) / "raw.zarr"
    t = time.perf_counter()
    generate(_gen_cfg(args.n), out, workers=args.workers, progress=False)
    return {"seconds": time.perf_counter() - t}


def task_preprocess(args) -> dict:
    from virgo_exps.study.preprocess import preprocess

    warm = 0.0
    if args.workers == 1:
        _one_thread()
        # One-time cost of a process: torch import, building the Q tiling and
        # spline operators (cached per process), first use of the kernels.
        # Excluded from the per-core figure (as gwpy's warm-up is), reported.
        import numpy as np

        from virgo_exps.study.qtransform import q_transform

        t = time.perf_counter()
        noise = np.random.default_rng(0).standard_normal((1, int(DURATION * SAMPLE_RATE)))
        q_transform(noise, SAMPLE_RATE, frange=(FMIN, FMAX), whiten=args.whiten)
        warm = time.perf_counter() - t
    t = time.perf_counter()
    summary = preprocess(
        Path(args.src),
        _pre_cfg(args.whiten),
        Path(args.dir) / f"img-{args.whiten}-{args.workers}.zarr",
        progress=False,
        workers=args.workers,
    )
    return {"seconds": time.perf_counter() - t, "warmup_seconds": warm, "n": summary["n_samples"]}


def task_gwpy(args) -> dict:
    import numpy as np
    import zarr
    from gwpy.timeseries import TimeSeries

    x = zarr.open_group(args.src, mode="r")["strain"][: args.n].astype(np.float64)
    # warm-up (imports, caches) on one channel, not counted
    TimeSeries(x[0, 0], sample_rate=SAMPLE_RATE).q_transform(frange=(FMIN, FMAX), whiten=args.whiten)
    t = time.perf_counter()
    for sample in x:
        for channel in sample:
            TimeSeries(channel, sample_rate=SAMPLE_RATE).q_transform(frange=(FMIN, FMAX), whiten=args.whiten)
    return {"seconds": time.perf_counter() - t}


def task_rss(args) -> dict:
    import resource

    from virgo_exps.study.generate import generate
    from virgo_exps.study.preprocess import preprocess

    raw = Path(args.dir) / "raw.zarr"
    generate(_gen_cfg(args.n), raw, workers=0, progress=False)
    preprocess(raw, _pre_cfg(False), Path(args.dir) / "img.zarr", progress=False, workers=0)
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"parent": round(self_mb, 1), "largest_worker": round(child_mb, 1)}


TASKS = {"generate": task_generate, "preprocess": task_preprocess, "gwpy": task_gwpy, "rss": task_rss}


def _sub(task: str, one_thread: bool = False, **kw) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--task", task]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ)
    if one_thread:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{task} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--task", choices=sorted(TASKS), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--whiten", type=lambda s: s == "True", default=True, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.task:
        print(json.dumps(TASKS[args.task](args)))
        return

    cores = os.cpu_count() or 1
    if args.quick:
        n_gen, n_core, n_gwpy, rss_sizes = 256, 64, 4, (128, 512)
    else:
        n_gen, n_core, n_gwpy, rss_sizes = 2048, 256, 16, (256, 2048)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="virgo-bench-") as tmp:
        src = Path(tmp) / "raw.zarr"
        gen_all = _sub("generate", n=n_gen, workers=0, dir=tmp)
        with tempfile.TemporaryDirectory(dir=tmp) as t1:
            gen_one = _sub("generate", one_thread=True, n=min(n_gen, 512), workers=1, dir=t1)
        pre_all, per_core, per_core_cold, gwpy = {}, {}, {}, {}
        for whiten in (True, False):
            with tempfile.TemporaryDirectory(dir=tmp) as t2:
                r = _sub("preprocess", workers=0, whiten=whiten, dir=t2, src=src)
                assert r["n"] == n_gen
                pre_all[whiten] = r["n"] / r["seconds"]
            with tempfile.TemporaryDirectory(dir=tmp) as t3:
                sub_src = Path(t3) / "raw.zarr"
                _sub("generate", n=n_core, workers=0, dir=t3)  # same seed: the first n_core samples
                r = _sub("preprocess", one_thread=True, workers=1, whiten=whiten, dir=t3, src=sub_src)
                assert r["n"] == n_core
                per_core[whiten] = n_core / r["seconds"]
                per_core_cold[whiten] = n_core / (r["seconds"] + r["warmup_seconds"])
            gwpy[whiten] = n_gwpy / _sub("gwpy", one_thread=True, n=n_gwpy, whiten=whiten, src=src)["seconds"]
    rss = {}
    for n in rss_sizes:
        with tempfile.TemporaryDirectory(prefix="virgo-bench-rss-") as t4:
            rss[str(n)] = _sub("rss", n=n, dir=t4)

    import gwpy as gwpy_mod
    import torch

    result = {
        "generate_samples_per_s": round(n_gen / gen_all["seconds"], 2),
        "generate_samples_per_s_per_core": round(min(n_gen, 512) / gen_one["seconds"], 2),
        "preprocess_samples_per_s": round(pre_all[True], 3),
        "preprocess_samples_per_s_by_whiten": {str(k).lower(): round(v, 3) for k, v in pre_all.items()},
        "ours_per_core_samples_per_s_by_whiten": {str(k).lower(): round(v, 3) for k, v in per_core.items()},
        "ours_per_core_samples_per_s_incl_process_warmup_by_whiten": {
            str(k).lower(): round(v, 3) for k, v in per_core_cold.items()
        },
        "gwpy_samples_per_s": round(gwpy[True], 3),
        "gwpy_samples_per_s_by_whiten": {str(k).lower(): round(v, 3) for k, v in gwpy.items()},
        "speedup_vs_gwpy_per_core": round(per_core[True] / gwpy[True], 2),
        "speedup_vs_gwpy_per_core_by_whiten": {str(k).lower(): round(per_core[k] / gwpy[k], 2) for k in (True, False)},
        "peak_rss_mb": {k: max(v.values()) for k, v in rss.items()},
        "peak_rss_detail_mb": rss,
        "cores": cores,
        "load_avg_1m_at_start": round(load, 2),
        "settings": {
            "quick": args.quick,
            "duration_s": DURATION,
            "sample_rate": SAMPLE_RATE,
            "channels": 1 + N_AUX,
            "chunk_size": CHUNK,
            "frange": [FMIN, FMAX],
            "patch_size": PATCH,
            "batch_size": BATCH,
            "headline_whiten": True,
            "n_generate": n_gen,
            "n_generate_per_core": min(n_gen, 512),
            "n_preprocess": n_gen,
            "n_per_core": n_core,
            "n_gwpy": n_gwpy,
            "rss_sizes": list(rss_sizes),
            "rss_whiten": False,
            "gwpy": f"TimeSeries(x, sample_rate={SAMPLE_RATE}).q_transform(frange=({FMIN}, {FMAX}), whiten=...) "
            "per channel, 1 process, 1 thread",
            "ours_per_core": "preprocess(workers=1) with torch.set_num_threads(1), 1 OpenMP/BLAS thread; "
            "store reading/writing, patches, statistics and normalisation included; the "
            "per-process warm-up (one q_transform building the cached tiling) excluded",
            "versions": {"torch": torch.__version__, "gwpy": gwpy_mod.__version__},
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
