"""``mailstorm report merge``: one honest report from ``mailstorm load --json`` runs made on
several machines (started by ssh, Ansible, Kubernetes Jobs, anything).

This module owns reading and checking report files, merging report documents, and the
``mailstorm report`` command line. Percentiles are never averaged: every phase's HdrHistogram
(kept encoded in each report) is decoded and added, and the merged summaries come from the
same ``phase_summary``/``percentile_curve`` the load generator uses. The output has the schema
of a ``mailstorm load --json`` report, plus ``merged_from``, so it can be merged again:
counts and histograms merge associatively. It never measures anything and never talks to the
network.

How each field of a report merges (``build_report`` makes them):

=========================================  ===================================================
field                                      merged as
=========================================  ===================================================
histograms                                 decoded and added (exact)
phases, percentile_curves                  recomputed from the merged histograms
totals.attempted/delivered/failed/errors,  summed
bytes, connections, probe_connections,
reconnects (per reason)
totals.error_rate                          failed / attempted, recomputed
totals.elapsed_s                           from the earliest start to the latest end
                                           (``started_at_unix``); reports without it: the
                                           longest run, with ``span_note`` saying so
totals.wall_s                              as elapsed_s, with each run's wall time
totals.msg_rate, mb_rate                   delivered and bytes over the merged elapsed_s
totals.target_rate                         summed when every run was open loop, else dropped
totals.ramp_up_note                        dropped (per run, it is in that run's report)
timeline, timeline_latency_counts          by absolute second (each run shifted by its start,
                                           rounded to the second); reports without start
                                           times: aligned at their starts, with a note.
                                           delivered, bytes, failed and each second's latency
                                           counts summed (``Timeline.merge``), the rows
                                           recomputed by ``timeline_rows``; a report without
                                           latency counts: no latency per second, with a note
errors.by_kind, by_code                    summed
errors.samples                             counts summed per text, the most common kept
tls handshakes, versions_and_ciphers       summed; tls.resume from the first run
backoff waits, seconds, not_started        summed; min_s/max_s from the first run
generator.cpu_s, unpipelined_connections   summed; cpu_per_1000_messages recomputed
generator.loop_lag_*                       the worst machine's (max): lag is per machine
generator.saturated                        true if any machine was saturated
interrupted                                true if any run was interrupted
started_at, started_at_unix                the earliest
host                                       dropped (each run's is in merged_from)
config                                     the first run's; sessions, procs, and messages
                                           and rate when every run set them, summed;
                                           duration the longest; a target or workload
                                           setting that differs is warned about, targets
                                           joined with " + "
fail_if                                    each run's verdict in merged_from; the merge's own
                                           --fail-if, evaluated on the merged numbers
merged_from                                one entry per original run (flattened when a
                                           merged report is merged again)
=========================================  ===================================================
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from mailstorm.cliutil import OneLineErrorParser
from mailstorm.errors import ConfigError
from mailstorm.load.cli import _check_output_path as check_output_path
from mailstorm.load.cli import _ClosedPipeTolerantConsole as ClosedPipeTolerantConsole
from mailstorm.load.failif import FailIfError, FailIfExpression
from mailstorm.load.report import (
    MB,
    REPORT_VERSION,
    percentile_curve,
    phase_summary,
    render_table,
    timeline_rows,
    write_report_files,
)
from mailstorm.load.stats import (
    ERROR_KINDS,
    MAX_ERROR_SAMPLES,
    PHASES,
    PhaseHistograms,
    RunStats,
    Timeline,
)

__all__ = ["MergeError", "load_report", "main", "merge_reports", "report_main"]

#: What a report's ``tool`` may say: a run's report, or one this module merged.
TOOLS = ("mailstorm load", "mailstorm report merge")
#: Keys every report has (``build_report``); a file without them is not a report.
REQUIRED_KEYS = ("config", "totals", "phases", "timeline", "errors", "histograms")
#: The report's per-second latencies as counts (``Timeline.to_dict()["latency"]``).
LATENCY_COUNTS = "timeline_latency_counts"
#: Settings that make runs the same workload; a difference is warned about, not refused.
WORKLOAD_SETTINGS = (
    "target",
    "mode",
    "size_text",
    "eml",
    "rcpts",
    "per_connection",
    "pipelining",
    "pipeline_messages",
    "chunking",
    "lmtp",
    "starttls",
    "auth_user",
    "tls_resume",
)
#: Config fields summed over runs (the load the machines made together).
SUMMED_SETTINGS = ("sessions", "procs")


class MergeError(ValueError):
    """A file that cannot be merged; the text is one line naming the file."""


def load_report(path: str) -> dict[str, Any]:
    """Read and check one report file: JSON, a supported report, histograms that decode,
    and every field the merge reads."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise MergeError(f"{path}: cannot read: {reason}") from None
    try:
        report: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MergeError(f"{path}: not JSON: {exc}") from None
    check_report(report, path)
    try:
        # A report that merges alone merges with others: every field it needs is there.
        merge_reports([report], [path])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise MergeError(f"{path}: malformed report: {what}") from None
    return report


