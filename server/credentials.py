"""The sink's AUTH credential store: parsing ``--auth-file``, checking passwords, making hashes.

This module owns the auth file format, password verification, and the rules for what a
password and scrypt parameters may be (``mailstorm passwd``, in ``passwd``, uses them). It must
never log, print or put into an exception message a password or a password hash, must never
raise from ``CredentialStore.verify`` whatever the input, and must never let the work of a
verification depend on the secret being checked, on whether the user exists, or on whether
the user's entry is plaintext or scrypt (see ``CredentialStore.verify``).

Auth file format (UTF-8, one entry per line)::

    # comment
    alice:plaintext password
    bob:$scrypt$ln=14,r=8,p=1$<salt>$<hash>

* Blank lines (empty or whitespace only) and lines starting with ``#`` are ignored.
* The username is everything before the FIRST colon, so passwords may contain colons. It may
  be any non-empty UTF-8 text without a colon; duplicates are an error.
* The trailing CR/LF of each line is stripped; all other whitespace belongs to the password.
  A UTF-8 byte order mark at the start of the file is ignored.
* A password starting with ``$scrypt$`` is a ``hashlib.scrypt`` hash in this format::

      $scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt, standard base64 without padding>$<hash, standard base64 without padding>

  The hash is 32 bytes. ``hash_password`` (and ``mailstorm passwd``) use ln=14, r=8, p=1 and a
  16-byte random salt from ``secrets``. Parameters must satisfy 1 <= ln <= 20, r >= 1, p >= 1,
  ln < 16*r (an RFC 7914 limit OpenSSL enforces), memory ``128*r*2**ln <= 256 MiB`` and CPU
  cost ``r*p*2**ln <= 2**22``. A plaintext password therefore cannot start with ``$scrypt$``;
  any other password starting with ``$`` is plaintext. An empty password is an error, and so
  is one containing NUL (scrypt's HMAC would treat trailing NULs as absent).

Errors in the file are reported as ``CredentialFileError`` with the file and line number; the
message says what is wrong but never quotes the password or hash text.
"""  # noqa: E501

# The noqa above covers the format line: it is quoted verbatim and must stay on one line.

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

__all__ = [
    "CredentialFileError",
    "CredentialStore",
    "hash_password",
    "password_problem",
    "scrypt_params_problem",
]

SCRYPT_PREFIX = "$scrypt$"
DEFAULT_LN = 14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MIN_LN = 1
MAX_LN = 20
#: Upper bound on scrypt's big work array (128*r*N bytes), so a typo cannot exhaust memory.
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
#: Upper bound on r*p*N. p costs CPU linearly (OpenSSL runs the lanes one after another) without
#: costing memory, so the memory bound alone would let "p=100000" make every AUTH take hours.
#: 2**22 is 32 times the default cost and twice the largest memory-bound setting (ln=20, r=2).
MAX_SCRYPT_WORK = 2**22
#: A salt this short is not a salt; no real generator makes one.
MIN_SALT_BYTES = 8

# re.ASCII: int() would accept non-ASCII digits, "+", "_" and spaces; the digit-count cap keeps
# int() away from huge strings (and from Python's int max-str-digits ValueError).
_PARAMS = re.compile(r"ln=([0-9]{1,9}),r=([0-9]{1,9}),p=([0-9]{1,9})", re.ASCII)
_B64_CHARS = re.compile(r"[A-Za-z0-9+/]*", re.ASCII)


class CredentialFileError(ValueError):
    """The auth file is unreadable or has a bad line.

    ``str()`` is one line: ``auth file PATH line N: what is wrong`` (or ``auth file PATH: ...``
    when no particular line is at fault). It never contains a password or hash.
    """

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        where = f"auth file {_display(path)}"
        if line is not None:
            where += f" line {line}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        # The default would call __init__ with only the message and fail (e.g. when the
        # error crosses a process boundary).
        return (type(self), (self.path, self.line, self.problem))


