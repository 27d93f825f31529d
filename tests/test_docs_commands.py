"""The documentation names only commands that exist: every `virgo-exps` subcommand and option and every
`make` target written as code (inline or in a block) in README.md, ARCHITECTURE.md and docs/*.md."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from conftest import ROOT
from virgo_exps.cli.main import build_parser

DOCS = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
ENDS = {"|", ";", "&&", "||", ">", ">>", "2>&1", "#", "&", ")", "\\"}


def code_of(text: str) -> list[str]:
    """The lines of the fenced blocks and the inline code spans of a Markdown text."""
    found, inline = [], re.sub(r"```.*?```", "", text, flags=re.S)
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        found.extend(block.splitlines())
    found.extend(re.findall(r"`([^`\n]+)`", inline))
    return found


def commands(tool: str) -> list[tuple[str, list[str]]]:
    """(file name, the words after ``tool``) for each use of ``tool`` in the docs' code."""
    uses = []
    for doc in DOCS:
        for line in code_of(doc.read_text()):
            line = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment
            for m in re.finditer(rf"(?:^|[\s(;&|]){re.escape(tool)}((?: [^\s;|&>#)]+)*)", line):
                try:
                    words = shlex.split(m.group(1), comments=True)
                except ValueError:
                    words = m.group(1).split()
                cut = next((i for i, w in enumerate(words) if w in ENDS), len(words))
                uses.append((doc.name, words[:cut]))
    return uses


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def problem(words: list[str]) -> str | None:
    """What in ``virgo-exps <words>`` the command line does not have, or None."""
    parser, said = build_parser(), ["virgo-exps"]
    for word in words:
        if word.startswith("<") or "$" in word:  # a placeholder: nothing more to check
            return None
        choices = _subparsers(parser)
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            if option not in _options(parser):
                return f"`{' '.join(said)}` has no option {option}"
            continue
        if choices:
            if word not in choices:
                return f"`{' '.join(said)}` has no subcommand {word!r}"
            parser = choices[word]
            said.append(word)
            if word == "run":  # the rest belongs to dvc
                return None
    return None


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*):", text, flags=re.M))


def test_the_docs_name_virgo_exps_commands():
    uses = commands("virgo-exps")
    assert len(uses) > 20  # the scan finds the documented commands at all
    wrong = [f"{name}: virgo-exps {' '.join(words)}: {why}" for name, words in uses if (why := problem(words))]
    assert wrong == []


def test_the_docs_name_make_targets_that_exist():
    targets, uses = make_targets(), commands("make")
    assert {"run", "test"} <= {words[0] for _, words in uses if words}
    wrong = [
        f"{name}: make {words[0]}"
        for name, words in uses
        if words and "=" not in words[0] and not words[0].startswith("-") and words[0] not in targets
    ]
    assert wrong == []


@pytest.mark.parametrize(
    "words,why",
    [
        (["sweep", "nosuch"], "has no subcommand 'nosuch'"),
        (["verify", "--nosuch"], "has no option --nosuch"),
        (["nosuch"], "has no subcommand 'nosuch'"),
    ],
)
def test_a_command_that_does_not_exist_is_found(words, why):
    assert why in (problem(words) or "")
