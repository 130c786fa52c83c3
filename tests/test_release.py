"""A release a user can pin (issue 28): CHANGELOG.md names every metric, config field, flag and
alert, in Keep a Changelog's form; the version is written once and everything says the same.
make dist's artefacts are tested with the image (tests/test_image.py), the chart's image in
tests/test_deploy.py."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter import __version__
from exporter.cli import build_parser
from exporter.metrics import render
from exporter.snapshot import ReloadStatus, Snapshot
from tests.metrics_util import full_exposition, series

ROOT = Path(__file__).resolve().parent.parent
CHANGELOG = ROOT / "CHANGELOG.md"
CHART = ROOT / "helm" / "pg-advisory-lock-exporter"
RULES = ROOT / "alerts" / "pg-advisory-lock-exporter.rules.yml"
SECTIONS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


def exposed_families() -> set[str]:
    """Every family the exporter writes, as its HELP lines name them: a single server's exposition
    with every optional part, a fleet's /metrics and a shard's figures (as test_metrics reads them)."""
    text = full_exposition()
    return {family.name + ("_total" if family.type == "counter" else "")
            for family in text_string_to_metric_families(text) if family.name.startswith("pg_advisory_lock")}


def schema_fields(node: object) -> Iterator[str]:
    """Every property name anywhere in config.schema.json (nested fields, definitions, items)."""
    if isinstance(node, dict):
        yield from node.get("properties", {})
        for value in node.values():
            yield from schema_fields(value)
    elif isinstance(node, list):
        for value in node:
            yield from schema_fields(value)


def flags() -> set[str]:
    parser = build_parser()
    options = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
    commands = {choice for action in parser._actions if not action.option_strings for choice in action.choices or ()}
    return (options - {"--help"}) | commands


def alerts() -> set[str]:
    return {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}


def test_every_metric_config_field_flag_and_alert_is_in_the_changelog() -> None:
    """Named as code (in backticks; a metric may carry its labels), so a word of prose that
    happens to be a field's name does not count."""
    text = CHANGELOG.read_text()
    names = {
        "metric": exposed_families(),
        "config field": set(schema_fields(json.loads((ROOT / "config.schema.json").read_text()))),
        "flag or command": flags(),
        "alert": alerts(),
    }
    assert len(names["metric"]) >= 48 and {"dsn", "locks", "poll_interval", "with_advisory_lock"} <= names["config field"]
    assert {"--config.file", "--check-config", "--json", "locks"} <= names["flag or command"]
    missing = [f"{kind} {name}" for kind, found in names.items() for name in sorted(found)
               if not re.search(rf"`{re.escape(name)}[`{{]", text)]
    assert not missing, f"CHANGELOG.md never names: {', '.join(missing)}"


def _releases(text: str) -> list[tuple[str, str | None]]:
    return [(m["version"], m["date"]) for m in
            re.finditer(r"^## \[(?P<version>[^\]]+)\](?: - (?P<date>\d{4}-\d{2}-\d{2}))?$", text, re.MULTILINE)]


def test_the_changelog_is_in_keep_a_changelog_form() -> None:
    text = CHANGELOG.read_text()
    releases = _releases(text)
    assert releases[0] == ("Unreleased", None)
    versions = [tuple(map(int, v.split("."))) for v, _ in releases[1:]]
    assert versions == sorted(versions, reverse=True) and versions[-1] == (0, 1, 0)
    dates = [d for _, d in releases[1:]]
    assert all(dates) and dates == sorted(dates, reverse=True)
    # Every second-level heading is a release; under each, only the kinds of change the form knows.
    assert len(re.findall(r"^## ", text, re.MULTILINE)) == len(releases)
    assert set(re.findall(r"^### (.+)$", text, re.MULTILINE)) <= SECTIONS
    for version, _ in releases:
        assert re.search(rf"^\[{re.escape(version)}\]: https://", text, re.MULTILINE), f"no link for [{version}]"


def test_the_version_is_written_once_and_everything_says_it() -> None:
    """exporter/__init__.py is the one place: the package reads it, build_info and --version print
    it, the chart's appVersion (and so its default image tag: test_deploy renders it) and the
    newest release in CHANGELOG.md are it, and the docs' build and push examples use it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "exporter.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
    assert yaml.safe_load((CHART / "values.yaml").read_text())["image"]["tag"] == ""  # appVersion, then
    text = render(Snapshot(up=False), (), ReloadStatus(True, 1.0)).decode()
    assert series(text, "pg_advisory_lock_exporter_build_info") == [{"version": __version__}]
    assert _releases(CHANGELOG.read_text())[1][0] == __version__
    docs = [ROOT / "README.md", CHART / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    quoted = [(path.name, found) for path in docs for found in
              re.findall(r"pg-advisory-lock-exporter(?:-|:)(\d+\.\d+\.\d+)", path.read_text())]
    assert quoted and all(found == __version__ for _, found in quoted), quoted


def test_the_readme_links_the_changelog_and_the_stability_policy() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(CHANGELOG.md)" in readme and "(docs/stability.md)" in readme
    policy = (ROOT / "docs" / "stability.md").read_text()
    assert "(../CHANGELOG.md)" in policy
