"""The run's report: the complete JSON document, and the final table on the terminal.

This module owns what a report contains and how the table looks. The JSON holds the
configuration, totals, per-phase percentiles, the per-second timeline, errors, and every
histogram in HdrHistogram's encoded form (so reports can be merged exactly later). It never
measures anything and never talks to the network. The HTML report is built from the same
document by ``htmlreport``.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.table import Table

from mailstorm.load.config import LoadConfig
from mailstorm.load.schedule import OpenLoopSchedule
from mailstorm.load.stats import (
    ERROR_KINDS,
    PHASES,
    RunStats,
    counts_percentile,
    histogram_mean,
    value_at_percentiles,
)

__all__ = [
    "PERCENTILES",
    "build_report",
    "percentile_curve",
    "phase_summary",
    "render_table",
    "write_json",
    "write_report_files",
]

#: The percentiles every phase reports, and their JSON key suffixes.
PERCENTILES = ((50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99_9"))
#: Points of the latency-by-percentile curves in the HTML report.
CURVE_PERCENTILES = (
    0.0,
    10.0,
    25.0,
    50.0,
    75.0,
    90.0,
    95.0,
    97.5,
    99.0,
    99.5,
    99.9,
    99.95,
    99.99,
    99.999,
    100.0,
)
#: MB in reports is 10**6 bytes, as network throughput usually is.
MB = 1_000_000

REPORT_VERSION = 1
#: A last, partial second of the timeline shorter than this is left out of the charts: its
#: rate, over so short a time, says little (the JSON keeps it, with its length).
MIN_CHARTED_SECOND = 0.25
#: The percentiles of the latency over time (max: one slow message among hundreds a second
#: does not move p99).
OVER_TIME_PERCENTILES = ((50.0, "p50"), (99.0, "p99"), (100.0, "max"))


def timeline_rows(stats: RunStats, duration: float | None = None) -> list[dict[str, Any]]:
    """One row per second of the run: counts, the rate over the second's real length (the
    last second is partial), and p50/p99/max of end of data and whole messages in it.

    Seconds from ``duration`` (``--duration``) on are the drain (``"drain": true``): no
    message starts in them, the ones in flight finish, so their rates are no throughput."""
    timeline = stats.timeline
    seconds = len(timeline.delivered)
    rows: list[dict[str, Any]] = []
    for i in range(seconds):
        length = 1.0
        if i == seconds - 1:
            length = round(min(1.0, max(0.0, stats.elapsed - i)), 3)
        delivered = timeline.delivered[i]
        latency: dict[str, dict[str, float] | None] = {}
        for phase in timeline.latency:
            counts = timeline.latency_counts(phase, i)
            latency[phase] = (
                {key: _ms(counts_percentile(counts, p)) for p, key in OVER_TIME_PERCENTILES}
                if counts
                else None
            )
        rows.append(
            {
                "second": i,
                "length_s": length,
                "delivered": delivered,
                "bytes": timeline.bytes[i],
                "failed": timeline.failed[i],
                "msg_rate": round(delivered / length, 2) if length > 0 else None,
                "charted": length >= MIN_CHARTED_SECOND,
                "drain": duration is not None and i >= duration,
                "latency_ms": latency,
            }
        )
    return rows


def ramp_up_note(config: LoadConfig, stats: RunStats) -> str | None:
    """Open loop with a ramp-up: what average rate the schedule itself asked for over the run,
    so a lower average against the target is not read as the server's doing."""
    if config.rate is None or config.ramp_up <= 0:
        return None
    window = config.duration if config.duration is not None else stats.elapsed
    if not window or window <= 0:
        return None
    expected = OpenLoopSchedule(config.rate, config.ramp_up).due_by(window) / window
    return (
        f"the {config.ramp_up:g}s ramp-up lowers the average: over {window:g}s the schedule "
        f"asks for {expected:.1f} msg/s on average, against the target {config.rate:g} msg/s"
    )


def _ms(us: float) -> float:
    return round(us / 1000.0, 3)


def phase_summary(hist: HdrHistogram) -> dict[str, float | int]:
    """Count, min, mean, percentiles and max of one phase, in milliseconds."""
    summary: dict[str, float | int] = {
        "count": hist.get_total_count(),
        "min_ms": _ms(hist.get_min_value()),
        "mean_ms": _ms(histogram_mean(hist)),
    }
    values = value_at_percentiles(hist, [p for p, _ in PERCENTILES])
    for (_, key), value in zip(PERCENTILES, values, strict=True):
        summary[f"{key}_ms"] = _ms(value)
    summary["max_ms"] = _ms(hist.get_max_value())
    return summary


def percentile_curve(hist: HdrHistogram) -> list[list[float]]:
    """``[[percentile, ms], ...]`` for the latency-by-percentile plot."""
    values = value_at_percentiles(hist, CURVE_PERCENTILES)
    return [[p, _ms(v)] for p, v in zip(CURVE_PERCENTILES, values, strict=True)]


