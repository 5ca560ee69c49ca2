"""Ratios against the reference servers, and the dated JSON and Markdown reports.

Files written under the output folder (``bench/results/`` by default)::

    YYYY-MM-DDTHHMM-<host>.json   everything: settings, machine, every run, medians, ratios
    YYYY-MM-DDTHHMM-<host>.md     the summary tables
    latest.md                     a copy of the newest summary

Ratios always compare numbers from the same run of the harness. For msg/s a ratio above 1 is
better than the reference; for CPU per message, time-to-banner and RSS, below 1 is better.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["add_ratios", "render_markdown", "write_reports"]

REFERENCES = ("aiosmtpd", "smtp-sink", "trio-floor")


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return round(value / reference, 3)


def _throughput_ratios(entries: list[dict[str, Any]]) -> None:
    medians = {
        (e["scenario"], e["driver"], e["server"]): e.get("median") or {} for e in entries
    }
    for entry in entries:
        median = entry.get("median") or {}
        for ref in REFERENCES:
            other = medians.get((entry["scenario"], entry["driver"], ref), {})
            key = ref.replace("-", "_")
            entry[f"msg_s_x_{key}"] = _ratio(median.get("msg_s"), other.get("msg_s"))
            entry[f"cpu_x_{key}"] = _ratio(
                median.get("server_cpu_per_1000"), other.get("server_cpu_per_1000")
            )


def _keyed_ratios(entries: list[dict[str, Any]], field: str, prefix: str) -> None:
    values = {e["server"]: e.get(field) for e in entries}
    for entry in entries:
        for ref in REFERENCES:
            entry[f"{prefix}_x_{ref.replace('-', '_')}"] = _ratio(entry.get(field), values.get(ref))


def add_ratios(result: dict[str, Any]) -> None:
    """Add ratios against aiosmtpd and smtp-sink (same run) to every entry, in place."""
    _throughput_ratios(result["throughput"])
    _keyed_ratios(result["connect_storm"], "p99_ms", "p99")
    _keyed_ratios(result["idle_sessions"], "per_session_kib", "rss")


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _header(result: dict[str, Any]) -> list[str]:
    machine, settings = result["machine"], result["settings"]
    mode = "smoke" if settings["smoke"] else f"scale {settings['scale']:g}"
    lines = [
        f"# mailstorm bench: {result['started_at']} on {machine['hostname']}",
        "",
        f"{machine['cpus']} CPUs ({machine['cpu_model'] or 'unknown model'}), Linux "
        f"{machine['kernel']}, Python {machine['python']}, somaxconn {machine['somaxconn']}, "
        f"1-minute load average {machine['loadavg_at_start'][0]:.2f} at start, "
        f"{machine.get('loadavg_at_end', [0.0])[0]:.2f} at end. "
        f"{mode}, median of {settings['repeat']} run(s); took {result['duration_s']:.0f} s. "
        f"Code under test: git {machine.get('revision', 'unknown')}.",
        "",
    ]
    if result["problems"]:
        lines += ["## COUNT MISMATCHES AND FAILURES", ""]
        lines += [f"- **{line}**" for line in result["problems"]]
        lines.append("")
    lines += ["## Servers and drivers", ""]
    for name, spec in result["servers"].items():
        state = (spec["version"] or "available") if spec["available"] else "skipped: "
        state += "" if spec["available"] else str(spec["reason"])
        lines.append(f"- server `{name}`: {state}")
    for name, status in result["drivers"].items():
        state = "available" if status["available"] else f"unavailable: {status['reason']}"
        if status.get("options"):
            state += f" (`python -m mailstorm.load` with {status['options']})"
        lines.append(f"- driver `{name}`: {state}")
    lines.append("")
    for name, scenario in settings["scenarios"].items():
        lines.append(f"- `{name}`: {scenario['description']}")
    lines.append("")
    return lines


def _throughput_table(result: dict[str, Any]) -> list[str]:
    lines = [
        "## Throughput",
        "",
        "| scenario | driver | server | msg/s | MB/s | server CPU s/1000 msgs | peak RSS MiB "
        "| msg/s x aiosmtpd | msg/s x smtp-sink | CPU x aiosmtpd | CPU x trio-floor "
        "| driver CPU s/1000 | driver run CPU s/1000 | counts |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for e in result["throughput"]:
        head = f"| {e['scenario']} | {e['driver']} | {e['server']} "
        if e["skipped"]:
            lines.append(head + f"| skipped: {e['skipped']} |" + " |" * 12)
            continue
        m = e["median"] or {}
        peak = m.get("peak_rss_kib")
        lines.append(
            head + f"| {_num(m.get('msg_s'))} | {_num(m.get('mb_s'), 2)} "
            f"| {_num(m.get('server_cpu_per_1000'), 3)} "
            f"| {_num(peak / 1024 if peak else None, 1)} "
            f"| {_x(e['msg_s_x_aiosmtpd'])} | {_x(e['msg_s_x_smtp_sink'])} "
            f"| {_x(e['cpu_x_aiosmtpd'])} | {_x(e['cpu_x_trio_floor'])} "
            f"| {_num(m.get('driver_cpu_per_1000'), 3)} "
            f"| {_num(m.get('driver_run_cpu_per_1000'), 3)} "
            f"| {'ok' if e['count_ok'] else '**MISMATCH**'} |"
        )
    return [*lines, ""]


def _storm_table(result: dict[str, Any]) -> list[str]:
    storms = result["connect_storm"]
    if not storms:
        return []
    lines = [
        f"## Connect storm: {storms[0]['clients']:,} clients connect at once",
        "",
        "| server | greeted | p50 ms | p99 ms | max ms | last greeting after s "
        "| p99 x aiosmtpd | p99 x smtp-sink |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in storms:
        why = s.get("skipped") or s.get("error")
        if why:
            lines.append(f"| {s['server']} | {why} |" + " |" * 6)
            continue
        lines.append(
            f"| {s['server']} | {s['greeted']:,} / {s['clients']:,} | {_num(s['p50_ms'], 1)} "
            f"| {_num(s['p99_ms'], 1)} | {_num(s['max_ms'], 1)} | {_num(s['wall_s'], 2)} "
            f"| {_x(s['p99_x_aiosmtpd'])} | {_x(s['p99_x_smtp_sink'])} |"
        )
    return [*lines, ""]


def _idle_table(result: dict[str, Any]) -> list[str]:
    idles = result["idle_sessions"]
    if not idles:
        return []
    lines = [
        f"## Idle sessions: RSS per session at {idles[0]['sessions']:,} idle sessions",
        "",
        "| server | open | RSS before MiB | RSS with sessions MiB | KiB per session "
        "| x aiosmtpd | x smtp-sink |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for i in idles:
        why = i.get("skipped") or i.get("error")
        if why:
            lines.append(f"| {i['server']} | {why} |" + " |" * 5)
            continue
        lines.append(
            f"| {i['server']} | {i['opened']:,} / {i['sessions']:,} "
            f"| {_num(i['baseline_kib'] / 1024, 1)} | {_num(i['loaded_kib'] / 1024, 1)} "
            f"| {_num(i['per_session_kib'], 1)} | {_x(i['rss_x_aiosmtpd'])} "
            f"| {_x(i['rss_x_smtp_sink'])} |"
        )
    return [*lines, ""]


CAVEATS = """\
## Caveats

