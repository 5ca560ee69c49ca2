"""``mailstorm passwd``: read a password and print an auth-file line with its scrypt hash.

This module owns the command's arguments and how the password is read (a terminal prompt,
twice and without echo, or one line of standard input). The hashing and every rule about what
a username, a password or scrypt parameters may be belong to ``credentials``. It must never
print or log the password; the only secret-derived output is the hash line it was asked for.
"""

from __future__ import annotations

import argparse
import sys
from getpass import getpass

from .credentials import (
    DEFAULT_LN,
    DEFAULT_P,
    DEFAULT_R,
    MAX_LN,
    MIN_LN,
    hash_password,
    password_problem,
    scrypt_params_problem,
)

__all__ = ["main"]

PROG = "mailstorm passwd"


def main(argv: list[str] | None = None) -> int:
    """``mailstorm passwd [USER]``: print an auth file line with a scrypt hash."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        # Raw: the examples below must keep their line breaks.
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Hash a password with scrypt for the sink's --auth-file.\n\n"
            "When standard input is a terminal, prompts for the password twice without echo.\n"
            "Otherwise reads one line from standard input; only its line ending is removed,\n"
            "so spaces are part of the password. Prints USER:$scrypt$... ready to paste\n"
            "into the auth file (only the $scrypt$... hash when USER is omitted)."
        ),
        epilog=(
            "examples:\n"
            "  mailstorm passwd alice >> users.auth\n"
            "  printf '%s\\n' \"$PASSWORD\" | mailstorm passwd alice >> users.auth"
        ),
    )
    parser.add_argument("user", nargs="?", metavar="USER", help="username to put in front")
    parser.add_argument(
        "--ln",
        type=int,
        default=DEFAULT_LN,
        help=f"scrypt cost, log2 of N, {MIN_LN}..{MAX_LN} (default {DEFAULT_LN})",
    )
    parser.add_argument(
        "-r", type=int, default=DEFAULT_R, help=f"scrypt block size (default {DEFAULT_R})"
    )
    parser.add_argument(
        "-p", type=int, default=DEFAULT_P, help=f"scrypt parallelism (default {DEFAULT_P})"
    )
    args = parser.parse_args(argv)

    user: str | None = args.user
    if user is not None:
        problem = _username_problem(user)
        if problem is not None:
            parser.error(problem)
    problem = scrypt_params_problem(args.ln, args.r, args.p)
    if problem is not None:
        parser.error(problem)

    password = _read_password()
    if password is None:
        return 1
    problem = password_problem(password)
    if problem is not None:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return 1
    try:
        hashed = hash_password(password, ln=args.ln, r=args.r, p=args.p)
    except ValueError:
        # Only reachable for passwords that are not valid text (lone surrogates); the
        # exception text is not shown because it could quote the password.
        print(f"{PROG}: the password is not valid text", file=sys.stderr)
        return 1
    print(hashed if user is None else f"{user}:{hashed}")
    return 0


def _username_problem(user: str) -> str | None:
    """Why ``user`` cannot start an auth-file line, or None."""
    if not user:
        return "empty username"
    if ":" in user or "\n" in user or "\r" in user:
        # The colon ends the username; a line break would split the printed line in two.
        return "username must not contain a colon or a line break"
    return None


def _read_password() -> str | None:
    """The password from the terminal (twice, no echo) or one line of stdin; None on failure."""
    stdin = sys.stdin
    if stdin is None:
        print(f"{PROG}: no standard input to read the password from", file=sys.stderr)
        return None
    try:
        if stdin.isatty():
            first = getpass("Password: ")
            if not first:
                # No point asking twice.
                return first
            if getpass("Password (again): ") != first:
                print(f"{PROG}: passwords do not match", file=sys.stderr)
                return None
            return first
        line = stdin.readline()
    except (EOFError, KeyboardInterrupt):
        print(f"\n{PROG}: aborted", file=sys.stderr)
        return None
    # Only the line ending goes: leading and trailing spaces are part of the password, exactly
    # as in the auth file.
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        print(f"{PROG}: no password on standard input", file=sys.stderr)
        return None
    return password


if __name__ == "__main__":
    sys.exit(main())
