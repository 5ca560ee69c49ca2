"""Counters of a running sink, and the periodic one-line report.

The session driver bumps plain integer attributes (no locks: trio runs one task at a time).
The Prometheus exporter (``metrics``, ``--metrics-listen``) reads ``snapshot()`` when scraped,
so a counter added here is exported too (under its own name, if ``metrics`` does not know it).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass, field

__all__ = [
    "CLIENT_KEY_PREFIX",
    "FAULT_KEY_PREFIX",
    "MAX_CLIENT_LABELS",
    "REFUSED_KEY_PREFIX",
    "REPLY_KEY_PREFIX",
    "STORE_BUCKETS",
    "STORE_KEY_PREFIX",
    "SinkStats",
]

#: Keys of ``SinkStats.snapshot`` that count injected faults by point and kind.
FAULT_KEY_PREFIX = "faults."
# ---- Prometheus metrics (issue 12): more counters, flat keys so that workers' sums stay simple
#: Keys counting replies by code (``replies.250``).
REPLY_KEY_PREFIX = "replies."
#: Keys counting refused messages by reason (``refused.too_big``, ``refused.fault``).
REFUSED_KEY_PREFIX = "refused."
#: Keys of the store-latency histogram: ``store_seconds.le.0.005`` (cumulative counts, as
#: Prometheus buckets are), ``store_seconds.count``, ``store_seconds.sum``.
STORE_KEY_PREFIX = "store_seconds."
#: Keys counting sessions by client address (``clients.192.0.2.7``): the real client, after
#: any PROXY header. The first ``MAX_CLIENT_LABELS`` addresses a process sees get keys of their
#: own and the rest count under ``clients.other``, so that a sweep from many addresses cannot
#: grow the counters (and the metrics' label sets) without bound.
CLIENT_KEY_PREFIX = "clients."
MAX_CLIENT_LABELS = 100
#: Upper bounds of the store-latency buckets, in seconds (fixed, so that workers' counts add).
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Reply codes are three digits; a list indexed by code costs one increment per reply.
_REPLY_CODES = 600


#: Attributes that ``snapshot`` gives in another form (or not at all).
_NOT_FLAT = (
    "started",
    "client_sessions",
    "fault_counts",
    "reply_counts",
    "refused_counts",
    "store_buckets",
    "store_seconds",
)


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
    # ---- Prometheus metrics (issue 12) ----
    #: Successful AUTH, and TLS handshakes that failed (``tls_sessions`` counts the good ones).
    auth_successes: int = 0
    tls_failures: int = 0
    #: Replies given, indexed by code (the core counts into it, ``SessionPolicy.reply_counts``).
    reply_counts: list[int] = field(default_factory=lambda: [0] * _REPLY_CODES)
    #: Refused messages by reason: "too_big", "bare_linefeed", "fault", "storage_failure".
    refused_counts: dict[str, int] = field(default_factory=dict)
    #: Sessions by client address (bounded: ``count_client``).
    client_sessions: dict[str, int] = field(default_factory=dict)
    #: Store latency (stores that wait: maildir, mbox): counts per ``STORE_BUCKETS`` bound
    #: (not cumulative; the last is +Inf), and the sum of the seconds.
    store_buckets: list[int] = field(default_factory=lambda: [0] * (len(STORE_BUCKETS) + 1))
    store_seconds: float = 0.0
    # ---- PROXY protocol (--proxy-protocol): headers accepted, connections dropped by why ----
    proxy_accepted: int = 0
    proxy_refused_untrusted: int = 0
    proxy_refused_malformed: int = 0
    proxy_refused_truncated: int = 0
    proxy_refused_oversize: int = 0
    proxy_refused_timeout: int = 0
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

    def count_client(self, address: str) -> None:
        """One more session from ``address`` (see ``CLIENT_KEY_PREFIX`` for the bound)."""
        counts = self.client_sessions
        if address not in counts and len(counts) >= MAX_CLIENT_LABELS:
            address = "other"
        counts[address] = counts.get(address, 0) + 1

    def count_refused(self, reason: str) -> None:
        """One complete message refused: in ``messages_refused`` and under its reason."""
        self.messages_refused += 1
        self.refused_counts[reason] = self.refused_counts.get(reason, 0) + 1

    def observe_store(self, seconds: float) -> None:
        """One store call that took ``seconds``."""
        self.store_buckets[bisect_left(STORE_BUCKETS, seconds)] += 1
        self.store_seconds += seconds

    def snapshot(self) -> dict[str, int | float]:
        """The counters as a dict (for JSON, metrics, and tests); the faults by point and kind
        as flat ``faults.POINT.KIND`` keys (``faults.EOD.452``), so that sums stay simple."""
        return (
            {
                name: getattr(self, name)
                for name in self.__slots__
                if not name.startswith("_") and name not in _NOT_FLAT
            }
            | {
                f"{FAULT_KEY_PREFIX}{key.replace(' ', '.')}": n
                for key, n in self.fault_counts.items()
            }
            | self._metrics_snapshot()
            | {"uptime": round(time.monotonic() - self.started, 3)}
        )

    def _metrics_snapshot(self) -> dict[str, int | float]:
        """Replies by code, refusals by reason and the store histogram as flat keys."""
        flat: dict[str, int | float] = {
            f"{REPLY_KEY_PREFIX}{code}": n for code, n in enumerate(self.reply_counts) if n
        }
        flat |= {f"{REFUSED_KEY_PREFIX}{why}": n for why, n in self.refused_counts.items()}
        flat |= {f"{CLIENT_KEY_PREFIX}{ip}": n for ip, n in self.client_sessions.items()}
        cumulative = 0
        for bound, n in zip(STORE_BUCKETS, self.store_buckets, strict=False):
            cumulative += n
            flat[f"{STORE_KEY_PREFIX}le.{bound:g}"] = cumulative
        flat[f"{STORE_KEY_PREFIX}count"] = cumulative + self.store_buckets[-1]
        flat[f"{STORE_KEY_PREFIX}sum"] = self.store_seconds
        return flat

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
            + (f", PROXY refused {self.proxy_refused()}" if self.proxy_refused() else "")
            + self._lmtp_line()
        )

    def proxy_refused(self) -> int:
        """Connections dropped for their PROXY header (or its absence), whatever the reason."""
        return (
            self.proxy_refused_untrusted
            + self.proxy_refused_malformed
            + self.proxy_refused_truncated
            + self.proxy_refused_oversize
            + self.proxy_refused_timeout
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
