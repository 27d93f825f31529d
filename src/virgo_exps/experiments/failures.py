"""Failed experiments, queued or run in the workspace: status, error line, log path.

Where a failure leaves traces:

- queued (``dvc queue start``): ``dvc queue status`` says ``Failed`` and
  ``dvc exp show`` lists it with State ``Failed`` (and, confusingly, the
  baseline's metrics); ``dvc queue logs <name>`` holds DVC's output, kept only
  until ``dvc queue remove``. :func:`failures` copies it to
  ``logs/failed/<name>.log`` in the main checkout, so it is never lost.
- the train stage (queued or not): the launcher's log
  ``logs/train/<exp>-local-<pid>.out`` (``-<jobid>.out`` on SLURM) in the main
  checkout, with the rank's traceback and ``error:`` line.
- anything else written to ``logs/failed/`` (see :func:`record`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from virgo_exps import dvcrun
from virgo_exps.experiments.verify_sources import exp_refs
from virgo_exps.gitrun import experiment_refs, git
from virgo_exps.launch.protocol import announced_logs, experiment_of_log
from virgo_exps.paths import REPORT_DIR, TRAIN_LOG, main_checkout

FAILED_DIR = Path("logs") / "failed"
_QUEUE_ROW = re.compile(r"^(?P<task>[0-9a-f]{7,})\s+(?P<name>\S+)\s+.*?\s(?P<status>[A-Z][a-z]+)\s*$")


@dataclass
class Failure:
    name: str
    status: str  # 'Failed' (dvc queue) or 'failed (workspace)'
    stage: str  # the stage DVC reported, when known
    error: str  # the most telling error line
    logs: list[str] = field(default_factory=list)
    task: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _dvc(args: list[str], cwd: Path) -> str:
    """What ``dvc <args>`` printed (stdout, then stderr), whatever its exit code."""
    proc = dvcrun.run(args, cwd, check=False)
    return proc.stdout + proc.stderr


def error_line(text: str) -> str:
    """Our stages print one ``error:`` line; else the last exception or DVC error line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("error:")]
    if ours:
        return ours[-1]
    exc = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", ln)]
    if exc:
        return exc[-1]
    dvc = [ln for ln in lines if ln.startswith("ERROR:")]
    return dvc[0] if dvc else (lines[-1] if lines else "")


def failed_stage(text: str) -> str:
    m = re.search(r"failed to reproduce '([^']+)'", text)
    return m.group(1) if m else ""


def launcher_logs(text: str) -> list[str]:
    """Stage logs the launcher announced (:func:`virgo_exps.launch.protocol.log_announcement`)."""
    return announced_logs(text)


def queue_rows(repo: Path) -> list[dict]:
    out = _dvc(["queue", "status"], repo)
    rows = []
    for line in out.splitlines():
        m = _QUEUE_ROW.match(line.strip())
        if m:
            rows.append(m.groupdict())
    return rows


def _exp_refs(repo: Path) -> set[str]:
    return {name for name, _, _ in experiment_refs(repo)}


def record(text: str, name: str, root: Path | None = None) -> Path:
    """Keep a failure's output in logs/failed/<name>.log (what ``virgo-exps run`` and the queue leave)."""
    root = root or main_checkout()
    path = root / FAILED_DIR / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text(errors="replace") != text:
        path.write_text(text)
    return path


