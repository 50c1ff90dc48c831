"""The README is a door, the rest lives in docs/: the README's size and commands, its links, the
mkdocs build (strict: broken links, anchors and pages left out of the nav fail it)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

#: ``[text](target)`` and ``![alt](target)``; the target ends at whitespace or ``)`` (a title may follow).
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[^)]*)?\)")
#: ``[label]: target`` reference definitions at the start of a line.
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//|#)")


def broken_relative_links(markdown: Path) -> list[str]:
    """Relative link targets in ``markdown`` (inline and reference style, outside code) that name
    no existing file or folder, resolved from the file's own folder; URLs and ``#anchors`` are not
    checked."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", markdown.read_text(encoding="utf-8")))
    targets = _INLINE_LINK.findall(text) + _REFERENCE_LINK.findall(text)
    broken = []
    for target in targets:
        if _EXTERNAL.match(target):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (markdown.parent / path).exists():
            broken.append(target)
    return broken


def test_readme_is_a_short_door():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move reference material to docs/"
    for needed in ("make conformance", "make test", "pip install pytest-hotswap"):
        assert needed in text, f"README.md no longer shows {needed!r}"


def test_readme_links_point_to_existing_files():
    assert broken_relative_links(README) == []


def test_readme_links_to_every_docs_page():
    text = README.read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)", text))
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert pages - {"docs/index.md"} <= linked, sorted(pages - {"docs/index.md"} - linked)


def test_link_checker_reports_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# page\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n"
        "[fine](docs/page.md#page), [web](https://example.org/missing.md), [here](#x)\n"
        "[gone](docs/missing.md)\n"
        "![figure](img/missing.png)\n"
        "[ref]: docs/also-missing.md\n"
        "`[in code](docs/not-a-link.md)`\n\n"
        "```\n[in a fence](docs/not-a-link-either.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_relative_links(readme) == [
        "docs/missing.md",
        "img/missing.png",
        "docs/also-missing.md",
    ]


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
    )


_needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed: pip install -e '.[docs]' (make venv installs it)",
)


@_needs_mkdocs
def test_docs_build_strict(tmp_path):
    result = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    built = {page.parent.name for page in site.glob("*/index.html")}
    assert built == {page.stem for page in (ROOT / "docs").glob("*.md")} - {"index"}
    assert (site / "index.html").exists()


@_needs_mkdocs
def test_docs_build_fails_on_a_broken_link(tmp_path):
    """Negative control: the strict build (with mkdocs.yml's validation settings) is red on a link
    to a missing page and on a page left out of the nav."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    page = tmp_path / "docs" / "gpu.md"
    page.write_text(page.read_text(encoding="utf-8") + "\n[gone](no-such-page.md)\n", "utf-8")
    result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr

    shutil.copy(ROOT / "docs" / "gpu.md", page)
    (tmp_path / "docs" / "orphan.md").write_text("# orphan\n", encoding="utf-8")
    result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "orphan.md" in result.stdout + result.stderr
