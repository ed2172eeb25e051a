"""The documentation and the CLI agree: every ``netshrink`` command in the code blocks of
README.md and of every docs page parses, and the calibrations the capability table lists
are the ones the CLI and the recipe accept."""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import typing

import pytest

from doc_pages import ROOT, doc_pages, page_name
from netshrink.cli import build_parser
from netshrink.cli.study import normalize_argv
from netshrink.quant.ptq import PTQConfig

PAGES = {page_name(path): path.read_text(encoding="utf-8") for path in doc_pages()}
PROGRAMS = ("netshrink", ".venv/bin/netshrink")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")


def code_blocks(text: str, page: str = "README.md") -> list[str]:
    """Fenced blocks (any info string) and indented blocks (4 spaces after a blank line)."""
    blocks: list[str] = []
    lines = text.splitlines()
    fence: list[str] | None = None
    indented: list[str] = []
    previous_blank = True
    for line in lines:
        if fence is not None:
            if line.startswith("```"):
                blocks.append("\n".join(fence))
                fence = None
            else:
                fence.append(line)
            continue
        if line.startswith("```"):
            fence = []
        elif line.startswith("    ") and (indented or previous_blank):
            indented.append(line[4:])
        elif indented:
            blocks.append("\n".join(indented))
            indented = []
        previous_blank = not line.strip()
    assert fence is None, f"{page}: a code fence is never closed"
    if indented:
        blocks.append("\n".join(indented))
    return blocks


def _strip_comment(line: str) -> str:
    """The line without a shell comment (``#`` at its start or after a space)."""
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0].rstrip()


def _expand(token: str) -> list[str]:
    """A synopsis token's alternatives: ``a|b`` is either, ``[a|b]`` also nothing."""
    optional = token.startswith("[") and token.endswith("]")
    body = token[1:-1] if optional else token
    choices = body.split("|") if "|" in body else [body]
    return ([""] if optional else []) + choices


def readme_commands(text: str, page: str = "README.md") -> list[tuple[str, list[list[str]]]]:
    """Every ``netshrink`` command in the code blocks: (as written, the argument lists it
    stands for, program name removed). Line continuations are joined, comments dropped,
    ``&&``/``;``-joined commands split and leading ``VAR=value`` assignments skipped."""
    found = []
    for block in code_blocks(text, page):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", _strip_comment(line)):
                if not any(program in part for program in PROGRAMS):
                    continue  # not a command line (Python in the API section, prose)
                words = shlex.split(part)
                while words and ENV_ASSIGNMENT.fullmatch(words[0]):
                    words.pop(0)
                if not words or words[0] not in PROGRAMS:
                    continue
                expanded = [[w for w in combo if w]
                            for combo in itertools.product(*map(_expand, words[1:]))]
                found.append((part.strip(), expanded))
    return found


# (page, command as written, its argument lists) for every page: README.md, docs/*.md.
COMMANDS = [(page, text, variants) for page, page_text in PAGES.items()
            for text, variants in readme_commands(page_text, page)]


def test_readme_has_commands() -> None:
    texts = [text for _, text, _ in COMMANDS]
    assert len(texts) >= 15, texts
    readme = [text for page, text, _ in COMMANDS if page == "README.md"]
    assert any(t.startswith(".venv/bin/netshrink run recipes/quickstart.yaml") for t in readme)
    assert {page for page, _, _ in COMMANDS} >= {"README.md", "docs/commands.md"}


@pytest.mark.parametrize("page,text,variants", COMMANDS,
                         ids=[f"{page}:{text}" for page, text, _ in COMMANDS])
def test_readme_command_parses(page: str, text: str, variants: list[list[str]],
                               capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for argv in variants:
        try:
            parser.parse_args(normalize_argv(argv))  # as main() reads argv
        except SystemExit as exc:
            pytest.fail(f"{page}: `{text}` does not parse (as {argv}): "
                        f"{capsys.readouterr().err.strip()} (exit {exc.code})")


def test_extraction_handles_prefixes_continuations_and_synopses() -> None:
    text = ("```\nA=1 B=2 scripts/setup.sh dev && .venv/bin/netshrink report runs/x  # note\n"
            "netshrink bench --arch resnet50 \\\n    --repeats 3\nls -l # netshrink run\n"
            "netshrink cache list|prune\n```\n\n    netshrink list [models|stages]\n")
    assert [argvs for _, argvs in readme_commands(text)] == [
        [["report", "runs/x"]],
        [["bench", "--arch", "resnet50", "--repeats", "3"]],
        [["cache", "list"], ["cache", "prune"]],
        [["list"], ["list", "models"], ["list", "stages"]],
    ]


def test_readme_recipes_exist() -> None:
    """Every ``recipes/*.yaml`` the README or a docs page names is a file."""
    for page, text in PAGES.items():
        names = set(re.findall(r"recipes/([\w.-]+\.yaml)", text))
        missing = sorted(n for n in names if not (ROOT / "recipes" / n).is_file())
        assert not missing, f"{page} names recipes that do not exist: {missing}"
    assert any("recipes/quickstart.yaml" in text for text in PAGES.values())


def _choices(command: str, dest: str) -> list[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in subparsers.choices[command]._actions if a.dest == dest)
    return list(action.choices)


def test_readme_calibrations_are_the_cli_choices() -> None:
    """The capability table lists exactly the calibrations ``netshrink quantize
    --calibration`` and the ``quant.ptq`` stage accept."""
    rows = [line for text in PAGES.values() for line in text.splitlines()
            if line.startswith("|") and "calibration" in line]
    listed = []
    for row in rows:
        for group in re.findall(r"((?:[\w-]+ / )+[\w-]+) calibration", row):
            listed += [name.replace("-", "") for name in group.split(" / ")]
    assert listed, "docs: the capability table should list the PTQ calibrations"
    cli = _choices("quantize", "calibration")
    stage = list(typing.get_args(PTQConfig.model_fields["calibration"].annotation))
    assert sorted(listed) == sorted(cli) == sorted(stage)
