"""What the harness measures about a server process, read from /proc.

- CPU seconds: utime + stime from ``/proc/PID/stat`` (clock ticks), summed over the server's
  process tree, read before and after a driver run.
- Peak RSS: ``VmHWM`` from ``/proc/PID/status`` (the high-water mark since the process
  started), summed over the tree.
- RSS per idle session: ``VmRSS`` after N connections have read the banner and sit idle,
  minus ``VmRSS`` before, divided by N.

Summing over the tree keeps the numbers right for a server that forks workers (the
``--workers`` mode the issue asks for); every server measured today is a single process.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from .connect_storm import close_all, open_greeted

__all__ = [
    "IdleResult",
    "cpu_seconds",
    "idle_session_rss",
    "peak_rss_kib",
    "process_tree",
    "raise_nofile",
    "rss_kib",
]

_TICKS = os.sysconf("SC_CLK_TCK")
#: Idle connections are opened this many at a time, so that no listen backlog overflows.
IDLE_BATCH = 500
#: How long the server gets to settle after the last idle connection was greeted.
IDLE_SETTLE = 1.0


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may contain spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (found through the parent ids in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def _own_cpu(pid: int) -> float:
    """utime + stime of one process, plus those of its reaped children, in seconds."""
    fields = _stat_fields(pid)
    # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / _TICKS


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants."""
    total = 0.0
    for member in process_tree(pid):
        try:
            total += _own_cpu(member)
        except (OSError, ValueError, IndexError):
            continue  # exited between the scan and the read
    return total


def _status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (0 when absent, as for a zombie)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _tree_status_kib(pid: int, field: str) -> int:
    total = 0
    for member in process_tree(pid):
        try:
            total += _status_kib(member, field)
        except (OSError, ValueError):
            continue
    return total


def peak_rss_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) of ``pid`` and its descendants, in KiB."""
    return _tree_status_kib(pid, "VmHWM")


def rss_kib(pid: int) -> int:
    """Current resident set size (VmRSS) of ``pid`` and its descendants, in KiB."""
    return _tree_status_kib(pid, "VmRSS")


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (children inherit it).

    Returns the soft limit in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


@dataclass
class IdleResult:
    """RSS cost of idle sessions that have read the banner."""

    sessions: int
    opened: int
    baseline_kib: int
    loaded_kib: int
    per_session_kib: float | None
    errors: dict[str, int]


async def _idle(host: str, port: int, pid: int, sessions: int, timeout: float) -> IdleResult:
    """Open ``sessions`` greeted connections, measure the server's RSS, close them."""
    baseline = rss_kib(pid)
    socks, _, errors = await open_greeted(host, port, sessions, batch=IDLE_BATCH, timeout=timeout)
    try:
        await asyncio.sleep(IDLE_SETTLE)
        loaded = rss_kib(pid)
    finally:
        close_all(socks)
    opened = len(socks)
    per_session = (loaded - baseline) / opened if opened else None
    return IdleResult(sessions, opened, baseline, loaded, per_session, errors)


def idle_session_rss(
    host: str, port: int, pid: int, sessions: int, *, timeout: float = 60.0
) -> IdleResult:
    """RSS per idle session of the server ``pid`` at ``sessions`` idle connections."""
    time.sleep(0.3)  # let the start-up allocations settle before the baseline
    return asyncio.run(_idle(host, port, pid, sessions, timeout))
