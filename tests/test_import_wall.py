"""The machinery does not import the study.

`src/virgo_exps/study/` is the Virgo study: its data stages, networks and report. Everything else in
`src/virgo_exps/` is the machinery that runs, checks and records any study, and a port replaces the study
package without touching it. Read from the source with `ast` (nothing is imported): every `import` and
`from ... import` of the package's modules, at module level or in a function.

The study's params, its checks and the size of its data reach the machinery through an entry point
(`virgo_exps.config.studies`), not an import. A crossing the code needs for a while is listed in
REMAINING with its reason (none today); any other import of the study fails, and so does a listed
crossing that is gone (the list must shrink with the code).

Imports sit at the top of a module. One inside a function (or method) of ``src/`` either imports a package
of HEAVY (the modules that do not need it load without it) or says why on its line or the line above it: a
cycle broken on purpose, the command line kept fast. Files still being brought under that rule are listed
in PENDING; a listed file that follows it fails too (remove it from the list).
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "virgo_exps"
STUDY = "virgo_exps.study"

REMAINING: dict[tuple[str, str], str] = {}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path`` (a file of ``package``), relative imports resolved."""
    here = module_name(path, package).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*here[: len(here) - node.level + 1], *([base] if base else [])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def crossings() -> dict[tuple[str, str], list[int]]:
    out: dict[tuple[str, str], list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("study/"):
            continue
        for line, name in imported(path):
            if name == STUDY or name.startswith(STUDY + "."):
                key = (rel, ".".join(name.split(".")[:3]))
                out.setdefault(key, []).append(line)
    return out


def test_imported_reads_every_form_of_import(tmp_path):
    sample = tmp_path / "virgo_exps" / "train" / "sample.py"
    sample.parent.mkdir(parents=True)
    sample.write_text(
        "import virgo_exps.study.models\n"
        "from virgo_exps.study import generate\n"
        "def f():\n    from ..study.report import build\n"
        "from . import data\n"
    )
    names = [n for _, n in imported(sample, tmp_path / "virgo_exps")]
    assert "virgo_exps.study.models" in names and "virgo_exps.study.generate" in names
    assert "virgo_exps.study.report.build" in names and "virgo_exps.train.data" in names


def test_the_machinery_imports_nothing_of_the_study_but_the_listed_crossings():
    found = crossings()
    new = {k: v for k, v in found.items() if k not in REMAINING}
    assert not new, "the machinery imports the study (move the code into the study, or give it as a hook):\n" + (
        "\n".join(f"  src/virgo_exps/{f}:{lines} imports {m}" for (f, m), lines in sorted(new.items()))
    )
    gone = sorted(set(REMAINING) - set(found))
    assert not gone, f"crossings that no longer exist: remove them from REMAINING: {gone}"


def test_nothing_outside_the_command_line_imports_it_and_it_has_no_circle():
    """``cli/`` parses arguments and calls the package; no module of the package calls back up into it,
    and its subcommand modules do not import ``cli.main`` (which imports them)."""
    up = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, name in imported(path):
            if not rel.startswith("cli/") and (name == "virgo_exps.cli" or name.startswith("virgo_exps.cli.")):
                up.append(f"src/virgo_exps/{rel}:{line} imports {name}")
            if rel.startswith("cli/") and rel != "cli/main.py" and name.startswith("virgo_exps.cli.main"):
                up.append(f"src/virgo_exps/{rel}:{line} imports {name} (a circle)")
    assert not up, "\n".join(up)


SRC = PACKAGE.parent
REPO = SRC.parent

# Packages imported inside the functions that use them, with no comment needed: importing them costs a
# large part of a second, or they are installed only where they run.
HEAVY: dict[str, str] = {
    "torch": "most of a second to import: the command line, the launcher and the checks before a run do without it",
    "mlflow": "about a second to import (SQLAlchemy, alembic): only a run that logs to it, or reads it, loads it",
    "optuna": "heavy: only a sweep's search, its trials and its page use it, not the modules that name a sweep",
    "zarr": "heavy (numcodecs, numpy): only the code that opens a data store loads it",
    "numcodecs": "heavy: the data stages' compressors",
    "scipy": "heavy: only the Q-transform's splines, sparse solvers and windows use it",
    "deepspeed": "seconds to import, and optional: only the deepspeed strategy loads it",
    "horovod": "optional: built into the venv only where the horovod strategy runs",
    "pynvml": "optional: NVIDIA's library, read by GPU monitoring only, which carries on without it",
}

# Files still being reworked, not yet held to the rule: remove an entry once its file follows it (the test
# says so). A folder (ending in /) holds every file under it.
PENDING: set[str] = set()


def function_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module as written, commented) of every import inside a function or method of ``path``, one
    per module an ``import`` names (a relative one with its dots); commented when a comment is on the
    import's lines, or the line above them is a comment."""
    text = path.read_text()
    lines = text.splitlines()
    commented = {
        tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type == tokenize.COMMENT
    }
    found: set[tuple[int, str, bool]] = set()
    for fn in ast.walk(ast.parse(text, str(path))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            else:
                continue
            above = node.lineno - 2
            said = bool(commented & set(range(node.lineno, node.end_lineno + 1))) or (
                above >= 0 and lines[above].lstrip().startswith("#")
            )
            found |= {(node.lineno, name, said) for name in names}
    return sorted(found)


def pending(rel: str) -> bool:
    return any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in PENDING)


