"""The bench run: every scenario against every server with every driver, then the connect
storm and the idle-session measurement, collected into one result dict for ``report``.

Each throughput run gets a freshly started server, so its CPU seconds, peak RSS and message
count belong to that run alone. Runs are interleaved (repeat, scenario, driver, server) so
that a noisy moment on the machine does not land on one server only.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import drivers, measure, servers
from .connect_storm import connect_storm
from .drivers import DriverResult, Scenario

__all__ = ["Settings", "run_bench"]

_REPO = Path(__file__).resolve().parent.parent
#: Pause after a driver ends, so the server's work on the last closes is counted.
SETTLE = 0.2


@dataclass
class Settings:
    """What to run; built by ``__main__`` from the command line."""

    smoke: bool
    scale: float
    repeat: int
    scenarios: list[Scenario]
    servers: tuple[str, ...]
    drivers: tuple[str, ...]
    storm_clients: int
    idle_sessions: int
    out: Path
    run_timeout: float


def say(text: str) -> None:
    """Progress on stdout, flushed (the run takes minutes)."""
    print(text, flush=True)


def _machine() -> dict[str, Any]:
    """Facts about the machine that the numbers depend on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "somaxconn": servers.listen_backlog(),
        "loadavg_at_start": list(os.getloadavg()),
        "revision": _revision(),
    }


def _revision() -> str:
    """The git commit of the code under test, marked when the work tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True, cwd=_REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True,
                               cwd=_REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} with uncommitted changes" if dirty else head


def _drivers_status(wanted: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    status: dict[str, dict[str, Any]] = {}
    if "smtp-source" in wanted:
        path = drivers.smtp_source_path()
        status["smtp-source"] = {
            "available": path is not None,
            "reason": None if path else "Postfix smtp-source not found (apt-get install postfix)",
        }
    for name in drivers.MAILSTORM_DRIVERS:
        if name in wanted:
            # Part of this repository: always there, and a failing run is a problem to report.
            options = " ".join(drivers.MAILSTORM_DRIVERS[name]) or "defaults"
            status[name] = {"available": True, "reason": None, "options": options}
    return status


def _drive(
    driver: str, scenario: Scenario, port: int, json_path: Path, timeout: float
) -> DriverResult:
    if driver == "smtp-source":
        return drivers.run_smtp_source(scenario, port, timeout)
    return drivers.run_mailstorm_load(scenario, port, json_path, timeout, driver)


def _run_record(
    scenario: Scenario, result: DriverResult, server_count: int | None, cpu_s: float,
    peak_kib: int,
) -> dict[str, Any]:
    """One throughput run as a JSON-ready dict, with the count check."""
    delivered, elapsed = result.delivered, result.elapsed_s
    rate = delivered / elapsed if delivered and elapsed else None
    problems = []
    if result.error:
        problems.append(result.error)
    if delivered != scenario.messages:
        problems.append(f"driver delivered {delivered} of {scenario.messages}")
    if server_count != delivered:
        problems.append(f"server counted {server_count}, driver delivered {delivered}")
    per_1000 = 1000 / delivered if delivered else None
    return {
        "requested": scenario.messages,
        "delivered": delivered,
        "server_count": server_count,
        "count_ok": not problems,
        "problems": problems,
        "elapsed_s": _r(elapsed, 3),
        "msg_s": _r(rate, 1),
        "mb_s": _r(rate * scenario.size / 1e6 if rate else None, 2),
        "server_cpu_s": _r(cpu_s, 3),
        "server_cpu_per_1000": _r(cpu_s * per_1000 if per_1000 else None, 4),
        "driver_cpu_per_1000": _r(result.driver_cpu_s * per_1000 if per_1000 else None, 4),
        "driver_run_cpu_per_1000": _r(
            result.run_cpu_s * per_1000 if per_1000 and result.run_cpu_s is not None else None, 4
        ),
        "peak_rss_kib": peak_kib,
    }


def _lifetime(settings: Settings) -> float:
    """The most any one server may live: a run, its start and stop, with room to spare."""
    return settings.run_timeout * 2 + 120


def _r(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _throughput_run(
    settings: Settings, workdir: Path, scenario: Scenario, server: str, driver: str,
    rep: int,
) -> dict[str, Any]:
    """Start a fresh server, run one driver against it, stop it, check the counts."""
    label = f"{scenario.name}-{server}-{driver.replace(' ', '-')}-r{rep}"
    try:
        running = servers.start_server(server, workdir, label, scenario.sessions,
                                       _lifetime(settings))
    except RuntimeError as exc:
        failed = DriverResult(driver, scenario.messages, None, None, 0.0, f"{server}: {exc}")
        return _run_record(scenario, failed, None, 0.0, 0)
    try:
        cpu_before = measure.cpu_seconds(running.pid)
        result = _drive(driver, scenario, running.port, workdir / f"{label}.json",
                        settings.run_timeout)
        time.sleep(SETTLE)
        cpu = measure.cpu_seconds(running.pid) - cpu_before
        peak = measure.peak_rss_kib(running.pid)
    finally:
        count = running.stop()
    record = _run_record(scenario, result, count, cpu, peak)
    if count is None:
        record["problems"].append(f"server output: {running.log_tail()}")
    return record


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return round(statistics.median(values), 4) if values else None


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("msg_s", "mb_s", "server_cpu_per_1000", "driver_cpu_per_1000",
            "driver_run_cpu_per_1000", "peak_rss_kib")
    return {key: _median(runs, key) for key in keys}


def _throughput(
    settings: Settings, workdir: Path, specs: dict[str, servers.ServerSpec],
    driver_status: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Every (scenario, server, driver) entry, with its runs and medians (or why skipped)."""
    entries: dict[tuple[str, str, str], dict[str, Any]] = {}
    for scenario in settings.scenarios:
        for driver in settings.drivers:
            for server in settings.servers:
                skip = _skip_reason(specs[server], driver_status[driver])
                entries[scenario.name, server, driver] = {
                    "scenario": scenario.name, "server": server, "driver": driver,
                    "skipped": skip, "runs": [],
                }
    for rep in range(settings.repeat):
        for scenario in settings.scenarios:
            for driver in settings.drivers:
                for server in settings.servers:
                    entry = entries[scenario.name, server, driver]
                    if entry["skipped"]:
                        continue
                    record = _throughput_run(settings, workdir, scenario, server, driver, rep)
                    entry["runs"].append(record)
                    say(_progress(scenario, server, driver, rep, record))
    for entry in entries.values():
        runs = entry["runs"]
        entry["median"] = _summary(runs) if runs else None
        entry["count_ok"] = bool(runs) and all(run["count_ok"] for run in runs)
    return list(entries.values())


