"""Tests for server.stores: the discard, Maildir and mbox stores and the store spec parser."""

from __future__ import annotations

import errno
import mailbox
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from mailstorm.sink import stores
from mailstorm.sink.stores import (
    DiscardStore,
    MaildirStore,
    MboxStore,
    Store,
    StoreError,
    open_store,
)
from mailstorm.wire.events import Envelope

TRACE = b"Return-Path: <alice@example.org>\r\nReceived: from x (y [192.0.2.1])\r\n\tby z; date\r\n"

CONTENTS = [
    b"Subject: plain\r\n\r\nHello.\r\n",
    b"Subject: from lines\r\n\r\nFrom here on\r\n>From quoted\r\n>>From twice\r\nFrom \r\n",
    b"Subject: 8bit\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xc3\xa9t\xc3\xa9 \xff\xfe\x00\r\n",
    b"",
    b"From the first line\r\n\r\nbody\r\n",
    b"Subject: no final newline\r\n\r\nlast line",
    b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" * 5000,
]


def envelope(mail_from: str = "alice@example.org") -> Envelope:
    return Envelope(mail_from=mail_from, rcpt_tos=["bob@example.com"])


def unquote_mboxrd(data: bytes) -> bytes:
    return re.sub(rb"(?m)^>(>*From )", rb"\1", data)