def unexplained(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each import inside a function of ``path`` that is neither of HEAVY nor commented
    (a relative import is of the package itself, never heavy)."""
    return [(line, name) for line, name, said in function_imports(path) if not said and name.split(".")[0] not in HEAVY]


def test_function_imports_reads_every_form_of_import(tmp_path):
    sample = tmp_path / "mod.py"
    sample.write_text(
        "import yaml\n"  # 1: module level, not counted
        "def f():\n"
        "    import json\n"  # 3
        "    # why\n"
        "    import torch.nn\n"  # 5: commented above
        "    from .. import sibling  # why\n"  # 6: relative, commented on its line
        "    x = 1  # a comment on code\n"
        "    from zarr import codecs\n"  # 8: the comment above is not its own
        "    def g():\n"
        "        import os, mlflow\n"  # 10: nested
        "class C:\n"
        "    async def m(self):\n"
        "        from os.path import (\n"  # 13
        "            join,  # why\n"
        "        )\n"
        "    '# a string is no comment'\n"
        "    def n(self):\n"
        "        from . import re\n"  # 18
    )
    assert function_imports(sample) == [
        (3, "json", False),
        (5, "torch.nn", True),
        (6, "..", True),
        (8, "zarr", False),
        (10, "mlflow", False),
        (10, "os", False),
        (13, "os.path", True),
        (18, ".", False),
    ]
    assert unexplained(sample) == [(3, "json"), (10, "os"), (18, ".")]


def test_imports_inside_functions_are_heavy_or_say_why():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if not pending(rel):
            found += [f"  {rel}:{line} imports {name}" for line, name in unexplained(path)]
    assert not found, (
        "imports inside functions: move them to the top of the module, or say why on the line above "
        "(a cycle, the command line kept fast), or add a heavy package to HEAVY with its reason:\n" + "\n".join(found)
    )


def test_heavy_and_pending_lists_hold_only_what_the_code_needs():
    lazy = {name.split(".")[0] for path in SRC.rglob("*.py") for _, name, _ in function_imports(path)}
    unused = sorted(set(HEAVY) - lazy)
    assert not unused, f"HEAVY lists packages no function imports: remove them: {unused}"
    gone = sorted(p for p in PENDING if not (REPO / p).exists())
    assert not gone, f"PENDING lists paths that do not exist: {gone}"
    done = sorted(
        p
        for p in PENDING
        if not any(unexplained(path) for path in ((REPO / p).rglob("*.py") if p.endswith("/") else [REPO / p]))
    )
    assert not done, f"these files follow the rule now: remove them from PENDING: {done}"


# The modules that start other programs, and what each starts: git, dvc and the Slurm commands have one
# gateway each; the launchers start the training processes. Any other module goes through these.
GATEWAYS = {
    "gitrun.py": "git",
    "dvcrun.py": "dvc",
    "launch/slurm/query.py": "sbatch, squeue, scontrol, scancel, sacct",
    "launch/launcher.py": "the training processes (a worker, torchrun, deepspeed)",
    "launch/hvd_slurm.py": "horovodrun",
    "launch/slurm/submit.py": "the batch script inside an allocation, a stage's dry run",
    "container.py": "the container runtime (a stage started again inside its image) and unsquashfs",
}
SPAWNERS = {"run", "Popen", "call", "check_call", "check_output"}


def spawns(path: Path) -> list[int]:
    """Lines of ``path`` that start a program: ``subprocess.<SPAWNERS>``, ``os.system``, ``os.popen``,
    ``os.exec*``, ``os.spawn*``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, name = getattr(node.func.value, "id", None), node.func.attr
            if (owner == "subprocess" and name in SPAWNERS) or (
                owner == "os" and (name in ("system", "popen") or name.startswith(("exec", "spawn")))
            ):
                lines.append(node.lineno)
    return lines


def test_other_programs_are_started_by_their_gateways_only():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in GATEWAYS:
            found += [f"  {rel}:{line}" for line in spawns(path)]
    assert not found, (
        "a program started outside its gateway: use gitrun.git, dvcrun.run/stream/start or "
        "launch.slurm.query.run_tool/start_tool:\n" + "\n".join(found)
    )
    # every gateway is one still (a listed module that starts nothing has lost its reason to be listed)
    assert all(spawns(PACKAGE / rel) for rel in GATEWAYS), [rel for rel in GATEWAYS if not spawns(PACKAGE / rel)]