- Driver and server share this machine's CPUs: on 2 cores a fast server can be driver-bound
  (smtp-sink usually is), so its msg/s is a floor. Server CPU s/1000 msgs is the fairer
  efficiency number.
- Every throughput run starts a fresh server; peak RSS is that run's high-water mark.
- MB/s counts message payload only (the driver's message size), 1 MB = 10^6 bytes.
- node's smtp-server waits 100 ms before each greeting (its early-talker check), which bounds
  its conn100 rate and its time-to-banner.
- `trio-floor` (`bench/trio_floor.py`) is not a server but a yardstick: the least a trio sink
  can do (no validation, state machine or limits). "CPU x trio-floor" is what mailstorm's
  protocol layer costs on top of trio itself.
- "driver CPU s/1000" is the driver's whole process tree, start-up included (a Python
  driver's start-up is a few tenths of a second); "driver run CPU" is what `mailstorm load`
  reports of its own run, start-up excluded. smtp-source reports nothing of the kind.
- Time-to-banner is measured by a Python asyncio client, which itself takes CPU while
  thousands of connections start; compare servers within one run, not across machines.
"""


def render_markdown(result: dict[str, Any]) -> str:
    """The Markdown summary of one bench result."""
    lines = (
        _header(result) + _throughput_table(result) + _storm_table(result) + _idle_table(result)
    )
    logs = f"\nServer logs of this run (git-ignored): `{result['logs']}` in the report folder.\n"
    return "\n".join(lines) + "\n" + CAVEATS + logs


def _stem(result: dict[str, Any]) -> str:
    started = datetime.fromisoformat(result["started_at"])
    host = re.sub(r"[^A-Za-z0-9._-]", "_", result["machine"]["hostname"]) or "host"
    return f"{started.strftime('%Y-%m-%dT%H%M')}-{host}"


def write_reports(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write the dated JSON and Markdown reports and ``latest.md``; return the two paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(result)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(render_markdown(result))
    shutil.copyfile(md_path, out / "latest.md")
    return json_path, md_path
