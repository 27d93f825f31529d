"""Write-then-rename on real files and folders, with real processes racing and dying."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from virgo_exps import fsio

ROOT = Path(__file__).resolve().parents[1]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "status.json"
    fsio.write_text(target, "first\n")
    fsio.write_text(target, "second\n", mode=0o640)
    assert target.read_text() == "second\n"
    assert target.stat().st_mode & 0o777 == 0o640
    assert leftovers(target.parent) == []


def test_write_json_and_bytes(tmp_path):
    fsio.write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    text = (tmp_path / "a.json").read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": [1, 2], "b": 1}
    fsio.write_bytes(tmp_path / "b.bin", b"\x00\xff", durable=False)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"


def test_temporary_names_differ_and_say_who_wrote_them(tmp_path):
    names = {fsio.temp_path(tmp_path / "x.csv").name for _ in range(200)}
    assert len(names) == 200
    name = names.pop()
    assert name.startswith(".x.csv.tmp-") and f"-{os.getpid()}-" in name


def test_a_folder_replaces_a_full_folder(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.png").write_text("old")
    with fsio.replacing(out) as tmp:
        tmp.mkdir()
        (tmp / "report.md").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    assert leftovers(tmp_path) == []


def test_a_folder_replaces_a_file_and_the_aside_name_is_removed(tmp_path):
    out = tmp_path / "store"
    out.write_text("a file where the folder goes")
    aside = tmp_path / "store.old-1"
    with fsio.replacing(out, aside=aside) as tmp:
        tmp.mkdir()
    assert out.is_dir() and not aside.exists()


def test_a_failing_block_keeps_the_old_version_and_removes_its_work(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(ValueError):
        with fsio.replacing(target) as tmp:
            tmp.write_text("half")
            json.loads("{half")
    folder = tmp_path / "report"
    with pytest.raises(KeyError):
        with fsio.replacing(folder) as tmp:
            tmp.mkdir()
            (tmp / "a").write_text("x")
            raise KeyError("plot")
    assert target.read_text() == "old" and not folder.exists()
    assert leftovers(tmp_path) == []


def test_exclusive_keeps_what_another_process_made_first(tmp_path):
    target = tmp_path / "repo.git"
    mine, theirs = fsio.temp_path(target), fsio.temp_path(target)
    for d, name in ((mine, "mine"), (theirs, "theirs")):
        d.mkdir()
        (d / name).write_text(name)
    assert fsio.move_into_place(theirs, target, exclusive=True)
    assert not fsio.move_into_place(mine, target, exclusive=True)
    assert [p.name for p in target.iterdir()] == ["theirs"] and leftovers(tmp_path) == []
    marker = tmp_path / "marker.json"
    first, second = fsio.temp_path(marker), fsio.temp_path(marker)
    first.write_text("1")
    second.write_text("2")
    assert fsio.move_into_place(first, marker, exclusive=True)
    assert not fsio.move_into_place(second, marker, exclusive=True)
    assert marker.read_text() == "1" and leftovers(tmp_path) == []


def test_readers_never_see_half_a_file_while_processes_race(tmp_path):
    """Four processes rewrite one file with 1 MB contents; a reader checks every version it sees is whole."""
    target = tmp_path / "shared.txt"
    fsio.write_text(target, "0" * 1_000_000)
    writer = textwrap.dedent(
        f"""
        import sys
        from virgo_exps import fsio
        for i in range(30):
            fsio.write_text({str(target)!r}, sys.argv[1] * 1_000_000, durable=False)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(d)], env=env) for d in "1234"]
    seen = set()
    while any(p.poll() is None for p in procs):
        text = target.read_text()
        assert len(text) == 1_000_000 and len(set(text)) == 1, "a reader saw a partly written file"
        seen.add(text[0])
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert target.read_text()[0] in "1234"
    assert leftovers(tmp_path) == []


def test_a_killed_writer_leaves_the_old_file_and_only_a_hidden_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("complete old model")
    code = textwrap.dedent(
        f"""
        import os
        from virgo_exps import fsio
        with fsio.replacing({str(target)!r}) as tmp:
            with open(tmp, "w") as fh:
                fh.write("half of a new")
                fh.flush()
                os._exit(9)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 9
    assert target.read_text() == "complete old model"
    left = leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(".model.pt.tmp-")
