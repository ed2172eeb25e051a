"""The docs site builds strictly: ``mkdocs build --strict`` on mkdocs.yml (every page of
its nav, the API reference from the docstrings) exits 0, so any warning (a broken link or
anchor, a docstring mkdocstrings cannot parse, a page left out of the nav) fails CI, and
every nav page comes out as HTML."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from doc_pages import ROOT


def nav_pages(nav: list) -> list[str]:
    """The Markdown files of an mkdocs ``nav`` (entries ``{title: page}`` or nested lists)."""
    pages: list[str] = []
    for entry in nav:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def built_page(site: Path, page: str) -> Path:
    """Where mkdocs (``use_directory_urls``, its default) writes ``page``."""
    stem = page.removesuffix(".md")
    if stem == "index" or stem.endswith("/index"):
        return site / stem.removesuffix("index") / "index.html"
    return site / stem / "index.html"


def test_nav_lists_every_docs_page() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["strict"] is True
    pages = nav_pages(config["nav"])
    on_disk = sorted(p.relative_to(ROOT / "docs").as_posix()
                     for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(pages) == on_disk


def test_docs_build_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's end-of-life banner
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "WARNING" not in output, output[-5000:]
    pages = nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    missing = [page for page in pages if not built_page(site, page).is_file()]
    assert not missing, missing
    print(f"mkdocs build --strict: {len(pages)} pages built into {site}")
    api = built_page(site, "api.md").read_text(encoding="utf-8")
    verbs = ["api.prune", "api.quantize", "api.distill", "api.export", "api.measure",
             "api.load", "api.compress", "api.verbs.train_model", "api.run.run"]
    missing = [v for v in verbs if f'id="netshrink.{v}"' not in api]
    assert not missing, f"the API reference lacks {missing}"
