"""The scenarios and the two load drivers: Postfix ``smtp-source`` and ``mailstorm load``.

Scenarios (message counts are multiplied by ``--scale``; ``--smoke`` uses tiny counts):

- ``pers100``: 100 sessions, many 1 KiB messages per connection (``smtp-source -d``)
- ``conn100``: 100 sessions, one 1 KiB message per connection (no ``-d``)
- ``big10``: 10 sessions, many 100 KiB messages per connection

In smtp-source ``-d`` means "don't disconnect after each message". ``mailstorm load`` gets the
same shapes through ``--per-connection 0`` (persistent) or ``1``.

Each driver run reports what the driver saw acknowledged, its elapsed time, and the driver's
own CPU seconds (from ``getrusage(RUSAGE_CHILDREN)`` around the run: servers are reaped only
after the driver, so the difference is the driver's alone).
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .servers import bounded

__all__ = [
    "DRIVER_NAMES",
    "SCENARIO_NAMES",
    "DriverResult",
    "Scenario",
    "make_scenarios",
    "run_mailstorm_load",
    "run_smtp_source",
    "smtp_source_path",
]

HOST = "127.0.0.1"
#: The load generator's variants: the options each adds to the scenario's own.
MAILSTORM_DRIVERS: dict[str, list[str]] = {
    # Defaults: pipelining where offered, one message in flight per session (smtp-source's
    # shape, but pipelined).
    "mailstorm load": [],
    # Each message's commands ride with the previous message's content: one write each.
    "mailstorm load pm": ["--pipeline-messages"],
    # The same in two processes (issue 4: against smtp-sink, smtp-source's rate or more).
    "mailstorm load pm p2": ["--pipeline-messages", "--procs", "2"],
}
DRIVER_NAMES = ("smtp-source", *MAILSTORM_DRIVERS)
SCENARIO_NAMES = ("pers100", "conn100", "big10")
#: The exit status of coreutils ``timeout`` when the command ran out of time.
TIMED_OUT = 124


@dataclass(frozen=True)
class Scenario:
    """One load shape: sessions in parallel, messages in total, message size, reuse."""

    name: str
    sessions: int
    messages: int
    size: int
    persistent: bool

    def smtp_source_args(self) -> list[str]:
        """The smtp-source flags for this shape (without -c, -M and the target)."""
        reuse = ["-d"] if self.persistent else []
        return [*reuse, "-s", str(self.sessions), "-m", str(self.messages), "-l", str(self.size)]

    def describe(self) -> str:
        """A one-line description for the report."""
        per = "many messages per connection" if self.persistent else "one message per connection"
        return (
            f"{self.sessions} sessions, {self.messages} messages of {self.size} bytes, {per} "
            f"(smtp-source {' '.join(self.smtp_source_args())})"
        )


#: name: (sessions, messages at --scale 1, messages in --smoke, size, persistent). Each run of
#: a fast server lasts a second or two: long enough that start-up (a Python driver's, the
#: first connections) does not weigh on msg/s, short enough for aiosmtpd's 12 runs a scenario.
_SHAPES = {
    "pers100": (100, 40_000, 300, 1024, True),
    "conn100": (100, 5_000, 200, 1024, False),
    "big10": (10, 4_000, 50, 102_400, True),
}


def make_scenarios(names: tuple[str, ...], scale: float, smoke: bool) -> list[Scenario]:
    """The named scenarios with their message counts scaled (at least one per session)."""
    scenarios = []
    for name in names:
        sessions, messages, smoke_messages, size, persistent = _SHAPES[name]
        count = smoke_messages if smoke else round(messages * scale)
        scenarios.append(Scenario(name, sessions, max(count, sessions), size, persistent))
    return scenarios


@dataclass
class DriverResult:
    """What one driver run saw."""

    driver: str
    requested: int
    delivered: int | None
    elapsed_s: float | None
    driver_cpu_s: float
    error: str | None = None
    command: list[str] = field(default_factory=list)
    #: The driver's CPU during the run alone (start-up excluded), when it reports it.
    run_cpu_s: float | None = None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _run_bounded(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a driver under ``timeout`` (exit status 124 when it ran out of time)."""
    return subprocess.run(
        bounded(command, timeout), capture_output=True, text=True, check=False,
        timeout=timeout + 30, cwd=Path(__file__).resolve().parent.parent,
    )