def _skip_reason(spec: servers.ServerSpec, driver: dict[str, Any]) -> str | None:
    if not spec.available:
        return f"server unavailable: {spec.reason}"
    if not driver["available"]:
        return str(driver["reason"])
    return None


def _progress(scenario: Scenario, server: str, driver: str, rep: int, rec: dict[str, Any]) -> str:
    rate = f"{rec['msg_s']:,.0f} msg/s" if rec["msg_s"] else "no rate"
    cpu = rec["server_cpu_per_1000"]
    cpu_text = f", server CPU {cpu:.3f} s/1000" if cpu is not None else ""
    check = "counts ok" if rec["count_ok"] else "PROBLEM: " + "; ".join(rec["problems"])
    return f"  {scenario.name:8} {server:12} {driver:20} #{rep + 1}: {rate}{cpu_text}; {check}"


def _storms(settings: Settings, workdir: Path, specs: dict[str, servers.ServerSpec]) -> list[Any]:
    """Time-to-banner when ``storm_clients`` clients connect at once, per server."""
    results = []
    for server in settings.servers:
        entry: dict[str, Any] = {"server": server, "clients": settings.storm_clients}
        if not specs[server].available:
            results.append(entry | {"skipped": f"server unavailable: {specs[server].reason}"})
            continue
        try:
            running = servers.start_server(server, workdir, f"storm-{server}",
                                           settings.storm_clients, _lifetime(settings))
        except RuntimeError as exc:
            results.append(entry | {"error": f"{server}: {exc}"})
            continue
        try:
            storm = connect_storm(servers.HOST, running.port, settings.storm_clients,
                                  timeout=settings.run_timeout / 2)
            entry |= asdict(storm) | {"peak_rss_kib": measure.peak_rss_kib(running.pid)}
        finally:
            running.stop()
        say(f"  storm    {server:10} {storm.greeted}/{storm.clients} greeted, "
            f"p50 {storm.p50_ms} ms, p99 {storm.p99_ms} ms")
        results.append(entry)
    return results