def _stage_logs(root: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    logs = root / "logs"
    if not logs.is_dir():
        return found
    for stage_dir in sorted(p for p in logs.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if stage_dir.name == FAILED_DIR.name:
            continue
        for log in sorted(stage_dir.glob("*.out")):
            exp = experiment_of_log(log.name)  # the launcher's own names (launch.protocol)
            if exp is not None:
                found.setdefault(exp, []).append(log)
    return found


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def failures(repo: Path | str = ".") -> list[Failure]:
    """Every failed experiment this checkout knows about."""
    repo = Path(repo).resolve()
    root = main_checkout(repo)
    stage_logs = _stage_logs(root)
    out: list[Failure] = []
    seen: set[str] = set()
    for row in queue_rows(repo):
        if row["status"] != "Failed":
            continue
        name = row["name"]
        text = _dvc(["queue", "logs", name], repo)
        kept = record(text, name, root)
        logs = [_rel(kept, root)]
        logs += [_rel(Path(p), root) for p in launcher_logs(text)]
        logs += [_rel(p, root) for p in stage_logs.get(name, [])]
        err = error_line(text)
        for p in stage_logs.get(name, []):  # the rank's own message beats DVC's summary
            inner = error_line(p.read_text(errors="replace"))
            if inner.startswith("error:"):
                err = inner
        out.append(Failure(name, "Failed", failed_stage(text), err, list(dict.fromkeys(logs)), row["task"]))
        seen.add(name)
    succeeded = _exp_refs(repo)
    for name, paths in stage_logs.items():
        if name in seen or name in succeeded:
            continue
        bad = [
            p
            for p in paths
            if error_line(p.read_text(errors="replace")).startswith(("error:", "Traceback"))
            or "Traceback" in p.read_text(errors="replace")
        ]
        if bad:
            text = bad[-1].read_text(errors="replace")
            out.append(
                Failure(
                    name, "failed (workspace)", bad[-1].parent.name, error_line(text), [_rel(p, root) for p in paths]
                )
            )
            seen.add(name)
    failed_dir = root / FAILED_DIR
    if failed_dir.is_dir():
        for log in sorted(failed_dir.glob("*.log")):
            name = log.stem
            if name in seen or name in succeeded:
                continue
            text = log.read_text(errors="replace")
            out.append(Failure(name, "failed (recorded)", failed_stage(text), error_line(text), [_rel(log, root)]))
    return out


def format_failures(found: list[Failure]) -> str:
    if not found:
        return "no failed experiments"
    lines = [f"{len(found)} failed experiment(s):"]
    for f in found:
        where = f" in stage '{f.stage}'" if f.stage else ""
        lines.append(f"- {f.name}: {f.status}{where}" + (f" (task {f.task})" if f.task else ""))
        lines.append(f"    {f.error}")
        for log in f.logs:
            lines.append(f"    log: {log}")
    lines.append(
        "Queued failures stay in `dvc exp show` (State Failed) until `dvc queue remove --failed`; "
        "their DVC output is kept in logs/failed/ either way."
    )
    return "\n".join(lines)


# -- the logs an experiment carries -------------------------------------------------

# What git holds of an experiment's logs (outputs with `cache: false`, so `dvc exp push/pull` carries them).
CARRIED_LOGS = (TRAIN_LOG, f"{REPORT_DIR}/report.log")
_PART = re.compile(r"^==> (?P<name>\S+?)(?::.*)? <==$", re.M)


class LogsError(Exception):
    pass


def carried_logs(repo: Path | str = ".", exp: str | None = None) -> dict[str, str]:
    """{path: text} of the logs an experiment carries (from git for ``exp``, else the workspace)."""
    repo = Path(repo).resolve()
    found: dict[str, str] = {}
    rev = None
    if exp is not None:
        rev = exp_refs(repo).get(exp)
        if rev is None:
            proc = git(repo, "rev-parse", "--verify", "--quiet", f"{exp}^{{commit}}", check=False)
            if proc.returncode != 0:
                raise LogsError(
                    f"{exp}: no such experiment here; `dvc exp pull <remote> {exp}` fetches a teammate's, "
                    "`dvc exp list` lists what is here"
                )
            rev = exp
    for rel in CARRIED_LOGS:
        if rev is not None:
            proc = git(repo, "show", f"{rev}:{rel}", check=False, text=False)
            if proc.returncode == 0:
                found[rel] = proc.stdout.decode(errors="replace")
        elif (repo / rel).is_file():
            found[rel] = (repo / rel).read_text(errors="replace")
    return found


def log_parts(text: str) -> list[tuple[str, str]]:
    """(name, text) of each log joined in ``text`` under its ``==> name <==`` line."""
    marks = list(_PART.finditer(text))
    if not marks:
        return [("", text)] if text.strip() else []
    return [
        (m.group("name"), text[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(text)].strip("\n"))
        for i, m in enumerate(marks)
    ]


def format_logs(found: dict[str, str], stage: str | None = None, label: str = "the workspace") -> str:
    """The carried logs, each part under its name; ``stage`` keeps that stage's parts only."""
    lines = []
    for rel, text in found.items():
        for name, part in log_parts(text):
            where = name or rel
            part_stage = where.split("/")[1] if where.startswith("logs/") and where.count("/") >= 2 else ""
            if rel.endswith("report.log"):
                part_stage, where = "report", rel
            if stage and part_stage != stage:
                continue
            lines += [f"==> {where}" + (f" (in {rel})" if where != rel else "") + " <==", part, ""]
    if not lines:
        what = f"no log of stage '{stage}'" if stage else "no logs"
        return f"{label}: {what} (an experiment made before its stages kept their logs, or a stage that did not run)"
    return "\n".join(lines).rstrip("\n")