def smtp_source_path() -> str | None:
    """Where Postfix smtp-source is, or None."""
    found = shutil.which("smtp-source")
    if found:
        return found
    return "/usr/sbin/smtp-source" if Path("/usr/sbin/smtp-source").exists() else None


def run_smtp_source(scenario: Scenario, port: int, timeout: float) -> DriverResult:
    """Drive 127.0.0.1:``port`` with smtp-source; -c gives the count of completed messages."""
    command = [
        smtp_source_path() or "smtp-source", "-c", "-M", "bench.test",
        *scenario.smtp_source_args(), f"{HOST}:{port}",
    ]
    cpu_before, start = _children_cpu(), time.perf_counter()
    done = _run_bounded(command, timeout)
    elapsed = time.perf_counter() - start
    counters = re.findall(r"\d+", done.stdout)
    delivered = int(counters[-1]) if counters else 0
    error = None
    if done.returncode == TIMED_OUT:
        error = f"smtp-source timed out after {timeout:g}s"
    elif done.returncode != 0:
        error = f"smtp-source exited {done.returncode}: {_last_line(done.stderr)}"
    return DriverResult("smtp-source", scenario.messages, delivered, elapsed,
                        _children_cpu() - cpu_before, error, command)


def _loadgen_report(json_path: Path) -> tuple[dict[str, object] | None, float | None]:
    """The ``totals`` of a ``mailstorm load`` JSON report, and its own CPU for the run."""
    try:
        report = json.loads(json_path.read_text())
        totals, generator = report.get("totals"), report.get("generator") or {}
        cpu = generator.get("cpu_s")
    except (OSError, ValueError, AttributeError):
        return None, None
    return (
        totals if isinstance(totals, dict) else None,
        float(cpu) if isinstance(cpu, int | float) else None,
    )


def run_mailstorm_load(
    scenario: Scenario, port: int, json_path: Path, timeout: float, name: str = "mailstorm load"
) -> DriverResult:
    """Drive 127.0.0.1:``port`` with ``python -m mailstorm.load`` as driver ``name`` (a key of
    ``MAILSTORM_DRIVERS``); counts come from its JSON report."""
    command = [
        sys.executable, "-m", "mailstorm.load", f"{HOST}:{port}",
        "--sessions", str(scenario.sessions), "--messages", str(scenario.messages),
        "--per-connection", "0" if scenario.persistent else "1",
        "--size", str(scenario.size), "--json", str(json_path), "--quiet",
        *MAILSTORM_DRIVERS[name],
    ]
    cpu_before = _children_cpu()
    done = _run_bounded(command, timeout)
    cpu = _children_cpu() - cpu_before
    totals, run_cpu = _loadgen_report(json_path)
    if done.returncode == TIMED_OUT:
        return DriverResult(name, scenario.messages, None, None, cpu,
                            f"{name} timed out after {timeout:g}s", command)
    if totals is None:
        # Our own load generator failing is a problem to report, never a reason to skip.
        why = _last_line(done.stderr or done.stdout) or f"exit status {done.returncode}"
        return DriverResult(name, scenario.messages, None, None, cpu,
                            f"{name} failed: {why}", command)
    delivered = totals.get("delivered")
    elapsed = totals.get("elapsed_s")
    error = None if done.returncode == 0 else f"{name} exited {done.returncode}"
    return DriverResult(
        name,
        scenario.messages,
        delivered if isinstance(delivered, int) else None,
        float(elapsed) if isinstance(elapsed, int | float) and elapsed > 0 else None,
        cpu,
        error,
        command,
        run_cpu,
    )