def check_report(report: Any, name: str) -> None:
    """Raise MergeError unless ``report`` is a mergeable ``mailstorm load --json`` report."""
    if not isinstance(report, dict) or report.get("tool") not in TOOLS:
        raise MergeError(f"{name}: not a mailstorm load --json report")
    version = report.get("report_version")
    if version != REPORT_VERSION:
        raise MergeError(
            f"{name}: report_version {version!r} is not supported (this mailstorm reads "
            f"{REPORT_VERSION})"
        )
    missing = [key for key in REQUIRED_KEYS if not isinstance(report.get(key), (dict, list))]
    if missing:
        raise MergeError(f"{name}: malformed report: no {', '.join(missing)}")
    histograms = report["histograms"]
    if not isinstance(histograms, dict):
        raise MergeError(f"{name}: malformed report: histograms is not an object")
    for phase, encoded in histograms.items():
        if phase not in PHASES or not isinstance(encoded, str):
            raise MergeError(f"{name}: malformed report: histogram {phase!r}")
        try:
            HdrHistogram.decode(encoded.encode("ascii"))
        except Exception as exc:  # hdrh raises several unrelated types on bad input
            raise MergeError(f"{name}: histogram {phase!r} does not decode: {exc}") from None


def _merged_histograms(reports: Sequence[dict[str, Any]]) -> PhaseHistograms:
    merged = PhaseHistograms()
    for report in reports:
        merged.merge(PhaseHistograms.decode(report["histograms"]))
    return merged


