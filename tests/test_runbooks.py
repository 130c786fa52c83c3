"""docs/runbooks.md: a section for every alert and an alert for every section, each rule's
runbook_url at its section's GitHub anchor under one base (the chart replacing the base), and
the runbooks' SQL and PgBouncer commands run for real and doing what the page says.

Data-driven: a new rule and a new `## AlertName` section (with its four parts) is all it takes."""

from __future__ import annotations

import re
import subprocess
import textwrap
import threading

import psycopg
import pytest
import yaml

from tests.conftest import wait_until
from tests.pgbouncer import CONSOLE_USER, PgBouncer, PgBouncerError
from tests.test_deploy import CHART, ROOT, RULES, helm, promtool, render

RUNBOOKS = ROOT / "docs" / "runbooks.md"
TESTS = ROOT / "alerts" / "tests.yml"
PARTS = ["What it means", "How to confirm", "Fixes, safest first", "What not to do"]
FENCE = re.compile(r"^[ ]*```(\w*)\n(.*?)^[ ]*```[ ]*$", re.M | re.S)


def github_anchor(heading: str, seen: dict[str, int]) -> str:
    """The id GitHub gives a heading: lowercase, punctuation dropped (letters, digits, `_`, `-`
    and spaces kept), spaces as `-`; a repeated one gets `-1`, `-2`, ... (github-slugger)."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    return slug if count == 0 else f"{slug}-{count}"


def headings(text: str) -> list[tuple[int, str, str]]:
    """(level, title, anchor) of every heading outside code blocks, in order."""
    seen: dict[str, int] = {}
    found = []
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"(#{1,6}) +(.+?) *#* *$", line)
        if m:
            found.append((len(m.group(1)), m.group(2), github_anchor(m.group(2), seen)))
    return found


def runbooks() -> dict[str, str]:
    """Each level-2 section's title -> its text (up to the next level-2 heading)."""
    parts = re.split(r"^## +(.+?) *$", RUNBOOKS.read_text(), flags=re.M)
    return {title: body for title, body in zip(parts[1::2], parts[2::2])}


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def split_url(url: str) -> tuple[str, str]:
    base, _, anchor = url.partition("#")
    return base, anchor


def base_of_the_file() -> str:
    (base,) = {split_url(r["annotations"]["runbook_url"])[0] for r in rules()}
    return base


# -- the page and the rules ----------------------------------------------------------------

def test_every_alert_has_a_runbook_and_every_runbook_an_alert() -> None:
    alerts = [r["alert"] for r in rules()]
    sections = list(runbooks())
    assert sorted(set(alerts) - set(sections)) == [], "alerts without a runbook section"
    assert sorted(set(sections) - set(alerts)) == [], "runbook sections without an alert"
    assert len(sections) == len(set(sections))


def test_every_runbook_url_is_one_base_and_its_sections_github_anchor() -> None:
    anchors = {title: anchor for level, title, anchor in headings(RUNBOOKS.read_text()) if level == 2}
    base = base_of_the_file()
    assert base == "https://github.com/pg-advisory-lock-exporter/pg-advisory-lock-exporter/blob/main/docs/runbooks.md"
    for rule in rules():
        assert rule["annotations"]["runbook_url"] == f"{base}#{anchors[rule['alert']]}", rule["alert"]
    assert anchors["PgAdvisoryLockHeldTooLong"] == "pgadvisorylockheldtoolong"


def test_github_anchor_is_githubs() -> None:
    seen: dict[str, int] = {}
    assert github_anchor("PgAdvisoryLockHeldTooLong", seen) == "pgadvisorylockheldtoolong"
    assert github_anchor("Fixes, safest first", seen) == "fixes-safest-first"
    assert github_anchor("Fixes, safest first", seen) == "fixes-safest-first-1"
    assert github_anchor("The `locks` command", seen) == "the-locks-command"


def test_every_runbook_has_its_four_parts_in_order() -> None:
    for alert, body in runbooks().items():
        titles = [t for level, t, _ in headings(body) if level == 3]
        assert titles == PARTS, (alert, titles)
        pieces = re.split(r"^### .+$", body, flags=re.M)[1:]
        for title, piece in zip(PARTS, pieces):
            assert len(piece.strip()) > 80, (alert, title)
        confirm = pieces[1]
        assert FENCE.search(confirm), (alert, "no command or query to confirm with")


