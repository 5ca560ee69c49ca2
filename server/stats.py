"""Counters of a running sink, and the periodic one-line report.

The session driver bumps plain integer attributes (no locks: trio runs one task at a time).
A later metrics exporter reads the same object.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["SinkStats"]


@dataclass(slots=True)
class SinkStats:
    sessions_total: int = 0
    sessions_active: int = 0
    #: Connections refused with 421 because of --max-connections or --max-connections-per-ip.
    sessions_refused: int = 0
    #: Of those, the ones refused because of --max-connections-per-ip.
    sessions_refused_per_ip: int = 0
    tls_sessions: int = 0
    messages: int = 0
    #: Octets of message content accepted (after unstuffing, before trace headers).
    bytes: int = 0
    recipients: int = 0
    #: Messages refused by policy (size, bare LF) or lost to a storage failure.
    messages_refused: int = 0
    storage_failures: int = 0
    auth_failures: int = 0
    started: float = field(default_factory=time.monotonic)
    _last_messages: int = 0
    _last_time: float = field(default_factory=time.monotonic)

    def snapshot(self) -> dict[str, int | float]:
        """The counters as a dict (for JSON, metrics, and tests)."""
        return {
            name: getattr(self, name)
            for name in self.__slots__
            if not name.startswith("_") and name != "started"
        } | {"uptime": round(time.monotonic() - self.started, 3)}

    def interval_line(self) -> str:
        """A line of counters, with the message rate since the previous call."""
        now = time.monotonic()
        elapsed = max(now - self._last_time, 1e-9)
        rate = (self.messages - self._last_messages) / elapsed
        self._last_messages, self._last_time = self.messages, now
        return (
            f"sessions {self.sessions_active} active / {self.sessions_total} total, "
            f"messages {self.messages}, bytes {self.bytes}, {rate:.1f} msg/s"
            + (f", refused {self.messages_refused}" if self.messages_refused else "")
            + (f", storage failures {self.storage_failures}" if self.storage_failures else "")
        )
