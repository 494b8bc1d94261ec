#!/usr/bin/env bash
# Make an OpenSSH server binary present for the drill fleet (issue 13), idempotently.
# The drill never starts the system's sshd service: each drill "host" is an sshd process of
# its own on a loopback port, started by runbook/drill/fleet.py. On Debian as root: install
# Debian's openssh-server when sshd is absent. Elsewhere: one clear message.
set -euo pipefail

log() { printf 'ensure-sshd: %s\n' "$*" >&2; }
die() { printf 'ensure-sshd: error: %s\n' "$*" >&2; exit 3; }

find_sshd() {
  command -v sshd 2>/dev/null && return 0
  for p in /usr/sbin/sshd /usr/local/sbin/sshd; do [ -x "$p" ] && { echo "$p"; return 0; }; done
  return 1
}

if ! sshd_path=$(find_sshd); then
  if [ "$(id -u)" = 0 ] && [ -r /etc/debian_version ] && command -v apt-get >/dev/null; then
    log "installing Debian's openssh-server (sshd) and openssh-client"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    # policy-rc.d 101: the package must not start the system sshd service; the drill runs
    # its own sshd processes on loopback ports only.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"
      trap 'rm -f "$policy"' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      openssh-server openssh-client >/dev/null
    sshd_path=$(find_sshd) || die "openssh-server installed but sshd is still not found"
  else
    die "sshd (OpenSSH server) is missing and this is not Debian as root; install openssh-server (the drill fleet runs its own sshd on loopback ports), then run make again"
  fi
fi
command -v ssh >/dev/null 2>&1 || die "ssh (OpenSSH client) is missing; install openssh-client, then run make again"
log "ok: $sshd_path ($("$sshd_path" -V 2>&1 | head -1 || true))"
