#!/usr/bin/env bash
# Make headless Chromium available for tests/test_browser.py, idempotently.
# On Debian as root: install Debian's `chromium` package when /usr/bin/chromium is missing.
# Elsewhere: one line saying what to install (the browser test then fails with the same advice).
set -euo pipefail

log() { printf 'ensure-chromium: %s\n' "$*" >&2; }

if [ -n "${RUNBOOK_CHROMIUM:-}" ] && [ -x "${RUNBOOK_CHROMIUM}" ]; then
  exit 0
fi
if [ -x /usr/bin/chromium ]; then
  exit 0
fi

os_id=$(. /etc/os-release 2>/dev/null && printf '%s' "${ID:-}")
if [ "$os_id" = debian ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  log "installing Debian's chromium package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
  [ -x /usr/bin/chromium ] || { log "error: chromium installed but /usr/bin/chromium is missing"; exit 3; }
  log "ok: $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
  exit 0
fi

log "headless Chromium is missing: install Debian's 'chromium' package (sudo apt-get install chromium) or set RUNBOOK_CHROMIUM=/path/to/chromium; the browser test fails until then"
