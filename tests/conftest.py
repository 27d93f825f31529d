"""Shared fixtures: a copy of the repository in a temporary git repo, tiny params.

End-to-end tests run the real tools (dvc, torchrun, mlflow, Slurm) on that
copy, so they exercise exactly what a user gets from a clone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest_plugins = ["slurm_fixtures"] if (Path(__file__).parent / "slurm_fixtures.py").exists() else []

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small enough that a whole pipeline run takes well under a minute on 2 cores.
TINY = {
    "generate": {"n_samples": 40, "duration": 4.0, "sample_rate": 256, "chunk_size": 16, "workers": 2},
    "preprocess": {"fmax": 80.0, "patch_size": 16, "val_fraction": 0.2, "batch_size": 16},
    "train": {"epochs": 2, "global_batch_size": 8, "warmup_steps": 2, "profile_steps": 2},
}


# The trainer keeps one decompressed copy of a split per node and reuses it while a job maps it
# (virgo_exps.train.nodecopy). Two pytest workers are one node: each gets its own folder for those
# copies, so that a test never maps a copy made by a test of the other worker.
NODE_DATA_ENV = "VIRGO_NODE_DATA"


def tool_env(extra: dict | None = None) -> dict:
    """The environment a user has after activating .venv, without inherited tracking settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "VIRGO_"))}
    if os.environ.get(NODE_DATA_ENV):  # this test process's own folder for the node's data copies
        env[NODE_DATA_ENV] = os.environ[NODE_DATA_ENV]
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.invalid")
    env["DVC_NO_ANALYTICS"] = "1"
    env.update(extra or {})
    return env


