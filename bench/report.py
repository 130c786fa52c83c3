"""bench/results.md and docs/bench.png from a benchmark run's figures."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

COLORS = {"floor": "tab:gray", "this exporter": "tab:blue", "query-exporter": "tab:orange"}
BUDGET = {"db_ratio": 1.2, "scaling_db_ratio": 1.3, "cpu_vs_qe": 0.5, "scrape_p95_ms": 5.0, "tps_loss_5s": 1.0}


def _by_subject(run: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {p["subject"]: p for p in run}


def _med(values: list[float]) -> float:
    return statistics.median(values)


def _cell(values: list[float], fmt: str = "{:.2f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = fmt.format(_med(values))
    return med if len(values) == 1 else f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def default_table(results: dict[str, Any]) -> tuple[list[str], dict[str, float]]:
    runs = [_by_subject(run) for run in results["default"]]
    qe = all("query-exporter" in r for r in runs)
    col = lambda subject, field: [r[subject][field] for r in runs if subject in r]  # noqa: E731
    ratio_db = [r["this exporter"]["db_ms_per_poll"] / r["floor"]["db_ms_per_poll"] for r in runs]
    verdict: dict[str, float] = {"db_ratio": _med(ratio_db)}
    lines = [
        "| figure | floor | this exporter | query-exporter | this / floor | this / query-exporter | budget |",
        "|---|---|---|---|---|---|---|",
        f"| database time per poll (ms) | {_cell(col('floor', 'db_ms_per_poll'))} | {_cell(col('this exporter', 'db_ms_per_poll'))} | "
        f"{_cell(col('query-exporter', 'db_ms_per_poll')) if qe else '-'} | {_cell(ratio_db)} | "
        + (_cell([r['this exporter']['db_ms_per_poll'] / r['query-exporter']['db_ms_per_poll'] for r in runs]) if qe else "-")
        + " | at most 1.2x the floor, below query-exporter's |",
    ]
    for field, label, budget, key in (
        ("cpu_ms_per_poll", "exporter CPU per poll (ms), rendering included", "at most 0.5x query-exporter's", "cpu"),
        ("scrape_p50_ms", "scrape latency p50 (ms)", "report", "p50"),
        ("scrape_p95_ms", "scrape latency p95 (ms)", "under 5 ms", "p95"),
        ("rss_mb", "resident memory (MB)", "report", "rss"),
        ("size_bytes", "bytes on the wire per scrape (gzip asked)", "below query-exporter's", "size"),
    ):
        ours = col("this exporter", field)
        verdict[key] = _med(ours)
        versus = "-"
        if qe:
            ratios = [r["this exporter"][field] / r["query-exporter"][field] for r in runs if r["query-exporter"][field]]
            versus = _cell(ratios)
            verdict[key + "_vs_qe"] = _med(ratios) if ratios else 0.0
        fmt = "{:.0f}" if field == "size_bytes" else "{:.2f}"
        lines.append(f"| {label} | - | {_cell(ours, fmt)} | {_cell(col('query-exporter', field), fmt) if qe else '-'} | - | {versus} | {budget} |")
    return lines, verdict


def pgbench_lines(results: dict[str, Any]) -> tuple[list[str], dict[str, float]]:
    from bench.measure import mean_ci95

    tps = results.get("pgbench")
    if not tps:
        return [], {}
    lines = [
        "| exporter | TPS, median (min-max) | loss vs none, mean of paired rounds (95% CI) |",
        "|---|---|---|",
        f"| none | {_cell(tps['none'], '{:.0f}')} | - |",
    ]
    verdict: dict[str, float] = {}
    for label, text in (("5s", "polling every 5 s"), ("1s", "polling every 1 s")):
        losses = [(1 - t / base) * 100 for t, base in zip(tps[label], tps["none"])]
        mean, low, high = mean_ci95(losses)
        verdict[f"tps_loss_{label}"], verdict[f"tps_loss_{label}_high"] = mean, high
        lines.append(f"| {text} | {_cell(tps[label], '{:.0f}')} | {mean:+.2f}% ({low:+.2f}% .. {high:+.2f}%) |")
    scan = results.get("lock_status_scan_ms")
    if scan is not None:
        verdict["bound_5s"] = scan / 5000 * 100
        verdict["bound_1s"] = scan / 1000 * 100
        lines += ["", f"The bound from first principles: one `pg_lock_status()` scan holds the 16 lock-manager "
                      f"partition locks for {scan:.2f} ms (median of 5, the load above); a lock-taking workload can "
                      f"be delayed at most that long per poll: {verdict['bound_5s']:.3f}% of the time at 5 s polls, "
                      f"{verdict['bound_1s']:.3f}% at 1 s."]
    return lines, verdict


def _measured(value: float | None, form: str = "{:.2f}") -> str:
    """A table cell: the value in form, or '-' when not measured."""
    return "-" if value is None else form.format(value)


def scaling_lines(results: dict[str, Any]) -> list[str]:
    rows = results.get("scaling") or []
    lines = [
        "| held locks | named keys | subject | DB ms/poll | CPU ms/poll | scrape p95 ms | RSS MB | bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in rows:
        lines.append(
            f"| {p['held']} | {p['named']} | {p['subject']} | {_measured(p['db_ms_per_poll'])} | {_measured(p['cpu_ms_per_poll'])} | "
            f"{_measured(p['scrape_p95_ms'])} | {_measured(p['rss_mb'], '{:.1f}')} | {_measured(p['size_bytes'], '{:.0f}')} |"
        )
    return lines


def family_lines(results: dict[str, Any]) -> list[str]:
    rows = results.get("family") or []
    if not rows:
        return ["(not measured in this run)"]
    by = {p["subject"]: p for p in rows}
    floor, ours = by.get("floor"), by.get("this exporter")
    lines = ["| figure | floor | this exporter | budget |", "|---|---|---|---|"]
    if floor and ours:
        lines.append(f"| database time per poll (ms) | {floor['db_ms_per_poll']:.2f} | {ours['db_ms_per_poll']:.2f} "
                     f"({ours['db_ms_per_poll'] / floor['db_ms_per_poll']:.2f}x the floor) | at most 1.3x the floor |")
        lines.append(f"| exporter CPU per poll (ms) | - | {ours['cpu_ms_per_poll']:.1f} "
                     f"({ours['cpu_ms_per_poll'] * 1000 / ours['held']:.2f} µs per held key) | under 150 ms |")
        lines.append(f"| resident memory (MB) | - | {ours['rss_mb']:.1f} | under 60 MB |")
        lines.append(f"| scrape p95 (ms) | - | {ours['scrape_p95_ms']:.2f} | |")
        lines.append(f"| exposition (bytes) | - | {ours['size_bytes']} | as with 5 keys, but for holder_info |")
    return lines


def churn_lines(results: dict[str, Any]) -> list[str]:
    rows = results.get("churn") or []
    if not rows:
        return ["(not measured in this run)"]
    by = {p["subject"]: p for p in rows}
    floor, ours, qe = by.get("floor"), by.get("this exporter"), by.get("query-exporter")
    lines = ["| figure | floor | this exporter | query-exporter |", "|---|---|---|---|"]
    if floor and ours:
        lines.append(f"| database time per poll (ms) | {floor['db_ms_per_poll']:.2f} | {ours['db_ms_per_poll']:.2f} "
                     f"({ours['db_ms_per_poll'] / floor['db_ms_per_poll']:.2f}x the floor) | "
                     f"{_measured(qe['db_ms_per_poll'] if qe else None)} |")
        lines.append(f"| exporter CPU per poll (ms) | - | {ours['cpu_ms_per_poll']:.1f}"
                     + (f" ({ours['cpu_ms_per_poll'] / qe['cpu_ms_per_poll']:.2f}x query-exporter's)" if qe else "")
                     + f" | {_measured(qe['cpu_ms_per_poll'] if qe else None, '{:.1f}')} |")
        lines.append(f"| scrape p95 (ms) | - | {ours['scrape_p95_ms']:.2f} | {_measured(qe['scrape_p95_ms'] if qe else None)} |")
    return lines


def databases_lines(results: dict[str, Any]) -> list[str]:
    rows = results.get("databases") or []
    if not rows:
        return ["(not measured in this run)"]
    by = {p["subject"]: p for p in rows}
    floor, ours = by["floor"], by["this exporter"]
    return [
        "| figure | floor | this exporter | budget |",
        "|---|---|---|---|",
        f"| database time per poll (ms) | {floor['db_ms_per_poll']:.2f} | {ours['db_ms_per_poll']:.2f} "
        f"({ours['db_ms_per_poll'] / floor['db_ms_per_poll']:.2f}x the floor) | within 1.2x the floor |",
        f"| series in all (lock series) | - | {ours['series']} ({ours['lock_series']}) | under 200 |",
    ]


def coverage_lines(results: dict[str, Any]) -> list[str]:
    rows = results.get("coverage") or []
    if not rows:
        return ["(not measured in this run)"]
    lines = ["| poll interval | hold | holds seen (fresh key each hold) | acquisitions counted (one session, same key) | a random poll phase predicts |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['interval']:g} s | {r['hold'] * 1000:g} ms | {r['seen_share'] * 100:.0f}% of {r['seen_holds']} "
                     f"| {r['counted_share'] * 100:.0f}% of {r['counted_holds']} | {r['expected_seen'] * 100:.0f}% |")
    return lines


def fleet_lines(results: dict[str, Any]) -> list[str]:
    fleet = results.get("fleet")
    if not fleet:
        return ["(not measured in this run)"]
    return [
        "| figure | measured | budget |",
        "|---|---|---|",
        f"| exporter CPU | {fleet['cpu_percent_of_core']:.1f}% of a core | under 10% |",
        f"| resident memory | {fleet['rss_mb']:.1f} MB | under 150 MB |",
        f"| scrape p95 of one target | {fleet['scrape_p95_ms']:.2f} ms | under 5 ms |",
        f"| the same, while another target's server is stopped (SIGSTOP) | {fleet['scrape_p95_ms_other_server_stopped']:.2f} ms "
        f"(median {fleet['scrape_median_ms_other_server_stopped']:.2f}) | under 5 ms |",
        f"| threads, start / end of the run | {fleet['threads_start']} / {fleet['threads_end']} | no growth |",
        f"| connections to the servers, start / end | {fleet['connections_start']} / {fleet['connections_end']} | no growth |",
    ]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("scaling") or []
    if not rows:
        return
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for row_index, (axis_field, fixed_field, fixed_value, xlabel) in enumerate(
        (("held", "named", 1000, "held advisory locks (1,000 named)"), ("named", "held", 10000, "named keys (10,000 held)"))
    ):
        for col, (field, ylabel) in enumerate(
            (("db_ms_per_poll", "database ms per poll"), ("cpu_ms_per_poll", "exporter CPU ms per poll"), ("rss_mb", "resident MB"))
        ):
            ax = axes[row_index][col]
            for subject, color in COLORS.items():
                pts = sorted((p[axis_field], p[field]) for p in rows
                             if p["subject"] == subject and p[fixed_field] == fixed_value and p[field] is not None)
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=subject, color=color)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("pg-advisory-lock-exporter: cost as the load grows (make bench)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def write_report(results: dict[str, Any], md_path: Path, png_path: Path) -> None:
    table, verdict = default_table(results)
    pg_lines, pg_verdict = pgbench_lines(results)
    verdict.update(pg_verdict)
    interference = results.get("interference") or []
    args = results["args"]
    text = [
        "# Benchmark results",
        "",
        f"`make bench` on this machine: {args['sessions']} sessions holding {args['held']} advisory locks "
        f"(session- and transaction-level, exclusive and shared, 10 waiters), {args['named']} named keys, "
        f"polls every {args['interval']} s; a {args['window']} s window per subject with no scrapes, "
        f"{args['scrapes']} sequential scrapes (asking for gzip, from a process of their own), {args['repeats']} runs. Cells: median (min-max over runs); "
        "ratios are taken within each run, then the median.",
        "",
        "The floor is one read of pg_locks' advisory rows plus one of pg_stat_activity per poll, selecting only "
        "the columns an exporter with our features uses (pg_locks: database, classid, objid, objsubid, pid, mode, "
        "granted, waitstart; pg_stat_activity: pid, backend_start, application_name, usename, client_addr, "
        "client_port, state, state_change, query_start, xact_start). "
        "query-exporter 5.0.2 runs one hand-written query per poll: one pg_locks read, names matched by a "
        "hash join against a VALUES list of the named keys, holders and waiters per name plus unnamed totals "
        "per database in the same result (it reads no pg_stat_activity, so it reports no holder identity or ages). "
        "Database time is pg_stat_statements' execution plus planning time of every statement each subject's "
        "role ran in the window, divided by its polls.",
        "",
        *table,
        "",
        "## Cost to the database's own work",
        "",
        f"pgbench, 8 clients, a script of two `pg_advisory_xact_lock` calls per transaction, the load above in place; "
        f"{args.get('pgbench_rounds', '?')} rounds of {args.get('pgbench_seconds', '?')} s runs, each round one run with "
        "no exporter, one polling every 5 s and one every 1 s, in a rotating order; the loss is each round's "
        "difference against its own no-exporter run, averaged. The exporter and the server share the machine's "
        "two cores, as a sidecar shares a node, so the exporter's own CPU is part of this cost.",
        "",
        *pg_lines,
        "",
        "## Probe interference",
        "",
        "A worker calling `pg_try_advisory_lock` / `pg_advisory_unlock` on one key as fast as it can, while the "
        "probe tries the same key back to back: worker tries that got false, per 1,000 probes: "
        + (", ".join(f"{v:.1f}" for v in interference) + f" (median {_med(interference):.1f})" if interference else "-")
        + ".",
        "",
        "## Basic auth",
        "",
        ("A refused login (bcrypt cost 10), median of 15: a known user with a wrong password "
         f"{results['auth']['known_ms']:.1f} ms, an unknown user {results['auth']['unknown_ms']:.1f} ms: "
         "the time does not tell users apart." if results.get("auth") else "(not measured in this run)"),
        "",
        "## Scaling",
        "",
        "![cost as the load grows](../docs/bench.png)",
        "",
        *scaling_lines(results),
        "",
        "## When everything changes",
        "",
        "The default load, with every session outside a transaction (150 of 200) taking or letting go of a key of "
        "its own every half second, so almost every session's rows differ at every poll and the exporter can reuse "
        "next to nothing (its figures cost in proportion to what changed).",
        "",
        *churn_lines(results),
        "",
        "## The key-family point",
        "",
        "200 sessions holding 50,000 advisory locks `pg_advisory_lock(42, k)`, all named by one family entry "
        "`key: {namespace: 42}` (nothing else named); polls every 1 s.",
        "",
        *family_lines(results),
        "",
        "## A cluster with many databases",
        "",
        f"{results.get('args', {}).get('databases', '200')} databases, `presets: all`, nothing held: preset series "
        "appear only once a tool takes its lock.",
        "",
        *databases_lines(results),
        "",
        "## One exporter, many servers",
        "",
        f"{(results.get('fleet') or {}).get('targets', 50)} targets (50 databases over four clusters), each naming 20 locks "
        f"with 100 held, polls every 5 s, over {(results.get('fleet') or {}).get('seconds', '?')} s (bench/fleet.py).",
        "",
        *fleet_lines(results),
        "",
        "## What polling can see",
        "",
        "Workers holding a key for a fixed time, then a random gap of 0.5-1.5x that time, against two exporters "
        "polling every 1 s and every 5 s (bench/coverage.py).",
        "",
        *coverage_lines(results),
        "",
        "## Budget",
        "",
        f"- database time per poll: {verdict['db_ratio']:.2f}x the floor (budget 1.2x)",
        f"- scrape p95: {verdict['p95']:.2f} ms (budget 5 ms)",
        f"- resident memory: {verdict['rss']:.1f} MB"
        + (f", {verdict['rss_vs_qe']:.2f}x query-exporter's" if "rss_vs_qe" in verdict else ""),
        f"- CPU per poll: {verdict['cpu']:.2f} ms" + (f", {verdict['cpu_vs_qe']:.2f}x query-exporter's (budget 0.5x)" if "cpu_vs_qe" in verdict else ""),
        f"- bytes on the wire: {verdict['size']:.0f}" + (f", {verdict['size_vs_qe']:.2f}x query-exporter's (budget below 1x)" if "size_vs_qe" in verdict else ""),
    ]
    if pg_verdict:
        text.append(f"- pgbench TPS loss at 5 s polls: {pg_verdict['tps_loss_5s']:+.2f}% (95% CI upper end "
                    f"{pg_verdict['tps_loss_5s_high']:+.2f}%); bound from first principles "
                    f"{pg_verdict.get('bound_5s', float('nan')):.3f}% (budget: either under 1%)")
    md_path.write_text("\n".join(text) + "\n")
    plot(results, png_path)


if __name__ == "__main__":
    # Rewrite bench/results.md and docs/bench.png from bench/results.json without measuring again.
    import json

    root = Path(__file__).resolve().parent.parent
    write_report(json.loads((root / "bench" / "results.json").read_text()), root / "bench" / "results.md",
                 root / "docs" / "bench.png")
