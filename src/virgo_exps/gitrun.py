"""Running ``git`` from Python: one helper for every command of ours, and the experiments git knows.

:func:`git` runs one command in a repository and, when it must succeed, raises the caller's error class
with one line (the command, where, git's own message). :func:`experiment_refs` lists DVC's experiments
(``refs/exps/<baseline>/<name>``, DVC's queue's own refs left out): the one listing every command reads.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


class GitError(RuntimeError):
    """A git command failed; the message is one line."""


def git(
    repo: str | Path | None,
    *args: str,
    check: bool = True,
    error: type[Exception] = GitError,
    text: bool = True,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``git ARGS`` in ``repo`` (None: the current folder), output captured; with ``check``, a failure
    raises ``error`` (one line). Git missing raises OSError, a ``timeout`` passed TimeoutExpired."""
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=text, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        said = proc.stderr if text else proc.stderr.decode(errors="replace")
        shown = said.strip().splitlines()[-1] if said.strip() else f"exit code {proc.returncode}"
        raise error(f"git {' '.join(args)} failed in {repo}: {shown}")
    return proc


def experiment_refs(repo: str | Path) -> list[tuple[str, str, str]]:
    """(experiment name, ref, commit) of every DVC experiment git holds in ``repo``; [] where it cannot
    say (not a repository)."""
    proc = git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps", check=False)
    found = []
    for line in proc.stdout.splitlines():
        ref, _, commit = line.partition(" ")
        # refs/exps/<2 chars>/<38 chars>/<name>; DVC's queue keeps refs/exps/celery/...
        if ref.count("/") >= 4 and not ref.startswith("refs/exps/celery"):
            found.append((ref.rsplit("/", 1)[-1], ref, commit))
    return found
