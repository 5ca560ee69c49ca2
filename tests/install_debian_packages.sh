#!/usr/bin/env bash
# Install the Debian packages the test suite needs, when they are missing:
#   - swaks (with its TLS modules), curl;
#   - Postfix, only for its smtp-source/smtp-sink tools: the Postfix MTA is never started;
#   - chromium, which renders the load generator's HTML report;
#   - haproxy, which the PROXY protocol tests start on loopback ports (never as a service);
#   - jq, which reads the sink's JSON logs in a test.
# Called by tests/run.sh. POLICY_RC_D names the policy-rc.d file (a test points it elsewhere).
set -euo pipefail

need=()
command -v swaks >/dev/null || need+=(swaks)
# swaks speaks TLS (STARTTLS, smtps) only with these Perl modules, which are mere
# recommendations of the swaks package and so skipped by --no-install-recommends.
perl -MNet::SSLeay -MIO::Socket::SSL -e1 2>/dev/null || need+=(libnet-ssleay-perl libio-socket-ssl-perl)
command -v curl >/dev/null || need+=(curl)
[ -x /usr/sbin/smtp-source ] && [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
command -v chromium >/dev/null || need+=(chromium)
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null || need+=(haproxy)
command -v jq >/dev/null || need+=(jq)
[ ${#need[@]} -gt 0 ] || exit 0

echo "installing Debian packages: ${need[*]}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
policy=${POLICY_RC_D:-/usr/sbin/policy-rc.d}
# Postfix asks how to configure the MTA; we only want its client tools.
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -qq
# A policy-rc.d that exits 101 keeps any service (the Postfix MTA) from being started by the
# install. It is removed as soon as the install is over, failed or not: left behind, it would
# keep every service on the machine from starting.
created=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  created=yes
fi
status=0
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  "${need[@]}" >/dev/null || status=$?
[ -z "$created" ] || $SUDO rm -f "$policy"
exit $status
