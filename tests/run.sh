#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it.
# Used verbatim by the README's test command and by .ci/run.
#   - Debian packages: swaks (with its TLS modules), curl, Postfix (only for its
#     smtp-source/smtp-sink tools; the Postfix MTA is never started), chromium (renders the
#     load generator's HTML report).
#   - Python: this project with its "test" extra, editable.
# Extra arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v swaks >/dev/null || need+=(swaks)
# swaks speaks TLS (STARTTLS, smtps) only with these Perl modules, which are mere
# recommendations of the swaks package and so skipped by --no-install-recommends.
perl -MNet::SSLeay -MIO::Socket::SSL -e1 2>/dev/null || need+=(libnet-ssleay-perl libio-socket-ssl-perl)
command -v curl >/dev/null || need+=(curl)
[ -x /usr/sbin/smtp-source ] && [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # Postfix asks how to configure the MTA; we only want its client tools.
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  # policy-rc.d 101 keeps any service (the Postfix MTA) from being started by the install.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null
fi

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