def test_every_link_within_the_page_resolves() -> None:
    text = RUNBOOKS.read_text()
    anchors = {a for _, _, a in headings(text)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links
    assert sorted(set(links) - anchors) == []


def test_every_query_of_the_runbooks_parses_and_needs_no_jobs_name(tmp_path) -> None:
    """A runbook's PromQL is run by someone in the middle of an alert: it must parse, and, like the
    rules, find the exporter by its own series, whatever its job is called. (One query a line.)"""
    queries = [line for lang, body in FENCE.findall(RUNBOOKS.read_text()) if lang == "promql"
               for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert queries
    for query in queries:
        assert not re.search(r"\bjob\s*=", query), query
    path = tmp_path / "runbook-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "runbooks", "rules": [
        {"record": f"runbook:query_{i}", "expr": q} for i, q in enumerate(queries)]}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_promtool_case_expects_the_rules_runbook_url() -> None:
    urls = {r["alert"]: r["annotations"]["runbook_url"] for r in rules()}
    cases = [c for t in yaml.safe_load(TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    for case in cases:
        for alert in case["exp_alerts"]:
            assert alert["exp_annotations"]["runbook_url"] == urls[case["alertname"]], case["alertname"]


# -- the chart -----------------------------------------------------------------------------

def rendered_rules(values: dict) -> list[dict]:
    rule = next(d for d in render({"prometheusRule": {"enabled": True, **values}}) if d["kind"] == "PrometheusRule")
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def test_the_charts_default_base_is_the_files() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["prometheusRule"]["runbookBaseUrl"] == base_of_the_file()


@pytest.mark.helm
@pytest.mark.parametrize("base", [None, "https://wiki.example.com/platform/runbooks/pg-advisory-locks"])
def test_the_chart_points_every_rule_at_its_runbook_under_the_base(base: str | None) -> None:
    shipped = rules()
    chart = rendered_rules({} if base is None else {"runbookBaseUrl": base})
    want = base or base_of_the_file()
    assert [r["alert"] for r in chart] == [r["alert"] for r in shipped]
    for ours, theirs in zip(chart, shipped):
        assert ours["annotations"]["runbook_url"] == f"{want}#{split_url(theirs['annotations']['runbook_url'])[1]}"
        # Nothing else differs from the file.
        ours["annotations"]["runbook_url"] = theirs["annotations"]["runbook_url"]
        assert ours == theirs


@pytest.mark.helm
@pytest.mark.parametrize("base", ["wiki.example.com/runbooks", "https://wiki.example.com/runbooks#x",
                                  "https://wiki.example.com/run books", ""])
def test_the_schema_refuses_a_base_that_is_not_a_plain_url(base: str) -> None:
    with pytest.raises(helm.HelmError) as info:
        rendered_rules({"runbookBaseUrl": base})
    assert "/prometheusRule/runbookBaseUrl" in str(info.value)


# -- the SQL and the PgBouncer commands, for real ------------------------------------------

CONSOLE_COMMAND = re.compile(r"^\s*(RECONNECT|KILL|RESUME|SHOW)\b", re.I | re.M)
ENDS_SOMETHING = re.compile(r"pg_terminate_backend|pg_cancel_backend|(COMMIT|ROLLBACK) PREPARED", re.I)


def sql_blocks() -> list[tuple[str, str]]:
    """(section, block) of every ```sql block of the page; the preamble's section is ""."""
    found = []
    text = RUNBOOKS.read_text()
    sections = [("", re.split(r"^## ", text, flags=re.M)[0])] + list(runbooks().items())
    for name, body in sections:
        found += [(name, textwrap.dedent(code)) for lang, code in FENCE.findall(body) if lang == "sql"]
    return found


def key_holders(conn: psycopg.Connection, key: int) -> list[int | None]:
    return [r[0] for r in conn.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        " AND ((classid::int8 << 32) | objid::int8) = %s", [key]).fetchall()]


def test_the_runbooks_sql_runs_and_does_what_the_page_says(server, sessions) -> None:
    gid = "export-2026-11-30"
    holder = sessions.open(application_name="stuck-worker")
    holder.execute("SELECT pg_advisory_lock(4242), pg_advisory_lock(-7, 8)")
    idle = sessions.open(application_name="pooled-backend")  # the page's 901: idle, a session lock
    idle.execute("SELECT pg_advisory_lock(43)")
    waiter = sessions.open(application_name="queued-run")
    failures: list[BaseException] = []

    def wait() -> None:
        try:
            waiter.execute("SELECT pg_advisory_lock(4242)")
        except psycopg.Error as exc:
            failures.append(exc)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    sessions.open().execute(f"BEGIN; SELECT pg_advisory_xact_lock(77); PREPARE TRANSACTION '{gid}'")
    admin = sessions.open(application_name="runbook-reader")
    try:
        wait_until(lambda: admin.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()[0])

        def concrete(block: str) -> str:
            return (block.replace("4711", str(holder.info.backend_pid)).replace("901", str(idle.info.backend_pid))
                    .replace("'lock_exporter'", "current_user"))

        blocks = sql_blocks()
        console = [b for _, b in blocks if CONSOLE_COMMAND.search(b)]
        queries = [(s, concrete(b)) for s, b in blocks if not CONSOLE_COMMAND.search(b) and not ENDS_SOMETHING.search(b)]
        enders = [(s, concrete(b)) for s, b in blocks if not CONSOLE_COMMAND.search(b) and ENDS_SOMETHING.search(b)]
        assert len(console) >= 2 and queries and enders
        results = {}
        for section, block in queries:
            with admin.cursor() as cur:
                cur.execute(block)
                names = [c.name for c in cur.description]
                results.setdefault(section, []).append([dict(zip(names, row)) for row in cur.fetchall()])

        # The decoded listing shows the bigint, the negative pair and the prepared transaction's key.
        everything = results[""][0]
        assert {"4242", "-7,8", "43", "77"} <= {r["key"] for r in everything}
        assert next(r for r in everything if r["key"] == "77")["pid"] is None
        # The holder of 4242, the prepared transaction by its gid, the waiter and who blocks it.
        held = results["PgAdvisoryLockHeldTooLong"]
        assert [r["pid"] for r in held[0]] == [holder.info.backend_pid]
        assert held[0][0]["application_name"] == "stuck-worker" and held[0][0]["state"] == "idle"
        assert [(r["gid"], r["key"]) for r in held[1]] == [(gid, "77")]
        (waiting,) = results["PgAdvisoryLockWaitersPilingUp"][0]
        assert waiting["waiter"] == waiter.info.backend_pid and waiting["blocked_by"] == [holder.info.backend_pid]
        assert [r["key"] for r in results["PgAdvisoryLockStrandedOnTransactionPool"][0]] == ["43"]

        # What not to do: an unlock from another session releases nothing.
        assert admin.execute("SELECT pg_advisory_unlock(4242)").fetchone()[0] is False
        assert key_holders(admin, 4242) == [holder.info.backend_pid]

        # The fixes, in the page's order within each section; each releases what it says.
        by_section = {}
        for section, block in enders:
            by_section.setdefault(section, []).append(block)
        # Waiters cancelled: the waiter's call fails, the holder keeps the lock.
        (cancel,) = by_section["PgAdvisoryLockWaitersPilingUp"]
        assert admin.execute(cancel).fetchall() == [(True,)]
        thread.join(5)
        assert failures and "canceling statement due to user request" in str(failures[0])
        assert key_holders(admin, 4242) == [holder.info.backend_pid]
        # The checked terminate: the holder's session ends and 4242 is free; again, no row.
        terminate, finish = by_section["PgAdvisoryLockHeldTooLong"]
        assert admin.execute(terminate).fetchall() == [(True,)]
        wait_until(lambda: key_holders(admin, 4242) == [])
        assert admin.execute(terminate).fetchall() == []
        # The stranded backend's checked terminate.
        (stranded,) = by_section["PgAdvisoryLockStrandedOnTransactionPool"]
        assert admin.execute(stranded).fetchall() == [(True,)]
        wait_until(lambda: key_holders(admin, 43) == [])
        # The prepared transaction ended by its gid.
        admin.execute(finish)
        assert key_holders(admin, 77) == []
        assert admin.execute("SELECT count(*) FROM pg_prepared_xacts WHERE gid = %s", [gid]).fetchone()[0] == 0
    finally:
        if admin.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", [gid]).fetchone():
            admin.execute(f"ROLLBACK PREPARED '{gid}'")


def stranded_section_blocks() -> dict[str, str]:
    blocks = [b for s, b in sql_blocks() if s == "PgAdvisoryLockStrandedOnTransactionPool"]
    return {
        "reconnect": next(b for b in blocks if b.lstrip().upper().startswith("RECONNECT")),
        "terminate": next(b for b in blocks if "pg_terminate_backend" in b),
        "kill": next(b for b in blocks if b.lstrip().upper().startswith("KILL")),
    }


@pytest.mark.parametrize("fix", ["reconnect", "terminate", "kill"])
def test_each_fix_for_a_lock_stranded_on_pgbouncer_releases_it(server, fix: str) -> None:
    """A real transaction-mode PgBouncer: a client's session lock stays on the server connection
    after the client is gone; each of the page's fixes, as written, releases it."""
    cluster = server.require_cluster()
    try:
        bouncer = PgBouncer(cluster.port, extra={"admin_users": CONSOLE_USER}).start()
    except PgBouncerError as exc:
        pytest.fail(str(exc))
    try:
        with psycopg.connect(bouncer.dsn(application_name="migrator"), autocommit=True, prepare_threshold=None) as client:
            client.execute("SELECT pg_advisory_lock(4242)")
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            (backend,) = wait_until(lambda: key_holders(admin, 4242))
            assert admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [backend]).fetchone()[0] == "idle"
            # What not to do: the client is gone (as after a pod restart), the lock is not.
            assert key_holders(admin, 4242) == [backend]
            block = stranded_section_blocks()[fix]
            if fix == "terminate":
                assert admin.execute(block.replace("901", str(backend))).fetchall() == [(True,)]
            else:
                with psycopg.connect(bouncer.console_dsn(), autocommit=True, prepare_threshold=None) as console:
                    for statement in filter(None, (s.split("--")[0].strip() for s in block.split(";"))):
                        console.execute(statement.replace(" app", " postgres"))
            wait_until(lambda: key_holders(admin, 4242) == [], timeout=10)
        # The pool still serves (after KILL, because RESUME followed).
        with psycopg.connect(bouncer.dsn(connect_timeout="5"), autocommit=True, prepare_threshold=None) as client:
            assert client.execute("SELECT 1").fetchone() == (1,)
    finally:
        bouncer.stop()
