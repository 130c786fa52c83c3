"""The README as a front door, and the docs/ pages behind it, held together: the README stays short
with a table of contents whose links reach its headings, every page under docs/ is linked from it,
every relative link of the README and docs/ reaches its file and heading, and every metric the
README names is in the metrics reference."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 450
TOC_WITHIN = 40  # lines from the top: "near its top"

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6}) +(.*?) *#*$", re.M)


def prose(text: str) -> str:
    """The text without fenced blocks and code spans, where a link is only an example."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor on a page, a repeated one numbered as GitHub numbers it."""
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text())):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not ours to check


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_the_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines < MAX_README_LINES, f"README.md has {lines} lines: move detail to a page under docs/"


def test_the_readme_opens_with_a_table_of_contents_that_reaches_every_section() -> None:
    text = README.read_text()
    head = "\n".join(text.splitlines()[:TOC_WITHIN])
    assert "**Contents**" in head, f"no **Contents** list in the README's first {TOC_WITHIN} lines"
    toc_block = head.split("**Contents**", 1)[1].split("\n\n", 2)[1]
    toc = re.findall(r"\]\(#([^)]+)\)", toc_block)
    assert toc, "the table of contents links nothing"
    headings = anchors(README)
    assert set(toc) <= headings, f"contents links with no heading: {sorted(set(toc) - headings)}"
    sections = {slug(m.group(2)) for m in HEADING.finditer(FENCE.sub("", text)) if len(m.group(1)) == 2}
    assert sections <= set(toc), f"sections missing from the contents: {sorted(sections - set(toc))}"


def test_every_page_under_docs_is_linked_from_the_readme() -> None:
    linked = {(README.parent / target.split("#")[0]).resolve() for target in relative_links(README)}
    unlinked = [page.name for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert not unlinked, f"docs pages the README never links: {unlinked}"


def test_every_relative_link_reaches_its_file_and_heading() -> None:
    broken = []
    for page in pages():
        for target in relative_links(page):
            file, _, fragment = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and (dest.suffix != ".md" or fragment not in anchors(dest)):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_sees_a_broken_file_and_a_broken_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## The `locks` command\n\n[a](#the-locks-command) [b](#gone) [c](other.md)\n"
                    "`[d](skipped.md)`\n```\n[e](skipped.md)\n```\n[f](https://example.com/x)\n")
    assert anchors(page) == {"title", "the-locks-command"}
    assert relative_links(page) == ["#the-locks-command", "#gone", "other.md"]


def test_every_metric_the_readme_names_is_in_the_metrics_reference() -> None:
    documented = set(re.findall(r"^\| `(pg_advisory_lock_\w+)` \|", (DOCS / "metrics.md").read_text(), re.M))
    named = set(re.findall(r"\b(pg_advisory_lock_\w+)", README.read_text()))
    assert named, "the README names no metric"
    assert named <= documented, f"named in the README, not in docs/metrics.md: {sorted(named - documented)}"