def sh(cmd, cwd, env=None, check=True, timeout=900, **kw) -> subprocess.CompletedProcess:
    """Run a command, capturing output; on failure show it in the assertion message."""
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env or tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        shell=isinstance(cmd, str),
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {cmd}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def dvc_queue_status(repo: Path, env: dict | None = None, tries: int = 10) -> str:
    """`dvc queue status` output; tried again when DVC fails reading a worker's state file
    while the worker writes it (`unexpected error - Expecting value: line 1 column 1`)."""
    for _ in range(tries - 1):
        proc = sh([str(BIN / "dvc"), "queue", "status"], repo, env=env, check=False)
        if proc.returncode == 0:
            return proc.stdout
        if "Expecting value" not in proc.stderr:
            break
        time.sleep(0.5)
    return sh([str(BIN / "dvc"), "queue", "status"], repo, env=env).stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_served(command: str, backend_uri: str, home: Path, args=(), env: dict | None = None) -> Iterator[str]:
    """``mlflow server`` or ``mlflow ui`` (``command``) on 127.0.0.1 over ``backend_uri``, its log in ``home``;
    yields its URL once /health answers, and stops it by its process group afterwards."""
    port = free_port()
    cmd = [str(BIN / "mlflow"), command, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", backend_uri, "--workers", "1", *args]
    with open(home / f"mlflow-{command}.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=home, env=tool_env(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    if proc.poll() is not None or time.time() > deadline:
                        pytest.fail(f"mlflow {command} did not start:\n" + Path(log.name).read_text()[-3000:])
                    time.sleep(1)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
            proc.wait(timeout=30)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    """The first true value of ``predicate()``, polled every ``interval`` s; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def mappings_of(prefix: str) -> list[tuple[int, int, str]]:
    """(pid, inode, path) of every file mapping of this machine's processes whose path starts with ``prefix``
    (from /proc/<pid>/maps; one row a mapped region)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            lines = (entry / "maps").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith(prefix):
                found.append((int(entry.name), int(parts[4]), parts[5]))
    return found


def mapped_files(prefix: str) -> dict[str, set[int]]:
    """Per path that starts with ``prefix``, the processes of this machine that map it."""
    found: dict[str, set[int]] = {}
    for pid, _, path in mappings_of(prefix):
        found.setdefault(path, set()).add(pid)
    return found


DEEPSPEED_SHM = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_"


def shm_left_behind(since: float, prefix: str = DEEPSPEED_SHM) -> list[str]:
    """Files under ``prefix`` made at or after ``since`` (a time.time()) that no process maps any more:
    what a finished run left in the node's memory (another test's live run maps its own)."""
    folder, start = Path(prefix).parent, Path(prefix).name
    new = []
    for p in folder.glob(f"{start}*"):
        try:
            if p.stat().st_mtime >= since - 1:
                new.append(str(p))
        except FileNotFoundError:  # removed meanwhile
            continue
    mapped = mapped_files(prefix)
    return sorted(p for p in new if p not in mapped)


def _project_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    return [f for f in out if f and (ROOT / f).is_file()]


# The train stage's worker command as stages/train.py hands it to the launcher (dvc.yaml's cmd, with --worker).
TRAIN_WORKER_ARGV = [
    "stages/train.py",
    "--params",
    "params.yaml",
    "--data",
    "data/images.zarr",
    "--checkpoints",
    "checkpoints",
    "--model",
    "results/model.pt",
    "--worker",
]


def train_stage_cmd(params: str, out: str, data: str = "data/images.zarr") -> list[str]:
    """The train stage run by hand rather than by DVC: every output under ``out``, no tracking."""
    return [
        str(BIN / "python"),
        "stages/train.py",
        "--params",
        params,
        "--data",
        data,
        "--checkpoints",
        f"{out}/checkpoints",
        "--model",
        f"{out}/model.pt",
        "--metrics",
        f"{out}/metrics.json",
        "--epochs",
        f"{out}/epochs.csv",
        "--ranks",
        f"{out}/ranks.json",
        "--no-tracking",
    ]


def update_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(dest: Path, params: dict | None = None) -> Path:
    """Copy the project into ``dest`` as a fresh git repository with one commit."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in _project_files():
        if rel == "dvc.lock" or rel.startswith(("data/", "results/", "checkpoints/")):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    merged = {k: dict(v) for k, v in TINY.items()}
    for section, values in (params or {}).items():
        merged.setdefault(section, {}).update(values)
    update_params(dest, merged)
    env = tool_env()
    sh(["git", "init", "-q", "-b", "main"], dest, env)
    sh(["git", "add", "-A"], dest, env)
    sh(["git", "commit", "-q", "-m", "test copy"], dest, env)
    return dest


def image_repo(tmp_path_factory, name: str) -> Path:
    """A project copy whose data/images.zarr is the hand-made store of :func:`write_images` (the train stage's
    input, without running the data stages)."""
    repo = make_repo(tmp_path_factory.mktemp(name) / "repo")
    write_images(repo / "data" / "images.zarr")
    return repo


def write_images(path: Path, seed: int = 0, n_train: int = 64, n_val: int = 16) -> None:
    """A hand-made store in the layout of the preprocess stage (learnable: y depends on x)."""
    import zarr

    rng = np.random.default_rng(seed)
    group = zarr.open_group(str(path), mode="w")
    for split, n in (("train", n_train), ("val", n_val)):
        x = rng.standard_normal((n, 3, 16, 16)).astype("float32")
        y = (0.6 * x[:, :1] - 0.3 * x[:, 2:3] + 0.1 * rng.standard_normal((n, 1, 16, 16))).astype("float32")
        group.create_array(f"{split}/x", data=x, chunks=(32, 3, 16, 16))
        group.create_array(f"{split}/y", data=y, chunks=(32, 1, 16, 16))
    group.attrs["norm"] = {"x_mean": [0.0] * 3, "x_std": [1.0] * 3, "y_mean": 0.0, "y_std": 1.0}
    group.attrs["complete"] = True


@pytest.fixture(scope="session", autouse=True)
def node_data_folder():
    """This pytest process's folder for the node's data copies, in /dev/shm as by default, removed at the end."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="virgo-tests-node-", dir=base))
    before = os.environ.get(NODE_DATA_ENV)
    os.environ[NODE_DATA_ENV] = str(folder)
    yield folder
    if before is None:
        os.environ.pop(NODE_DATA_ENV, None)
    else:
        os.environ[NODE_DATA_ENV] = before
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


# The longest modules first, so that neither of two workers (`make test`: pytest-xdist, --dist loadscope
# --no-loadscope-reorder, a module stays on one worker with its module fixtures) ends with a long module alone.
# Only the order changes; a module missing here runs after these, in the order pytest found it.
LONGEST_FIRST = (
    "test_sweep_search",
    "test_slurm_multinode",
    "test_sweep_array",
    "test_sweeps",
    "test_trainer",
    "test_resume_trust",
    "test_share",
    "test_slurm_launch",
    "test_scalability",
    "test_slurm_requeue",
    "test_pipeline",
    "test_container",
    "test_preflight",
    "test_secrets",
    "test_slurmsim",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def place(item) -> int:
        return rank.get(getattr(getattr(item, "module", None), "__name__", ""), len(rank))

    items.sort(key=place)
