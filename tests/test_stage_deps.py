"""Each stage's code deps in dvc.yaml are exactly the code its result depends on.

The import closure of a stage is derived from its entry point
(``stages/<stage>.py``) by reading source files with ``ast``: every
``import``/``from ... import`` of a ``virgo_exps`` module, at module level or
inside a function, followed transitively. Nothing is imported (no torch).
The modules below are excluded, with the reason; they are not followed
either, so what only they import is not a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "virgo_exps"

# Code that decides where and how a stage runs, or records it elsewhere, but
# computes nothing the stage writes: editing it must not invalidate results.
SCHEDULING = {
    "virgo_exps.cli": "entry-point plumbing: error reporting and exit codes of every stage, the virgo-exps CLI",
    "virgo_exps.container": "runs a stage inside the profile's image; the image itself is in version.lock and stamps",
    "virgo_exps.entry": "entry-point plumbing: error reporting and exit codes of every stage and training process",
    "virgo_exps.fsio": "write-then-rename: how a file reaches the disk (whole), never what it holds",
    "virgo_exps.launch": "starts the work (directly, torchrun, horovodrun) or hands it to Slurm; watches and requeues",
    "virgo_exps.machines": "the machine profile: the machine is not a dependency of a result",
    "virgo_exps.preflight": "checks the machine and params before a run; writes nothing the stages produce",
    "virgo_exps.stagelog": "keeps a stage's log (a record of how it ran, carried with the result, never part of it)",
    "virgo_exps.train.tracking": "logs the run to MLflow; writes none of the stage's outputs",
}
# Package markers run on import but hold only a docstring and a version string
# (checked below), so they cannot change a result.
MARKERS = {
    "virgo_exps",
    "virgo_exps.study",
    "virgo_exps.train",
    "virgo_exps.launch",
    "virgo_exps.cli",
    "virgo_exps.scalability",
    "virgo_exps.experiments",
}


def loaded_by_name(name: str) -> set[str]:
    """Modules ``name`` imports by name at run time rather than by an import statement: the
    strategy package loads the class the strategy table names for ``train.strategy`` (any row may run);
    the params loader loads the study's params module its entry point names (pyproject.toml)."""
    if name == "virgo_exps.config":
        import tomllib

        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        group = project.get("entry-points", {}).get("virgo_exps.studies", {})
        return {target.partition(":")[0] for target in group.values()}
    if name != "virgo_exps.train.strategies":
        return set()
    from virgo_exps.launch.strategy_table import STRATEGY_TABLE  # torch-free

    return {row.strategy_class.partition(":")[0] for row in STRATEGY_TABLE.values()}


# Modules inside a scheduling package that decide part of a result all the same.
RESULT_CODE = {
    "virgo_exps.launch.strategy_table": "which strategy class trains for each train.strategy",
}


def scheduling(name: str) -> bool:
    """A module of the scheduling code: one listed, or inside a listed package (but not result code)."""
    if name in RESULT_CODE:
        return False
    return any(name == s or name.startswith(s + ".") for s in SCHEDULING)


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, name: str | None) -> set[str]:
    """``virgo_exps`` modules a source file imports (anywhere in it), resolved to existing modules."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = None
    if name is not None:
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        candidates: list[str] = []
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert package is not None, f"{path}: relative import outside the package"
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for cand in candidates:
            if cand == PACKAGE or cand.startswith(PACKAGE + "."):
                if module_file(cand) is not None:
                    found.add(cand)
                elif cand == candidates[0]:
                    raise AssertionError(f"{path}: imports {cand}, which has no source file under src/")
    return found


def closure(entry: Path) -> set[str]:
    """Files (relative to the repository) a stage's result depends on."""
    files = {entry.relative_to(ROOT).as_posix()}
    todo = sorted(imported_modules(entry, None))
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        # importing a.b.c runs a and a.b first: those count too (unless excluded)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += [p for p in parents if p not in seen]
        if scheduling(name) or name in MARKERS:
            continue
        path = module_file(name)
        files.add(path.relative_to(ROOT).as_posix())
        todo += sorted((imported_modules(path, name) | loaded_by_name(name)) - seen)
    return files


