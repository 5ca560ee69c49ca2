"""The pytest plugin (``mailstorm.pytest_plugin``), run as its users run it: real test files in
a fresh directory (``pytester``), the plugin loaded through its ``pytest11`` entry point."""

from __future__ import annotations

import re
import textwrap
import threading
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from mailstorm.sink import SinkConfig

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.md"

#: The faults field of SinkConfig comes with the fault injection half of issue 11.
needs_faults = pytest.mark.skipif(
    "faults" not in SinkConfig.__dataclass_fields__,
    reason="SinkConfig has no 'faults' field yet (fault injection, issue 11)",
)


def readme_file(name: str) -> str:
    """The README's Python block that starts with the comment ``# <name>``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    (block,) = [b for b in blocks if b.startswith(f"# {name}\n")]
    return block


def readme_tests(*names: str) -> str:
    """The README's ``app.py`` test module, cut down to its imports and the tests ``names``."""
    module = readme_file("test_app.py")
    header, _, _ = module.partition("\n\n\n")
    # Each test is a top-level block, decorated or not, separated by two blank lines.
    chunks = module.split("\n\n\n")[1:]
    kept = [c for c in chunks if any(f"def {name}(" in c for name in names)]
    assert len(kept) == len(names), names
    return "\n\n\n".join([header, *kept]) + "\n"


def sink_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mailstorm-sink"]


def test_the_plugin_is_a_pytest11_entry_point() -> None:
    (entry,) = [e for e in entry_points(group="pytest11") if e.name == "mailstorm"]
    assert entry.value == "mailstorm.pytest_plugin"


def test_the_readme_example_passes_in_a_fresh_process(pytester: pytest.Pytester) -> None:
    """As a new user would: the fixture comes from the installed entry point, no conftest."""
    pytester.makepyfile(
        app=readme_file("app.py"), test_app=readme_tests("test_the_welcome_mail_arrives")
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


@needs_faults
def test_the_readme_example_under_rcpt_450(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(app=readme_file("app.py"), test_app=readme_file("test_app.py"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_the_plugin_is_listed_with_its_fixtures_and_marker(pytester: pytest.Pytester) -> None:
    fixtures = pytester.runpytest("--fixtures")
    fixtures.stdout.fnmatch_lines(
        [
            "*fixtures defined from mailstorm.pytest_plugin*",
            "smtp_sink -- *",
            "smtp_sink_session * -- *",
            "trio_smtp_sink -- *",
        ]
    )
    markers = pytester.runpytest("--markers")
    markers.stdout.fnmatch_lines(["@pytest.mark.smtp_sink(**options): *"])


SEND = """
import smtplib

def send(address, sender="a@example.test", rcpt="b@example.test", text="Subject: hi\\n\\nhi\\n"):
    with smtplib.SMTP(*address, timeout=20) as smtp:
        smtp.sendmail(sender, [rcpt], text)
"""


def test_marker_and_indirect_parameters_configure_the_sink(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        SEND
        + textwrap.dedent(
            """
            import pytest

            @pytest.mark.smtp_sink(hostname="marked.test", max_messages=2)
            def test_marker(smtp_sink):
                for n in range(3):
                    send(smtp_sink.address, sender=f"s{n}@example.test")
                records = smtp_sink.wait_for(3, timeout=20)
                assert [r.mail_from for r in records] == ["s1@example.test", "s2@example.test"]
                assert smtp_sink.dropped == 1
                assert b"by marked.test" in records[0].trace

            @pytest.mark.smtp_sink(hostname="marked.test")
            @pytest.mark.parametrize(
                "smtp_sink",
                [{"hostname": "one.test"}, {"hostname": "two.test"}],
                ids=["one", "two"],
                indirect=True,
            )
            def test_parameters(smtp_sink, request):
                send(smtp_sink.address)
                (record,) = smtp_sink.wait_for(1, timeout=20)
                # The parameter wins over the marker.
                assert f"by {request.node.callspec.id}.test".encode() in record.trace
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert sink_threads() == []


def test_the_session_sink_is_shared_and_cleared_by_hand(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        SEND
        + textwrap.dedent(
            """
            ports = []

            def test_first(smtp_sink_session):
                send(smtp_sink_session.address)
                smtp_sink_session.wait_for(1, timeout=20)
                ports.append(smtp_sink_session.port)

            def test_second(smtp_sink_session):
                assert smtp_sink_session.port == ports[0]
                assert len(smtp_sink_session.messages) == 1  # still there
                smtp_sink_session.clear()
                send(smtp_sink_session.address, sender="c@example.test")
                (record,) = smtp_sink_session.wait_for(1, timeout=20)
                assert record.mail_from == "c@example.test"
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert sink_threads() == []


def test_a_wait_that_times_out_fails_the_test_clearly(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_nothing_arrives(smtp_sink):
            smtp_sink.wait_for(1, timeout=0.1)
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*SinkTimeout: waited 0.1s for 1 message, 0 arrived*"])


def test_a_bad_marker_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.smtp_sink(["RCPT:450"])
        def test_positional(smtp_sink):
            pass

        @pytest.mark.smtp_sink(no_such_option=1)
        def test_unknown(smtp_sink):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        ["*keyword arguments only*", "*unexpected keyword argument 'no_such_option'*"]
    )


def test_trio_tests_get_a_sink_in_their_own_loop(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        SEND
        + textwrap.dedent(
            """
            import pytest
            import trio

            @pytest.mark.trio
            @pytest.mark.smtp_sink(hostname="trio.test")
            async def test_trio(trio_smtp_sink):
                await trio.to_thread.run_sync(send, trio_smtp_sink.address)
                (record,) = await trio_smtp_sink.wait_for(1, timeout=20)
                assert b"by trio.test" in record.trace
                assert record.message["Subject"] == "hi"

            @pytest.mark.trio
            async def test_fails(trio_smtp_sink):
                await trio.to_thread.run_sync(send, trio_smtp_sink.address, "x@example.test")
                await trio_smtp_sink.wait_for(1, timeout=20)
                assert False

            @pytest.mark.trio
            async def test_the_thread_sink_works_in_trio_tests_too(smtp_sink):
                await trio.to_thread.run_sync(send, smtp_sink.address)
                # Blocks this test's loop (not the sink's) until the message is in.
                (record,) = smtp_sink.wait_for(1, timeout=20)
                assert record.mail_from == "a@example.test"
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["*- what trio_smtp_sink received -*", "  <x@example.test> -> ['b@example.test']: 'hi'"]
    )


def test_a_failed_test_reports_what_the_sink_received(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        SEND
        + textwrap.dedent(
            """
            def test_fails(smtp_sink):
                send(smtp_sink.address, sender="x@example.test", text="Subject: hello\\n\\nhi\\n")
                smtp_sink.wait_for(1, timeout=20)
                assert smtp_sink.messages == []

            def test_passes(smtp_sink):
                send(smtp_sink.address)
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- what smtp_sink received -*",
            "127.0.0.1:*: 1 accepted, 0 refused, 1 sessions",
            "  <x@example.test> -> ['b@example.test']: 'hello'",
        ]
    )
    assert result.stdout.str().count("what smtp_sink received") == 1
