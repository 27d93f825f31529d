"""Continue an experiment from its last checkpoint with more epochs: one command.

    virgo-exps resume <exp> --epochs N            # run now, in the workspace
    virgo-exps resume <exp> --epochs N --queue    # queue it; `dvc queue start` runs it

What it does, and why it is enough:

1. ``dvc exp apply <exp>``: the workspace gets the experiment's params.yaml and
   dvc.lock, and DVC checks its outputs out of the cache, ``checkpoints/``
   included: the final snapshot of its completed run (DVC keeps whatever the
   workspace had in refs/exps/apply/stash).
2. ``dvc exp run -S train.epochs=N [--queue] -n <exp>-e<N>``: only
   ``train.epochs`` changed, so the train stage reruns; ``checkpoints/`` is a
   ``persist: true`` output, which DVC leaves in place, and the trainer finds
   a snapshot of the same configuration that is a prefix of the longer run
   and continues from it. A queued run starts from the stashed workspace,
   whose dvc.lock names the experiment's checkpoint, so DVC checks it out
   into the temporary workspace as well.

An *interrupted* run needs none of this: its snapshot is kept in
``.virgo/snapshots/`` of the main checkout (see :mod:`virgo_exps.train.snapshots`),
and running the same command again continues it.

The trainer's resume is exact (weights, optimiser, schedule, RNG, data
order), so the result equals training N epochs in one go.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from virgo_exps import dvcrun
from virgo_exps.gitrun import experiment_refs, git
from virgo_exps.paths import CHECKPOINTS_DIR


class ResumeError(RuntimeError):
    pass


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return git(repo, *args, check=False)


def find_experiment(repo: Path, exp: str) -> str:
    """The commit of experiment ``exp`` (a name of this repository, or a revision)."""
    matches = [(ref, commit) for name, ref, commit in experiment_refs(repo) if name == exp]
    if len(matches) == 1:
        return matches[0][1]
    head = _git(repo, "rev-parse", "HEAD").stdout.strip()
    if len(matches) > 1:
        # Same name under several baselines: prefer the current one.
        here = [m for m in matches if f"/{head[2:]}/" in m[0]]
        if len(here) == 1:
            return here[0][1]
        raise ResumeError(
            f"experiment name '{exp}' exists under several baselines; give its revision instead: "
            + ", ".join(m[1][:7] for m in matches)
        )
    rev = _git(repo, "rev-parse", "--verify", "--quiet", f"{exp}^{{commit}}")
    if rev.returncode == 0:
        return rev.stdout.strip()
    raise ResumeError(
        f"no experiment '{exp}' in this repository (see `dvc exp list`); a teammate's experiment is fetched with "
        f"`dvc exp pull team {exp}` (or pass --pull team)"
    )


def experiment_state(repo: Path, rev: str) -> tuple[int, bool]:
    """(train.epochs, whether its dvc.lock records a checkpoint) of the experiment commit ``rev``."""
    params = _git(repo, "show", f"{rev}:params.yaml")
    lock = _git(repo, "show", f"{rev}:dvc.lock")
    if params.returncode != 0 or lock.returncode != 0:
        raise ResumeError(f"{rev[:7]}: no params.yaml or dvc.lock in that commit; is it an experiment of this project?")
    epochs = int((yaml.safe_load(params.stdout) or {}).get("train", {}).get("epochs", 0))
    outs = ((yaml.safe_load(lock.stdout) or {}).get("stages", {}).get("train", {}) or {}).get("outs", [])
    has_ckpt = any(o.get("path") == CHECKPOINTS_DIR and (o.get("md5") or o.get("hash")) for o in outs)
    return epochs, has_ckpt


def resume(
    exp: str, epochs: int, queue: bool = False, name: str | None = None, pull: str | None = None, repo: Path | str = "."
) -> int:
    repo = Path(repo).resolve()
    if epochs <= 0:
        raise ResumeError(f"--epochs {epochs}: must be a positive total number of epochs")
    if pull:
        rc = dvcrun.stream(["exp", "pull", pull, exp], repo)
        if rc != 0:
            raise ResumeError(f"`dvc exp pull {pull} {exp}` failed (exit code {rc})")
    rev = find_experiment(repo, exp)
    done, has_ckpt = experiment_state(repo, rev)
    if not has_ckpt:
        raise ResumeError(f"experiment '{exp}' has no checkpoints/ output in its dvc.lock: nothing to continue from")
    if epochs <= done:
        raise ResumeError(
            f"experiment '{exp}' already trained {done} epoch(s); --epochs is the total, so give more than {done}"
        )
    new_name = name or f"{exp}-e{epochs}"
    rc = dvcrun.stream(["exp", "apply", exp], repo)
    if rc != 0:
        raise ResumeError(
            f"`dvc exp apply {exp}` failed (exit code {rc}); if its data is missing from the cache, "
            f"fetch it with `dvc exp pull <remote> {exp}` first"
        )
    args = ["exp", "run", "-S", f"train.epochs={epochs}", "-n", new_name]
    if queue:
        args.insert(2, "--queue")
    rc = dvcrun.stream(args, repo)
    if rc != 0:
        print(
            f"resume: `dvc {' '.join(args)}` failed (exit code {rc}); `virgo-exps failures` shows why", file=sys.stderr
        )
        return rc
    if queue:
        print(
            f"resume: queued '{new_name}' (continues '{exp}' from epoch {done} to {epochs}); run it with "
            f"`dvc queue start`, follow it with `dvc queue logs {new_name} -f`"
        )
    else:
        print(f"resume: '{new_name}' continued '{exp}' from epoch {done} to {epochs}; see `dvc exp show`")
    return 0
