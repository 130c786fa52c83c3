"""What docs/architecture.md says of the code's shape, checked: the pure modules import nothing
that talks to a server or the network, no function is over 60 lines, and the owners of remembered
state check their invariants after every poll in the tests."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from exporter import assemble
from exporter.assemble import Assembler, Caps, InvariantBroken
from exporter.config import parse_config
from exporter.matching import KeyMatcher
from exporter.naming import resolve_locks
from exporter.tracker import HoldTracker
from tests.test_assemble import row

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"
PURE = {"ages", "assemble", "config", "configkeys", "configvalues", "dsn", "dsnparse", "figures", "format", "holders", "interval", "keys", "logs", "matching", "metrics",
        "naming", "shards", "pieces", "pooled", "presets", "queries", "snapshot", "tracker"}
TALKS = {"chains", "cli", "connection", "exposition", "fleet", "landing", "locksview", "poller", "poolers", "probe", "relations",
         "resolve", "scheduler", "server", "webconfig", "deadline", "memory"}
OUTSIDE = {"socket", "threading", "http", "urllib", "ssl", "subprocess"}  # and no psycopg.connect (dsn parses with psycopg)


def imports(module: str) -> set[str]:
    """The modules one exporter module imports: its siblings by name, others by their full name."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                found |= {node.module} if node.module else {alias.name for alias in node.names}
            elif node.module:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_every_module_is_either_pure_or_talks() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == PURE | TALKS, "add the new module to PURE or TALKS here and to docs/architecture.md"


@pytest.mark.parametrize("module", sorted(PURE))
def test_a_pure_module_imports_nothing_that_talks(module: str) -> None:
    found = imports(module)
    assert not found & TALKS, f"{module} imports {sorted(found & TALKS)}"
    assert not {name for name in found if name.split(".")[0] in OUTSIDE}, module
    assert ".connect(" not in (PACKAGE / f"{module}.py").read_text(), module


def test_the_architecture_page_names_every_module() -> None:
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [m for m in sorted(PURE | TALKS) if f"{m}.py" not in page]
    assert not missing, missing


def test_no_function_is_over_60_lines() -> None:
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_the_invariant_checks_run_in_the_tests() -> None:
    assert os.environ.get(assemble.CHECK_INVARIANTS_ENV) == "1" and assemble.checking_invariants()


def test_a_broken_memory_of_the_last_poll_is_caught() -> None:
    config = parse_config({"dsn": "host=x dbname=postgres", "locks": [{"name": "five", "key": 5}]}, "t")
    locks = resolve_locks(config, "postgres", {}, ())
    assembler = Assembler(locks, KeyMatcher(locks), HoldTracker())
    held = row(datname="postgres", pid=7, objsubid=1, granted=True, shared=False, keys=[5, 6], backend_start=1.0,
               application_name="app", usename="u", state="idle", outside_transaction=True, idle_seconds=3.0)
    assembler.run([held], 100.0, Caps(10, 10, 10))
    assembler.check()  # as it is: true
    assembler._holding[0] = set()  # noqa: SLF001 - as a bug would leave it
    with pytest.raises(InvariantBroken, match="_holding"):
        assembler.check()
