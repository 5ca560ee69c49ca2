"""Tests for server.credentials and server.passwd: auth file parsing, verification, hashing and
``mailstorm passwd``.

This module owns the behavioural contract of the credential store. It must never touch the
network or files outside pytest's tmp_path, and never leave a real terminal prompt waiting
(getpass is always replaced). Scrypt lines are made with ln=4 so the suite stays fast; only the
tests that are about the default parameters pay for ln=14.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from mailstorm.sink import credentials, passwd
from mailstorm.sink.credentials import CredentialFileError, CredentialStore, hash_password
from mailstorm.sink.passwd import main

FAST = {"ln": 4, "r": 8, "p": 1}
SECRET = "s3cr3t-Tr0mb0ne"
_FORMAT = re.compile(r"\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")


def write(tmp_path: Path, text: str | bytes, name: str = "users.auth") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def load_text(tmp_path: Path, text: str | bytes) -> CredentialStore:
    return CredentialStore.load(write(tmp_path, text))


def fast_hash(password: str) -> str:
    return hash_password(password, **FAST)


# --- parsing -------------------------------------------------------------------------------


def test_plaintext_lines(tmp_path: Path) -> None:
    store = load_text(tmp_path, "alice:wonderland\nbob:builder\n")
    assert len(store) == 2
    assert store.verify("alice", "wonderland")
    assert store.verify("bob", "builder")
    assert not store.verify("alice", "builder")


def test_scrypt_line(tmp_path: Path) -> None:
    store = load_text(tmp_path, f"alice:{fast_hash(SECRET)}\n")
    assert len(store) == 1
    assert store.verify("alice", SECRET)
    assert not store.verify("alice", SECRET + "x")
    assert not store.verify("alice", SECRET[:-1])


def test_mixed_plaintext_and_scrypt(tmp_path: Path) -> None:
    store = load_text(tmp_path, f"alice:plain\nbob:{fast_hash('hashed')}\n")
    assert store.verify("alice", "plain")
    assert store.verify("bob", "hashed")
    assert not store.verify("alice", "hashed")
    assert not store.verify("bob", "plain")


def test_passwords_keep_colons_and_whitespace(tmp_path: Path) -> None:
    text = "\n".join(
        [
            "alice:pa:ss:word",
            "bob:  spaced out \t",
            "carol::leading colon",
            f"dave:{fast_hash(' a:b c ')}",
        ]
    )
    store = load_text(tmp_path, text)
    assert store.verify("alice", "pa:ss:word")
    assert store.verify("bob", "  spaced out \t")
    assert not store.verify("bob", "spaced out")
    assert store.verify("carol", ":leading colon")
    assert store.verify("dave", " a:b c ")
    assert not store.verify("dave", "a:b c")


def test_crlf_line_endings_are_stripped(tmp_path: Path) -> None:
    store = load_text(tmp_path, "alice:one \r\nbob:two\r\n")
    assert store.verify("alice", "one ")
    assert store.verify("bob", "two")
    assert not store.verify("bob", "two\r")


def test_no_trailing_newline(tmp_path: Path) -> None:
    assert load_text(tmp_path, "alice:pw").verify("alice", "pw")


def test_comments_and_blank_lines_are_ignored(tmp_path: Path) -> None:
    text = "# users for the test sink\n\n   \n\t\nalice:pw\n#bob:pw\n\n# end\n"
    store = load_text(tmp_path, text)
    assert len(store) == 1
    assert store.verify("alice", "pw")
    assert not store.verify("#bob", "pw")
    assert not store.verify("bob", "pw")


def test_empty_file(tmp_path: Path) -> None:
    store = load_text(tmp_path, "")
    assert len(store) == 0
    assert not store.verify("anyone", "anything")


def test_dollar_password_that_is_not_scrypt_is_plaintext(tmp_path: Path) -> None:
    store = load_text(tmp_path, "a:$1$abc$def\nb:$scrypt\nc:$scryptx$ln=4\nd:$\n")
    assert store.verify("a", "$1$abc$def")
    assert store.verify("b", "$scrypt")
    assert store.verify("c", "$scryptx$ln=4")
    assert store.verify("d", "$")
    assert not store.needs_thread("a")


def test_utf8_usernames_and_passwords(tmp_path: Path) -> None:
    store = load_text(tmp_path, f"jürgen:grüße\n用户:{fast_hash('密码')}\n")
    assert store.verify("jürgen", "grüße")
    assert store.verify("用户", "密码")
    assert not store.verify("jurgen", "grüße")


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    store = load_text(tmp_path, b"\xef\xbb\xbfalice:pw\n")
    assert store.verify("alice", "pw")


def test_load_accepts_str_path(tmp_path: Path) -> None:
    path = write(tmp_path, "alice:pw\n")
    assert CredentialStore.load(str(path)).verify("alice", "pw")


# --- file errors ---------------------------------------------------------------------------

_GOOD_SALT = "c2FsdHNhbHRzYWx0c2FsdA"  # 16 bytes
_GOOD_HASH = "A" * 43  # 32 bytes


def _scrypt(params: str = "ln=4,r=8,p=1", salt: str = _GOOD_SALT, digest: str = _GOOD_HASH) -> str:
    return f"$scrypt${params}${salt}${digest}"


# (bad line, expected fragment of the message). Every bad line contains SECRET or a hash-like
# value that must not be echoed.
BAD_LINES: list[tuple[str, str]] = [
    (SECRET, "no colon"),
    (f":{SECRET}", "empty username"),
    ("bob:", "empty password"),
    (f"bob:{SECRET}\x00", "password contains a NUL character"),
    (f"bob:$scrypt${SECRET}", "malformed $scrypt$"),
    ("bob:" + _scrypt() + "$" + SECRET, "malformed $scrypt$"),
    ("bob:" + _scrypt(params=f"ln=4,r=8,p=1,{SECRET}"), "parameters"),
    ("bob:" + _scrypt(params="ln=4,p=1,r=8"), "parameters"),
    ("bob:" + _scrypt(params="ln=x,r=8,p=1"), "parameters"),
    ("bob:" + _scrypt(params="ln=+4,r=8,p=1"), "parameters"),
    ("bob:" + _scrypt(params="ln=4,r=8,p=" + "9" * 5000), "parameters"),
    ("bob:" + _scrypt(params="ln=0,r=8,p=1"), "ln must be between 1 and 20"),
    ("bob:" + _scrypt(params="ln=21,r=1,p=1"), "ln must be between 1 and 20"),
    ("bob:" + _scrypt(params="ln=4,r=0,p=1"), "at least 1"),
    ("bob:" + _scrypt(params="ln=4,r=8,p=0"), "at least 1"),
    ("bob:" + _scrypt(params="ln=16,r=1,p=1"), "less than 16*r"),
    ("bob:" + _scrypt(params="ln=20,r=4,p=1"), "256 MiB"),
    ("bob:" + _scrypt(params="ln=14,r=8,p=64"), "r*p too big"),
    ("bob:" + _scrypt(params="ln=1,r=1,p=999999999"), "r*p too big"),
    ("bob:" + _scrypt(salt="!!!!" + SECRET), "salt is not unpadded standard base64"),
    ("bob:" + _scrypt(salt=_GOOD_SALT + "=="), "salt is not unpadded standard base64"),
    ("bob:" + _scrypt(salt="c2FsdHNhbHRzYWx0c2FsdA-_"), "salt is not unpadded standard base64"),
    ("bob:" + _scrypt(salt="c2FsdA"), "salt is shorter"),
    ("bob:" + _scrypt(digest="A" * 42), "hash is 31 bytes"),
    ("bob:" + _scrypt(digest="A" * 44), "hash is 33 bytes"),
    ("bob:" + _scrypt(digest="A" * 41), "hash is not unpadded standard base64"),
    ("bob:" + _scrypt(digest="A" * 42 + "é"), "hash is not unpadded standard base64"),
    ("bob:" + _scrypt(digest=""), "hash is 0 bytes"),
]


@pytest.mark.parametrize(
    ("bad", "fragment"), BAD_LINES, ids=[f"{i}-{frag}" for i, (_, frag) in enumerate(BAD_LINES)]
)
def test_bad_line_is_reported_with_line_number_and_without_secret(
    tmp_path: Path, bad: str, fragment: str
) -> None:
    # The bad line is line 4: after a comment, a blank line and a good entry.
    path = write(tmp_path, f"# header\n\nalice:{SECRET}x\n{bad}\ncarol:pw\n")
    with pytest.raises(CredentialFileError) as info:
        CredentialStore.load(path)
    message = str(info.value)
    assert message.startswith(f"auth file {path} line 4: ")
    assert fragment in message
    assert "\n" not in message
    assert info.value.line == 4
    assert info.value.path == str(path)
    assert SECRET not in message
    password_part = bad.partition(":")[2]
    if password_part:
        assert password_part not in message
    if "$scrypt$" in bad:
        # No piece of the hash text (salt, digest) leaks either.
        assert _GOOD_SALT not in message
        assert _GOOD_HASH not in message
    # No chained exception: a traceback must not show decoder messages about the line.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_duplicate_username(tmp_path: Path) -> None:
    path = write(tmp_path, f"alice:one\nbob:two\nalice:{SECRET}\n")
    with pytest.raises(CredentialFileError) as info:
        CredentialStore.load(path)
    message = str(info.value)
    assert message == f"auth file {path} line 3: duplicate username 'alice'"
    assert SECRET not in message


def test_duplicate_username_across_plaintext_and_scrypt(tmp_path: Path) -> None:
    path = write(tmp_path, f"alice:{fast_hash(SECRET)}\nalice:{SECRET}\n")
    with pytest.raises(CredentialFileError, match="line 2: duplicate username"):
        CredentialStore.load(path)


def test_invalid_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, b"alice:pw\nbob:" + SECRET.encode() + b"\xff\xfe\n")
    with pytest.raises(CredentialFileError) as info:
        CredentialStore.load(path)
    message = str(info.value)
    assert message == f"auth file {path} line 2: not valid UTF-8"
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_error_message_stays_on_one_line_for_odd_paths(tmp_path: Path) -> None:
    path = write(tmp_path, "nocolon\n", name="evil\nname.auth")
    with pytest.raises(CredentialFileError) as info:
        CredentialStore.load(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith("line 1: no colon (expected user:password)")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.auth"
    with pytest.raises(CredentialFileError) as info:
        CredentialStore.load(path)
    assert str(info.value) == f"auth file {path}: cannot read: No such file or directory"
    assert info.value.line is None
    assert isinstance(info.value, ValueError)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(CredentialFileError, match=r": cannot read: Is a directory$"):
        CredentialStore.load(tmp_path)


def test_error_pickles() -> None:
    error = CredentialFileError("users.auth", 7, "empty username")
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == str(error) == "auth file users.auth line 7: empty username"
    assert (clone.path, clone.line, clone.problem) == ("users.auth", 7, "empty username")


# --- verify --------------------------------------------------------------------------------


@pytest.fixture(params=["plain", "scrypt"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CredentialStore:
    value = SECRET if request.param == "plain" else fast_hash(SECRET)
    return load_text(tmp_path, f"alice:{value}\n")


def test_verify_right_and_wrong(store: CredentialStore) -> None:
    assert store.verify("alice", SECRET)
    assert not store.verify("alice", SECRET.upper())
    assert not store.verify("Alice", SECRET)
    assert not store.verify("alice ", SECRET)


def test_unknown_user_is_false(store: CredentialStore) -> None:
    assert not store.verify("mallory", SECRET)
    assert not store.verify("", SECRET)


WEIRD = ["", "\x00", f"{SECRET}\x00", "\x00" + SECRET, "\ud800", f"{SECRET}\udcff", "x" * 100_000]


@pytest.mark.parametrize("weird", WEIRD)
def test_weird_input_is_false_not_an_error(store: CredentialStore, weird: str) -> None:
    assert not store.verify("alice", weird)
    assert not store.verify(weird, SECRET)
    assert not store.verify(weird, weird)


def test_non_string_input_is_false(store: CredentialStore) -> None:
    # Deliberately wrong types: a buggy caller must get a refusal, not an exception.
    assert not store.verify(None, SECRET)  # type: ignore[arg-type]
    assert not store.verify("alice", None)  # type: ignore[arg-type]
    assert not store.verify("alice", SECRET.encode())  # type: ignore[arg-type]
    assert not store.needs_thread(None)  # type: ignore[arg-type]


def test_scrypt_failure_at_verify_time_is_false(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = load_text(tmp_path, f"alice:{fast_hash(SECRET)}\n")

    def fail(*args: object, **kwargs: object) -> bytes:
        raise ValueError("memory limit exceeded")

    monkeypatch.setattr(credentials, "_scrypt", fail)
    assert store.verify("alice", SECRET) is False


def _count_scrypt(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the ln of every scrypt computation verify does."""
    calls: list[int] = []
    real: Callable[..., bytes] = credentials._scrypt

    def spy(password: bytes, salt: bytes, params: credentials._ScryptParams) -> bytes:
        calls.append(params.ln)
        return real(password, salt, params)

    monkeypatch.setattr(credentials, "_scrypt", spy)
    return calls