@dataclass(frozen=True, slots=True)
class _ScryptParams:
    """Validated scrypt cost parameters."""

    ln: int
    r: int
    p: int

    @property
    def n(self) -> int:
        return 1 << self.ln

    @property
    def maxmem(self) -> int:
        # OpenSSL needs 128*r*(N+2) bytes for V plus 128*r*p for B and refuses to start when
        # that exceeds maxmem (its default is only 32 MiB). The slack absorbs any small
        # difference between OpenSSL versions; the real bound is checked in _params_problem.
        return 128 * self.r * (self.n + self.p + 2) + (1 << 20)


@dataclass(frozen=True, slots=True)
class _Plain:
    """A plaintext entry: the password's UTF-8 bytes."""

    secret: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class _Scrypt:
    """An scrypt entry."""

    params: _ScryptParams
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)


_Entry: TypeAlias = _Plain | _Scrypt

# Stand-in for unknown users in a plaintext-only store: random per process so no input can
# ever match it.
_DUMMY_PLAIN = secrets.token_bytes(HASH_BYTES)


class CredentialStore:
    """Usernames and their passwords (plaintext or scrypt), checked by ``verify``."""

    __slots__ = ("_entries", "_reference")

    def __init__(self, entries: dict[str, _Entry]) -> None:
        """Wrap already validated entries; use ``load`` or ``from_pairs`` instead."""
        self._entries = dict(entries)
        # The scrypt run every check pays when the store has any scrypt entry (see verify).
        self._reference = _reference_entry(self._entries.values())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CredentialStore:
        """Read and validate an auth file; raise ``CredentialFileError`` on any problem."""
        name = os.fspath(path)
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise CredentialFileError(name, None, f"cannot read: {reason}") from None
        return cls(_parse(name, data))

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> CredentialStore:
        """Build a store from (username, plaintext password) pairs, for tests and embedding.

        Passwords are always plaintext here, even one that starts with ``$scrypt$``. The same
        rules as for the file apply (non-empty, colon-free, unique usernames; non-empty
        passwords) and a violation raises ``ValueError`` naming the pair's 1-based position.
        """
        entries: dict[str, _Entry] = {}
        for index, (username, password) in enumerate(pairs, start=1):
            problem = _username_problem(username, entries)
            if problem is None and ":" in username:
                problem = "username contains a colon"
            if problem is None:
                problem = password_problem(password)
            if problem is not None:
                raise ValueError(f"credential pair {index}: {problem}")
            try:
                secret = password.encode("utf-8")
            except UnicodeEncodeError:
                # Lone surrogates: no client could ever send this password.
                raise ValueError(f"credential pair {index}: password is not valid text") from None
            entries[username] = _Plain(secret)
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        # Only a count: usernames help an attacker and secrets must never appear.
        count = len(self._entries)
        return f"<CredentialStore {count} user{'' if count == 1 else 's'}>"

    def needs_thread(self, username: str) -> bool:
        """Whether ``verify(username, ...)`` runs scrypt, so the caller should use a thread.

        In a store with any scrypt entry every check runs scrypt (see ``verify``), so the
        answer is the same for every user, known or not, plaintext or scrypt: it reveals
        nothing about who exists.
        """
        if not isinstance(username, str):
            return False  # verify refuses it without doing any work
        return self._reference is not None

    def verify(self, username: str, password: str) -> bool:
        """Whether ``password`` is ``username``'s password. Never raises.

        Constant-time in the password: plaintext is compared with ``hmac.compare_digest``,
        scrypt hashes are computed in full and then compared the same way.

        The same work whoever the user is, so that timing does not tell who exists: in a store
        with any scrypt entry, every check runs scrypt once with the store's reference
        parameters (the most expensive in the file). For a scrypt user with those parameters
        that run is the real check; an unknown user, a plaintext user, and a scrypt user with
        cheaper parameters get it as a dummy run next to their own (cheap) check. A store of
        plaintext entries only does one ``compare_digest`` per check.
        """
        if not isinstance(username, str) or not isinstance(password, str):
            return False
        if "\x00" in password:
            # No stored password contains NUL (see password_problem). Refusing here matters
            # for scrypt: PBKDF2's HMAC pads short keys with zero bytes, so "pw" and "pw\0"
            # would hash alike. Checked before the lookup, so it says nothing about the user.
            return False
        try:
            offered = password.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates cannot match anything stored; returning early leaks nothing
            # about the user because it happens before the lookup.
            return False
        entry = self._entries.get(username)
        reference = self._reference
        if isinstance(entry, _Scrypt) and reference is not None:
            if entry.params != reference.params:
                # Pad a cheaper entry up to the reference cost.
                _check_scrypt(reference, offered)
            return _check_scrypt(entry, offered)
        # compare_digest's running time follows its SECOND argument's length, so the offered
        # password goes second: time depends on what the client sent (which it knows) and
        # not on the stored password's length.
        secret = entry.secret if isinstance(entry, _Plain) else _DUMMY_PLAIN
        matches = hmac.compare_digest(secret, offered)
        if reference is not None:
            _check_scrypt(reference, offered)  # the dummy run: always False
        return matches and entry is not None


