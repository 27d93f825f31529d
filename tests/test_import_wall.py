"""The machinery does not import the study.

`src/virgo_exps/study/` is the Virgo study: its data stages, networks and report. Everything else in
`src/virgo_exps/` is the machinery that runs, checks and records any study, and a port replaces the study
package without touching it. Read from the source with `ast` (nothing is imported): every `import` and
`from ... import` of the package's modules, at module level or in a function.

The study's params, its checks and the size of its data reach the machinery through an entry point
(`virgo_exps.config.studies`), not an import. A crossing the code needs for a while is listed in
REMAINING with its reason (none today); any other import of the study fails, and so does a listed
crossing that is gone (the list must shrink with the code).
"""

from __future__ import annotations

import ast
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
