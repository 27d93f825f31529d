"""How far a distributed run drifts from the single-process loss trajectory, epoch by epoch.

    python benchmarks/trajectory.py                    # the default params (512 samples, 5 epochs)
    python benchmarks/trajectory.py --epochs 10 --procs 2 --strategies ddp deepspeed

Every strategy takes the same global batches in the same order (ShardSampler),
and GroupNorm makes the computed function independent of how a batch is split,
so the only difference between world sizes is the order of floating-point
sums (the gradient all-reduce). That difference starts at rounding level and
grows as training amplifies it. This script runs the pipeline of
``params.yaml`` once with ``train.strategy=single`` and once per strategy with
``--procs`` processes, through the real ``dvc exp run`` in a temporary copy of
the project, and prints ONE JSON object: per strategy and epoch, the relative
difference of the train and validation loss from the single-process run.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import yaml
from _project import copy_project, run


def _losses(repo: Path) -> list[tuple[float, float]]:
    with open(repo / "results" / "epochs.csv", newline="") as f:
        return [(float(row["train_loss"]), float(row["val_loss"])) for row in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: params.yaml's)")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", default=["ddp"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="virgo-bench-trajectory-", ignore_cleanup_errors=True) as tmp:
        repo = Path(tmp) / "repo"
        copy_project(repo)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        if args.epochs:
            params["train"]["epochs"] = args.epochs
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "copy"]):
            run(cmd, repo)
        print("single process", file=sys.stderr, flush=True)
        run(["dvc", "exp", "run", "-S", "train.strategy=single", "-S", "train.procs_per_node=1"], repo)
        reference = _losses(repo)
        out = {
            "epochs": len(reference),
            "n_samples": params["generate"]["n_samples"],
            "procs": args.procs,
            "single": [{"train_loss": t, "val_loss": v} for t, v in reference],
        }
        for strategy in args.strategies:
            print(f"{strategy} on {args.procs} processes", file=sys.stderr, flush=True)
            run(
                ["dvc", "exp", "run", "-S", f"train.strategy={strategy}", "-S", f"train.procs_per_node={args.procs}"],
                repo,
            )
            rows = []
            for epoch, ((t0, v0), (t, v)) in enumerate(zip(reference, _losses(repo)), start=1):
                rows.append(
                    {
                        "epoch": epoch,
                        "train_loss": t,
                        "val_loss": v,
                        "train_rel_diff": abs(t - t0) / abs(t0),
                        "val_rel_diff": abs(v - v0) / abs(v0),
                    }
                )
            out[strategy] = rows
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
