"""Installed, the project is one package: ``mailstorm``.

The source folders keep the design card's layout (``server/``, ``loadgen/``, the core
``smtpwire/``), but nothing named ``server`` or ``loadgen`` may land in site-packages, where it
would collide with anything else of that name. This builds the wheel, installs it into a fresh
virtual environment and looks at what it added.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(out), str(ROOT)],
        check=True, timeout=300,
    )
    (path,) = out.glob("mailstorm-*.whl")
    return path


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/", 1)[0] for name in zf.namelist()}
        names = set(zf.namelist())
    assert {t for t in tops if not t.endswith(".dist-info")} == {"mailstorm"}
    # The symbolic links were followed: real modules, not links, are in the wheel.
    for module in ("mailstorm/wire/server.py", "mailstorm/sink/app.py", "mailstorm/load/cli.py",
                   "mailstorm/_net/readiness.py"):
        assert module in names


def test_installed_into_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    env = tmp_path / "venv"
    # No pip in the venv and no dependencies: what the wheel itself adds is what is looked at.
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    before = set(Path(purelib).iterdir())
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
         "--target", purelib, str(wheel)],
        check=True, timeout=300,
    )
    added = {p.name for p in set(Path(purelib).iterdir()) - before}
    # --target puts the console script in a bin/ beside the packages.
    assert {n for n in added if not n.endswith(".dist-info")} - {"bin"} == {"mailstorm"}
    # The sans-IO core needs nothing but the standard library: it imports in the bare venv,
    # from the installed copy rather than this checkout.
    # Without PYTHONPATH, which would put a checkout ahead of the venv.
    bare_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run(
        [str(python), "-c",
         "import mailstorm.wire.server as s, mailstorm.wire.client; print(s.__file__)"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=bare_env,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(purelib)