def build_report(
    config: LoadConfig,
    stats: RunStats,
    *,
    fail_if: dict[str, Any] | None = None,
    started_at: float | None = None,
    probe_connections: int = 0,
    interrupted: bool = False,
) -> dict[str, Any]:
    """The complete report document (what ``--json`` writes).

    ``probe_connections``: connections made before the run to see that the target is up (the
    CLI's probe); the server counts them as sessions, the run's ``connections`` do not.
    """
    if not started_at:
        started_at = time.time()
    phases = {}
    curves = {}
    for phase in PHASES:
        hist = stats.phases.by_phase[phase]
        if hist.get_total_count():
            phases[phase] = phase_summary(hist)
            curves[phase] = percentile_curve(hist)
    totals: dict[str, Any] = {
        "attempted": stats.attempted,
        "delivered": stats.delivered,
        "failed": stats.failed,
        "errors": stats.errors,
        "error_rate": round(stats.error_rate, 6),
        "bytes": stats.bytes_delivered,
        "connections": stats.connections,
        "probe_connections": probe_connections,
        "reconnects": dict(sorted(stats.reconnects.items())),
        "elapsed_s": round(stats.elapsed, 3),
        "wall_s": round(stats.wall, 3),
        "msg_rate": round(stats.msg_rate, 2),
        "mb_rate": round(stats.byte_rate / MB, 3),
    }
    if config.rate is not None:
        totals["target_rate"] = config.rate
        note = ramp_up_note(config, stats)
        if note is not None:
            totals["ramp_up_note"] = note
    return {
        "report_version": REPORT_VERSION,
        "tool": "mailstorm load",
        # Ctrl-C ended the run: everything below covers only the part that ran.
        "interrupted": interrupted,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        # The same instant to the microsecond (wall clock, UTC epoch) and the machine that ran
        # the load: ``mailstorm report merge`` lines runs from several machines up with them.
        "started_at_unix": round(started_at, 6),
        "host": socket.gethostname(),
        "config": config.to_report(),
        "totals": totals,
        "phases": phases,
        "percentile_curves": curves,
        "timeline": timeline_rows(stats, config.duration),
        # Each second's latencies as counts, for ``mailstorm report merge`` to add up exactly.
        "timeline_latency_counts": stats.timeline.to_dict()["latency"],
        "errors": {
            "by_kind": {k: stats.errors_by_kind[k] for k in ERROR_KINDS if stats.errors_by_kind[k]},
            "by_code": {str(c): n for c, n in sorted(stats.errors_by_code.items())},
            "samples": [
                {"error": text, "count": n} for text, n in stats.error_samples.most_common()
            ],
        },
        "tls": {
            "resume": config.tls_resume,
            "full_handshakes": stats.phases.by_phase["tls"].get_total_count(),
            "resumed_handshakes": stats.phases.by_phase["tls_resumed"].get_total_count(),
            "versions_and_ciphers": dict(stats.tls_ciphers.most_common()),
        },
        "backoff": {
            "min_s": config.backoff_min,
            "max_s": config.backoff_max,
            "waits": stats.backoffs,
            # As drawn: a wait the end of the run cut short counts whole.
            "seconds": round(stats.backoff_s, 3),
            "messages_not_started": stats.errors_by_kind["backoff"],
        },
        "fail_if": fail_if,
        "generator": {
            "loop_lag_p99_ms": stats.loop_lag_ms(0.99),
            "loop_lag_max_ms": stats.loop_lag_ms(1.0),
            # Only when messages got through: failed connections alone (a server that is down,
            # refuses or closes at once) say nothing about the generator's own pace.
            "saturated": stats.loop_lag_ms(0.99) > SATURATED_LAG_MS and stats.delivered > 0,
            # The generator's own cost (every process, start-up excluded): the number to
            # compare with another driver's CPU per message.
            "cpu_s": round(stats.cpu_s, 3),
            "cpu_per_1000_messages": (
                round(stats.cpu_s * 1000 / stats.delivered, 4) if stats.delivered else None
            ),
            # Connections where --pipeline-messages did nothing: the server lacks PIPELINING.
            "unpipelined_connections": stats.unpipelined_connections,
        },
        "histograms": stats.phases.encode(),
    }


#: Event-loop lag (p99, ms) above which the generator, not the server, set the pace.
SATURATED_LAG_MS = 10


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def write_report_files(
    report: dict[str, Any], console: Console, json_path: str | None, html_path: str | None
) -> None:
    """Write ``--json`` and ``--html`` (those given) and say on ``console`` where they went."""
    if json_path:
        write_json(report, json_path)
        console.print(f"JSON report written to {json_path}", markup=False, soft_wrap=True)
    if html_path:
        from mailstorm.load.htmlreport import write_html  # its template only when asked for

        write_html(report, html_path)
        console.print(f"HTML report written to {html_path}", markup=False, soft_wrap=True)


