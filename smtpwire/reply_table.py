"""The sink's fixed replies: the reply-code table of RFC 5321 4.2.3 with RFC 3463 enhanced codes.

Replies that never change are module constants, so their wire bytes are built once. Replies
that name the host or carry a limit are made by the small functions at the end, cached, so
they too are built once per server rather than once per connection.
"""

from __future__ import annotations

from functools import cache

from .replies import Reply

# 2xx ---------------------------------------------------------------------------------------
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
CANNOT_EXPN = Reply(252, "2.5.0", "Cannot EXPN list, but will accept message and attempt delivery")
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")

# 3xx ---------------------------------------------------------------------------------------
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
# RFC 4954: the challenge is base64 text without an enhanced code. The AUTH LOGIN prompts are
# base64 of "Username:" and "Password:", which clients match literally.
AUTH_EMPTY_CHALLENGE = Reply(334, None, "")
AUTH_LOGIN_USERNAME = Reply(334, None, "VXNlcm5hbWU6")
AUTH_LOGIN_PASSWORD = Reply(334, None, "UGFzc3dvcmQ6")

# 4xx ---------------------------------------------------------------------------------------
STORAGE_FAILED = Reply(451, "4.3.0", "Error: local error in processing, message not stored")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")

# 5xx: syntax and sequence ------------------------------------------------------------------
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
BAD_UTF8 = Reply(500, "5.5.2", "Error: command is not valid UTF-8")
SYNTAX_HELO = Reply(501, "5.5.4", "Syntax: HELO hostname")
SYNTAX_EHLO = Reply(501, "5.5.4", "Syntax: EHLO hostname")
SYNTAX_LHLO = Reply(501, "5.5.4", "Syntax: LHLO hostname")
SYNTAX_MAIL = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
SYNTAX_RCPT = Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
SYNTAX_NO_ARGS = Reply(501, "5.5.4", "Syntax error: no parameters allowed")
SYNTAX_VRFY = Reply(501, "5.5.4", "Syntax: VRFY address")
SYNTAX_EXPN = Reply(501, "5.5.4", "Syntax: EXPN list")
SYNTAX_BDAT = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
SYNTAX_AUTH = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
BAD_PARAM_VALUE = Reply(501, "5.5.4", "Error: bad parameter value")
DUPLICATE_PARAM = Reply(501, "5.5.4", "Error: duplicate parameter")
PATH_TOO_LONG = Reply(501, "5.1.3", "Error: address too long")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Error: invalid base64 data")
AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Error: malformed authentication response")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
AUTH_NOT_ENABLED = Reply(502, "5.5.1", "Error: authentication not enabled")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_LHLO = Reply(503, "5.5.1", "Error: send LHLO first")
# RFC 2033 4.1: an LMTP server refuses HELO and EHLO.
NOT_LMTP = Reply(500, "5.5.1", "Error: this is an LMTP server, send LHLO")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
BDAT_IN_PROGRESS = Reply(503, "5.5.1", "Error: BDAT transfer in progress, send BDAT or RSET")
DATA_DURING_BDAT = Reply(503, "5.5.1", "Error: DATA not allowed during BDAT transfer")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: AUTH not allowed during a mail transaction")
# After an injected failure banner (RFC 5321 3.1: the client should send QUIT).
NO_SERVICE = Reply(503, "5.5.1", "Error: no SMTP service here, send QUIT")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
# As Postfix: a TLS upgrade would have to forget the envelope (RFC 3207 4.2) mid-transaction.
TLS_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
NEED_EHLO_FOR_PARAMS = Reply(555, "5.5.4", "Error: parameters need EHLO")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Error: unrecognized authentication type")
UNSUPPORTED_BODY = Reply(504, "5.5.4", "Error: unsupported BODY type")
UNKNOWN_PARAM = Reply(555, "5.5.4", "Error: unsupported MAIL FROM/RCPT TO parameter")

# 5xx: policy -------------------------------------------------------------------------------
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
BARE_LINEFEED = Reply(
    550, "5.6.0", "Message refused: bare CR or LF in content (lines must end with CRLF)"
)
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")
NON_ASCII_RECIPIENT = Reply(553, "5.6.7", "Error: non-ASCII recipient needs SMTPUTF8")


@cache
def banner(hostname: str) -> Reply:
    return Reply(220, None, f"{hostname} ESMTP mailstorm")


@cache
def lmtp_banner(hostname: str) -> Reply:
    return Reply(220, None, f"{hostname} LMTP mailstorm")


@cache
def closing(hostname: str) -> Reply:
    return Reply(221, "2.0.0", f"{hostname} Bye")


@cache
def helo(hostname: str) -> Reply:
    return Reply(250, None, hostname)


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"OK: queued as {queue_id}")


def chunk_received(octets: int) -> Reply:
    return Reply(250, "2.0.0", f"{octets} octets received")


@cache
def size_exceeded(limit: int) -> Reply:
    return Reply(552, "5.3.4", f"Error: message size exceeds fixed limit of {limit} octets")


@cache
def too_many_errors(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many errors")


@cache
def too_many_commands(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many commands")


@cache
def timed_out(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded")


@cache
def shutting_down(hostname: str) -> Reply:
    return Reply(421, "4.3.2", f"{hostname} Service shutting down, closing connection")


@cache
def session_too_long(hostname: str) -> Reply:
    """The session reached the server's maximum duration (after its transaction)."""
    return Reply(421, "4.4.2", f"{hostname} Error: session lasted too long, reconnect")


@cache
def too_many_auth_failures(hostname: str) -> Reply:
    """Too many failed AUTH attempts from this client address."""
    return Reply(421, "4.7.0", f"{hostname} Error: too many authentication failures")


@cache
def too_many_connections(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many connections, try again later")
