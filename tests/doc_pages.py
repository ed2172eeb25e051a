"""The documentation's Markdown, where the tests that check it read it: README.md and every
page of the docs site (``docs/*.md``, built by ``mkdocs.yml``)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = re.compile(r"(#{1,6}) +(.+?) *#*$")


def doc_pages() -> list[Path]:
    """README.md first, then the docs pages in name order."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1, f"no docs pages in {ROOT / 'docs'}"
    return pages


def page_name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def headings(text: str) -> list[tuple[int, int, str]]:
    """(line index, level, title) of each ATX heading outside fenced code blocks (a ``#``
    comment in a code block is no heading)."""
    found = []
    fenced = False
    for i, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := HEADING.fullmatch(line)):
            found.append((i, len(match[1]), match[2]))
    return found


def section(title: str) -> tuple[Path, str]:
    """The page holding the one heading ``title`` (any level) and the text under it, up to
    the next heading of the same or a higher level; fails unless exactly one page has it."""
    hits = []
    for path in doc_pages():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        marks = headings(text)
        for n, (index, level, name) in enumerate(marks):
            if name == title:
                end = next((i for i, lv, _ in marks[n + 1:] if lv <= level), len(lines))
                hits.append((path, "\n".join(lines[index + 1:end])))
    assert len(hits) == 1, (f"heading {title!r} should be on exactly one page of "
                            f"{[page_name(p) for p in doc_pages()]}; found on "
                            f"{[page_name(p) for p, _ in hits]}")
    return hits[0]
