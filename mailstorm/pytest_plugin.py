"""pytest plugin (entry point ``pytest11``, loaded by pytest once mailstorm is installed): a
real SMTP sink on a free loopback port for the tests of software that sends mail.

Fixtures:

- ``smtp_sink``: a ``mailstorm.sink.SinkThread`` per test, for plain (synchronous) tests and
  tests of code on any event loop; ``wait_for`` blocks.
- ``smtp_sink_session``: one ``SinkThread`` for the whole session (its records accumulate:
  call ``clear()`` where a test needs a fresh count).
- ``trio_smtp_sink``: a ``mailstorm.sink.Sink`` from ``open_sink`` in the test's own trio loop,
  for trio tests (with pytest-trio installed); ``await wait_for``.

Options of ``smtp_sink`` and ``trio_smtp_sink``, such as faults (``faults=["RCPT:450"]``), a
store, or any ``SinkConfig`` field: the ``@pytest.mark.smtp_sink(**options)`` marker, or
indirect parametrization with a dict (``@pytest.mark.parametrize("smtp_sink", [{...}],
indirect=True)``), which wins over the marker where both name an option.

When a test that uses one of them fails, its report gets a section saying what the sink
received (sender, recipients and subject of each message, and the counters).

This module imports the sink only when a fixture is used, so that loading the plugin costs
pytest runs that never ask for a sink nothing. It never changes other plugins' fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from mailstorm.sink import Sink, SinkThread

__all__ = ["smtp_sink", "smtp_sink_session", "trio_smtp_sink"]

MARKER = "smtp_sink"
FIXTURES = ("smtp_sink", "smtp_sink_session", "trio_smtp_sink")
#: Messages listed in a failed test's report section; the rest are counted.
REPORTED_MESSAGES = 20


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**options): options of the smtp_sink and trio_smtp_sink fixtures' sink "
        "(faults=[...], store='memory' or 'maildir:DIR', max_messages, any SinkConfig field)",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when == "call" and report.failed:
        funcargs: dict[str, Any] = getattr(item, "funcargs", {})
        for name in FIXTURES:
            # pytest-trio keeps its fixtures' values in ``fixture_value``.
            sink = getattr(funcargs.get(name), "fixture_value", funcargs.get(name))
            if sink is not None and hasattr(sink, "stats"):
                report.sections.append((f"what {name} received", describe(sink)))


def describe(sink: Sink | SinkThread) -> str:
    """A few lines on what ``sink`` received: the counters, then one line per message."""
    from mailstorm.sink import NoRecords

    stats = sink.stats
    lines = [
        f"{sink.host}:{sink.port}: {stats.messages} accepted, {stats.messages_refused} refused,"
        f" {stats.sessions_total} sessions"
    ]
    try:
        records = sink.messages
    except NoRecords as exc:
        return "\n".join([*lines, str(exc)])
    for record in records[:REPORTED_MESSAGES]:
        subject = record.message.get("Subject", "")
        lines.append(f"  <{record.mail_from}> -> {record.rcpt_tos}: {subject!r}")
    if len(records) > REPORTED_MESSAGES:
        lines.append(f"  ... and {len(records) - REPORTED_MESSAGES} more")
    if sink.dropped:
        lines.append(f"  ({sink.dropped} older records dropped to keep max_messages)")
    return "\n".join(lines)


def sink_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The sink options a test asked for: its ``smtp_sink`` marker's keyword arguments, then
    the fixture's indirect parameter (a dict)."""
    options: dict[str, Any] = {}
    marker = request.node.get_closest_marker(MARKER)
    if marker is not None:
        if marker.args:
            raise pytest.UsageError(
                f"@pytest.mark.{MARKER} takes keyword arguments only, e.g. faults=['RCPT:450']"
            )
        options.update(marker.kwargs)
    param = getattr(request, "param", None)
    if param is not None:
        if not isinstance(param, dict):
            raise pytest.UsageError(
                f"{request.fixturename} parameters must be dicts of sink options, not {param!r}"
            )
        options.update(param)
    return options


@pytest.fixture
def smtp_sink(request: pytest.FixtureRequest) -> Iterator[SinkThread]:
    """A running SMTP sink for this test (a ``SinkThread``): ``.address``, ``.host``,
    ``.port``, ``.messages``, ``.wait_for(count, timeout)``, ``.clear()``, ``.stats``."""
    from mailstorm.sink import SinkThread

    with SinkThread(**sink_options(request)) as sink:
        yield sink


@pytest.fixture(scope="session")
def smtp_sink_session() -> Iterator[SinkThread]:
    """One running SMTP sink for the whole test session (default options; override this
    fixture in a conftest.py for others). Records accumulate: ``clear()`` them as needed."""
    from mailstorm.sink import SinkThread

    with SinkThread() as sink:
        yield sink


try:
    from pytest_trio import trio_fixture
except ImportError:  # pragma: no cover - without pytest-trio there are no trio tests to serve
    pass
else:

    @trio_fixture
    async def trio_smtp_sink(request: pytest.FixtureRequest) -> AsyncIterator[Sink]:
        """A running SMTP sink in this trio test's own loop (a ``Sink`` from ``open_sink``):
        ``await sink.wait_for(count, timeout)``. Trio tests only (pytest-trio)."""
        from mailstorm.sink import open_sink

        async with open_sink(**sink_options(request)) as sink:
            yield sink
