"""Password guessing against a real sink: failures from one client address are answered ever
later, and past ``--max-auth-failures`` the session ends with 421 4.7.0 and the address is
refused before any password is checked (issue 14, defect 7: about 4,000 guesses a second from
one client were limited only by 20 errors per connection).

The growing delay itself is unit-tested on a hand-driven clock (``tests/test_authlimit.py``);
here the session's part is checked: who is told what, and when the session ends.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from conftest import b64

Connect = Callable[..., Awaitable[Any]]


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + b64(f"\0{user}\0{password}")


async def test_guesses_past_the_limit_end_the_session_and_block_the_address(
    start_sink: Any, connect: Connect, auth_file: Path
) -> None:
    server = await start_sink(auth_file=str(auth_file), max_auth_failures=2)
    client = await connect(server.addresses[0])
    assert (await client.cmd("EHLO c.test")).code == 250
    assert (await client.cmd(plain("alice", "guess1"))).code == 535
    assert (await client.cmd(plain("nobody", "guess2"))).code == 535
    # The third failure is over the limit: its 535, then 421 and the end of the session.
    assert (await client.cmd(plain("alice", "guess3"))).code == 535
    reply = await client.reply()
    assert (reply.code, reply.lines[0][:5]) == (421, "4.7.0"), reply
    await client.expect_closed()
    # The address stays blocked: even the right password is not checked now.
    again = await connect(server.addresses[0])
    assert (await again.cmd("EHLO c.test")).code == 250
    assert (await again.cmd(plain("alice", "wonderland"))).code == 535
    assert (await again.reply()).code == 421
    await again.expect_closed()
    assert server.stats.auth_failures == 4


async def test_auth_login_failures_count_too(
    start_sink: Any, connect: Connect, auth_file: Path
) -> None:
    server = await start_sink(auth_file=str(auth_file), max_auth_failures=1)
    client = await connect(server.addresses[0])
    assert (await client.cmd("EHLO c.test")).code == 250
    for attempt in ("one", "two"):
        assert (await client.cmd("AUTH LOGIN")).code == 334
        assert (await client.cmd(b64("alice"))).code == 334
        assert (await client.cmd(b64(attempt))).code == 535
    assert (await client.reply()).code == 421
    await client.expect_closed()


async def test_a_success_between_failures_keeps_the_session_usable(
    start_sink: Any, connect: Connect, auth_file: Path
) -> None:
    server = await start_sink(auth_file=str(auth_file), max_auth_failures=3)
    client = await connect(server.addresses[0])
    assert (await client.cmd("EHLO c.test")).code == 250
    assert (await client.cmd(plain("alice", "nope"))).code == 535
    assert (await client.cmd(plain("alice", "wonderland"))).code == 235
    assert (await client.cmd("MAIL FROM:<a@c.test>")).code == 250


async def test_no_limit_when_zero(start_sink: Any, connect: Connect, auth_file: Path) -> None:
    server = await start_sink(auth_file=str(auth_file), max_auth_failures=0, max_errors=0)
    client = await connect(server.addresses[0])
    assert (await client.cmd("EHLO c.test")).code == 250
    for n in range(4):
        assert (await client.cmd(plain("alice", f"wrong{n}"))).code == 535