def _reference_entry(entries: Iterable[_Entry]) -> _Scrypt | None:
    """A dummy scrypt entry with the most expensive parameters among ``entries``, or None.

    Its salt and digest are random, so no password ever matches it.
    """
    params = [entry.params for entry in entries if isinstance(entry, _Scrypt)]
    if not params:
        return None
    # CPU cost first (r*p*N), then memory (r*N): what the check costs, not how it is spelled.
    costliest = max(params, key=lambda p: (p.r * p.p * p.n, p.r * p.n, p.ln))
    return _Scrypt(costliest, secrets.token_bytes(SALT_BYTES), secrets.token_bytes(HASH_BYTES))


def hash_password(
    password: str, *, ln: int = DEFAULT_LN, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """Hash ``password`` with scrypt and a fresh random salt, in the auth file's format.

    Raises ``ValueError`` for parameters the loader would refuse and for a password it would
    refuse (empty, or containing NUL).
    """
    problem = password_problem(password)
    if problem is not None:
        raise ValueError(problem)
    params = _ScryptParams(ln, r, p)
    problem = _params_problem(params)
    if problem is not None:
        raise ValueError(problem)
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password.encode("utf-8"), salt, params)
    return f"{SCRYPT_PREFIX}ln={ln},r={r},p={p}${_b64(salt)}${_b64(digest)}"


# --- internals -----------------------------------------------------------------------------


def _display(path: str) -> str:
    """The path as one printable line (a file name may contain newlines or junk bytes)."""
    return path if path.isprintable() else repr(path)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes | None:
    """Decode unpadded standard base64, or None if it is not exactly that."""
    # fullmatch rules out padding, URL-safe characters, whitespace and non-ASCII, which
    # b64decode would partly tolerate; a length of 1 mod 4 can never be produced by encoding.
    if not _B64_CHARS.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        return None


def _scrypt(password: bytes, salt: bytes, params: _ScryptParams) -> bytes:
    return hashlib.scrypt(
        password,
        salt=salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=params.maxmem,
        dklen=HASH_BYTES,
    )


def _check_scrypt(entry: _Scrypt, offered: bytes) -> bool:
    try:
        computed = _scrypt(offered, entry.salt, entry.params)
    except ValueError:
        # Parameters were validated at load, so this is OpenSSL failing to get memory. Treat
        # it as a failed login rather than crash the session; verify must not raise.
        return False
    return hmac.compare_digest(entry.digest, computed)


def scrypt_params_problem(ln: int, r: int, p: int) -> str | None:
    """Why the scrypt parameters ``ln``, ``r``, ``p`` are refused, or None if they are fine."""
    return _params_problem(_ScryptParams(ln, r, p))