def _idles(settings: Settings, workdir: Path, specs: dict[str, servers.ServerSpec]) -> list[Any]:
    """RSS per idle session at ``idle_sessions`` open, greeted, idle connections."""
    results = []
    for server in settings.servers:
        entry: dict[str, Any] = {"server": server, "sessions": settings.idle_sessions}
        if not specs[server].available:
            results.append(entry | {"skipped": f"server unavailable: {specs[server].reason}"})
            continue
        try:
            running = servers.start_server(server, workdir, f"idle-{server}",
                                           settings.idle_sessions, _lifetime(settings))
        except RuntimeError as exc:
            results.append(entry | {"error": f"{server}: {exc}"})
            continue
        try:
            idle = measure.idle_session_rss(servers.HOST, running.port, running.pid,
                                            settings.idle_sessions,
                                            timeout=settings.run_timeout / 2)
        finally:
            running.stop()
        entry |= asdict(idle)
        entry["per_session_kib"] = _r(idle.per_session_kib, 2)
        say(f"  idle     {server:10} {idle.opened}/{idle.sessions} open, "
            f"{entry['per_session_kib']} KiB per session")
        results.append(entry)
    return results


def _problems(result: dict[str, Any]) -> list[str]:
    """Every count mismatch, failed run and ungreeted client, one line each."""
    lines = []
    for entry in result["throughput"]:
        if entry["skipped"]:
            continue
        for i, run in enumerate(entry["runs"], 1):
            if not run["count_ok"]:
                lines.append(f"{entry['scenario']} / {entry['server']} / {entry['driver']} "
                             f"run {i}: " + "; ".join(run["problems"]))
    for storm in result["connect_storm"]:
        if storm.get("error"):
            lines.append(f"connect storm / {storm['server']}: {storm['error']}")
        elif storm.get("failed"):
            lines.append(f"connect storm / {storm['server']}: {storm['failed']} of "
                         f"{storm['clients']} clients not greeted {storm['errors']}")
    for idle in result["idle_sessions"]:
        if idle.get("error"):
            lines.append(f"idle sessions / {idle['server']}: {idle['error']}")
        elif "opened" in idle and idle["opened"] < idle["sessions"]:
            lines.append(f"idle sessions / {idle['server']}: only {idle['opened']} of "
                         f"{idle['sessions']} opened {idle['errors']}")
    return lines


def run_bench(settings: Settings) -> dict[str, Any]:
    """Run everything ``settings`` asks for; return the result for ``report.write_reports``."""
    started = datetime.now(UTC)
    clock = time.monotonic()
    measure.raise_nofile(max(settings.storm_clients, settings.idle_sessions) + 4096)
    workdir = settings.out / "tmp" / started.strftime("%Y-%m-%dT%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    # A full run installs node's smtp-server where node is; the smoke run never installs.
    specs = servers.discover_servers(settings.servers, install=not settings.smoke)
    driver_status = _drivers_status(settings.drivers)
    for spec in specs.values():
        state = (spec.version or "available") if spec.available else f"SKIPPED, {spec.reason}"
        say(f"server {spec.name}: {state}")
    for name, status in driver_status.items():
        say(f"driver {name}: " + ("available" if status["available"]
                                   else f"UNAVAILABLE, {status['reason']}"))
    result: dict[str, Any] = {
        "schema": 1,
        "started_at": started.isoformat(timespec="seconds"),
        "machine": _machine(),
        "settings": {
            "smoke": settings.smoke, "scale": settings.scale, "repeat": settings.repeat,
            "storm_clients": settings.storm_clients, "idle_sessions": settings.idle_sessions,
            "scenarios": {s.name: asdict(s) | {"description": s.describe()}
                          for s in settings.scenarios},
        },
        "servers": {name: asdict(spec) for name, spec in specs.items()},
        "drivers": driver_status,
        "logs": str(workdir.relative_to(settings.out)),
    }
    result["throughput"] = _throughput(settings, workdir, specs, driver_status)
    result["connect_storm"] = _storms(settings, workdir, specs) if settings.storm_clients else []
    result["idle_sessions"] = _idles(settings, workdir, specs) if settings.idle_sessions else []
    result["problems"] = _problems(result)
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["duration_s"] = round(time.monotonic() - clock, 1)
    return result
