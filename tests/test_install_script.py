"""tests/install_debian_packages.sh leaves no policy-rc.d behind.

The script writes a policy-rc.d that exits 101 so that installing Postfix (for its tools)
cannot start the Postfix MTA. Left behind, that file keeps every service on the machine from
starting; it once was, because its removal hung on an EXIT trap that ``exec pytest`` never ran.
Here the script runs against stand-ins for apt-get and debconf-set-selections that record what
they saw, with the policy file pointed into a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "install_debian_packages.sh"
#: Real commands the script uses besides the ones stood in for.
TOOLS = ("bash", "cat", "chmod", "env", "id", "rm", "tee")


def stand_ins(folder: Path, apt_status: int) -> Path:
    """A bin folder with recording apt-get/debconf stand-ins and the real tools; no perl,
    swaks, curl or chromium, so the script finds packages to install."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        real = shutil.which(tool)
        assert real is not None, tool
        (bin_dir / tool).symlink_to(real)
    (bin_dir / "debconf-set-selections").write_text("#!/bin/sh\ncat >/dev/null\n")
    (bin_dir / "apt-get").write_text(
        "#!/bin/sh\n"
        f'echo "$* policy=$(test -x "$POLICY_RC_D" && echo present || echo absent)"'
        f' >> {folder / "apt.log"}\n'
        f'case "$1" in install) exit {apt_status};; esac\n'
    )
    for stub in ("debconf-set-selections", "apt-get"):
        (bin_dir / stub).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("apt_status", [0, 100], ids=["install succeeds", "install fails"])
def test_the_policy_file_is_gone_after_the_install(tmp_path: Path, apt_status: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("the script calls sudo when not root")
    policy = tmp_path / "policy-rc.d"
    bin_dir = stand_ins(tmp_path, apt_status)
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env={"PATH": str(bin_dir), "POLICY_RC_D": str(policy)},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == apt_status, result.stderr
    log = (tmp_path / "apt.log").read_text().splitlines()
    install = [line for line in log if line.startswith("install")]
    assert install and install[0].endswith("policy=present"), log  # in force while installing
    assert not policy.exists()  # and gone afterwards


def test_a_policy_file_that_was_there_before_stays(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the script calls sudo when not root")
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    bin_dir = stand_ins(tmp_path, 0)
    subprocess.run(
        ["bash", str(SCRIPT)],
        env={"PATH": str(bin_dir), "POLICY_RC_D": str(policy)},
        check=True, capture_output=True, timeout=60,
    )
    assert policy.exists()  # someone else's: not ours to remove
