"""The load generator against mailstorm's own sink: the delivered count equals the number of
messages in the sink's Maildir, with DATA and with BDAT."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from mailstorm.load.config import LoadConfig
from mailstorm.load.runner import run_load

pytest_plugins = ("load_fixtures",)


def maildir_count(root: Path) -> int:
    return sum(1 for p in (root / "new").iterdir() if p.is_file())


async def test_maildir_holds_every_delivered_message(
    start_sink: Callable[..., Any], load_config: Callable[..., LoadConfig], tmp_path: Path
) -> None:
    maildir = tmp_path / "Maildir"
    sink = await start_sink(store=f"maildir:{maildir}")
    port = sink.addresses[0][1]
    with trio.fail_after(60):
        data = await run_load(load_config(port, sessions=10, messages=150, rcpts=2))
        bdat = await run_load(load_config(port, sessions=4, messages=50, chunking=True))
    assert data.delivered == 150 and bdat.delivered == 50
    assert data.errors == bdat.errors == 0
    assert maildir_count(maildir) == 200
    stored = next((maildir / "new").iterdir()).read_bytes()
    assert b"Subject: mailstorm load test " in stored and b"Message-ID: <" in stored
