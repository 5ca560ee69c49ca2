#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it.
# Used verbatim by the README's test command and by .ci/run.
#   - Debian packages: tests/install_debian_packages.sh (swaks, curl, Postfix's tools, chromium).
#   - Python: this project with its "test" extra, editable.
# Extra arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/install_debian_packages.sh
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -m ruff check .
# The sans-IO core is held to mypy --strict; the trio shells to mypy's defaults.
python3 -m mypy --strict mailstorm/wire
python3 -m mypy mailstorm bench
# The readiness hub is a fast path around trio's own waits: the suites that drive sessions run
# a second time with it switched off (MAILSTORM_NO_HUB=1), the portable path every platform
# without epoll takes. Given arguments (a subset of tests, say), pytest runs once, with them.
if [ $# -gt 0 ]; then
  exec python3 -m pytest -q "$@"
fi
echo "== readiness hub off: sink, load generator and transport suites"
MAILSTORM_NO_HUB=1 python3 -m pytest -q -p no:cacheprovider tests/server tests/loadgen tests/mailstorm
echo "== the whole suite, readiness hub on"
exec python3 -m pytest -q
