"""The ``mailstorm`` console script: ``sink``, ``load`` and ``passwd`` subcommands.

Each subcommand's module is imported only when used, so ``mailstorm sink`` never loads the
load generator and the other way round.
"""

from __future__ import annotations

import sys

USAGE = """\
usage: mailstorm {sink,load,report,passwd,demo} [options]

  sink     run an SMTP sink server (discard, count, or store to Maildir/mbox)
  load     load an SMTP server and report throughput and per-phase latency
  report   merge: one exact report from mailstorm load --json runs on several machines
  passwd   print an auth-file line with a scrypt hash of a password
  demo     a sink plus a short load run against it, with a report and a count check

"mailstorm COMMAND --help" explains each command.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "sink":
        from mailstorm.sink.cli import main as sink_main

        return sink_main(rest, prog="mailstorm sink")
    if command == "load":
        from mailstorm.load.cli import main as load_main

        return load_main(rest)
    if command == "report":
        from mailstorm.load.merge import report_main

        return report_main(rest)
    if command == "passwd":
        from mailstorm.sink.passwd import main as passwd_main

        return passwd_main(rest)
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if command in ("--version", "-V"):
        from importlib.metadata import version

        print(f"mailstorm {version('mailstorm')}")
        return 0
    print(f"mailstorm: error: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2