def declared(stage: dict) -> set[str]:
    """Code deps of a stage in dvc.yaml, folders expanded to their .py files."""
    out = set()
    for dep in stage.get("deps") or []:
        if not dep.endswith(".py") and not (ROOT / dep).is_dir():
            continue  # data and other non-code deps
        path = ROOT / dep
        if path.is_dir():
            if not any(path.rglob("*.py")):
                continue
            out |= {p.relative_to(ROOT).as_posix() for p in path.rglob("*.py") if "__pycache__" not in p.parts}
        else:
            out.add(dep)
    return out


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_the_import_closure(stage):
    entry = ROOT / "stages" / f"{stage}.py"
    assert entry.is_file(), f"stage {stage}: no entry point {entry.relative_to(ROOT)}"
    assert f"stages/{stage}.py" in STAGES[stage]["cmd"], f"stage {stage}: cmd does not run stages/{stage}.py"
    want = closure(entry)
    have = declared(STAGES[stage])
    missing, extra = sorted(want - have), sorted(have - want)
    assert not missing and not extra, (
        f"stage {stage}: dvc.yaml deps differ from the import closure of stages/{stage}.py\n"
        f"  missing (the result depends on them): {missing}\n"
        f"  extra (not imported, or scheduling code): {extra}"
    )


def test_excluded_modules_exist_and_markers_hold_no_code():
    for name in MARKERS:
        tree = ast.parse(module_file(name).read_text())
        kinds = {type(node).__name__ for node in tree.body}
        assert kinds <= {"Expr", "Assign"}, f"{name}: a package marker now holds code ({kinds}): make it a dep"
    for name in SCHEDULING:
        assert module_file(name) is not None, f"{name} is listed as scheduling code but does not exist"


def test_closure_follows_function_level_and_relative_imports():
    # preprocess reaches study/qtransform.py and study/qplan.py only through imports inside the functions of
    # study/patches.py (torch is loaded only where blocks are transformed); what they import follows
    got = closure(ROOT / "stages" / "preprocess.py")
    assert "src/virgo_exps/study/generate.py" in got
    assert "src/virgo_exps/study/qtransform.py" in got and "src/virgo_exps/study/qplan.py" in got
    assert "src/virgo_exps/study/qspline.py" in got and "src/virgo_exps/study/qwhiten.py" in got
    # train reaches launch/slurm only through excluded modules: not deps
    got = closure(ROOT / "stages" / "train.py")
    assert "src/virgo_exps/train/trainer.py" in got and "src/virgo_exps/train/strategies/horovod.py" in got
    assert (
        not {
            "src/virgo_exps/launch/launcher.py",
            "src/virgo_exps/launch/slurm/submit.py",
            "src/virgo_exps/launch/hvd_slurm.py",
            "src/virgo_exps/machines.py",
        }
        & got
    )


def test_the_outputs_every_command_reads_are_those_dvc_yaml_names():
    """paths.py declares the train and report stages' outputs once; dvc.yaml's commands write them there."""
    from virgo_exps import paths

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    train = stages["train"]["cmd"].split()
    given = {train[i]: train[i + 1] for i in range(len(train) - 1) if train[i].startswith("--")}
    assert given["--model"] == paths.MODEL_FILE and given["--metrics"] == paths.METRICS_FILE
    assert given["--epochs"] == paths.EPOCHS_FILE and given["--ranks"] == paths.RANKS_FILE
    assert given["--log"] == paths.TRAIN_LOG and given["--checkpoints"] == paths.CHECKPOINTS_DIR
    report = stages["report"]["cmd"].split()
    assert report[report.index("--out") + 1] == paths.REPORT_DIR