def _sum_counts(dicts: Sequence[dict[str, int]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for counts in dicts:
        total.update(counts)
    return total


def _start(report: dict[str, Any]) -> float | None:
    value = report.get("started_at_unix")
    return float(value) if isinstance(value, (int, float)) else None


def _span(reports: Sequence[dict[str, Any]], key: str) -> tuple[float, str | None]:
    """Seconds from the earliest start to the latest end of ``totals[key]``, and a note when
    start times are missing (then the longest run's)."""
    starts = [_start(r) for r in reports]
    lengths = [float(r["totals"].get(key, 0.0)) for r in reports]
    if None in starts or len(reports) == 1:
        note = (
            None
            if len(reports) == 1
            else "some reports have no started_at_unix (made before mailstorm recorded it): "
            "the merged duration is the longest run's, so rates assume the runs overlapped"
        )
        return max(lengths), note
    known = [s for s in starts if s is not None]
    first = min(known)
    return max(s + n for s, n in zip(known, lengths, strict=True)) - first, None


def _gaps(reports: Sequence[dict[str, Any]]) -> list[str]:
    """Runs that started after every earlier one had ended: the merged rates then include
    the idle time between them, which is rarely what was meant."""
    runs = sorted(
        (start, start + float(r["totals"].get("elapsed_s", 0.0)))
        for r in reports
        if (start := _start(r)) is not None
    )
    gaps: list[str] = []
    end = runs[0][1] if runs else 0.0
    for start, stop in runs[1:]:
        if start > end:
            gaps.append(
                f"the runs did not overlap: {start - end:.1f}s passed between one's end and the "
                "next one's start, and the merged rates count that time"
            )
        end = max(end, stop)
    return gaps


def _same_runs(reports: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """Inputs that are one run given twice (a glob that matched a file twice, a copy): its
    counts would be added twice."""
    seen: dict[tuple[Any, ...], str] = {}
    found: list[str] = []
    for report, name in zip(reports, names, strict=True):
        for run in _run_entry(report, name):
            key = (run["host"], run["started_at_unix"], run["attempted"], run["elapsed_s"])
            if run["started_at_unix"] is None:
                continue
            if key in seen:
                found.append(f"{seen[key]} and {name} hold the same run: it is counted twice")
            seen.setdefault(key, name)
    return found


def _merge_timeline(
    reports: Sequence[dict[str, Any]], elapsed: float
) -> tuple[list[dict[str, Any]], Timeline | None]:
    """Per-second rows by absolute second (each run shifted by its start, to the second; all
    aligned at their starts when a report has no start time), and the merged per-second
    latency counts (None when a report lacks them: then no second has percentiles)."""
    starts = [_start(r) for r in reports]
    first = min((s for s in starts if s is not None), default=0.0)
    exact = all(isinstance(r.get(LATENCY_COUNTS), dict) for r in reports)
    merged = Timeline()
    drains: dict[int, list[bool]] = {}
    for report, start in zip(reports, starts, strict=True):
        shift = round(start - first) if start is not None and None not in starts else 0
        rows = report["timeline"]
        latency = report[LATENCY_COUNTS] if exact else {}
        merged.merge(
            Timeline.from_dict(
                {
                    "delivered": [0] * shift + [row["delivered"] for row in rows],
                    "bytes": [0] * shift + [row["bytes"] for row in rows],
                    "failed": [0] * shift + [row["failed"] for row in rows],
                    "latency": {
                        phase: [[]] * shift + list(seconds) for phase, seconds in latency.items()
                    },
                }
            )
        )
        for row in rows:
            drains.setdefault(int(row["second"]) + shift, []).append(bool(row.get("drain")))
    # The load generator's own per-second rows, over the merged counts.
    timeline = timeline_rows(RunStats(elapsed=elapsed, timeline=merged))
    for row in timeline:
        # No message started in a second every run that was in it spent draining.
        flags = drains.get(row["second"], [])
        row["drain"] = bool(flags) and all(flags)
    return timeline, merged if exact else None


def _merged_config(reports: Sequence[dict[str, Any]], warn: list[str]) -> dict[str, Any]:
    configs = [r["config"] for r in reports]
    config = dict(configs[0])
    for key in WORKLOAD_SETTINGS:
        values = list(dict.fromkeys(json.dumps(c.get(key)) for c in configs))
        if len(values) > 1:
            warn.append(f"the runs differ in {key}: {', '.join(values)}")
    targets = list(dict.fromkeys(str(c.get("target")) for c in configs))
    config["target"] = " + ".join(targets)
    for key in SUMMED_SETTINGS:
        config[key] = sum(int(c.get(key) or 0) for c in configs)
    for key in ("messages", "rate"):
        values = [c.get(key) for c in configs]
        config[key] = sum(values) if None not in values else None
    durations = [c["duration"] for c in configs if c.get("duration") is not None]
    config["duration"] = max(durations) if durations else None
    config["mode"] = "open-loop" if config["rate"] is not None else "closed-loop"
    return config


def _run_entry(report: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """What ``merged_from`` says of one input: its runs (a merged input brings its own)."""
    if report.get("merged_from"):
        return list(report["merged_from"])
    config, totals = report["config"], report["totals"]
    fail_if = report.get("fail_if")
    return [
        {
            "file": name,
            "host": report.get("host"),
            "started_at": report.get("started_at"),
            "started_at_unix": report.get("started_at_unix"),
            "elapsed_s": totals.get("elapsed_s"),
            "target": config.get("target"),
            "mode": config.get("mode"),
            "sessions": config.get("sessions"),
            "rate": config.get("rate"),
            "size": config.get("size_text"),
            "attempted": totals.get("attempted"),
            "delivered": totals.get("delivered"),
            "interrupted": bool(report.get("interrupted")),
            "fail_if_failed": fail_if.get("failed") if isinstance(fail_if, dict) else None,
        }
    ]


def _sum(dicts: Sequence[dict[str, Any]], key: str) -> Any:
    return sum(d.get(key) or 0 for d in dicts)


def _merged_totals(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts summed; rates over the merged span (earliest start to latest end)."""
    all_totals = [r["totals"] for r in reports]
    elapsed, span_note = _span(reports, "elapsed_s")
    wall, _ = _span(reports, "wall_s")
    attempted, delivered, failed, bytes_ = (
        int(_sum(all_totals, key)) for key in ("attempted", "delivered", "failed", "bytes")
    )
    totals: dict[str, Any] = {
        "attempted": attempted,
        "delivered": delivered,
        "failed": failed,
        "errors": int(_sum(all_totals, "errors")),
        "error_rate": round(failed / attempted, 6) if attempted else 0.0,
        "bytes": bytes_,
        "connections": int(_sum(all_totals, "connections")),
        "probe_connections": int(_sum(all_totals, "probe_connections")),
        "reconnects": dict(
            sorted(_sum_counts([t.get("reconnects") or {} for t in all_totals]).items())
        ),
        "elapsed_s": round(elapsed, 3),
        "wall_s": round(wall, 3),
        "msg_rate": round(delivered / elapsed, 2) if elapsed > 0 else 0.0,
        "mb_rate": round(bytes_ / elapsed / MB, 3) if elapsed > 0 else 0.0,
    }
    if all("target_rate" in t for t in all_totals):
        totals["target_rate"] = _sum(all_totals, "target_rate")
    if span_note:
        totals["span_note"] = span_note
    return totals


def _merged_errors(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    errors = [r["errors"] for r in reports]
    by_kind = _sum_counts([e.get("by_kind") or {} for e in errors])
    by_code = _sum_counts([e.get("by_code") or {} for e in errors])
    samples: Counter[str] = Counter()
    for e in errors:
        for sample in e.get("samples") or []:
            samples[sample["error"]] += sample["count"]
    return {
        "by_kind": {k: by_kind[k] for k in ERROR_KINDS if by_kind[k]},
        "by_code": {c: by_code[c] for c in sorted(by_code, key=int)},
        "samples": [
            {"error": text, "count": n} for text, n in samples.most_common(MAX_ERROR_SAMPLES)
        ],
    }


def _merged_connections(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``tls`` and ``backoff``: counts summed, settings from the first run."""
    tls = [r.get("tls") or {} for r in reports]
    backoff = [r.get("backoff") or {} for r in reports]
    ciphers = _sum_counts([t.get("versions_and_ciphers") or {} for t in tls])
    return {
        "tls": {
            "resume": tls[0].get("resume", True),
            "full_handshakes": _sum(tls, "full_handshakes"),
            "resumed_handshakes": _sum(tls, "resumed_handshakes"),
            "versions_and_ciphers": dict(ciphers.most_common()),
        },
        "backoff": {
            "min_s": backoff[0].get("min_s"),
            "max_s": backoff[0].get("max_s"),
            "waits": _sum(backoff, "waits"),
            "seconds": round(_sum(backoff, "seconds"), 3),
            "messages_not_started": _sum(backoff, "messages_not_started"),
        },
    }


def _merged_generator(reports: Sequence[dict[str, Any]], delivered: int) -> dict[str, Any]:
    """Costs summed; loop lag is per machine, so the worst machine's."""
    generator = [r.get("generator") or {} for r in reports]
    cpu_s = round(_sum(generator, "cpu_s"), 3)
    return {
        "loop_lag_p99_ms": max(g.get("loop_lag_p99_ms") or 0 for g in generator),
        "loop_lag_max_ms": max(g.get("loop_lag_max_ms") or 0 for g in generator),
        "saturated": any(g.get("saturated") for g in generator),
        "cpu_s": cpu_s,
        "cpu_per_1000_messages": round(cpu_s * 1000 / delivered, 4) if delivered else None,
        "unpipelined_connections": _sum(generator, "unpipelined_connections"),
    }


def merge_reports(
    reports: Sequence[dict[str, Any]],
    names: Sequence[str],
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    """One report from several checked reports (``names`` label them in ``merged_from``),
    each field merged as the table in this module's docstring says.

    Warnings (runs that differ in target or workload, do not overlap, or are one run given
    twice) are appended to ``warnings``."""
    if not reports:
        raise MergeError("nothing to merge")
    warn = warnings if warnings is not None else []
    warn.extend(_same_runs(reports, names))
    warn.extend(_gaps(reports))
    histograms = _merged_histograms(reports)
    by_phase = {p: h for p, h in histograms.by_phase.items() if h.get_total_count()}
    totals = _merged_totals(reports)
    timeline, latency_counts = _merge_timeline(reports, totals["elapsed_s"])
    starts = [s for s in (_start(r) for r in reports) if s is not None]
    first = min(reports, key=lambda r: str(r.get("started_at")))
    merged: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "tool": "mailstorm report merge",
        "interrupted": any(r.get("interrupted") for r in reports),
        "started_at": first.get("started_at"),
        "started_at_unix": min(starts) if starts else None,
        "config": _merged_config(reports, warn),
        "totals": totals,
        "phases": {p: phase_summary(h) for p, h in by_phase.items()},
        "percentile_curves": {p: percentile_curve(h) for p, h in by_phase.items()},
        "timeline": timeline,
        "errors": _merged_errors(reports),
        **_merged_connections(reports),
        "fail_if": None,
        "generator": _merged_generator(reports, totals["delivered"]),
        "histograms": histograms.encode(),
        "merged_from": [
            entry
            for report, name in zip(reports, names, strict=True)
            for entry in _run_entry(report, name)
        ],
    }
    if latency_counts is not None:
        merged[LATENCY_COUNTS] = latency_counts.to_dict()["latency"]
    notes = []
    if len(reports) > 1 and len(starts) < len(reports):
        notes.append("some reports have no start time: their timelines are aligned at their starts")
    if latency_counts is None:
        notes.append(
            f"some reports have no {LATENCY_COUNTS} (made before mailstorm kept them): the "
            "timeline has no latency per second"
        )
    if notes:
        merged["timeline_note"] = "; ".join(notes)
    return merged


def stats_for_fail_if(report: dict[str, Any]) -> RunStats:
    """The merged numbers as the RunStats ``--fail-if`` reads (histograms, counts, rates)."""
    totals = report["totals"]
    errors = report["errors"]
    return RunStats(
        elapsed=float(totals["elapsed_s"]),
        wall=float(totals["wall_s"]),
        attempted=totals["attempted"],
        delivered=totals["delivered"],
        failed=totals["failed"],
        bytes_delivered=totals["bytes"],
        connections=totals["connections"],
        phases=PhaseHistograms.decode(report["histograms"]),
        errors_by_kind=Counter(errors["by_kind"]),
        errors_by_code=Counter({int(c): n for c, n in errors["by_code"].items()}),
    )


MERGE_DESCRIPTION = """\
Merge the --json reports of mailstorm load runs made at the same time on several machines
into one report: counts summed, every phase's HdrHistogram added, and the percentiles read
from the merged histograms (never averaged: the average of two p99s is no p99 of anything).
Rates are over the span from the earliest start to the latest end (the reports' start
times, so the machines' clocks should agree, as NTP keeps them). The result is printed as the
table mailstorm load prints, and written with --json (the same schema as a mailstorm load
report, plus "merged_from": it can be merged again) and --html. One file is allowed: it is
re-rendered. Runs that differ in target or workload settings are merged with a warning on
stderr."""

MERGE_EPILOG = """\
examples:
  %(prog)s host1.json host2.json host3.json --json all.json --html all.html
  %(prog)s runs/*.json --fail-if 'p99(eod)>50ms or error_rate>0.1%%'

exit status: 0 merged, 1 the --fail-if expression is true, 2 bad usage or a file that is
not a readable mailstorm load report (one line naming the file)."""


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog=prog,
        description=MERGE_DESCRIPTION,
        epilog=MERGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "files",
        nargs="+",
        metavar="REPORT.json",
        help="reports written by mailstorm load --json (or by this command)",
    )
    p.add_argument(
        "--json",
        dest="json_path",
        metavar="FILE",
        help="write the merged JSON report (without it, only the table is printed)",
    )
    p.add_argument(
        "--html",
        dest="html_path",
        metavar="FILE",
        help="write a self-contained HTML report of the merged run",
    )
    p.add_argument(
        "--fail-if",
        metavar="EXPR",
        help="exit with status 1 if EXPR is true of the merged numbers; the grammar of "
        "mailstorm load --fail-if, e.g. 'p99(eod)>50ms or error_rate>0.1%%'",
    )
    return p


def main(argv: list[str] | None = None, *, prog: str = "mailstorm report merge") -> int:
    """``mailstorm report merge``: returns the exit status."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return int(exc.code or 0)
    warnings: list[str] = []
    try:
        expression = FailIfExpression(args.fail_if) if args.fail_if is not None else None
        for option, path in (("--json", args.json_path), ("--html", args.html_path)):
            if path is not None:
                check_output_path(option, path)
        reports = [load_report(path) for path in args.files]
        merged = merge_reports(reports, args.files, warnings)
    except (MergeError, FailIfError, ConfigError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    failed_gate = False
    if expression is not None:
        failed_gate, explanation = expression.evaluate(stats_for_fail_if(merged))
        merged["fail_if"] = {
            "expression": expression.text,
            "failed": failed_gate,
            "explanation": explanation,
        }
    merged["config"].update(
        json_path=args.json_path, html_path=args.html_path, fail_if=args.fail_if
    )
    console = ClosedPipeTolerantConsole(highlight=False)
    render_table(merged, console)
    console.print(
        f"merged from {len(merged['merged_from'])} run(s): "
        + ", ".join(
            f"{run['file']}" + (f" ({run['host']})" if run.get("host") else "")
            for run in merged["merged_from"]
        ),
        markup=False,
        soft_wrap=True,
    )
    for key in ("span_note", "timeline_note"):
        note = merged["totals"].get(key) or merged.get(key)
        if note:
            console.print(f"note: {note}", markup=False, soft_wrap=True)
    write_report_files(merged, console, args.json_path, args.html_path)
    return 1 if failed_gate else 0


REPORT_USAGE = """\
usage: mailstorm report {merge} [options]

  merge    merge mailstorm load --json reports from several machines into one, exactly

"mailstorm report merge --help" explains it.
"""


def report_main(argv: list[str]) -> int:
    """``mailstorm report SUBCOMMAND``."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(REPORT_USAGE, end="")
        return 0 if argv else 2
    if argv[0] == "merge":
        return main(argv[1:])
    print(
        f"mailstorm report: error: unknown command {argv[0]!r}\n\n{REPORT_USAGE}",
        end="",
        file=sys.stderr,
    )
    return 2
