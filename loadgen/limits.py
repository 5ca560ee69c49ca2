"""Operating-system limits that decide how many sessions fit: open files, ephemeral ports.

This module owns raising RLIMIT_NOFILE (soft to hard) and explaining, in one line, when the
requested sessions cannot fit. It never changes anything but this process's soft limit.
"""

from __future__ import annotations

from pathlib import Path

from mailstorm.cliutil import raise_open_files_limit as raise_nofile

__all__ = ["ephemeral_port_warning", "fds_needed", "raise_open_files_limit"]

#: Descriptors a process needs besides one per session: stdio, the trio wakeup pipe and epoll,
#: report files, worker pipes.
FD_RESERVE = 64


def fds_needed(sessions: int) -> int:
    return sessions + FD_RESERVE


def raise_open_files_limit(sessions: int) -> str | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; a message if ``sessions`` still do not
    fit in one process, else None."""
    soft, hard = raise_nofile()
    needed = fds_needed(sessions)
    if needed > soft:
        return (
            f"{sessions} sessions in one process need about {needed} open files, but the limit "
            f"is {soft} (hard limit {hard}): raise it (ulimit -Hn, LimitNOFILE=) or spread the "
            f"sessions over processes with --procs"
        )
    return None


def _port_range() -> tuple[int, int] | None:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def ephemeral_port_warning(sessions: int, source_addresses: int) -> str | None:
    """A warning when the sessions alone come near the ephemeral ports of the source addresses
    (each source address has the whole range for one destination)."""
    port_range = _port_range()
    if port_range is None:
        return None
    ports = (port_range[1] - port_range[0] + 1) * max(1, source_addresses)
    if sessions > ports * 0.9:
        return (
            f"{sessions} sessions come close to the {ports} ephemeral ports available to one "
            f"destination; add source addresses with --source-address 127.0.0.2 ... "
        )
    return None
