"""``mailstorm sink --lmtp``: the command-line option of LMTP mode, in its own group.

LMTP itself (RFC 2033) is the sans-IO core's (``mailstorm.wire.server``, ``SessionPolicy.lmtp``);
this module only says on the command line what it is and when to use it.
"""

from __future__ import annotations

import argparse

__all__ = ["add_lmtp_options"]


def add_lmtp_options(parser: argparse.ArgumentParser) -> None:
    """Add the "LMTP" argument group to the sink's parser."""
    group = parser.add_argument_group(
        "LMTP (RFC 2033)",
        # Lines broken by hand: the sink's parser keeps descriptions as written.
        "for an MTA delivering to a final store (Postfix's lmtp transport, smtp-source -L).\n"
        "LMTP is usually served on port 24 or a unix socket; this sink listens on TCP only\n"
        "(--listen HOST:PORT; port 24 needs root), plain or with TLS.",
    )
    group.add_argument(
        "--lmtp",
        action="store_true",
        help="speak LMTP instead of SMTP: LHLO is the only hello (HELO and EHLO get 500), "
        "and the end of data gets one reply per accepted recipient, in RCPT order, so a "
        "failure (a storage error, an EOD --fault whose to= names the recipient) is reported "
        "per recipient. The message is stored once, for the recipients answered 250",
    )
