"""The benchmark harness in smoke mode: every scenario, server and driver, with counts checked.

Runs ``python -m bench --smoke`` as a real subprocess (real servers, real drivers, loopback
sockets) and checks the structure of its JSON report and its message-count checks. No timing
threshold lives here: the machine is noisy, so speed is judged by the harness's reports, not
by tests. The subprocess timeout only guards against a hang.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("pers100", "conn100", "big10")
#: Always run (the suite's installer provides them); node's smtp-server runs only when present.
REQUIRED_SERVERS = ("mailstorm", "mailstorm-w2", "aiosmtpd", "smtp-sink", "trio-floor")
SERVERS = (*REQUIRED_SERVERS, "node")
DRIVERS = ("smtp-source", "mailstorm load", "mailstorm load pm", "mailstorm load pm p2")
#: A hang guard for the whole smoke run, far above its usual length; not a timing check.
HANG_GUARD = 900


def _smtp_source() -> str | None:
    found = shutil.which("smtp-source")
    if found:
        return found
    return "/usr/sbin/smtp-source" if Path("/usr/sbin/smtp-source").exists() else None


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        _smtp_source() is None,
        reason="Postfix smtp-source is not installed (apt-get install postfix)",
    ),
]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict[str, Any], Path]:
    """Run the smoke bench once: (exit status, its output, the JSON report, the out folder)."""
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )
    output = done.stdout + done.stderr
    reports = sorted(out.glob("*.json"))
    assert len(reports) == 1, output
    return done.returncode, output, json.loads(reports[0].read_text()), out


def _entries(report: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(e["scenario"], e["server"], e["driver"]): e for e in report["throughput"]}


def test_every_scenario_server_and_driver_has_an_entry(smoke: Any) -> None:
    _, output, report, _ = smoke
    entries = _entries(report)
    for scenario in SCENARIOS:
        for server in SERVERS:
            for driver in DRIVERS:
                assert (scenario, server, driver) in entries, (scenario, server, driver, output)
    for scenario in SCENARIOS:
        for server in REQUIRED_SERVERS:
            entry = entries[scenario, server, "smtp-source"]
            assert not entry["skipped"], entry
            assert len(entry["runs"]) == 1, entry


def test_skips_say_why(smoke: Any) -> None:
    _, _, report, _ = smoke
    for entry in report["throughput"]:
        if entry["server"] in REQUIRED_SERVERS:
            # Our own load generator is never skipped: a broken one must fail this test.
            assert not entry["skipped"], entry
        if entry["skipped"]:
            assert entry["runs"] == [], entry
    if not report["servers"]["node"]["available"]:
        assert report["servers"]["node"]["reason"]


def test_server_counts_match_driver_counts(smoke: Any) -> None:
    _, _, report, _ = smoke
    for entry in report["throughput"]:
        if entry["skipped"]:
            continue
        assert entry["count_ok"], entry
        for run in entry["runs"]:
            assert run["delivered"] == run["requested"], (entry["scenario"], entry["server"], run)
            assert run["server_count"] == run["delivered"], (entry["server"], run)
            assert run["msg_s"] and run["msg_s"] > 0, run
            assert run["peak_rss_kib"] > 0, run
    assert report["problems"] == []


def test_connect_storm_and_idle_sessions_cover_every_server(smoke: Any) -> None:
    _, _, report, _ = smoke
    storms = {s["server"]: s for s in report["connect_storm"]}
    idles = {i["server"]: i for i in report["idle_sessions"]}
    assert set(storms) == set(idles) == set(SERVERS)
    for server in REQUIRED_SERVERS:
        storm, idle = storms[server], idles[server]
        assert storm["greeted"] == storm["clients"], storm
        assert storm["p50_ms"] is not None and storm["p99_ms"] >= storm["p50_ms"], storm
        assert idle["opened"] == idle["sessions"], idle
        assert idle["per_session_kib"] is not None, idle


def test_ratios_and_markdown(smoke: Any) -> None:
    _, _, report, out = smoke
    entry = _entries(report)["pers100", "aiosmtpd", "smtp-source"]
    assert entry["msg_s_x_aiosmtpd"] == 1.0
    assert _entries(report)["pers100", "smtp-sink", "smtp-source"]["msg_s_x_smtp_sink"] == 1.0
    markdown = sorted(out.glob("*.md"))
    assert {path.name for path in markdown} >= {"latest.md"}
    assert len(markdown) == 2
    text = (out / "latest.md").read_text()
    for heading in ("## Throughput", "## Connect storm", "## Idle sessions", "## Caveats"):
        assert heading in text


def test_exit_status_reports_success(smoke: Any) -> None:
    status, output, _, _ = smoke
    assert status == 0, output
