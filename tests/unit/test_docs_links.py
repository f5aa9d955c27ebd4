"""The README and docs/ link only to files and headings that exist, so a reader never lands nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "ENVELOPE.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown file."""
    text = FENCE.sub("", path.read_text())
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc: Path) -> None:
    """Each relative link names an existing file, and each #anchor a heading of its target."""
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, anchor = target.partition("#")
        dest = doc if not file_part else (doc.parent / file_part).resolve()
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_door() -> None:
    """The README stays short: what byzguard is, the two commands, the event path, the checks and links."""
    assert len((REPO / "README.md").read_text().splitlines()) <= 220


OUR_DIRS = ("app", "byzguard", "agents", "tables", "topics", "bench", "tests", "deploy")
CODE_SPAN = re.compile(r"`([^`\s]+)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_path_named_exists(doc: Path) -> None:
    """Each `dir/module.py` of the repository a page names in a code span (also as `path.py:line` or
    `path.py::test`; a pattern matches some file; a `<placeholder>` is no path) exists, so a moved module
    cannot leave its old path behind."""
    missing = []
    for span in CODE_SPAN.findall(doc.read_text()):
        path = span.split("::", 1)[0].split(":", 1)[0]
        if not (path.endswith(".py") and "/" in path and path.split("/", 1)[0] in OUR_DIRS) or "<" in path:
            continue
        if not (any(REPO.glob(path)) if "*" in path else (REPO / path).is_file()):  # a pattern names some file
            missing.append(span)
    assert not missing, f"{doc.relative_to(REPO)} names modules that do not exist: {missing}"
