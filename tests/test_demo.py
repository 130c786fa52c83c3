"""make demo keeps working: run it, as a newcomer would, read what it prints and its landing page,
and hold the README's sample of it to what it prints."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import needs_own_clusters
from tests.pgcluster import free_port
from tests.test_landing import row_names

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_MARKER = "<!-- demo-sample -->"
LOCKS_PROMPT = "$ pg-advisory-lock-exporter locks"
DEMO_SECONDS = 3  # the demo's run after it printed: its landing page is read at once


def demo_clusters() -> set[str]:
    """Data folders of running demo clusters (their folders are pgale-*; the demo prints its own)."""
    out = subprocess.run(["pgrep", "-a", "-x", "postgres"], capture_output=True, text=True).stdout
    return {part for line in out.splitlines() for part in line.split() if "/pgale-" in part and part.endswith("/data")}


@dataclass(frozen=True)
class DemoRun:
    stdout: str
    stderr: str
    returncode: int
    page: str  # its landing page, read while it ran


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


@pytest.fixture(scope="module")
def demo_run() -> DemoRun:
    """One real `make demo` (python -m demo), its landing page read once it printed where to look."""
    needs_own_clusters()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "demo", "--seconds", str(DEMO_SECONDS), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    out: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    printed: list[str] = []
    page = ""
    deadline = time.monotonic() + 120
    try:
        while True:
            line = out.get(timeout=max(deadline - time.monotonic(), 0.1))
            if line is None:
                break
            printed.append(line)
            if line.startswith("landing page: "):
                url = line.split()[2]
                with urllib.request.urlopen(url, timeout=10) as response:
                    page = response.read().decode()
        returncode = proc.wait(max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return DemoRun("".join(printed), "".join(err), returncode, page)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_demo_shows_the_sample_workload_and_cleans_up(demo_run: DemoRun) -> None:
    assert demo_run.returncode == 0, demo_run.stderr
    out = demo_run.stdout
    assert 'pg_advisory_lock_holders{lock="billing-leader",database="app",mode="exclusive"} 1' in out
    assert 'pg_advisory_lock_waiters{lock="shard-7",database="app"} 1' in out
    assert 'state="idle in transaction"' in out and 'application_name="shard-7-worker-a"' in out
    assert 'pg_advisory_lock_unnamed_holders{database="app"} 2' in out
    # The transaction-pool hazard, flagged (make tools unpacks pgbouncer, so the demo has one).
    assert 'pg_advisory_lock_pooled_session_holders{lock="schema-migration",database="app"} 1' in out
    # Why is it stuck: the migration holds its lock and waits for a table; the chain names the report.
    assert 'pg_advisory_lock_blocked_holders{lock="deploy-migrations",database="app"} 1' in out
    words = " ".join(out.split())  # the locks command wraps the chain at 80 columns
    assert "which waits for relation public.demo_users (AccessExclusiveLock)" in words
    assert "(report-runner, postgres@127.0.0.1, idle in transaction" in words
    assert "demo stopped and cleaned up" in out
    # The demo's own cluster (the data folder it printed) is stopped and gone; other clusters are not its business.
    data_dir = next(line.split("data dir ", 1)[1].strip() for line in out.splitlines() if "data dir " in line)
    assert data_dir not in demo_clusters()
    assert not os.path.exists(data_dir)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_demo_shows_trouble(demo_run: DemoRun) -> None:
    """A lock over its max_hold, a probe not as expected, keys nobody named over unnamed_max_hold:
    in what it prints and, the red row first, on its landing page."""
    assert demo_run.returncode == 0, demo_run.stderr
    samples = parse(demo_run.stdout.split(LOCKS_PROMPT, 1)[0])

    def get(name: str, **labels: str) -> float | None:
        return samples.get((f"pg_advisory_lock_{name}", tuple(sorted({"database": "app", **labels}.items()))))

    assert get("held_seconds", lock="shard-7") > get("max_hold_seconds", lock="shard-7") == 5.0
    assert get("probe_ok", lock="nightly-export") == 0 and get("probe_ok", lock="billing-leader") == 1
    assert get("unnamed_held_seconds") > get("unnamed_max_hold_seconds") == 5.0
    page = demo_run.page
    # The red row first: shard-7's (the blocked migration's too, once past its 30 s on a slow machine).
    first = page.split('<table id="locks">', 1)[1].split("</tr>", 2)[1]
    assert first.startswith('<tr class="trouble over">') and '<tr class="trouble over"><td><b>shard-7</b>' in page
    # Every kind of trouble the demo has is on the page, in the page's order.
    assert {"shard-7", "deploy-migrations", "schema-migration", "nightly-export"} <= set(row_names(page))
    names = row_names(page)
    assert names.index("deploy-migrations") < names.index("schema-migration") < names.index("nightly-export")
    assert "probe: <span class=\"bad\">NOT as expected</span>" in page
    assert re.search(r"pid \d+ shard-7-worker-b postgres@127\.0\.0\.1, waiting \d+s", page)  # who waits, named
    unnamed = page.split('<table id="unnamed">', 1)[1]
    assert '<td class="bad">' in unnamed.split("</tr>", 2)[1]  # the legacy job's keys: over unnamed_max_hold


# The README's sample of what the demo prints, against a real run.

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """The series among what the demo prints (its other lines say what it starts and where to look)."""
    series = "\n".join(line for line in text.splitlines() if line.startswith("pg_advisory_lock_")) + "\n"
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(series) for sample in family.samples}


def readme_sample() -> str:
    """The fenced block right after the marker line, wherever the docs keep it (one place)."""
    found = [(path, text) for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
             if SAMPLE_MARKER in (text := path.read_text())]
    assert len(found) == 1, f"{SAMPLE_MARKER} in {[str(p) for p, _ in found]}: exactly one place"
    after = found[0][1].split(SAMPLE_MARKER, 1)[1].lstrip("\n")
    assert after.startswith("```"), f"the line after {SAMPLE_MARKER} opens a fenced block"
    return after.split("\n", 1)[1].split("\n```", 1)[0]


# Labels that differ from run to run: the backend's pid, and which digest contender holds its lock.
VARYING_LABELS = {"pid"}
AGES = re.compile(r"_seconds$|_timestamp_seconds$")
FIXED_SECONDS = {"pg_advisory_lock_max_hold_seconds", "pg_advisory_lock_unnamed_max_hold_seconds"}


def stable(labels: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((k, re.sub(r"\d+$", "N", v) if k == "application_name" else v)
                 for k, v in labels if k not in VARYING_LABELS)


def normalized(text: str) -> str:
    """A `locks` printout with what varies masked: ages (≥8s, 2m13s) and numbers (pids), and its
    lines joined (where a long line wraps depends on a pid's width)."""
    text = re.sub(r"≥?\b(\d+h\d\dm|\d+m\d\ds|\d+s)\b", "AGE", text)
    return " ".join(re.sub(r"\d+", "N", text).split())


# What the sample must show of the demo's trouble (issue 28: a sample without the stranded
# PgBouncer lock and the blocked migration hid the demo's point): each a series name and the
# labels that pick it; the sample test below holds every series of the sample to a real run.
REQUIRED_SERIES = (
    ("pg_advisory_lock_pooled_session_holders", {"lock": "schema-migration"}),
    ("pg_advisory_lock_holder_info", {"lock": "schema-migration", "pooler": "pgbouncer"}),
    ("pg_advisory_lock_blocked_holders", {"lock": "deploy-migrations"}),
    ("pg_advisory_lock_blocked_holder_info", {"lock": "deploy-migrations"}),
    ("pg_advisory_lock_max_hold_seconds", {"lock": "shard-7"}),
    ("pg_advisory_lock_held_seconds", {"lock": "shard-7"}),
    ("pg_advisory_lock_waiters", {"lock": "shard-7"}),
    ("pg_advisory_lock_probe_ok", {"lock": "billing-leader"}),
    ("pg_advisory_lock_probe_ok", {"lock": "nightly-export"}),
    ("pg_advisory_lock_unnamed_max_hold_seconds", {}),
    ("pg_advisory_lock_unnamed_held_seconds", {}),
)
# The `locks` lines that show it (compared with pids and ages masked, lines joined).
REQUIRED_LOCKS = (
    "schema-migration  [777]  in app",
    "STRANDED on pooler pgbouncer: a session lock left on a pooled connection",
    "deploy-migrations  [8888]  in app",
    "which waits for relation public.demo_users (AccessExclusiveLock)",
    "blocked by pid 1 (report-runner, postgres@127.0.0.1, idle in transaction",
    "waits 1 deploy-pod-2 postgres@127.0.0.1",
    "shard-7  [(42, 7)]  in app",
    "waits 1 shard-7-worker-b",
)


def test_readme_sample_shows_the_demos_trouble() -> None:
    """Every series and `locks` line of REQUIRED_* is in the sample, and its values show the
    trouble (over max_hold, a probe not as expected): a sample pruned of any fails here, before the
    slow test below holds what is left to a real run."""
    sample_metrics, _, sample_locks = readme_sample().partition(LOCKS_PROMPT)
    shown = parse(sample_metrics)

    def value(name: str, **picked: str) -> float:
        found = [v for (n, labels), v in shown.items() if n == name and picked.items() <= dict(labels).items()]
        assert found, f"the README's demo sample leaves out {name}{picked}"
        return found[0]

    for name, picked in REQUIRED_SERIES:
        value(name, **picked)
    assert value("pg_advisory_lock_held_seconds", lock="shard-7") > value("pg_advisory_lock_max_hold_seconds",
                                                                         lock="shard-7")
    assert value("pg_advisory_lock_unnamed_held_seconds") > value("pg_advisory_lock_unnamed_max_hold_seconds")
    assert value("pg_advisory_lock_probe_ok", lock="nightly-export") == 0
    assert value("pg_advisory_lock_pooled_session_holders", lock="schema-migration") == 1
    assert value("pg_advisory_lock_blocked_holders", lock="deploy-migrations") == 1
    locks = normalized(sample_locks)
    for line in REQUIRED_LOCKS:
        assert normalized(line) in locks, f"the README's demo sample leaves out the `locks` line {line!r}"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_readme_sample_is_what_the_demo_prints(demo_run: DemoRun) -> None:
    """Every series of the sample is printed by the real demo: the same name and labels (pids and a
    contender's number aside) and, but for ages, the same value; its `locks` lines are the real
    ones with pids and ages masked."""
    assert demo_run.returncode == 0, demo_run.stderr
    sample = readme_sample()
    sample_metrics, _, sample_locks = sample.partition(LOCKS_PROMPT)
    real_metrics, _, real_locks = demo_run.stdout.partition(LOCKS_PROMPT)
    real = {}
    for (name, labels), value in parse(real_metrics).items():
        real.setdefault((name, stable(labels)), []).append(value)
    shown = parse(sample_metrics)
    assert len(shown) >= 10 and sample_locks.strip(), sample
    for (name, labels), value in shown.items():
        values = real.get((name, stable(labels)))
        assert values is not None, f"the demo printed no {name}{dict(labels)}"
        if AGES.search(name) and name not in FIXED_SECONDS:
            assert all(v >= 0 for v in values)
        else:
            assert value in values, f"{name}{dict(labels)}: the sample says {value}, the demo {values}"
    # hourly-digest's key on PostgreSQL 15 (hashtext), the example of a sample gone stale.
    assert any(n == "pg_advisory_lock_holder_info" and ("key", "285835591") in labels for n, labels in shown)
    real_text = normalized(real_locks.split("\nlanding page:", 1)[0])
    for line in sample_locks.strip().splitlines():
        assert normalized(line) in real_text, f"not in the demo's `locks`: {line!r}\n{real_locks}"


def test_a_port_that_is_no_port_is_refused_before_anything_starts() -> None:
    done = subprocess.run([sys.executable, "-m", "demo", "--port", "70000"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--port: 70000 is not a port (0 to 65535)" in done.stderr
    assert "starting a throwaway PostgreSQL" not in done.stdout
