"""Tests for server.authlimit: per-address AUTH failure delays, the cut-off, and its memory bound.

Time is a hand-driven clock: nothing here sleeps or measures time.
"""

from __future__ import annotations

import pytest

from mailstorm.sink.authlimit import AuthFailureLimiter

WINDOW = 900.0
ALICE = "192.0.2.1"
BOB = "192.0.2.2"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def limiter(clock: Clock, max_failures: int = 10, **kwargs: float) -> AuthFailureLimiter:
    return AuthFailureLimiter(max_failures, window=WINDOW, clock=clock, **kwargs)  # type: ignore[arg-type]


def test_no_delay_without_failures(clock: Clock) -> None:
    assert limiter(clock).delay_for(ALICE) == 0.0


def test_delay_doubles_from_a_quarter_second_to_at_most_five(clock: Clock) -> None:
    limit = limiter(clock, max_failures=0)
    delays = []
    for _ in range(10):
        limit.record_failure(ALICE)
        delays.append(limit.delay_for(ALICE))
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0]


def test_addresses_are_counted_apart(clock: Clock) -> None:
    limit = limiter(clock)
    for _ in range(3):
        limit.record_failure(ALICE)
    assert limit.delay_for(ALICE) == 1.0
    assert limit.delay_for(BOB) == 0.0
    limit.record_failure(BOB)
    assert limit.delay_for(BOB) == 0.25


def test_false_once_past_the_limit(clock: Clock) -> None:
    """``max_failures`` failures are allowed; the next one ends the session, and so does every
    further one within the window."""
    limit = limiter(clock, max_failures=3)
    assert [limit.record_failure(ALICE) for _ in range(3)] == [True, True, True]
    assert not limit.blocked(ALICE)
    assert limit.record_failure(ALICE) is False
    assert limit.blocked(ALICE)
    assert limit.record_failure(ALICE) is False
    assert not limit.blocked(BOB)
    assert limit.record_failure(BOB) is True


def test_zero_means_no_limit(clock: Clock) -> None:
    limit = limiter(clock, max_failures=0)
    assert all(limit.record_failure(ALICE) for _ in range(1000))
    assert not limit.blocked(ALICE)
    assert limit.delay_for(ALICE) == 5.0


def test_failures_older_than_the_window_are_forgotten(clock: Clock) -> None:
    limit = limiter(clock, max_failures=3)
    for _ in range(4):
        limit.record_failure(ALICE)
    assert limit.blocked(ALICE)
    clock.now += WINDOW + 1
    assert not limit.blocked(ALICE)
    assert limit.delay_for(ALICE) == 0.0
    assert limit.record_failure(ALICE) is True
    assert limit.delay_for(ALICE) == 0.25


def test_the_window_slides(clock: Clock) -> None:
    """Failures spread out so that no window holds more than the limit never end a session."""
    limit = limiter(clock, max_failures=3)
    for _ in range(20):
        assert limit.record_failure(ALICE) is True
        clock.now += WINDOW / 3 + 1


def test_success_resets_the_delay_but_not_the_count(clock: Clock) -> None:
    """After a success the next failure is answered quickly again, but the failures still
    count: one valid account must not let a client reset its count between guesses."""
    limit = limiter(clock, max_failures=3)
    for _ in range(3):
        limit.record_failure(ALICE)
    assert limit.delay_for(ALICE) == 1.0
    limit.record_success(ALICE)
    assert limit.delay_for(ALICE) == 0.0
    assert limit.record_failure(ALICE) is False
    assert limit.delay_for(ALICE) == 0.25


def test_success_from_an_unknown_address_is_harmless(clock: Clock) -> None:
    limit = limiter(clock)
    limit.record_success(ALICE)
    assert len(limit) == 0
    assert limit.delay_for(ALICE) == 0.0


def test_memory_is_bounded_and_the_oldest_address_goes_first(clock: Clock) -> None:
    limit = limiter(clock, max_failures=2, max_addresses=100)
    for _ in range(3):
        limit.record_failure(ALICE)
    assert limit.blocked(ALICE)
    for n in range(500):
        clock.now += 0.001
        limit.record_failure(f"10.0.{n // 256}.{n % 256}")
        assert len(limit) <= 100
    assert len(limit) == 100
    # ALICE's failures were the oldest: forgotten.
    assert not limit.blocked(ALICE)
    assert limit.delay_for("10.0.1.243") == 0.25  # the newest is kept


def test_an_address_that_fails_again_is_not_the_oldest(clock: Clock) -> None:
    limit = limiter(clock, max_failures=0, max_addresses=2)
    limit.record_failure(ALICE)
    clock.now += 1
    limit.record_failure(BOB)
    clock.now += 1
    limit.record_failure(ALICE)  # ALICE is now the most recent
    clock.now += 1
    limit.record_failure("192.0.2.3")
    assert limit.delay_for(ALICE) == 0.5
    assert limit.delay_for(BOB) == 0.0


def test_expired_addresses_are_dropped(clock: Clock) -> None:
    """Memory follows recent failures: addresses quiet for a window are dropped."""
    limit = limiter(clock)
    for n in range(50):
        limit.record_failure(f"10.0.0.{n}")
    assert len(limit) == 50
    clock.now += WINDOW + 1
    limit.record_failure(ALICE)
    assert len(limit) == 1


def test_custom_delays(clock: Clock) -> None:
    limit = limiter(clock, max_failures=0, base_delay=1.0, max_delay=3.0)
    delays = []
    for _ in range(4):
        limit.record_failure(ALICE)
        delays.append(limit.delay_for(ALICE))
    assert delays == [1.0, 2.0, 3.0, 3.0]


def test_no_delay_at_all(clock: Clock) -> None:
    limit = limiter(clock, max_failures=2, base_delay=0.0)
    assert limit.record_failure(ALICE) is True
    assert limit.delay_for(ALICE) == 0.0
    assert limit.record_failure(ALICE) is True
    assert limit.record_failure(ALICE) is False


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_failures": -1},
        {"window": 0.0},
        {"max_addresses": 0},
        {"base_delay": 2.0, "max_delay": 1.0},
        {"base_delay": -1.0},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AuthFailureLimiter(**kwargs)  # type: ignore[arg-type]


def test_default_clock_works() -> None:
    limit = AuthFailureLimiter(1)
    assert limit.record_failure(ALICE) is True
    assert limit.record_failure(ALICE) is False
    assert limit.delay_for(ALICE) == 0.5
