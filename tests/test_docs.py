"""The README and docs/ hold together: links resolve, the README stays short, and its Python example runs.

A newcomer follows the README's links and copies its example; a maintainer moves a file and forgets
a reference. These tests catch both: every relative link in README.md and docs/*.md (and every
``#anchor``, by GitHub's heading slugs) resolves, every ``docs/*.md`` named in the source exists, and
the README's Python block runs as written on the embedded model (slow).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

README_MOST_LINES = 220
FIRST_COMMAND_BY_LINE = 40

FENCE = re.compile(r"^ *(```|~~~).*?^ *\1 *$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#* *$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
# A docs page named in running text or a docstring ("see docs/protocol.md"), relative to the repository.
DOC_MENTION = re.compile(r"(?<![\w/.])docs/([\w-]+\.md)")
# A lettered section of the protocol page, as the editors' docstrings cite it: "docs/protocol.md (c)".
PROTOCOL_SECTION = re.compile(r"protocol\.md\)? \(([a-z])\)")


def without_code(text: str) -> str:
    """``text`` with fenced blocks and inline code removed: a link or heading there is an example."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of Markdown file ``path`` whose file or ``#anchor`` does not exist."""
    broken = []
    for match in LINK.finditer(without_code(path.read_text(encoding="utf-8"))):
        target = match.group(1)
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor} in {linked.name}")
    return broken


def test_every_relative_link_resolves() -> None:
    broken = {str(p.relative_to(ROOT)): b for p in [README, *DOCS] if (b := broken_links(p))}
    assert not broken, broken


def test_the_checker_finds_a_planted_broken_link(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A section (with `code`)\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[fine](other.md) [fine too](other.md#a-section-with-code) [here](#page) "
        "[web](https://example.org/x.md)\n\n```\n[in a code block](gone.md)\n```\n"
        "[gone](missing.md) and [no such heading](other.md#nowhere)\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        f"missing.md: no file {tmp_path / 'missing.md'}",
        "other.md#nowhere: no heading with anchor #nowhere in other.md",
    ]


def test_github_slugs() -> None:
    assert github_slug("(f) ROME and MEMIT statistics") == "f-rome-and-memit-statistics"
    assert github_slug("Ablations (paper Table 4.4)") == "ablations-paper-table-44"
    assert github_slug("Parallel single editing (`--parallel B`)") == "parallel-single-editing---parallel-b"


def test_docs_named_in_text_and_source_exist() -> None:
    """``docs/X.md`` named anywhere (docstrings included) exists; a cited protocol section has its heading."""
    sections = {m.group(1) for m in re.finditer(r"^## \(([a-z])\)", (ROOT / "docs/protocol.md").read_text(
        encoding="utf-8"), re.MULTILINE)}
    sources = [README, *DOCS, *sorted((ROOT / "src").rglob("*.py"))]
    missing = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        missing += [f"{path.relative_to(ROOT)}: docs/{name}" for name in DOC_MENTION.findall(text)
                    if not (ROOT / "docs" / name).exists()]
        missing += [f"{path.relative_to(ROOT)}: protocol.md ({letter})" for letter in PROTOCOL_SECTION.findall(text)
                    if letter not in sections]
    assert not missing, missing


def test_readme_is_short_and_starts_with_a_command() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MOST_LINES
    fence = next(i for i, line in enumerate(lines) if line.startswith("```"))
    first_command = next(i for i in range(fence + 1, len(lines)) if lines[i].strip() and not lines[i].startswith("#"))
    assert lines[first_command].split()[0] in {"make", "pip", "overtone", "python"}
    assert first_command + 1 <= FIRST_COMMAND_BY_LINE


def readme_python_block() -> str:
    """The README's Python example (its first ``python`` block)."""
    match = re.search(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    assert match, "README.md has no ```python block"
    return match.group(1)


@pytest.mark.slow
def test_readme_python_example_runs_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example edits, scores and reverts one fact on the embedded model; the edit must take."""
    monkeypatch.chdir(ROOT)
    namespace: dict[str, object] = {}
    exec(compile(readme_python_block(), "README.md", "exec"), namespace)  # the README's own code, as written
    record = namespace["record"]
    assert isinstance(record, dict)
    assert record["post"]["rel"] == 1.0 > record["pre"]["rel"]
