"""Message stores for the sink: where an accepted message goes before the server says 250.

This module owns the on-disk formats (Maildir, mboxrd) and the durability contract: when
``Store.deliver`` returns, the message is complete and fsynced, so the 250 the caller sends
next is a promise that holds across a crash. When it raises ``StoreError``, nothing of the
message is left behind, so a 4xx reply and the client's retry cannot produce a duplicate or a
truncated copy.

It must never block the trio thread with file I/O (blocking work runs in worker threads,
bounded by a ``trio.CapacityLimiter``), never run Python code per line of a message, and never
parse or rewrite message content beyond the mboxrd ``From`` quoting that the format requires.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import trio

from mailstorm.wire.events import Envelope

from .records import DEFAULT_MAX_MESSAGES, MemoryStore

__all__ = [
    "DiscardStore",
    "MaildirDelivered",
    "MaildirStore",
    "MboxStore",
    "Store",
    "StoreError",
    "open_store",
]

#: Worker threads per Maildir store: enough to keep a disk busy with fsyncs, few enough that
#: thousands of concurrent sessions cannot turn into thousands of threads.
DEFAULT_MAILDIR_THREADS = 16


class StoreError(Exception):
    """A delivery that failed. The message text is safe to log and to show an operator."""


@runtime_checkable
class Store(Protocol):
    """Where the sink puts accepted messages.

    A store says what it needs instead of being recognized by its type: ``keeps_messages``
    (each message then gets trace headers) and ``immediate`` (it stores without waiting, so the
    session's protocol object calls ``deliver_now`` on whichever driver's turn it is, the
    readiness hub's included, and no task wakes for the message).
    """

    keeps_messages: bool
    immediate: bool

    async def deliver(self, envelope: Envelope, content: bytes, trace: bytes) -> None:
        """Store ``trace + content`` durably, or raise ``StoreError`` leaving nothing behind."""
        ...

    def deliver_now(self, envelope: Envelope, content: bytes, trace: bytes) -> None:
        """For an ``immediate`` store: ``deliver`` without waiting (never blocks, never fails)."""
        ...

    def describe(self) -> str:
        """A short human-readable description, e.g. for the startup banner."""
        ...


def _write_all(fd: int, parts: Sequence[bytes]) -> None:
    """Write ``parts`` to ``fd`` back to back, in one ``writev`` unless the kernel writes less."""
    total = sum(len(part) for part in parts)
    written = os.writev(fd, parts)
    if written == total:
        return
    # A short write on a regular file is rare (a nearly full disk, a write over 2 GiB); joining
    # once here keeps the common path free of the copy.
    rest = memoryview(b"".join(parts))[written:]
    while rest:
        count = os.write(fd, rest)
        if count <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        rest = rest[count:]


def _reason(exc: OSError) -> str:
    """The operator-facing part of an OSError, without a repr or a traceback."""
    return exc.strerror or type(exc).__name__


class DiscardStore:
    """Accepts every message and keeps nothing; the server shell does the counting.

    ``deliver`` never yields to the scheduler: it is on the hot path of throughput benchmarks,
    and a checkpoint here would only add cost (the shell checkpoints when it sends the reply).
    """

    keeps_messages = False
    immediate = True

    async def deliver(self, envelope: Envelope, content: bytes, trace: bytes) -> None:
        return None

    def deliver_now(self, envelope: Envelope, content: bytes, trace: bytes) -> None:
        return None

    def describe(self) -> str:
        return "discard"


#: Told of each message a Maildir store kept: its envelope, its trace headers, its file's path.
MaildirDelivered = Callable[[Envelope, bytes, str], None]

# Maildir unique names (https://cr.yp.to/proto/maildir.html): time, microseconds, pid and a
# per-process counter make a name unique across the processes sharing the directory.
_counter = itertools.count()


def _maildir_host() -> str:
    """This host's name with the characters Maildir names reserve escaped."""
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072")


class _WaitingStore:
    """A store that keeps messages and waits for the disk: sessions ``await deliver``."""

    keeps_messages = True
    immediate = False

    def deliver_now(self, envelope: Envelope, content: bytes, trace: bytes) -> None:
        raise TypeError(f"{type(self).__name__} waits for the disk: await deliver() instead")


class MaildirStore(_WaitingStore):
    """Delivers each message as one file in a Maildir, readable by ``mailbox.Maildir``.

    The file holds ``trace + content`` byte for byte (CRLF line endings kept). It is written in
    ``tmp/``, fsynced, renamed into ``new/``, and ``new/`` is fsynced so the rename survives a
    crash; only then does ``deliver`` return. The directories are created when missing.

    ``on_delivered``, when set, is called on the trio thread after each delivery (the embedding
    API keeps records of what arrived this way); it must not raise.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, threads: int = DEFAULT_MAILDIR_THREADS
    ) -> None:
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self._tmp = os.path.join(self.path, "tmp")
        self._new = os.path.join(self.path, "new")
        self._host = _maildir_host()
        self._limiter = trio.CapacityLimiter(threads)
        self.on_delivered: MaildirDelivered | None = None
        self._prepare()

    def _prepare(self) -> None:
        """Create the Maildir if needed and prove it writable, raising ValueError if not."""
        where = f"maildir {self.path!r}"
        for directory in (self.path, *(os.path.join(self.path, d) for d in ("cur", "new", "tmp"))):
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except FileExistsError:
                raise ValueError(f"{where}: {directory!r} exists and is not a directory") from None
            except OSError as exc:
                raise ValueError(f"{where}: cannot create {directory!r}: {_reason(exc)}") from None
        # Permission bits say nothing when running as root, and nothing about read-only mounts,
        # so tmp/ is proved writable by creating a file. new/ is only checked with access():
        # a probe file there would be visible to mail readers.
        probe = os.path.join(self._tmp, self._unique_name(0) + ".probe")
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise ValueError(f"{where}: tmp/ is not writable: {_reason(exc)}") from None
        if not os.access(self._new, os.W_OK | os.X_OK):
            raise ValueError(f"{where}: new/ is not writable")

    def _unique_name(self, size: int) -> str:
        now = time.time_ns()
        seconds, nanoseconds = divmod(now, 1_000_000_000)
        # The ",S=" size suffix (Courier/Dovecot convention) lets IMAP servers skip a stat().
        return (
            f"{seconds}.M{nanoseconds // 1000}P{os.getpid()}Q{next(_counter)}.{self._host},S={size}"
        )

    async def deliver(self, envelope: Envelope, content: bytes, trace: bytes) -> None:
        # The default abandon_on_cancel=False is deliberate: a cancelled session must not leave
        # a thread writing a file nobody will clean up; the delivery finishes (or fails) first.
        path = await trio.to_thread.run_sync(
            self._deliver_sync, trace, content, limiter=self._limiter
        )
        if self.on_delivered is not None:
            self.on_delivered(envelope, trace, path)

    def _deliver_sync(self, trace: bytes, content: bytes) -> str:
        """Write one message; return the path of its file in ``new/``."""
        size = len(trace) + len(content)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
        # O_EXCL turns the (theoretical) name collision into an error we can retry, instead of
        # two deliveries writing into one file.
        for _attempt in range(3):
            name = self._unique_name(size)
            tmp_path = os.path.join(self._tmp, name)
            try:
                fd = os.open(tmp_path, flags, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise StoreError(
                    f"maildir {self.path}: cannot create file: {_reason(exc)}"
                ) from None
            break
        else:
            raise StoreError(f"maildir {self.path}: could not find a unique file name")

        new_path = os.path.join(self._new, name)
        try:
            try:
                _write_all(fd, (trace, content))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp_path, new_path)
        except OSError as exc:
            _unlink_quietly(tmp_path)
            raise StoreError(f"maildir {self.path}: delivery failed: {_reason(exc)}") from None

        try:
            _fsync_directory(self._new)
        except OSError as exc:
            # The file is complete but its name may not survive a crash. The caller is about to
            # report failure and the client will retry, so keeping it would make a duplicate.
            _unlink_quietly(new_path)
            raise StoreError(f"maildir {self.path}: cannot sync new/: {_reason(exc)}") from None
        return new_path

    def describe(self) -> str:
        return f"maildir:{self.path}"


def _unlink_quietly(path: str) -> None:
    # Used while handling another error: that error is the one to report.
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: mboxrd quoting: every line that starts with zero or more ">" and then "From " gets one more
#: ">", so a reader can undo it exactly. ``^`` under MULTILINE matches after every "\n", which
#: covers CRLF lines too.
_MBOXRD_FROM = re.compile(rb"^(>*From )", re.MULTILINE)


def _mboxrd_quote(block: bytes) -> bytes:
    return _MBOXRD_FROM.sub(rb">\1", block)


def _from_line_sender(mail_from: str) -> bytes:
    """The envelope sender as one word for the ``From `` separator line."""
    if not mail_from:
        return b"MAILER-DAEMON"
    # The separator must stay one line and its sender one word; the trace header carries the
    # exact address anyway.
    if not mail_from.isprintable() or " " in mail_from:
        mail_from = "".join(ch if ch.isprintable() and ch != " " else "_" for ch in mail_from)
    return mail_from.encode("utf-8", "replace")


class MboxStore(_WaitingStore):
    """Appends each message to one mbox file in mboxrd format, readable by ``mailbox.mbox``.

    Each message is ``From <sender> <asctime UTC>\\n``, then ``trace + content`` with every
    line matching ``^>*From `` quoted with one more ``>`` (mboxrd), a line end if the content
    lacked one, and a blank line. Content keeps its CRLF line endings: only the separator
    lines the format adds are bare LF.

    Appends are serialized by a ``trio.Lock`` in this process and ``fcntl.lockf`` on the file
    (the lock the stdlib ``mailbox`` module and fcntl-locking mail readers take) against other
    processes. A failed append is truncated away.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self._lock = trio.Lock()
        # The trio.Lock already admits one delivery at a time; a private limiter keeps those
        # threads from competing with unrelated users of trio's default thread limiter.
        self._limiter = trio.CapacityLimiter(1)
        self._prepare()

    def _prepare(self) -> None:
        where = f"mbox {self.path!r}"
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise ValueError(f"{where}: directory {parent!r} does not exist")
        if os.path.isdir(self.path):
            raise ValueError(f"{where}: is a directory")
        try:
            fd = self._open()
        except OSError as exc:
            raise ValueError(f"{where}: cannot open for appending: {_reason(exc)}") from None
        os.close(fd)

    def _open(self) -> int:
        # Opened per message rather than once: a rotated or deleted mbox is then recreated
        # instead of appended to after it was unlinked.
        # Read access is for looking at the file's last bytes (see _separator_needed).
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    async def deliver(self, envelope: Envelope, content: bytes, trace: bytes) -> None:
        # Formatting and quoting happen in the thread too: the regex pass over a large message
        # is CPU work the trio thread should not wait for.
        async with self._lock:
            await trio.to_thread.run_sync(
                self._deliver_sync, envelope.mail_from, trace, content, limiter=self._limiter
            )

    def _deliver_sync(self, mail_from: str, trace: bytes, content: bytes) -> None:
        stamp = time.asctime(time.gmtime()).encode("ascii")
        parts = [b"", b"From " + _from_line_sender(mail_from) + b" " + stamp + b"\n"]
        parts.append(_mboxrd_quote(trace))
        if content:
            parts.append(_mboxrd_quote(content))
        last = parts[-1]
        parts.append(b"\n\n" if last and not last.endswith(b"\n") else b"\n")

        fd = self._open_locked()
        try:
            # The length is read under the lock: another process may have appended between
            # our open() and our lock.
            try:
                size = os.fstat(fd).st_size
                parts[0] = self._separator_needed(fd, size)
            except OSError as exc:
                raise StoreError(f"mbox {self.path}: cannot read: {_reason(exc)}") from None
            try:
                _write_all(fd, parts)
                os.fsync(fd)
            except OSError as exc:
                self._truncate_quietly(fd, size)
                raise StoreError(f"mbox {self.path}: append failed: {_reason(exc)}") from None
        finally:
            # Closing the descriptor releases the lockf lock as well.
            os.close(fd)

    def _open_locked(self) -> int:
        """Open the mbox and lock it, making sure the locked file is still the one at ``path``."""
        # A mail reader that rewrites the mbox (stdlib mailbox.mbox.flush, for one) renames a
        # new file over it while holding the lock we wait for. Appending to the old inode after
        # that would lose a message we are about to acknowledge, so check and reopen.
        for _attempt in range(5):
            try:
                fd = self._open()
            except OSError as exc:
                raise StoreError(f"mbox {self.path}: cannot open: {_reason(exc)}") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                opened, current = os.fstat(fd), os.stat(self.path)
            except FileNotFoundError:
                os.close(fd)
                continue
            except OSError as exc:
                os.close(fd)
                raise StoreError(f"mbox {self.path}: cannot lock: {_reason(exc)}") from None
            if (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino):
                return fd
            os.close(fd)
        raise StoreError(f"mbox {self.path}: the file keeps being replaced")

    @staticmethod
    def _separator_needed(fd: int, size: int) -> bytes:
        """What to write first so our ``From `` line starts after a blank line."""
        # Another program may have left the file without the final blank line (or even in the
        # middle of a line); our separator would then be glued to or hidden in its message.
        if size == 0:
            return b""
        tail = os.pread(fd, 2, max(size - 2, 0))
        if tail.endswith(b"\n\n") or tail == b"\n":
            return b""
        return b"\n" if tail.endswith(b"\n") else b"\n\n"

    @staticmethod
    def _truncate_quietly(fd: int, size: int) -> None:
        # Best effort while another error is being reported; if this fails too, the partial
        # message at least sits after a complete one, so earlier messages stay readable.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
            os.fsync(fd)

    def describe(self) -> str:
        return f"mbox:{self.path}"


def open_store(spec: str) -> Store:
    """Build a store from a spec: ``discard``, ``maildir:DIR``, ``mbox:FILE``, or ``memory`` /
    ``memory:N`` (the last N messages as records, for the embedding API; see ``records``).

    Raises ValueError with a one-line message when the spec is malformed or the path cannot
    be used; Maildir directories are created when missing.
    """
    kind, colon, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "discard":
        if colon:
            raise ValueError(f"store {spec!r}: 'discard' takes no argument")
        return DiscardStore()
    if kind == "memory":
        if not colon:
            return MemoryStore(DEFAULT_MAX_MESSAGES)
        if not path.strip().isdigit() or int(path) < 1:
            raise ValueError(f"store {spec!r}: expected 'memory:N' with N a count of messages")
        return MemoryStore(int(path))
    if kind in ("maildir", "mbox"):
        if not path:
            what = "DIR" if kind == "maildir" else "FILE"
            raise ValueError(f"store {spec!r}: missing path, expected '{kind}:{what}'")
        if kind == "maildir":
            return MaildirStore(path)
        return MboxStore(path)
    raise ValueError(
        f"store {spec!r}: unknown kind {kind!r}, expected 'discard', 'maildir:DIR', "
        "'mbox:FILE' or 'memory[:N]'"
    )