def _fmt_ms(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:.2f}s"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render_table(report: dict[str, Any], console: Console) -> None:
    """The final summary: totals, a per-phase latency table, and errors."""
    totals = report["totals"]
    config = report["config"]
    mode = config["mode"]
    if mode == "open-loop":
        mode += f" at {config['rate']:g} msg/s"
    console.print(
        f"[bold]mailstorm load[/] {config['target']}  {mode}, {config['sessions']} sessions",
        soft_wrap=True,
    )
    if report.get("interrupted"):
        console.print(
            "[bold yellow]interrupted[/]: these results cover only the part of the run before "
            "Ctrl-C",
            soft_wrap=True,
        )
    rate_line = f"{totals['msg_rate']:.1f} msg/s, {totals['mb_rate']:.2f} MB/s"
    if "target_rate" in totals:
        rate_line += f" (target {totals['target_rate']:g} msg/s)"
    console.print(
        f"delivered [bold green]{totals['delivered']}[/] of {totals['attempted']} in "
        f"{totals['elapsed_s']:.2f}s: {rate_line}; failed {totals['failed']} "
        f"({totals['error_rate'] * 100:.2f}%), errors {totals['errors']}, "
        f"connections {totals['connections']}"
        + (
            f" (and {totals['probe_connections']} probe before the run)"
            if totals.get("probe_connections")
            else ""
        ),
        soft_wrap=True,
    )
    if totals.get("ramp_up_note"):
        console.print(f"note: {totals['ramp_up_note']}", markup=False, soft_wrap=True)
    reconnects = totals.get("reconnects")
    if reconnects:
        reasons = ", ".join(
            f"{n} after {'a 421' if reason == '421' else 'the server closed the connection'}"
            for reason, n in reconnects.items()
        )
        console.print(
            f"reconnects (the server ended a connection between messages; the message went "
            f"again on a new one): {reasons}",
            soft_wrap=True,
        )
    tls = report.get("tls")
    if tls and (tls["full_handshakes"] or tls["resumed_handshakes"]):
        ciphers = ", ".join(f"{name} x{n}" for name, n in tls["versions_and_ciphers"].items())
        console.print(
            f"TLS: {tls['full_handshakes']} full handshakes, {tls['resumed_handshakes']} "
            f"resumed (resumption {'on' if tls['resume'] else 'off, --no-tls-resume'}); "
            f"{ciphers}",
            markup=False,
            soft_wrap=True,
        )
    backoff = report.get("backoff")
    if backoff and backoff["waits"]:
        not_started = backoff["messages_not_started"]
        console.print(
            f"[bold yellow]back-off[/] after failed connections: {backoff['waits']} waits, "
            f"{backoff['seconds']:.1f}s planned in all (random {backoff['min_s']:g}s to "
            f"{backoff['max_s']:g}s, doubling per failure in a row)"
            + (
                f"; {not_started} messages due meanwhile failed unstarted"
                if not_started
                else ""
            ),
            soft_wrap=True,
        )
    table = Table(title="latency (ms)", title_justify="left")
    table.add_column("phase")
    for name in ("count", "p50", "p90", "p99", "p99.9", "max"):
        table.add_column(name, justify="right")
    for phase, s in report["phases"].items():
        table.add_row(
            phase if phase != "message" else "[bold]message[/]",
            str(s["count"]),
            *(_fmt_ms(s[k]) for k in ("p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "max_ms")),
        )
    console.print(table)
    errors = report["errors"]
    if errors["by_kind"]:
        kinds = ", ".join(f"{k} {n}" for k, n in errors["by_kind"].items())
        codes = ", ".join(f"{c}: {n}" for c, n in errors["by_code"].items())
        console.print(
            f"[bold red]errors[/] by kind: {kinds}" + (f"; by code: {codes}" if codes else ""),
            soft_wrap=True,
        )
        for sample in errors["samples"][:5]:
            console.print(
                f"  {sample['count']:>6} x {sample['error']}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    generator = report.get("generator", {})
    if generator.get("unpipelined_connections"):
        console.print(
            f"[bold yellow]warning[/]: --pipeline-messages had no effect on "
            f"{generator['unpipelined_connections']} connection(s): the server does not offer "
            "PIPELINING (--pipelining on sends pipelined anyway)",
            soft_wrap=True,
        )
    if generator.get("saturated"):
        console.print(
            f"[bold yellow]warning[/]: the load generator itself was saturated (event loop "
            f"lag p99 {generator['loop_lag_p99_ms']} ms, max {generator['loop_lag_max_ms']} ms): "
            "latencies include its own delay; spread the load with --procs or fewer sessions",
            soft_wrap=True,
        )
    fail_if = report.get("fail_if")
    if fail_if:
        verdict = "[bold red]FAILED[/]" if fail_if["failed"] else "[green]passed[/]"
        console.print(f"--fail-if {fail_if['expression']!r}: {verdict}")
        for line in fail_if["explanation"]:
            console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
