"""Where ``virgo-exps verify`` reads a workspace's or an experiment's files, and which experiments
are their baseline.

An experiment is read without applying it: ``params.yaml``, ``dvc.lock`` and
``metrics.json`` and ``run.json`` from its git ref, the other outputs from the DVC cache (which
must hold them: ``dvc exp pull`` first for a teammate's). Chunks are not
decoded there; the cache objects' MD5 covers their bytes.

An experiment whose commit has the same tree as its baseline's (a
``dvc exp run`` with nothing changed) is said to be that baseline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from virgo_exps import dvcrun, fsio, provenance
from virgo_exps.gitrun import experiment_refs, git


def cache_dir(repo: Path) -> Path:
    return Path(dvcrun.run(["cache", "dir"], repo, check=False).stdout.strip() or repo / ".dvc" / "cache")


def _git(repo: Path, *args: str, check: bool = True) -> str:
    return git(repo, *args, check=check, error=VerifyError).stdout


class VerifyError(Exception):
    """Verification could not even start (no such experiment, not a repository)."""


# -- experiments and baselines ------------------------------------------------


def exp_refs(repo: Path) -> dict[str, str]:
    """{experiment name: ref} of the experiments git knows (``refs/exps/...``)."""
    return {name: ref for name, ref, _ in experiment_refs(repo)}


def baseline_of(repo: Path, rev: str) -> str | None:
    """The baseline commit of an experiment when the experiment changed nothing, else None.

    ``dvc exp run`` records an experiment even when no stage reran: its commit
    then has the very tree of its parent (the baseline).
    """
    tree = _git(repo, "rev-parse", f"{rev}^{{tree}}", check=False).strip()
    parent = _git(repo, "rev-parse", f"{rev}^", check=False).strip()
    if not tree or not parent:
        return None
    return parent if _git(repo, "rev-parse", f"{parent}^{{tree}}", check=False).strip() == tree else None


def same_as_baseline(repo: str | Path = ".") -> dict[str, str]:
    """{experiment name: baseline commit} for every experiment identical to its baseline."""
    repo = Path(repo)
    out = {}
    for name, ref in exp_refs(repo).items():
        base = baseline_of(repo, ref)
        if base:
            out[name] = base
    return out


# -- where outputs are read from ------------------------------------------------


class Workspace:
    label = "workspace"

    def __init__(self, repo: Path):
        self.repo = repo

    def text(self, rel: str) -> str | None:
        path = self.repo / rel
        return path.read_text(errors="replace") if path.is_file() else None  # damage shows as a parse error

    def files(self, rel: str) -> list[tuple[str, Path]] | None:
        path = self.repo / rel
        if not path.exists():
            return None
        return list(provenance.files_of(path))

    def path(self, rel: str) -> Path | None:
        path = self.repo / rel
        return path if path.exists() else None

    def trust(self, rel: str) -> str | None:
        """Why the file ``rel`` is not this user's to trust (:func:`fsio.trust_refusal`), or None."""
        try:
            return fsio.trust_refusal(self.repo / rel)
        except OSError:
            return None  # missing or unreadable: the reader says so


class Experiment:
    """An experiment's files: git for what git holds, the DVC cache for the outputs in ``dvc.lock``."""

    def __init__(self, repo: Path, name: str):
        self.repo = repo
        refs = exp_refs(repo)
        if name in refs:
            self.rev = refs[name]
        elif _git(repo, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}", check=False).strip():
            self.rev = name
        else:
            known = ", ".join(sorted(refs)) or "none"
            raise VerifyError(f"--exp {name}: no such experiment (known: {known}); see `dvc exp list`")
        self.label = f"experiment {name}"
        self.cache = cache_dir(repo)
        lock = yaml.safe_load(self.text("dvc.lock") or "") or {}
        self.uncached = uncached_outs(yaml.safe_load(self.text("dvc.yaml") or "") or {})
        self.outs: dict[str, dict] = {}
        for stage in (lock.get("stages") or {}).values():
            for out in stage.get("outs") or []:
                if out["path"] not in self.uncached:
                    self.outs[out["path"]] = out

    def text(self, rel: str) -> str | None:
        proc = git(self.repo, "show", f"{self.rev}:{rel}", check=False, text=False)
        return proc.stdout.decode(errors="replace") if proc.returncode == 0 else None

    def blob(self, rel: str) -> bytes | None:
        """The bytes git holds for ``rel`` in the experiment's commit; None if it holds none."""
        proc = git(self.repo, "show", f"{self.rev}:{rel}", check=False, text=False)
        return proc.stdout if proc.returncode == 0 else None

    def object(self, md5: str) -> Path:
        return self.cache / "files" / "md5" / md5[:2] / md5[2:]

    def entries(self, rel: str) -> list[tuple[str, str]] | None:
        """(relative path, md5) of an output's files per dvc.lock and its .dir object; None if unknown."""
        out = self.outs.get(rel)
        if out is None or "md5" not in out:
            return None
        md5 = out["md5"]
        if not md5.endswith(".dir"):
            return [("", md5)]
        obj = self.object(md5)
        if not obj.is_file():
            return []
        return [(e["relpath"], e["md5"]) for e in json.loads(obj.read_text())]

    def git_files(self, rel: str) -> list[tuple[str, bytes]] | None:
        """(path inside ``rel``, bytes) of what git holds at ``rel`` in the experiment's commit: one
        entry with path "" for a file, every file below it for a folder; None if git holds nothing."""
        proc = git(self.repo, "ls-tree", "-r", "-z", "--full-tree", self.rev, "--", rel, check=False, text=False)
        found = []
        for item in proc.stdout.split(b"\0"):
            if b"\t" not in item:
                continue
            meta, name = item.split(b"\t", 1)
            if meta.split()[1] != b"blob":
                continue
            path = name.decode()
            sub = "" if path == rel else path[len(rel) + 1 :]
            found.append((sub, self.blob(path) or b""))
        return found or None

    def files(self, rel: str) -> list[tuple[str, Path]] | None:
        entries = self.entries(rel)
        if entries is None:
            held = self.git_files(rel)  # an output git holds (cache: false)
            if held is None:
                return None
            out = []
            for sub, data in held:
                tmp = (
                    self.repo / ".dvc" / "tmp" / "verify" / rel / sub
                    if sub
                    else self.repo / ".dvc" / "tmp" / "verify" / rel
                )
                if tmp.is_dir():
                    shutil.rmtree(tmp)
                tmp.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(data)
                out.append((sub, tmp))
            return out
        return [(r, self.object(m)) for r, m in entries]

    def path(self, rel: str) -> Path | None:
        files = self.files(rel)
        if files and len(files) == 1 and files[0][0] == "" and files[0][1].is_file():
            return files[0][1]
        return None


def uncached_outs(dvc_yaml: dict) -> set[str]:
    """Outputs with ``cache: false``: git holds them, the DVC cache does not."""
    out = set()
    for spec in (dvc_yaml.get("stages") or {}).values():
        for key in ("outs", "metrics", "plots"):
            for entry in spec.get(key) or []:
                if isinstance(entry, dict):
                    path, opts = next(iter(entry.items()))
                    if isinstance(opts, dict) and opts.get("cache") is False:
                        out.add(path)
    return out
