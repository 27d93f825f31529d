"""The paper preset's data stages at a fraction, generate as a job array on a 2-node Slurm cluster,
checked byte for byte against the same stages run on one machine.

    python benchmarks/scale_cluster.py                    # one tenth: 75,000 samples (as root)
    python benchmarks/scale_cluster.py --fraction 0.002   # 1,500 samples (the preset's batch needs 1,024), to check it

Needs root: it starts a simulated cluster of 2 nodes (src/slurmsim: slurmctld, a slurmd a node, each
node in its own network namespace, 1 CPU each) in a temporary folder and stops it at the end. In a
temporary copy of the project with ``presets/paper.yaml`` and ``generate.n_samples`` set to the
fraction, ``dvc repro --single-item generate`` runs with ``VIRGO_MACHINE=simcluster``: the profile's
``data_tasks: 2`` makes it one job array, a task a node, each writing its share of the chunks.
``dvc repro --single-item preprocess`` follows (a stage of the submitting host). Then the two stage
commands run again on this machine (``VIRGO_MACHINE=local``) in a second copy of the project, and every
file of both stores is compared by SHA-256. Prints ONE JSON object: the seconds and peak memory of each run
(see benchmarks/scale.py for what they count), the array's job id and task logs, the stores' sizes,
the number of files compared, and the files that differ (none expected; the run exits 1 otherwise).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml
from _project import BIN, copy_project, env, run
from scale import TreeMemory, disk_bytes, paper_study, require_free, run_stage


def digests(store: Path) -> dict[str, str]:
    """SHA-256 of every file of a store, by path inside it."""
    out = {}
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[str(path.relative_to(store))] = h.hexdigest()
    return out


def local_stage(repo: Path, argv: list[str], extra_env: dict) -> dict:
    """A stage command run directly on this machine: seconds and peak memory."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "python"), *argv],
        cwd=repo,
        env={**env(), **extra_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with TreeMemory(proc.pid, Path(extra_env["VIRGO_NODE_DATA"]), argv[0].split("/")[-1][:-3]) as mem:
        output, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark: {' '.join(argv)} failed ({proc.returncode}):\n{output[-4000:]}")
    return {"seconds": round(time.monotonic() - t0, 2), "peak_memory_mb": mem.peak / 2**20}


def compare(a: Path, b: Path) -> dict:
    da, db = digests(a), digests(b)
    differ = sorted(k for k in da.keys() & db.keys() if da[k] != db[k])
    return {
        "files": len(da),
        "only_cluster": sorted(da.keys() - db.keys()),
        "only_local": sorted(db.keys() - da.keys()),
        "differ": differ,
        "identical": not differ and da.keys() == db.keys(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.1, help="of the paper's 750,000 samples (default 0.1)")
    ap.add_argument("--keep", action="store_true", help="leave the project copy and the cluster's folder in place")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("benchmark: needs root (it starts slurmctld/slurmd in network namespaces)")
    from slurmsim import SimCluster

    n, _params, raw, images = paper_study(args.fraction)
    # the cluster's stores and this machine's
    require_free(
        2 * (raw + images), f"{n} samples (two copies of raw {raw / 1e9:.1f} GB + images {images / 1e9:.1f} GB)"
    )
    tmp = Path(tempfile.mkdtemp(prefix="virgo-scale-cluster-"))
    node = Path(tempfile.mkdtemp(prefix="virgo-scale-node-"))
    extra = {"VIRGO_NODE_DATA": str(node)}
    cluster = SimCluster(tmp / "cluster", nodes=2)
    try:
        repo = tmp / "repo"
        repo.mkdir()
        copy_project(repo)
        run(["git", "init", "-q", "-b", "main"], repo)
        run([str(BIN / "virgo-exps"), "preset", "presets/paper.yaml"], repo)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["generate"]["n_samples"] = n
        # Training does not run here; the first stage's checks still read its resources.
        params["train"].update(strategy="single", nodes=1, procs_per_node=1)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(["git", "add", "-A"], repo)
        run(["git", "commit", "-q", "-m", "scale benchmark on the cluster"], repo)
        t0 = time.monotonic()
        cluster.start(timeout=120)
        started = round(time.monotonic() - t0, 2)
        # Where machines/simcluster/machine.yaml looks for the cluster `make cluster` starts.
        (repo / ".slurmsim").symlink_to(cluster.workdir, target_is_directory=True)
        on_cluster = {**extra, "VIRGO_MACHINE": "simcluster", "VIRGO_FOLLOW_LOG": "0"}
        stages = {"environment": run_stage(repo, "environment", extra)}
        stages["generate"] = run_stage(repo, "generate", on_cluster)
        logs = sorted(p.name for p in (repo / "logs" / "generate").glob("*_*.out"))
        jobs = sorted({m.group(1) for name in logs if (m := re.search(r"-(\d+)_\d+\.out$", name))})
        stages["preprocess"] = run_stage(repo, "preprocess", extra)
        # A second copy of the project, so the stores' provenance names the same relative input path.
        other = tmp / "local"
        other.mkdir()
        copy_project(other)
        shutil.copy2(repo / "params.yaml", other / "params.yaml")
        here = other / "data"
        on_local = {**extra, "VIRGO_MACHINE": "local"}
        local = {
            "generate": local_stage(
                other, ["stages/generate.py", "--params", "params.yaml", "--out", "data/raw.zarr"], on_local
            ),
            "preprocess": local_stage(
                other,
                [
                    "stages/preprocess.py",
                    "--params",
                    "params.yaml",
                    "--in",
                    "data/raw.zarr",
                    "--out",
                    "data/images.zarr",
                ],
                on_local,
            ),
        }
        result = {
            "fraction": args.fraction,
            "n_samples": n,
            "cores": os.cpu_count(),
            "cluster": {"nodes": 2, "cpus_per_node": 1, "start_s": started, "generate_jobs": jobs, "task_logs": logs},
            "cluster_stages": stages,
            "local_stages": local,
            "stores_mb": {
                "raw": disk_bytes(here / "raw.zarr") / 2**20,
                "images": disk_bytes(here / "images.zarr") / 2**20,
                "raw_uncompressed": raw / 2**20,
                "images_uncompressed": images / 2**20,
            },
            "raw": compare(repo / "data" / "raw.zarr", here / "raw.zarr"),
            "images": compare(repo / "data" / "images.zarr", here / "images.zarr"),
        }
        if args.keep:
            result["project"] = str(repo)
        print(json.dumps(result, indent=1))
        if not (result["raw"]["identical"] and result["images"]["identical"]):
            raise SystemExit(1)
    finally:
        cluster.stop()
        shutil.rmtree(node, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
