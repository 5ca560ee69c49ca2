"""The readiness hub's edge-triggered state, checked against a model of the socket under it.

``Readiness.on_edge`` and ``Readiness.after_read`` (``mailstorm._net.readiness``) are the only
transitions of a socket's ``readable``/``hangup`` flags. Here a fake socket delivers data, the
peer's FIN and edges in every order (an edge is "pending" from an arrival until the hub takes
the set's events, as in an edge-triggered epoll set), and a reader that follows the transport's
protocol reads any size, parks plainly or inline only when the flags say the socket is drained,
and is woken (or has its inline handler run) by the hub. After every step::

    not readable  =>  an edge is pending, or the socket is empty

and so a parked reader never leaves data in the socket with no edge still to come. The same
machine run with the hub's old logic (a woken plain reader's edge did not mark the socket
readable: issue 14's lost wake-up) must fail.
"""

from __future__ import annotations

import select

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mailstorm._net.readiness import Readiness

pytestmark = pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll flags needed")

RUNNING, WOKEN, PARKED_PLAIN, PARKED_INLINE, DONE = (
    "running",
    "woken",  # by the hub from a plain wait: the transport reads before anything else
    "parked",
    "parked inline",
    "done",
)
sizes = st.integers(min_value=1, max_value=8)


class ReadinessModel(RuleBasedStateMachine):
    """One socket, its peer, the hub's edge delivery and one reader."""

    def __init__(self) -> None:
        super().__init__()
        self.readiness = Readiness()
        self.queued = 0  # bytes in the socket's receive queue
        self.peer_closed = False
        self.edge_pending = False  # an arrival the hub has not taken from the set yet
        self.reader = RUNNING

    # ---- the socket and the peer ----------------------------------------------------------

    @property
    def empty(self) -> bool:
        """A read would block (EAGAIN): no data, and no end of stream to report."""
        return self.queued == 0 and not self.peer_closed

    @property
    def unread(self) -> str:
        return f"{self.queued} bytes" + (" and the end of stream" if self.peer_closed else "")

    @precondition(lambda self: not self.peer_closed)
    @rule(n=sizes)
    def peer_sends(self, n: int) -> None:
        self.queued += n
        self.edge_pending = True

    @precondition(lambda self: not self.peer_closed)
    @rule()
    def peer_closes(self) -> None:
        self.peer_closed = True
        self.edge_pending = True

    def read(self, asked: int) -> None:
        """One receive of ``asked`` bytes, told to the state as the transport does."""
        if self.empty:
            self.readiness.after_read(None, asked)
            return
        got = min(self.queued, asked)
        self.queued -= got
        self.readiness.after_read(got, asked)
        if got == 0:
            self.reader = DONE  # end of stream: the session ends
        elif self.reader == WOKEN:
            self.reader = RUNNING

    # ---- the hub ----------------------------------------------------------------------------

    @rule(asked=sizes)
    def hub_takes_events(self, asked: int) -> None:
        """The hub polls the set: a pending edge is reported with the socket's state now (an
        edge whose data was read meanwhile is dropped, as epoll does)."""
        if not self.edge_pending:
            return
        self.edge_pending = False
        flags = 0
        if not self.empty:
            flags |= select.EPOLLIN
        if self.peer_closed:
            flags |= select.EPOLLRDHUP
        if flags:
            self.deliver(flags, asked)

    @rule(asked=sizes)
    def spurious_edge(self, asked: int) -> None:
        """An edge for nothing new (a stale event): it must be harmless."""
        self.deliver(select.EPOLLIN, asked)

    def deliver(self, flags: int, asked: int) -> None:
        """What ``ReadinessHub.run`` does with a readable edge: mark it, then serve the reader."""
        self.readiness.on_edge(flags)
        self.serve_reader(asked)

    def serve_reader(self, asked: int) -> None:
        if self.reader == PARKED_PLAIN:
            self.reader = WOKEN
        elif self.reader == PARKED_INLINE:
            # The handler: one read, then sleep on only if that read drained the socket.
            self.read(asked)
            if self.reader != DONE and self.readiness.readable:
                self.reader = RUNNING

    # ---- the reader ---------------------------------------------------------------------------

    @precondition(lambda self: self.reader in (RUNNING, WOKEN))
    @rule(asked=sizes)
    def reader_reads(self, asked: int) -> None:
        if self.empty and self.reader == WOKEN:
            self.reader = RUNNING  # a spurious wake-up: the read finds nothing, parks again
        self.read(asked)

    @precondition(lambda self: self.reader == RUNNING and not self.readiness.readable)
    @rule(inline=st.booleans())
    def reader_parks(self, inline: bool) -> None:
        """The transport parks only when drained (after EAGAIN, or a send with the socket
        drained); the sessions wait inline only then too."""
        self.reader = PARKED_INLINE if inline else PARKED_PLAIN

    # ---- what must always hold ----------------------------------------------------------------

    @invariant()
    def drained_means_empty_or_an_edge_to_come(self) -> None:
        """For a reader that may park now (a woken one reads first, whatever the flags)."""
        if self.reader not in (WOKEN, DONE) and not self.readiness.readable:
            assert self.edge_pending or self.empty, f"lost wake-up: {self.unread} unread"

    @invariant()
    def a_parked_reader_is_woken_for_what_is_there(self) -> None:
        if self.reader in (PARKED_PLAIN, PARKED_INLINE):
            assert self.edge_pending or self.empty, f"lost wake-up: {self.unread} unread"

    @invariant()
    def after_a_hangup_reads_never_block(self) -> None:
        if self.readiness.hangup:
            assert self.readiness.readable


TestReadinessModel = ReadinessModel.TestCase
TestReadinessModel.settings = settings(
    max_examples=400, stateful_step_count=40, deadline=None, database=None
)


class OldHubLogic(ReadinessModel):
    """The hub before issue 14's fix: an edge that woke a plain reader did not mark the
    socket readable (only a hang-up was noted), and a full read left the flag as it was."""

    def deliver(self, flags: int, asked: int) -> None:
        if self.reader == PARKED_PLAIN:
            if flags & select.EPOLLRDHUP:
                self.readiness.hangup = True
        else:
            self.readiness.on_edge(flags)
        self.serve_reader(asked)

    def after_a_hangup_reads_never_block(self) -> None:
        """Not checked here: the old logic broke it harmlessly (the woken reader then read the
        end of stream); the point is that the model finds the lost wake-up."""


def test_the_model_catches_the_old_hub_logic() -> None:
    with pytest.raises(AssertionError, match="lost wake-up"):
        run_state_machine_as_test(
            OldHubLogic,
            settings=settings(
                max_examples=1000,
                stateful_step_count=40,
                deadline=None,
                database=None,
                derandomize=True,
                report_multiple_bugs=False,
                suppress_health_check=list(HealthCheck),
            ),
        )
