"""Who the accept loop lets in, and what it says when it cannot accept at all.

This module owns two pieces of the accept loop's bookkeeping: the count of open sessions per
client address (``--max-connections-per-ip``), and the log of an accept-error episode (running
out of file descriptors: one line when it starts, one with the count when it ends). It never
touches sockets, never sleeps, and never imports trio: the accept loop in ``app`` does the
I/O and passes the clock in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["AcceptErrorEpisode", "AddressSlots"]


class AddressSlots:
    """Open sessions per client address, capped at ``limit`` each (0: no cap, no counting).

    ``acquire`` when a session starts, ``release`` when it ends, with the same address.
    Only addresses with open sessions are kept, so memory follows the open sessions.
    """

    __slots__ = ("_open", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must not be negative (0 means no limit)")
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        """Take a slot for a new session from ``address``; False if it has ``limit`` already."""
        if not self.limit:
            return True
        count = self._open.get(address, 0)
        if count >= self.limit:
            return False
        self._open[address] = count + 1
        return True

    def release(self, address: str) -> None:
        """Give back the slot of an ended session from ``address``."""
        if not self.limit:
            return
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)

    def open_sessions(self, address: str) -> int:
        """How many sessions from ``address`` hold a slot (always 0 without a limit)."""
        return self._open.get(address, 0)

    def __len__(self) -> int:
        """How many addresses have open sessions."""
        return len(self._open)


class AcceptErrorEpisode:
    """Logs a stretch of failed accepts (EMFILE and the like) as two lines, not one per retry.

    The accept loop backs off and retries every fraction of a second for as long as the
    resource is short; logging each retry floods the log (hundreds of lines a minute) just
    when the operator needs to read it. ``failed`` logs the first failure of an episode;
    ``succeeded`` (the next accept that works) or ``close`` (shutdown) logs its end, with how
    many accepts failed and for how long.
    """

    __slots__ = ("_clock", "_log", "_reason", "_retry_interval", "_started", "failures")

    def __init__(
        self, logger: logging.Logger, clock: Callable[[], float], retry_interval: float
    ) -> None:
        self._log = logger
        self._clock = clock
        self._retry_interval = retry_interval
        #: Failed accepts in the current episode (0: no episode).
        self.failures = 0
        self._started = 0.0
        self._reason = ""

    def failed(self, exc: OSError) -> None:
        """An accept failed for want of a resource."""
        if not self.failures:
            self._started = self._clock()
            self._reason = exc.strerror or str(exc)
            self._log.error(
                "accept: %s; retrying every %.1fs (logged again when it clears)",
                self._reason,
                self._retry_interval,
            )
        self.failures += 1

    def succeeded(self) -> None:
        """An accept worked: if an episode was open, log its end."""
        if self.failures:
            self._end("recovered")

    def close(self) -> None:
        """The server stops accepting: if an episode is still open, log its end."""
        if self.failures:
            self._end("stopped accepting")

    def _end(self, how: str) -> None:
        duration = self._clock() - self._started
        self._log.warning(
            "accept: %s after %d failed accept%s over %.1fs (%s)",
            how,
            self.failures,
            "" if self.failures == 1 else "s",
            duration,
            self._reason,
        )
        self.failures = 0
