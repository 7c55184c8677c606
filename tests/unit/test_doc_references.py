"""Every place that cites a section of a document by name (``docs/model.md, "New objects"``) names
a heading that exists. The code's comments justify its settings by such citations, and the
measurements behind them moved between documents once already; a citation that leads nowhere is
a justification nobody can check."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SCANNED_DIRS = ("alerts", "bench", "config", "consumer", "deploy", "docs", "model", "scripts", "tests", "trainer")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml"}

# A line break, its indentation and a comment marker read as one space, so that a citation wrapped
# over two comment or docstring lines is read whole.
_WRAP = re.compile(r"[ \t]*\n[ \t]*(?:#+[ \t]*)?")
# `docs/model.md, "Name"`, `docs/model.md "Name"`, `[model.md](model.md), "Name"`, ...
_CITATION = re.compile(r"(?:docs/)?\b([a-z][\w-]*\.md)\)?,?[ ]\"([^\"]{2,120})\"")
_HEADING = re.compile(r"^#{1,6}[ ]+(.+?)\s*$", re.M)


def headings(text: str) -> set[str]:
    return {h.rstrip(".:") for h in _HEADING.findall(text)}


def citations(text: str) -> list[tuple[str, str]]:
    return _CITATION.findall(_WRAP.sub(" ", text))


def cites(name: str, heads: set[str]) -> bool:
    """A citation may name a heading whole or up to the first comma ("Where the remaining errors
    are" for "Where the remaining errors are, and three more attempts")."""
    return any(h == name or h.startswith(name + ",") for h in heads)


def _files() -> list[Path]:
    found = [ROOT / "README.md"]
    for d in SCANNED_DIRS:
        found += [p for p in sorted((ROOT / d).rglob("*")) if p.suffix in SUFFIXES and p.is_file()]
    return [p for p in found if p != Path(__file__).resolve()]  # this file's examples are not citations


def test_the_citation_reader_finds_wrapped_citations_and_unknown_names() -> None:
    text = '    # kept (docs/model.md, "The first-detection view\n    # reads the earliest detection").\n'
    assert citations(text) == [("model.md", "The first-detection view reads the earliest detection")]
    heads = headings("# T\n\n### The first-detection view reads the earliest detection\n")
    assert cites("The first-detection view reads the earliest detection", heads)
    assert not cites("The first-detection view", heads)
    assert not cites("Fused classifier", heads)


def test_every_cited_section_exists() -> None:
    docs = {p.name: headings(p.read_text(encoding="utf-8")) for p in DOCS.glob("*.md")}
    broken, seen = [], 0
    for path in _files():
        for doc, name in citations(path.read_text(encoding="utf-8")):
            if doc not in docs:
                continue  # a quotation after a file outside docs/ (README.md), not a section
            seen += 1
            if not cites(name, docs[doc]):
                broken.append(f"{path.relative_to(ROOT)}: {doc}, \"{name}\"")
    assert seen >= 20, seen  # the reader still finds the code's citations
    assert not broken, "\n".join(broken)


def anchor(heading: str) -> str:
    """The fragment a Markdown renderer (GitHub's) gives a heading: lower case, punctuation gone,
    spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {anchor(h) for h in _HEADING.findall(page.read_text(encoding="utf-8"))}


def test_anchor_follows_the_renderer() -> None:
    assert anchor("The gate reads the alert's own history") == "the-gate-reads-the-alerts-own-history"
    assert anchor("Every row over 10 seeds, by `trainer fit` itself") == "every-row-over-10-seeds-by-trainer-fit-itself"


def test_every_relative_link_in_the_docs_resolves() -> None:
    """Files and, for a link to a section (``model-experiments.md#class-offsets``), the heading."""
    broken, seen = [], 0
    for page in (p for p in _files() if p.suffix == ".md"):
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            seen += 1
            path, _, fragment = target.partition("#")
            linked = page.parent / path if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif fragment and linked.suffix == ".md" and fragment not in _anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert seen >= 20, seen
    assert not broken, "\n".join(broken)