#: The scrypt cost of the hashed entries in the mixed-store tests: neither the fast cost of the
#: other tests nor the default, so a dummy run with the default cost would show.
FILE_LN = 5


def test_every_check_costs_one_scrypt_with_the_files_parameters(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In a store mixing plaintext and scrypt, a known plaintext user, a known scrypt user and
    an unknown user each cost exactly one scrypt run with the file's parameters, right or wrong
    password: the work does not tell who exists or how they are stored."""
    hashed = hash_password(SECRET, ln=FILE_LN, r=8, p=1)
    store = load_text(tmp_path, f"alice:plain\nbob:{hashed}\n")
    calls = _count_scrypt(monkeypatch)
    checks = [
        ("mallory", SECRET, False),
        ("mallory", "plain", False),
        ("alice", "plain", True),
        ("alice", "wrong", False),
        ("bob", SECRET, True),
        ("bob", "wrong", False),
    ]
    for username, password, expected in checks:
        calls.clear()
        assert store.verify(username, password) is expected, (username, password)
        assert calls == [FILE_LN], (username, password)


def test_cheaper_scrypt_entry_is_padded_to_the_costliest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With entries of different costs, every check pays the costliest run once; a cheaper
    entry's own run comes on top of it."""
    cheap = hash_password(SECRET, ln=4, r=8, p=1)
    costly = hash_password(SECRET, ln=FILE_LN, r=8, p=1)
    store = load_text(tmp_path, f"alice:plain\nbob:{cheap}\ncarol:{costly}\n")
    calls = _count_scrypt(monkeypatch)
    assert store.verify("bob", SECRET)
    assert calls == [FILE_LN, 4]
    for username in ("carol", "alice", "mallory"):
        calls.clear()
        store.verify(username, SECRET)
        assert calls == [FILE_LN], username


def test_unknown_user_gets_no_scrypt_in_plaintext_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = load_text(tmp_path, "alice:plain\n")
    calls = _count_scrypt(monkeypatch)
    assert not store.verify("mallory", "plain")
    assert store.verify("alice", "plain")
    assert calls == []


def test_needs_thread(tmp_path: Path) -> None:
    """``needs_thread`` is true exactly when ``verify`` runs scrypt: for every user of a store
    with scrypt entries, known or not, plaintext or not; for nobody in a plaintext store."""
    mixed = load_text(tmp_path, f"alice:plain\nbob:{fast_hash(SECRET)}\n")
    assert mixed.needs_thread("alice")
    assert mixed.needs_thread("bob")
    assert mixed.needs_thread("mallory")

    plain = CredentialStore.from_pairs([("alice", "plain")])
    assert not plain.needs_thread("alice")
    assert not plain.needs_thread("mallory")


def test_needs_thread_agrees_with_the_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every check that runs scrypt is one ``needs_thread`` sends to a thread."""
    mixed = load_text(tmp_path, f"alice:plain\nbob:{fast_hash(SECRET)}\n")
    plain = load_text(tmp_path, "alice:plain\n")
    calls = _count_scrypt(monkeypatch)
    for store in (mixed, plain):
        for username in ("alice", "bob", "mallory"):
            calls.clear()
            store.verify(username, "guess")
            assert bool(calls) == store.needs_thread(username), username


# --- from_pairs ----------------------------------------------------------------------------


def test_from_pairs_is_plaintext_even_for_scrypt_lookalikes() -> None:
    hashed = fast_hash(SECRET)
    store = CredentialStore.from_pairs([("alice", "a:b c"), ("bob", hashed)])
    assert len(store) == 2
    assert store.verify("alice", "a:b c")
    assert store.verify("bob", hashed)
    assert not store.verify("bob", SECRET)
    assert not store.needs_thread("bob")


def test_from_pairs_accepts_a_generator() -> None:
    store = CredentialStore.from_pairs((f"u{i}", f"p{i}") for i in range(3))
    assert len(store) == 3
    assert store.verify("u2", "p2")


@pytest.mark.parametrize(
    ("pairs", "fragment"),
    [
        ([("alice", "x"), ("alice", SECRET)], "pair 2: duplicate username 'alice'"),
        ([("", SECRET)], "pair 1: empty username"),
        ([("alice", "")], "pair 1: empty password"),
        ([("al:ice", SECRET)], "pair 1: username contains a colon"),
        ([("alice", SECRET + "\ud800")], "pair 1: password is not valid text"),
        ([("alice", SECRET + "\x00")], "pair 1: password contains a NUL character"),
    ],
)
def test_from_pairs_errors(pairs: list[tuple[str, str]], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        CredentialStore.from_pairs(pairs)
    assert fragment in str(info.value)
    assert SECRET not in str(info.value)


# --- repr ----------------------------------------------------------------------------------


def test_repr_hides_secrets(tmp_path: Path) -> None:
    hashed = fast_hash(SECRET)
    store = load_text(tmp_path, f"alice:{SECRET}\nbob:{hashed}\ncarol:x\n")
    text = repr(store)
    assert text == "<CredentialStore 3 users>"
    assert str(store) == text
    assert repr(CredentialStore.from_pairs([("a", "b")])) == "<CredentialStore 1 user>"


def test_internal_entries_repr_hides_secrets(tmp_path: Path) -> None:
    hashed = fast_hash(SECRET)
    store = load_text(tmp_path, f"alice:{SECRET}\nbob:{hashed}\n")
    # Even someone poking at internals (a debugger, a careless log line) sees no secrets.
    for entry in store._entries.values():
        shown = repr(entry)
        assert SECRET not in shown
        assert hashed.split("$")[-1] not in shown
        assert hashed.split("$")[-2] not in shown


# --- hash_password -------------------------------------------------------------------------


def test_hash_password_format_and_defaults() -> None:
    line = hash_password(SECRET)
    match = _FORMAT.fullmatch(line)
    assert match is not None
    ln, r, p, salt, digest = match.groups()
    assert (ln, r, p) == ("14", "8", "1")
    assert "=" not in salt + digest
    assert len(salt) == 22  # 16 bytes, unpadded
    assert len(digest) == 43  # 32 bytes, unpadded


def test_hash_password_salts_are_random() -> None:
    first, second = fast_hash(SECRET), fast_hash(SECRET)
    assert first != second
    assert first.split("$")[3] != second.split("$")[3]


def test_hash_password_round_trips_through_the_loader(tmp_path: Path) -> None:
    line = hash_password(SECRET, ln=5, r=2, p=3)
    assert line.startswith("$scrypt$ln=5,r=2,p=3$")
    store = load_text(tmp_path, f"alice:{line}\n")
    assert store.verify("alice", SECRET)


@pytest.mark.parametrize(
    "params",
    [{"ln": 0}, {"ln": 21}, {"r": 0}, {"p": 0}, {"ln": 16, "r": 1}, {"ln": 20, "r": 4}],
)
def test_hash_password_refuses_what_the_loader_refuses(params: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        hash_password(SECRET, **params)


def test_hash_password_refuses_empty_password() -> None:
    with pytest.raises(ValueError, match="empty password"):
        hash_password("", **FAST)


def test_hash_password_refuses_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        hash_password(SECRET + "\x00", **FAST)


def test_trailing_nul_would_collide_under_scrypt() -> None:
    # Why NUL is refused everywhere: PBKDF2-HMAC zero-pads short keys, so at the hashlib
    # level these two passwords are the same. verify must not inherit that.
    salt = b"0123456789abcdef"
    params = credentials._ScryptParams(**FAST)
    assert credentials._scrypt(b"pw", salt, params) == credentials._scrypt(b"pw\0", salt, params)


# --- mailstorm passwd ----------------------------------------------------------------------


def _stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    # StringIO.isatty() is False, which is what selects the read-one-line path.
    monkeypatch.setattr("sys.stdin", io.StringIO(text))


def test_main_reads_stdin_and_prints_a_loadable_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    password = f" {SECRET}:with colon "
    _stdin(monkeypatch, password + "\n")
    assert main(["jürgen", "--ln", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1
    line = out.rstrip("\n")
    assert line.startswith("jürgen:$scrypt$ln=4,r=8,p=1$")
    assert SECRET not in out
    assert SECRET not in err
    store = load_text(tmp_path, out)
    assert store.verify("jürgen", password)
    assert not store.verify("jürgen", password.strip())


def test_main_reads_only_the_first_line_without_its_crlf(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _stdin(monkeypatch, SECRET + "\r\nsecond line ignored\n")
    assert main(["alice", "--ln", "4"]) == 0
    store = load_text(tmp_path, capsys.readouterr().out)
    assert store.verify("alice", SECRET)
    assert not store.verify("alice", SECRET + "\r")


def test_main_stdin_without_trailing_newline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _stdin(monkeypatch, SECRET)
    assert main(["alice", "--ln", "4", "-r", "2", "-p", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("alice:$scrypt$ln=4,r=2,p=2$")
    assert load_text(tmp_path, out).verify("alice", SECRET)


def test_main_without_user_prints_only_the_hash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _stdin(monkeypatch, SECRET + "\n")
    assert main(["--ln", "4"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    assert _FORMAT.fullmatch(out)
    assert load_text(tmp_path, f"bob:{out}\n").verify("bob", SECRET)


@pytest.mark.parametrize("text", ["", "\n", "\r\n"])
def test_main_refuses_empty_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    _stdin(monkeypatch, text)
    assert main(["alice", "--ln", "4"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "no password" in err


def test_main_refuses_nul_on_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _stdin(monkeypatch, SECRET + "\x00\n")
    assert main(["alice", "--ln", "4"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "NUL" in err
    assert SECRET not in err


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _fake_getpass(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> list[str]:
    prompts: list[str] = []

    def fake(prompt: str = "Password: ") -> str:
        prompts.append(prompt)
        return answers.pop(0)

    monkeypatch.setattr("sys.stdin", _Tty())
    monkeypatch.setattr(passwd, "getpass", fake)
    return prompts


def test_main_tty_prompts_twice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prompts = _fake_getpass(monkeypatch, [SECRET, SECRET])
    assert main(["alice", "--ln", "4"]) == 0
    assert len(prompts) == 2
    out, err = capsys.readouterr()
    assert SECRET not in out
    assert SECRET not in err
    assert load_text(tmp_path, out).verify("alice", SECRET)


def test_main_tty_mismatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_getpass(monkeypatch, [SECRET, SECRET + "x"])
    assert main(["alice", "--ln", "4"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "do not match" in err
    assert SECRET not in err


def test_main_tty_empty_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = _fake_getpass(monkeypatch, [""])
    assert main(["alice", "--ln", "4"]) == 1
    assert len(prompts) == 1
    assert "empty password" in capsys.readouterr().err


def test_main_tty_interrupted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(prompt: str = "") -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", _Tty())
    monkeypatch.setattr(passwd, "getpass", interrupted)
    assert main(["alice"]) == 1
    assert "aborted" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["al:ice"], "colon"),
        ([""], "empty username"),
        (["alice", "--ln", "0"], "ln must be between"),
        (["alice", "--ln", "21"], "ln must be between"),
        (["alice", "-r", "0"], "at least 1"),
        (["alice", "--ln", "nope"], "invalid int value"),
    ],
)
def test_main_rejects_bad_arguments(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    fragment: str,
) -> None:
    _stdin(monkeypatch, SECRET + "\n")
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert fragment in err


def test_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mailstorm passwd")
    assert "--auth-file" in out
    assert "--ln" in out
