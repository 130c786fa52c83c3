"""The README as a front door, and the docs/ pages behind it, held together: the README stays short
with a table of contents whose links reach its headings, every page under docs/ is linked from it,
every relative link of the README and docs/ reaches its file and heading, and every metric the
README names is in the metrics reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

from exporter.cli import build_parser, env_name
from exporter.presets import PARAMETERISED, PRESETS

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


def _field_rows() -> set[str]:
    """The fields the configuration reference's table documents: `a`, `b` in a row's first cell."""
    rows = re.findall(r"^\| (`[a-z_\[\].]+`(?:, `[a-z_\[\].]+`)*) \|", (DOCS / "configuration.md").read_text(), re.M)
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row)}


def test_every_config_field_is_in_the_configuration_reference_and_nothing_else() -> None:
    """config.schema.json (held to the exporter's own checks by test_schema) and the reference's
    field table name the same fields: the top level's and a lock's."""
    schema = json.loads((ROOT / "config.schema.json").read_text())
    fields = set(schema["properties"]) | {f"locks[].{name}" for name in schema["definitions"]["lock"]["properties"]}
    documented = _field_rows()
    assert fields - documented == set(), f"fields missing from docs/configuration.md: {sorted(fields - documented)}"
    assert documented - fields == set(), f"docs/configuration.md documents no such field: {sorted(documented - fields)}"


def test_every_flag_is_in_the_configuration_reference_with_its_environment_variable() -> None:
    """Each option of the CLI in the flags table with the environment variable it reads; the `locks`
    command's own options wherever that command is documented."""
    reference = (DOCS / "configuration.md").read_text()
    rows = dict(re.findall(r"^\| `(--[a-z.-]+)(?:=[^`]*)?` \| (?:`([A-Z_]+)[^`]*`)? ?\|", reference, re.M))
    locks_only = {"--json", "--watch", "--target"}
    options = {opt for action in build_parser()._actions for opt in action.option_strings
               if opt.startswith("--") and opt != "--help"}
    for flag in sorted(options - locks_only):
        assert flag in rows, f"{flag} is not in the flags table of docs/configuration.md"
        assert flag == "--version" or rows[flag] == env_name(flag), f"{flag}: {rows[flag]!r}, the CLI reads {env_name(flag)}"
    assert set(rows) <= options, f"no such flag: {sorted(set(rows) - options)}"
    pages_text = "\n".join(page.read_text() for page in DOCS.glob("*.md"))
    for flag in sorted(locks_only & options):
        assert f"locks --config.file=config.yaml {flag}" in pages_text or f"`locks {flag}" in pages_text, flag


def _preset_rows() -> dict[str, str]:
    """docs/presets.md's table: each preset named in a row's first cell -> the row's lock-name cell."""
    rows: dict[str, str] = {}
    for line in (DOCS / "presets.md").read_text().splitlines():
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[0].startswith("`"):
            for preset in re.findall(r"`\{?([a-z_-]+)", cells[0]):
                rows[preset] = rows.get(preset, "") + " " + cells[1]
    return rows


def test_every_preset_and_each_of_its_locks_is_in_the_presets_page() -> None:
    """Each preset the exporter knows has a row naming each of its locks (`tool:name`, or `:name`
    after the first of the same tool), and the page names no preset the exporter lacks."""
    rows = _preset_rows()
    known = {**{name: locks for name, locks in PRESETS.items()},
             **{name: make("MyApp.Repo") for name, (_, make) in PARAMETERISED.items()}}
    assert set(rows) == set(known), f"docs/presets.md {sorted(rows)}, the exporter {sorted(known)}"
    for preset, locks in known.items():
        for lock in locks:
            short = ":" + lock.name.split(":", 1)[1]
            assert f"`{lock.name}`" in rows[preset] or f"`{short}`" in rows[preset], f"{preset}: {lock.name} not in its row"
