"""``python -m bench``: run the side-by-side benchmark and write the reports.

See bench/README.md. Exit status: 0 when every server's message count matched its driver's
and every client was greeted, 1 when anything mismatched or failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from .drivers import DRIVER_NAMES, SCENARIO_NAMES, make_scenarios
from .harness import Settings, run_bench, say
from .report import add_ratios, write_reports
from .servers import SERVER_NAMES

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _names(allowed: tuple[str, ...]):
    """An argparse type: a comma-separated subset of ``allowed``, kept in ``allowed`` order."""

    def parse(text: str) -> tuple[str, ...]:
        wanted = {name.strip() for name in text.split(",") if name.strip()}
        unknown = wanted - set(allowed)
        if unknown or not wanted:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return tuple(name for name in allowed if name in wanted)

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench``."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run mailstorm sink, aiosmtpd, Postfix smtp-sink (and node smtp-server "
        "when installed) side by side under smtp-source and mailstorm load; report msg/s, "
        "MB/s, server CPU per 1000 messages, peak RSS, time-to-banner under a connect storm "
        "and RSS per idle session, with ratios against aiosmtpd and smtp-sink.",
    )
    p.add_argument("--smoke", action="store_true",
                   help="tiny counts, one run each (what CI runs; under a minute)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every scenario's message count (default 1)")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs per (scenario, server, driver); the median is reported "
                   "(default 3, smoke 1)")
    p.add_argument("--scenarios", type=_names(SCENARIO_NAMES), default=SCENARIO_NAMES,
                   help=f"comma-separated subset of {','.join(SCENARIO_NAMES)}")
    p.add_argument("--servers", type=_names(SERVER_NAMES), default=SERVER_NAMES,
                   help=f"comma-separated subset of {','.join(SERVER_NAMES)}")
    p.add_argument("--drivers", type=_names(DRIVER_NAMES), default=DRIVER_NAMES,
                   help=f"comma-separated subset of {','.join(DRIVER_NAMES)}")
    p.add_argument("--storm-clients", type=int, default=None, metavar="N",
                   help="clients connecting at once for time-to-banner "
                   "(default 5000, smoke 200; 0 skips)")
    p.add_argument("--idle-sessions", type=int, default=None, metavar="N",
                   help="idle sessions for RSS per session (default 10000, smoke 200; 0 skips)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="limit for each driver run in seconds (default 300, smoke 60)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"folder for the reports (default {DEFAULT_OUT})")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Fill in the defaults that depend on --smoke."""
    smoke = args.smoke

    def pick(value: float | None, normal: float, small: float) -> float:
        return value if value is not None else (small if smoke else normal)

    return Settings(
        smoke=smoke,
        scale=args.scale,
        repeat=max(1, int(pick(args.repeat, 3, 1))),
        scenarios=make_scenarios(args.scenarios, args.scale, smoke),
        servers=args.servers,
        drivers=args.drivers,
        storm_clients=max(0, int(pick(args.storm_clients, 5000, 200))),
        idle_sessions=max(0, int(pick(args.idle_sessions, 10_000, 200))),
        out=args.out,
        run_timeout=pick(args.timeout, 300.0, 60.0),
    )


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like ^C, so every started server is stopped on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the bench; print where the reports are and any mismatch."""
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        result = run_bench(settings)
    except KeyboardInterrupt:
        print("interrupted; every server started was stopped", file=sys.stderr)
        return 130
    add_ratios(result)
    json_path, md_path = write_reports(result, settings.out)
    say(f"\nreports: {json_path}\n         {md_path}\n         {settings.out / 'latest.md'}")
    if result["problems"]:
        say("\n!!! COUNT MISMATCHES / FAILURES !!!")
        for line in result["problems"]:
            say(f"!!! {line}")
        return 1
    say(f"all counts matched; took {result['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
