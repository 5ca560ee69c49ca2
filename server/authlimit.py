"""Failed AUTH attempts per client address: a growing delay before each failure's answer, and
a cut-off after too many failures within a window.

This module owns the bookkeeping only: which addresses failed how often and when. The session
driver asks it how long to wait and whether to go on; it does the waiting and the replies. It
never sleeps, never imports trio (the clock is injected, so tests drive time by hand), never
sees a username or password, and never holds more than ``max_addresses`` addresses.

Use, for one failed AUTH from ``address``::

    allowed = limiter.record_failure(address)
    await trio.sleep(limiter.delay_for(address))   # the delay for this failure
    reply 535 if allowed else 421 4.7.0 and end the session

and ``limiter.record_success(address)`` after a successful one. ``blocked(address)`` says,
before any work, whether the address is already over the limit.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import DEFAULT_MAX_AUTH_FAILURES

__all__ = ["AuthFailureLimiter"]

#: How far back failures count (as fail2ban's default findtime of 10 minutes, a bit longer).
DEFAULT_WINDOW = 15 * 60.0
#: The delay before answering an address's first failure; it doubles with each further one.
DEFAULT_BASE_DELAY = 0.25
#: The delay never grows beyond this: a legitimate client that mistyped still gets an answer.
DEFAULT_MAX_DELAY = 5.0
#: Addresses tracked at once; the one whose last failure is oldest is forgotten first.
DEFAULT_MAX_ADDRESSES = 10_000


@dataclass(slots=True)
class _Failures:
    """One address's failures within the window."""

    #: When each counted failure happened (oldest first), at most ``_keep`` of them.
    times: deque[float] = field(default_factory=deque)
    #: Failures since the last success: what the delay grows with.
    streak: int = 0


class AuthFailureLimiter:
    """Counts failed AUTH attempts per client address; shared by all sessions of a server.

    ``max_failures`` is how many failures an address may have within ``window`` seconds: the
    next one makes ``record_failure`` return False (0 means no limit; the delay still grows).
    """

    def __init__(
        self,
        max_failures: int = DEFAULT_MAX_AUTH_FAILURES,
        *,
        window: float = DEFAULT_WINDOW,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 0:
            raise ValueError("max_failures must not be negative (0 means no limit)")
        if window <= 0 or base_delay < 0 or max_delay < base_delay or max_addresses < 1:
            raise ValueError("window and max_addresses must be positive, 0 <= base <= max delay")
        self.max_failures = max_failures
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_addresses = max_addresses
        self._clock = clock
        # How many failure times an address keeps: enough to pass the limit, and enough for
        # the delay to reach its maximum; more would say nothing new.
        steps_to_max = 1
        if base_delay > 0:
            steps_to_max += math.ceil(math.log2(max_delay / base_delay))
        self._keep = max(max_failures + 1, steps_to_max)
        # Ordered by last failure, oldest first: eviction and expiry take from the front.
        self._addresses: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        """How many addresses are tracked."""
        return len(self._addresses)

    def record_failure(self, address: str) -> bool:
        """Count a failed AUTH from ``address``; False once the address is over the limit.

        After False the session must end (421 4.7.0): the address has had more than
        ``max_failures`` failures within the window. It stays over the limit until enough of
        them are older than the window.
        """
        now = self._clock()
        self._expire(now)
        failures = self._addresses.pop(address, None)
        if failures is None:
            failures = _Failures()
            if len(self._addresses) >= self.max_addresses:
                self._addresses.popitem(last=False)
        else:
            self._forget_old(failures, now)
        failures.times.append(now)
        if len(failures.times) > self._keep:
            failures.times.popleft()
        failures.streak = min(failures.streak + 1, self._keep)
        self._addresses[address] = failures  # now the most recent
        return not self._over_limit(failures)

    def delay_for(self, address: str) -> float:
        """Seconds to wait before answering the failure just recorded for ``address``.

        ``base_delay`` for the first failure since the last success (within the window),
        doubling with each further one, at most ``max_delay``; 0 for an address without
        recent failures.
        """
        failures = self._current(address)
        if failures is None or failures.streak == 0:
            return 0.0
        return float(min(self.max_delay, self.base_delay * 2 ** (failures.streak - 1)))

    def record_success(self, address: str) -> None:
        """A successful AUTH from ``address``: its next failure is answered without the
        grown delay.

        The failures stay counted toward the limit: otherwise a client holding one valid
        account could reset its count between guesses at others.
        """
        failures = self._current(address)
        if failures is not None:
            failures.streak = 0

    def blocked(self, address: str) -> bool:
        """Whether ``address`` is over the limit now, so an AUTH from it can be refused
        before any password is checked."""
        failures = self._current(address)
        return failures is not None and self._over_limit(failures)

    # ---- internals -----------------------------------------------------------------------------

    def _current(self, address: str) -> _Failures | None:
        """``address``'s failures within the window, or None if it has none."""
        failures = self._addresses.get(address)
        if failures is None:
            return None
        self._forget_old(failures, self._clock())
        if not failures.times:
            del self._addresses[address]
            return None
        return failures

    def _over_limit(self, failures: _Failures) -> bool:
        return bool(self.max_failures) and len(failures.times) > self.max_failures

    def _forget_old(self, failures: _Failures, now: float) -> None:
        horizon = now - self.window
        while failures.times and failures.times[0] <= horizon:
            failures.times.popleft()
        if not failures.times:
            # A streak ends with the window too: a client back after a long pause starts over.
            failures.streak = 0

    def _expire(self, now: float) -> None:
        """Drop addresses whose last failure is older than the window (from the front, where
        the oldest are), so memory follows recent failures and not every address ever seen."""
        horizon = now - self.window
        while self._addresses:
            oldest = next(iter(self._addresses.values()))
            if oldest.times and oldest.times[-1] > horizon:
                break
            self._addresses.popitem(last=False)
