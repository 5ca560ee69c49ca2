"""Counters of a running sink, and the periodic one-line report.

The session driver bumps plain integer attributes (no locks: trio runs one task at a time).
A later metrics exporter reads the same object.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["FAULT_KEY_PREFIX", "SinkStats"]

#: Keys of ``SinkStats.snapshot`` that count injected faults by point and kind.
FAULT_KEY_PREFIX = "faults."


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
    #: Messages refused by policy (size, bare LF), by an injected fault at the end of data, or
    #: lost to a storage failure.
    messages_refused: int = 0
    storage_failures: int = 0
    auth_failures: int = 0
    #: Injected faults (``--fault``, ``--delay``, ``--drop``, magic addresses), by kind.
    faults_replied: int = 0
    faults_delayed: int = 0
    faults_dropped: int = 0
    #: The same, by point and kind: "RCPT 450", "EOD drop", "BANNER delay".
    fault_counts: dict[str, int] = field(default_factory=dict)
    # ---- LMTP (--lmtp): the end of data is answered per recipient ----------------------------
    #: Recipients answered 250 at the end of data (the message stored for them).
    lmtp_recipients_delivered: int = 0
    #: Recipients answered a failure at the end of data: an injected EOD fault for that
    #: recipient, a storage failure (451), or a message refused by policy (size, bare LF).
    lmtp_recipients_refused: int = 0
    started: float = field(default_factory=time.monotonic)
    _last_messages: int = 0
    _last_time: float = field(default_factory=time.monotonic)

    def count_fault(self, point: str, what: str) -> None:
        """One injected fault at ``point``: ``what`` is the reply code, "delay" or "drop"."""
        if what == "delay":
            self.faults_delayed += 1
        elif what == "drop":
            self.faults_dropped += 1
        else:
            self.faults_replied += 1
        key = f"{point} {what}"
        self.fault_counts[key] = self.fault_counts.get(key, 0) + 1

    def snapshot(self) -> dict[str, int | float]:
        """The counters as a dict (for JSON, metrics, and tests); the faults by point and kind
        as flat ``faults.POINT.KIND`` keys (``faults.EOD.452``), so that sums stay simple."""
        return (
            {
                name: getattr(self, name)
                for name in self.__slots__
                if not name.startswith("_") and name not in ("started", "fault_counts")
            }
            | {
                f"{FAULT_KEY_PREFIX}{key.replace(' ', '.')}": n
                for key, n in self.fault_counts.items()
            }
            | {"uptime": round(time.monotonic() - self.started, 3)}
        )

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
            + (f", faults {self.faults_line()}" if self.fault_counts else "")
            + self._lmtp_line()
        )

    def _lmtp_line(self) -> str:
        """LMTP's recipients at the end of data, once there are any."""
        delivered, refused = self.lmtp_recipients_delivered, self.lmtp_recipients_refused
        if not (delivered or refused):
            return ""
        return f", LMTP recipients {delivered} delivered / {refused} refused"

    def faults_line(self) -> str:
        """The injected faults by point and kind: "EOD 452 x20, RCPT delay x3"."""
        return ", ".join(f"{key} x{n}" for key, n in sorted(self.fault_counts.items()))