def split_mbox(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Parse an mboxrd file written by MboxStore exactly: (From line, unquoted message)."""
    assert raw.startswith(b"From ")
    result = []
    # Every message ends with a line end and one blank line, then the next "From " follows.
    for chunk in re.split(rb"(?<=\n)\n(?=From )", raw.removesuffix(b"\n")):
        from_line, _, body = chunk.partition(b"\n")
        result.append((from_line, unquote_mboxrd(body)))
    return result


def expected_mbox_message(content: bytes) -> bytes:
    message = TRACE + content
    return message if message.endswith(b"\n") else message + b"\n"


# -- discard -------------------------------------------------------------------------------


async def test_discard_store() -> None:
    store = DiscardStore()
    assert isinstance(store, Store)
    await store.deliver(envelope(), b"x\r\n", TRACE)
    assert store.describe() == "discard"


# -- Maildir -------------------------------------------------------------------------------


async def test_maildir_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "Maildir"
    store = MaildirStore(path)
    assert isinstance(store, Store)
    assert store.describe() == f"maildir:{path}"
    for sub in ("cur", "new", "tmp"):
        assert (path / sub).is_dir()

    for content in CONTENTS:
        await store.deliver(envelope(), content, TRACE)

    box = mailbox.Maildir(path, factory=None)
    stored = sorted(box.get_bytes(key) for key in box.iterkeys())
    assert stored == sorted(TRACE + content for content in CONTENTS)
    assert os.listdir(path / "tmp") == []
    names = os.listdir(path / "new")
    assert len(names) == len(CONTENTS)
    for name in names:
        # The unique-name convention, with the S= size of the file.
        match = re.fullmatch(r"(\d+)\.M(\d+)P(\d+)Q(\d+)\.([^/:]+),S=(\d+)", name)
        assert match, name
        assert int(match[3]) == os.getpid()
        assert int(match[6]) == (path / "new" / name).stat().st_size
        assert (path / "new" / name).stat().st_mode & 0o777 == 0o600


async def test_maildir_files_are_byte_exact(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path)
    content = b"Subject: x\r\n\r\nbare\nlf and bare\rcr\r\n\xff\r\n"
    await store.deliver(envelope(), content, TRACE)
    (name,) = os.listdir(tmp_path / "new")
    assert (tmp_path / "new" / name).read_bytes() == TRACE + content


async def test_maildir_concurrent_deliveries(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "md", threads=8)
    count = 200

    async def one(i: int) -> None:
        await store.deliver(envelope(), b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i), TRACE)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)

    names = os.listdir(tmp_path / "md" / "new")
    assert len(names) == len(set(names)) == count
    box = mailbox.Maildir(tmp_path / "md", factory=None)
    bodies = {box.get_bytes(key) for key in box.iterkeys()}
    assert bodies == {TRACE + b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(count)}
    assert os.listdir(tmp_path / "md" / "tmp") == []


async def test_maildir_failure_leaves_nothing(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path)
    # Works as root too: rename() into a path below a regular file fails with ENOTDIR
    # whatever the permissions.
    (tmp_path / "new").rmdir()
    (tmp_path / "new").write_bytes(b"")
    with pytest.raises(StoreError, match=r"maildir .*: delivery failed: Not a directory"):
        await store.deliver(envelope(), b"Subject: x\r\n\r\nx\r\n", TRACE)
    assert os.listdir(tmp_path / "tmp") == []


async def test_maildir_failure_during_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MaildirStore(tmp_path)

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(stores.os, "fsync", full_disk)
    with pytest.raises(StoreError, match="No space left on device"):
        await store.deliver(envelope(), b"Subject: x\r\n\r\nx\r\n", TRACE)
    assert os.listdir(tmp_path / "tmp") == []
    assert os.listdir(tmp_path / "new") == []


async def test_maildir_failure_syncing_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = MaildirStore(tmp_path)

    def broken(path: str) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    # The rename happened but cannot be made durable: the caller will report failure, so the
    # message must not stay behind to be duplicated by the client's retry.
    monkeypatch.setattr(stores, "_fsync_directory", broken)
    with pytest.raises(StoreError, match="cannot sync new/"):
        await store.deliver(envelope(), b"Subject: x\r\n\r\nx\r\n", TRACE)
    assert os.listdir(tmp_path / "tmp") == []
    assert os.listdir(tmp_path / "new") == []


async def test_maildir_short_writes_are_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MaildirStore(tmp_path)
    real_writev = os.writev

    def short_writev(fd: int, buffers: list[bytes]) -> int:
        return real_writev(fd, [bytes(buffers[0][:7])])

    monkeypatch.setattr(stores.os, "writev", short_writev)
    content = b"Subject: short\r\n\r\n" + b"y" * 100_000 + b"\r\n"
    await store.deliver(envelope(), content, TRACE)
    (name,) = os.listdir(tmp_path / "new")
    assert (tmp_path / "new" / name).read_bytes() == TRACE + content


# -- mbox ----------------------------------------------------------------------------------


async def test_mbox_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "mail.mbox"
    store = MboxStore(path)
    assert isinstance(store, Store)
    assert store.describe() == f"mbox:{path}"
    assert path.exists()

    senders = ["alice@example.org", "", "jörg@exämple.de"]
    for i, content in enumerate(CONTENTS):
        await store.deliver(envelope(senders[i % len(senders)]), content, TRACE)

    raw = path.read_bytes()
    assert raw.endswith(b"\n\n")
    # No unquoted "From " line other than the separators.
    assert len(re.findall(rb"(?m)^From ", raw)) == len(CONTENTS)

    parsed = split_mbox(raw)
    assert [body for _, body in parsed] == [expected_mbox_message(c) for c in CONTENTS]
    for i, (from_line, _) in enumerate(parsed):
        sender = senders[i % len(senders)].encode() or b"MAILER-DAEMON"
        assert re.fullmatch(
            rb"From " + re.escape(sender) + rb" \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}",
            from_line,
        ), from_line

    box = mailbox.mbox(path, factory=None)
    try:
        stored = [box.get_bytes(key) for key in box.iterkeys()]
    finally:
        box.close()
    # mailbox.mbox strips the blank separator line; on POSIX it keeps the bytes otherwise.
    assert [unquote_mboxrd(m) for m in stored] == [expected_mbox_message(c) for c in CONTENTS]
    # Both readers also see the quoting itself.
    assert b"\n>From here on\r\n>>From quoted\r\n>>>From twice\r\n>From \r\n" in stored[1]
    assert stored[4].endswith(b"\r\n>From the first line\r\n\r\nbody\r\n")


async def test_mbox_appends_to_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "mbox"
    # A file left by another program without the final blank line.
    path.write_bytes(b"From someone Sat Nov 29 10:00:00 2025\nSubject: old\n\nold body")
    store = MboxStore(path)
    await store.deliver(envelope(), CONTENTS[0], TRACE)
    box = mailbox.mbox(path, factory=None)
    try:
        stored = [box.get_bytes(key) for key in box.iterkeys()]
    finally:
        box.close()
    assert stored == [b"Subject: old\n\nold body\n", TRACE + CONTENTS[0]]


async def test_mbox_concurrent_appends_do_not_interleave(tmp_path: Path) -> None:
    path = tmp_path / "mbox"
    store = MboxStore(path)
    contents = [b"Subject: %d\r\n\r\n" % i + (b"line %d\r\n" % i) * (i * 50) for i in range(60)]

    async with trio.open_nursery() as nursery:
        for content in contents:
            nursery.start_soon(store.deliver, envelope(), content, TRACE)

    parsed = split_mbox(path.read_bytes())
    assert sorted(body for _, body in parsed) == sorted(TRACE + c for c in contents)


async def test_mbox_failure_truncates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mbox"
    store = MboxStore(path)
    await store.deliver(envelope(), CONTENTS[0], TRACE)
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, buffers: list[bytes]) -> int:
        # Write part of the message, then fail the way a full disk does.
        real_write(fd, b"".join(buffers)[:20])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(stores.os, "writev", half_then_full)
    with pytest.raises(StoreError, match=r"mbox .*: append failed: No space left on device"):
        await store.deliver(envelope(), CONTENTS[1], TRACE)
    assert path.read_bytes() == before

    monkeypatch.undo()
    await store.deliver(envelope(), CONTENTS[2], TRACE)
    parsed = split_mbox(path.read_bytes())
    assert [body for _, body in parsed] == [TRACE + CONTENTS[0], TRACE + CONTENTS[2]]


async def test_mbox_file_removed_after_start_is_recreated(tmp_path: Path) -> None:
    path = tmp_path / "mbox"
    store = MboxStore(path)
    path.unlink()
    await store.deliver(envelope(), CONTENTS[0], TRACE)
    assert split_mbox(path.read_bytes())[0][1] == TRACE + CONTENTS[0]


LOCK_HOLDER = """
import fcntl, os, sys
path = sys.argv[1]
with open(path, "r+b") as held:
    fcntl.lockf(held, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()
    # Rewrite the mbox the way mailbox.mbox.flush does: a new file renamed over the old one.
    with open(path + ".new", "wb") as new:
        new.write(b"From rewriter Sat Nov 29 10:00:00 2025\\nSubject: kept\\n\\nkept\\n\\n")
    os.rename(path + ".new", path)
"""


async def test_mbox_waits_for_other_process_and_follows_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "mbox"
    store = MboxStore(path)
    process = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        assert await trio.to_thread.run_sync(process.stdout.readline) == b"locked\n"
        delivered = trio.Event()

        async def deliver() -> None:
            await store.deliver(envelope(), CONTENTS[0], TRACE)
            delivered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)
            await trio.sleep(0.2)
            # The other process holds the lock: the delivery must wait for it.
            assert not delivered.is_set()
            process.stdin.write(b"go\n")
            process.stdin.flush()
        assert await trio.to_thread.run_sync(process.wait) == 0
    finally:
        process.kill()
        process.wait()

    # The message went into the file now at the path, not into the replaced one.
    parsed = split_mbox(path.read_bytes())
    assert [body for _, body in parsed] == [b"Subject: kept\n\nkept\n", TRACE + CONTENTS[0]]


# -- open_store ----------------------------------------------------------------------------


def test_open_store_good_specs(tmp_path: Path) -> None:
    assert isinstance(open_store("discard"), DiscardStore)

    maildir = open_store(f"maildir:{tmp_path / 'a' / 'Maildir'}")
    assert isinstance(maildir, MaildirStore)
    assert maildir.describe() == f"maildir:{tmp_path / 'a' / 'Maildir'}"
    for sub in ("cur", "new", "tmp"):
        assert (tmp_path / "a" / "Maildir" / sub).is_dir()
    assert os.listdir(tmp_path / "a" / "Maildir" / "tmp") == []

    mbox = open_store(f"mbox:{tmp_path / 'inbox'}")
    assert isinstance(mbox, MboxStore)
    assert mbox.describe() == f"mbox:{tmp_path / 'inbox'}"

    # An existing Maildir is used as is.
    assert isinstance(open_store(f"maildir:{tmp_path / 'a' / 'Maildir'}"), MaildirStore)


def test_open_store_relative_paths_become_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert open_store("maildir:md").describe() == f"maildir:{tmp_path / 'md'}"
    assert open_store("mbox:box").describe() == f"mbox:{tmp_path / 'box'}"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "unknown kind ''"),
        ("nowhere", "unknown kind 'nowhere'"),
        ("s3:bucket", "unknown kind 's3'"),
        ("discard:/tmp/x", "takes no argument"),
        ("maildir", "missing path"),
        ("maildir:", "missing path"),
        ("mbox", "missing path"),
        ("mbox:", "missing path"),
    ],
)
def test_open_store_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        open_store(spec)
    assert "\n" not in str(info.value)


def test_open_store_unusable_paths(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    cases = [
        (f"maildir:{a_file}", "exists and is not a directory"),
        (f"maildir:{a_file / 'below'}", "cannot create"),
        (f"mbox:{tmp_path / 'missing' / 'mbox'}", "does not exist"),
        (f"mbox:{tmp_path}", "is a directory"),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            open_store(spec)
        assert "\n" not in str(info.value)


def test_open_store_maildir_with_file_in_place_of_subdir(tmp_path: Path) -> None:
    (tmp_path / "md").mkdir()
    (tmp_path / "md" / "new").write_bytes(b"")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        open_store(f"maildir:{tmp_path / 'md'}")


def test_open_store_maildir_tmp_not_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def read_only_fs(path: str, flags: int, mode: int = 0o777) -> int:
        if path.endswith(".probe"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, mode)

    monkeypatch.setattr(stores.os, "open", read_only_fs)
    with pytest.raises(ValueError, match="tmp/ is not writable: Read-only file system"):
        open_store(f"maildir:{tmp_path}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_open_store_unwritable_paths(tmp_path: Path) -> None:
    md = tmp_path / "md"
    MaildirStore(md)
    (md / "tmp").chmod(0o500)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="tmp/ is not writable"):
            open_store(f"maildir:{md}")
        with pytest.raises(ValueError, match="cannot open for appending"):
            open_store(f"mbox:{locked / 'mbox'}")
    finally:
        (md / "tmp").chmod(0o700)
        locked.chmod(0o700)
