"""When messages start: the open-loop schedule, closed-loop ramp-up, and the ticket dispenser.

This module owns the run's message numbering and timing. In closed loop a free session takes
the next message at once; in open loop (``--rate``) message ``n`` is due at a fixed offset from
the start, whatever the server does, and a session that takes it late (because none was free)
still reports latency from the due time, as wrk2 does, so a stalled server cannot hide in
coordinated omission. It never touches the network or the statistics.

With ``--procs P`` the message numbers of process ``w`` are ``w, w + P, w + 2P, ...`` of the
one global schedule, so the processes interleave exactly and the run's totals stay exact.
"""

from __future__ import annotations

import math

import trio

__all__ = ["MessageTickets", "OpenLoopSchedule", "session_start_offset"]


class OpenLoopSchedule:
    """Due times of messages at ``rate`` per second, after a linear ramp from 0 over ``ramp_up``.

    During the ramp the rate grows as ``rate * t / ramp_up``, so ``rate * t**2 / (2 * ramp_up)``
    messages are due by time ``t``; after it, one every ``1 / rate`` seconds.
    """

    __slots__ = ("_ramp_messages", "ramp_up", "rate")

    def __init__(self, rate: float, ramp_up: float = 0.0) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        if ramp_up < 0:
            raise ValueError("ramp_up must not be negative")
        self.rate = rate
        self.ramp_up = ramp_up
        #: Messages due during the ramp.
        self._ramp_messages = rate * ramp_up / 2

    def offset(self, n: int) -> float:
        """Seconds from the start at which message ``n`` (from 0) is due."""
        if n < self._ramp_messages:
            return math.sqrt(2 * self.ramp_up * n / self.rate)
        return self.ramp_up + (n - self._ramp_messages) / self.rate

    def due_by(self, t: float) -> int:
        """How many messages are due strictly before ``t`` seconds."""
        if t <= 0:
            return 0
        if t < self.ramp_up:
            expected = self.rate * t * t / (2 * self.ramp_up)
        else:
            expected = self._ramp_messages + (t - self.ramp_up) * self.rate
        count = math.ceil(expected)
        # Guard the float edge: the count is of n with offset(n) < t.
        while count > 0 and self.offset(count - 1) >= t:
            count -= 1
        while self.offset(count) < t:
            count += 1
        return count


def session_start_offset(index: int, sessions: int, ramp_up: float) -> float:
    """Closed loop with ``--ramp-up``: session ``index`` of ``sessions`` starts this late."""
    if ramp_up <= 0 or sessions <= 1:
        return 0.0
    return ramp_up * index / sessions


class MessageTickets:
    """Hands each free session the number of the next message and the time it was due.

    ``take`` returns ``(n, due)`` or None when the run is over (``messages`` reached or the
    duration passed). Message numbers are global across processes.
    """

    __slots__ = (
        "_next",
        "deadline",
        "duration",
        "messages",
        "schedule",
        "start",
        "workers",
    )

    def __init__(
        self,
        *,
        start: float,
        messages: int | None,
        duration: float | None,
        schedule: OpenLoopSchedule | None = None,
        worker: int = 0,
        workers: int = 1,
    ) -> None:
        self.start = start
        self.messages = messages
        self.duration = duration
        self.deadline = start + duration if duration is not None else math.inf
        self.schedule = schedule
        self.workers = workers
        # Worker w takes messages w, w + workers, ...: one global numbering across processes.
        self._next = worker

    def _upcoming(self) -> tuple[int, float] | None:
        """The next message and when it is due (now, in closed loop), not yet taken; None
        when the run is over."""
        n = self._next
        if self.messages is not None and n >= self.messages:
            return None
        schedule = self.schedule
        if schedule is None:
            now = trio.current_time()
            return None if now >= self.deadline else (n, now)
        offset = schedule.offset(n)
        if self.duration is not None and offset >= self.duration:
            return None
        return n, self.start + offset

    def take_now(self) -> tuple[int, float] | None:
        """The next message if it is due already, else None (not yet due, or the run is
        over): for a session that can start one without waiting, or not at all."""
        upcoming = self._upcoming()
        if upcoming is None or (self.schedule is not None and upcoming[1] > trio.current_time()):
            return None
        self._next += self.workers
        return upcoming

    async def take(self) -> tuple[int, float] | None:
        upcoming = self._upcoming()
        if upcoming is None:
            return None
        self._next += self.workers
        due = upcoming[1]
        if self.schedule is not None and due > trio.current_time():
            await trio.sleep_until(due)
        return upcoming
