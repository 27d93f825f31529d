"""What the end-to-end benchmarks share: a copy of the project in a fresh git repository, and
running the venv's tools in it with a clean environment (no inherited MLflow, DVC or machine settings)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "VIRGO_"))}
    out["PATH"] = f"{BIN}{os.pathsep}{out.get('PATH', '')}"
    out["DVC_NO_ANALYTICS"] = "1"
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        out.setdefault(key, "bench")
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        out.setdefault(key, "bench@example.invalid")
    return out


def run(cmd: list[str], cwd: Path) -> str:
    """Run a command in ``cwd``; stop the benchmark with its output when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"benchmark: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def copy_project(dest: Path) -> None:
    """The tracked files of the project into ``dest``, without results of earlier runs."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if rel == "dvc.lock" or rel.startswith(("data/", "results/", "checkpoints/")) or not (ROOT / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