def _params_problem(params: _ScryptParams) -> str | None:
    """Why these scrypt parameters are refused, or None if they are fine."""
    ln, r, p = params.ln, params.r, params.p
    if not MIN_LN <= ln <= MAX_LN:
        return f"scrypt ln must be between {MIN_LN} and {MAX_LN}"
    if r < 1 or p < 1:
        return "scrypt r and p must be at least 1"
    if ln >= 16 * r:
        # RFC 7914 requires N < 2**(128*r/8); OpenSSL would refuse it at every verify.
        return "scrypt ln must be less than 16*r"
    if 128 * r * (1 << ln) > MAX_SCRYPT_MEMORY:
        return "scrypt parameters need more than 256 MiB (128*r*2**ln)"
    if r * p * (1 << ln) > MAX_SCRYPT_WORK:
        return "scrypt r*p too big: r*p*2**ln must not exceed 2**22"
    return None


def _username_problem(username: str, seen: dict[str, _Entry]) -> str | None:
    if not username:
        return "empty username"
    if username in seen:
        # The username is not a secret, and naming it is what makes this error actionable.
        return f"duplicate username {username!r}"
    return None


def password_problem(password: str) -> str | None:
    """Why a password cannot be stored, or None. Applies to plaintext and to-be-hashed alike."""
    if not password:
        # Almost certainly a truncated line, and an empty password is no protection.
        return "empty password"
    if "\x00" in password:
        # SASL PLAIN cannot carry it, and under scrypt a trailing NUL is indistinguishable
        # from its absence (HMAC zero-pads keys), so verify refuses NUL outright.
        return "password contains a NUL character"
    return None


def _parse_scrypt(value: str) -> _Scrypt | str:
    """Parse a ``$scrypt$...`` value into an entry, or return what is wrong with it."""
    parts = value[len(SCRYPT_PREFIX) :].split("$")
    if len(parts) != 3:
        return "malformed $scrypt$ hash: expected $scrypt$PARAMS$SALT$HASH"
    params_text, salt_text, digest_text = parts
    match = _PARAMS.fullmatch(params_text)
    if match is None:
        return "malformed $scrypt$ hash: parameters must be ln=N,r=N,p=N"
    params = _ScryptParams(*(int(g) for g in match.groups()))
    problem = _params_problem(params)
    if problem is not None:
        return f"malformed $scrypt$ hash: {problem}"
    salt = _unb64(salt_text)
    if salt is None:
        return "malformed $scrypt$ hash: salt is not unpadded standard base64"
    if len(salt) < MIN_SALT_BYTES:
        return f"malformed $scrypt$ hash: salt is shorter than {MIN_SALT_BYTES} bytes"
    digest = _unb64(digest_text)
    if digest is None:
        return "malformed $scrypt$ hash: hash is not unpadded standard base64"
    if len(digest) != HASH_BYTES:
        return f"malformed $scrypt$ hash: hash is {len(digest)} bytes, not {HASH_BYTES}"
    return _Scrypt(params, salt, digest)


def _parse(path: str, data: bytes) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    # Split on LF only: str.splitlines would also split on VT, FF, U+2028 and friends, which
    # are legitimate (if odd) password characters.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            # Editors on Windows like to add a BOM; it would otherwise join the first username.
            raw = raw[3:]
        try:
            # Only CR is left to strip: the split already took the LF.
            line = raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            # from None: the decode error's text quotes bytes of the line.
            raise CredentialFileError(path, number, "not valid UTF-8") from None
        if not line.strip() or line.startswith("#"):
            continue
        username, colon, password = line.partition(":")
        if not colon:
            # The whole line may be a password pasted on its own, so it is not quoted.
            raise CredentialFileError(path, number, "no colon (expected user:password)")
        problem = _username_problem(username, entries)
        if problem is None:
            problem = password_problem(password)
        if problem is not None:
            raise CredentialFileError(path, number, problem)
        if password.startswith(SCRYPT_PREFIX):
            parsed = _parse_scrypt(password)
            if isinstance(parsed, str):
                raise CredentialFileError(path, number, parsed)
            entries[username] = parsed
        else:
            entries[username] = _Plain(password.encode("utf-8"))
    return entries

