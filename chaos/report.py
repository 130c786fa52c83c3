"""OUT/report.md (also printed) and OUT/timeline.png from a chaos run's Result."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from chaos.oracle import CLAUSES
from chaos.truth import Hold
from tests.metrics_util import parse

if TYPE_CHECKING:
    from chaos.run import Result

HOLDERS = "pg_advisory_lock_holders"
UP = "pg_advisory_lock_exporter_up"
TIMELINE_LOCKS = 3  # locks drawn in the picture
TIMELINE_TARGET = "direct"
LIES_SHOWN = 10  # per rule, in report.md (lies.txt has them all)


def _median_worst(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} | {max(values):.2f}" if values else "- | -"


def _header(result: "Result") -> list[str]:
    options, verdict = result.options, result.verdict
    failed = sum(1 for s in result.scrapes if not s.text)
    verdict_line = "**passed**" if result.ok else "**failed**"
    lines = [
        f"# Truth test: {verdict_line}",
        "",
        f"Seed **{options.seed}** (`python -m chaos --seconds {options.seconds:g} --seed {options.seed}"
        f"{' --short' if options.short else ''}"
        f"{f' --poll-interval {options.poll_interval:g}' if options.poll_interval != 0.5 else ''}` replays this "
        f"schedule); poll_interval {options.poll_interval:g}s; "
        f"{len(result.faults)} faults of {len(result.plan)} planned, one at a time.",
        "",
        "Concurrency: one exporter process in `targets:` mode watches three servers at once: `direct` is topology (a) "
        "(dsn straight to the server, a pooler console through the harness's proxy), `proxied` is (b) (dsn through "
        "the proxy), `pooled` is (c) (dsn through the transaction pool, with its console); together they are (d): "
        "each fault hits one server (or the exporter process: topology d), and the others must not notice. "
        "The workload runs on all three throughout. The PgBouncers run with server_login_retry 0.5 s "
        "(default 15 s: through a pool the exporter could not recover sooner than the pool retries) "
        "and query_wait_timeout 10 s (default 120 s: a worker queued for a server would hold up a pause).",
        "",
        f"Scrapes: {len(result.scrapes)} ({failed} failed or timed out), "
        + ", ".join(f"{t}: {sum(1 for s in result.scrapes if s.target == t)}" for t in sorted(result.setups)) + ".",
        "",
        "| target | stale_after (s) | reconnect back-off cap (s) |",
        "|---|---|---|",
        *[f"| {name} | {setup.stale_after:g} | {setup.reconnect_backoff_max:g} |" for name, setup in sorted(result.setups.items())],
        "",
        "## Checks by rule",
        "",
        "| rule | checks | lies |",
        "|---|---|---|",
        *[f"| {rule} | {verdict.checks.get(rule, 0)} | {sum(1 for lie in verdict.lies if lie.rule == rule)} |"
          for rule in range(1, 9)],
        "",
        "Checks by clause (a clause with none fails the run): "
        + ", ".join(f"{clause}: {verdict.clauses.get(clause, 0)}" for clause in CLAUSES) + "."
        + (f" **Unchecked: {', '.join(verdict.unchecked)}.**" if verdict.unchecked else ""),
    ]
    return lines


def _truth_at(result: "Result", target: str, when: float) -> list[str]:
    """The holds of a target that may have been held at `when`: one line each."""
    lines = []
    for hold in result.truth.holds:
        released = hold.released.hi if hold.released else float("inf")
        if hold.target == target and hold.granted.lo <= when + 1 and released >= when - 1:
            lines.append(f"    {hold.database} {hold.key} {hold.mode} pid={hold.holder.pid} gid={hold.holder.gid} "
                         f"granted [{hold.granted.lo:.3f}, {hold.granted.hi:.3f}] released "
                         f"{'-' if hold.released is None else f'[{hold.released.lo:.3f}, {hold.released.hi:.3f}]'}")
    return lines[:40]


def _lies(result: "Result", out: Path) -> list[str]:
    """Every lie in OUT/lies.txt; the first LIES_SHOWN of each rule here, each with its scrape
    and the truth then saved beside the report."""
    lines = ["", "## Lies", ""]
    lies = result.verdict.lies
    if not lies:
        return [*lines, "None."]
    (out / "lies.txt").write_text("".join(f"rule {lie.rule}\t{lie.target}\t{lie.scrape_received:.3f}\t{lie.what}\n"
                                          for lie in lies))
    folder = out / "lies"
    folder.mkdir(exist_ok=True)
    shown: Counter[int] = Counter()
    for number, lie in enumerate(lies, 1):
        shown[lie.rule] += 1
        if shown[lie.rule] > LIES_SHOWN:
            continue
        scrape = next((s for s in result.scrapes if s.target == lie.target and s.received == lie.scrape_received), None)
        path = folder / f"lie-{number}-rule-{lie.rule}.txt"
        path.write_text((scrape.text if scrape else "(scrape not found)") + "\n# the truth then\n"
                        + "\n".join(_truth_at(result, lie.target, lie.scrape_received)) + "\n")
        lines.append(f"- rule {lie.rule}, target {lie.target or '-'}, scrape at {lie.scrape_received:.3f} "
                     f"(seed {result.options.seed}): {lie.what} (the scrape and the truth then: lies/{path.name})")
    hidden = {rule: n - LIES_SHOWN for rule, n in sorted(shown.items()) if n > LIES_SHOWN}
    if hidden:
        lines.append(f"- and more (all {len(lies)} in lies.txt): "
                     + ", ".join(f"{n} of rule {rule}" for rule, n in hidden.items()))
    return lines


def _faults(result: "Result") -> list[str]:
    verdict = result.verdict
    counts = Counter((f.kind, result.sites.get(f.target, "d")) for f in result.faults)
    kinds = sorted({f.kind for f in result.faults})
    lines = ["", "## Faults", "",
             "| kind | a | b | c | d (exporter) | blind s, median | worst | recovery s, median | worst |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind in kinds:
        by = [str(counts.get((kind, letter), 0)) for letter in "abcd"]
        lines.append(f"| {kind} | {' | '.join(by)} | {_median_worst(verdict.blind.get(kind, []))} | "
                     f"{_median_worst(verdict.recovery.get(kind, []))} |")
    lines += ["", *_budget(result, counts)]
    missed = budget_failures(result)
    if missed:
        lines += ["", "Budgets missed (the run fails): " + "; ".join(missed) + "."]
    unproven = result.unproven
    lines += ["", f"Every fault proved itself: {'yes' if not unproven else 'no'}."]
    lines += [f"- NOT PROVEN: {f.kind} on {f.target} at {f.began.lo:.3f}" for f in unproven]
    lines += ["", f"Unexplained blind time: {len(verdict.unexplained_blind)} stretches"]
    lines += [f"- {target or '-'}: {lo:.3f} .. {hi:.3f} ({hi - lo:.2f} s)" for target, lo, hi in verdict.unexplained_blind[:50]]
    return lines


def _budget(result: "Result", counts: Counter[tuple[str, str]]) -> list[str]:
    """Issue 27's budget for the 30-minute run: at least 100 faults, every kind at least twice in
    every topology it applies to (the places the schedule drew from)."""
    if result.options.short:
        return [f"Short run: every kind once ({len({f.kind for f in result.faults})} kinds played)."]
    places = sorted({(p.kind, result.sites.get(p.target, "d")) for p in result.plan})
    thin = [f"{kind} in ({letter}): {counts.get((kind, letter), 0)}" for kind, letter in places
            if counts.get((kind, letter), 0) < 2]
    return [f"Budget: at least 100 faults: {len(result.faults)}, {'met' if len(result.faults) >= 100 else 'not met'}; "
            f"every kind at least twice in every topology it applies to: {'met' if not thin else 'not met: ' + ', '.join(thin)}."]


def budget_failures(result: "Result") -> list[str]:
    """Issue 27's budgets for a long run that it missed (none for a short run): at least 100
    faults, every kind at least twice in every topology it applies to, RSS at the end within 10%
    of its value after five minutes, threads and sockets back to their starting counts."""
    if result.options.short:
        return []
    failures = []
    counts = Counter((f.kind, result.sites.get(f.target, "d")) for f in result.faults)
    if len(result.faults) < 100:
        failures.append(f"{len(result.faults)} faults, fewer than 100")
    places = sorted({(p.kind, result.sites.get(p.target, "d")) for p in result.plan})
    failures += [f"{kind} in ({letter}) played {counts.get((kind, letter), 0)} times, fewer than 2"
                 for kind, letter in places if counts.get((kind, letter), 0) < 2]
    samples = result.samples
    at_five = next((s for s in samples if s["at"] - result.started >= 300), None)
    if at_five and samples and "rss_mb" in at_five and "rss_mb" in samples[-1]:
        drift = (samples[-1]["rss_mb"] - at_five["rss_mb"]) / at_five["rss_mb"] * 100
        if abs(drift) > 10:
            failures.append(f"RSS {drift:+.1f}% against after 5 minutes, more than 10%")
    settled = next((s for s in samples if "settled_after" in s), None)
    if settled is not None and samples and any(settled.get(k) != samples[0].get(k) for k in ("threads", "sockets")):
        failures.append("threads or sockets not back to their starting counts after the last fault")
    return failures


def _resources(result: "Result") -> list[str]:
    samples = result.samples
    if not samples:
        return []
    first, last = samples[0], samples[-1]
    at_five = next((s for s in samples if s["at"] - result.started >= 300), None)
    lines = ["", "## The exporter process", "", "| figure | start | after 5 min | end (the workload stopped) |",
             "|---|---|---|---|"]
    for key, label in (("rss_mb", "RSS (MB)"), ("threads", "threads"), ("sockets", "open sockets (/proc)"),
                       ("backends", "its backends (pg_stat_activity)"),
                       ("server_clients", "every client backend of the three servers (pools keep theirs)")):
        five = f"{at_five[key]:.1f}" if at_five and key in at_five else "-"
        lines.append(f"| {label} | {first.get(key, 0):.1f} | {five} | {last.get(key, 0):.1f} |")
    settled = next((s for s in samples if "settled_after" in s), None)
    if settled is not None:
        back = all(settled.get(k) == first.get(k) for k in ("threads", "sockets"))
        lines.append(f"\nThreads and sockets back to their starting counts {settled['settled_after']:.0f} s after the "
                     f"last fault: {'yes' if back else 'no'} ({settled.get('threads', 0):.0f} threads, "
                     f"{settled.get('sockets', 0):.0f} sockets).")
    if at_five and "rss_mb" in at_five and "rss_mb" in last:
        drift = (last["rss_mb"] - at_five["rss_mb"]) / at_five["rss_mb"] * 100
        lines.append(f"RSS at the end against after 5 minutes: {drift:+.1f}% (budget: within 10%: "
                     f"{'met' if abs(drift) <= 10 else 'not met'}).")
    return lines


def write_report(result: "Result") -> str:
    out = result.options.out
    lines = [*_header(result), *_lies(result, out), *_faults(result), *_resources(result)]
    picture = timeline(result, out / "timeline.png")
    if picture:
        lines += ["", f"![true versus reported holders]({picture.name})"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


# -- the picture -------------------------------------------------------------------------------


def _true_holders(holds: list[Hold], times: list[float]) -> list[int]:
    """At each time (ascending), how many holds were surely held: granted by then (the grant's
    span over), not yet released (its span not begun). One sweep over the changes."""
    # A hold whose release may come before its grant was over (a lock call whose answer a fault
    # lost: it may never have been) is never surely held.
    sure = [h for h in holds if h.released is None or h.released.lo > h.granted.hi]
    changes = sorted([(h.granted.hi, 1) for h in sure] + [(h.released.lo, -1) for h in sure if h.released])
    counts, held, at = [], 0, 0
    for when in times:
        while at < len(changes) and changes[at][0] <= when:
            held += changes[at][1]
            at += 1
        counts.append(held)
    return counts


def _reported(result: "Result", lock: str) -> tuple[list[float], list[float]]:
    times, values = [], []
    for scrape in result.scrapes:
        if scrape.target != TIMELINE_TARGET or not scrape.text:
            continue
        samples = parse(scrape.text)
        if samples.get((UP, ())) != 1:
            continue
        times.append(scrape.received - result.started)
        values.append(sum(v for (name, labels), v in samples.items() if name == HOLDERS and ("lock", lock) in labels))
    return times, values


def timeline(result: "Result", path: Path) -> Path | None:
    """True versus reported holders of a few named locks of one target, the faults shaded; None
    without matplotlib (the `bench` extra) or scrapes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    setup = result.setups.get(TIMELINE_TARGET)
    if setup is None or not result.scrapes:
        return None
    # The busiest named locks: the picture shows most where the truth changed most.
    busy = Counter(lock.name for h in result.truth.holds if h.target == TIMELINE_TARGET
                   for lock in setup.locks if not lock.family and h.database == lock.database and lock.matches(h.key))
    locks = sorted((lock for lock in setup.locks if not lock.family), key=lambda lock: -busy[lock.name])[:TIMELINE_LOCKS]
    end = max(s.received for s in result.scrapes) - result.started
    grid = [i * 0.1 for i in range(int(end / 0.1) + 1)]
    fig, axes = plt.subplots(len(locks), 1, figsize=(12, 2.2 * len(locks)), sharex=True, squeeze=False)
    for axis, lock in zip(axes[:, 0], locks):
        holds = [h for h in result.truth.holds if h.target == TIMELINE_TARGET and h.database == lock.database
                 and lock.matches(h.key)]
        axis.step(grid, _true_holders(holds, [t + result.started for t in grid]), where="post", color="tab:gray",
                  label="true holders")
        axis.plot(*_reported(result, lock.name), ".", markersize=2, color="tab:blue", label="reported (up 1)")
        for fault in result.faults:
            if fault.target in (TIMELINE_TARGET, "exporter"):
                hi = (fault.ended or fault.began).hi
                axis.axvspan(fault.began.lo - result.started, hi - result.started, alpha=0.2,
                             color="tab:red" if fault.blinds else "tab:orange")
        axis.set_ylabel(lock.name)
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel(f"seconds since the faults began (seed {result.options.seed}); shaded: faults of "
                           f"{TIMELINE_TARGET} or the exporter (red: may blind, orange: may not)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
