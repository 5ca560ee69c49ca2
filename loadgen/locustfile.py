"""A ready locustfile: SMTP load through Locust with ``mailstorm.load.locust_user.SMTPUser``.

This module owns only the wiring Locust looks for in a locustfile: the SMTP command-line
arguments (``--size``, ``--rcpts``, ``--per-connection``, ``--starttls``, ``--auth-user``,
``--auth-password``, ``--eml``, ``--mail-from``, ``--rcpt-to`` ..., also in the web UI's start
form) and one user class, ``MailUser``. Everything else lives in ``locust_user`` and
``locust_report``. Run it by its path, from a checkout or an installed mailstorm::

    locust -f "$(python3 -c 'import mailstorm.load.locustfile as f; print(f.__file__)')" \\
           --host smtp://127.0.0.1:2525 --headless -u 50 -r 50 --run-time 30s
"""

from __future__ import annotations

import sys
from typing import Any

import gevent
from locust import events
from locust.stats import CSV_STATS_INTERVAL_SEC

from mailstorm.load.locust_user import SMTPUser, add_arguments, options_error

__all__ = ["MailUser"]

events.init_command_line_parser.add_listener(add_arguments)


class MailUser(SMTPUser):
    """One SMTP client: a connection kept across messages, one message per task run, no wait
    between messages (a closed loop, as ``mailstorm load`` without ``--rate``)."""


@events.init.add_listener
def _check_options(environment: Any, **_: Any) -> None:
    """A bad option or ``--host`` is one line and exit status 2 at start-up, as in
    ``mailstorm load``, instead of a traceback for every user spawned."""
    options = MailUser.options.overridden_by(environment.parsed_options)
    error = options_error(options, environment.host)
    if error is not None:
        print(f"locust: {error}", file=sys.stderr)
        sys.exit(2)


@events.quitting.add_listener
def _write_final_csv(environment: Any, **_: Any) -> None:
    """Give Locust's CSV writer one more turn before it closes its files.

    It rewrites the ``--csv`` files once a second and does not write again at shutdown, so
    without this wait the CSV may miss the last second's requests (the summary and
    ``--json-file`` have them). At this point the users have stopped and the workers' final
    reports are in, so the next write is final.
    """
    options = environment.parsed_options
    if options is not None and getattr(options, "csv_prefix", None) and not options.worker:
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.5)
