#!/usr/bin/env bash
# Make a Docker engine and the Compose v2 plugin answer on this machine, idempotently.
# On Debian as root: install docker.io when absent, start dockerd when it is not running,
# install Compose v2 from Debian trixie's docker-compose package (same mirror as the
# machine's own apt sources; no host name is written here). Elsewhere: one clear message.
set -euo pipefail

log() { printf 'ensure-docker: %s\n' "$*" >&2; }
die() { printf 'ensure-docker: error: %s\n' "$*" >&2; exit 3; }

is_debian_root() { [ "$(id -u)" = 0 ] && [ -r /etc/debian_version ] && command -v apt-get >/dev/null; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null; apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# 1. the engine
if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null 2>&1; then
    is_debian_root || die "no Docker engine answers and this is not Debian as root; install Docker Engine (https://docs.docker.com/engine/install/) and start it, then run make again"
    log "installing Debian's docker.io"
    apt_install docker.io
  fi
  if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "dockerd is installed but not running and we are not root; start it (sudo systemctl start docker) and run make again"
    log "starting dockerd in the background (log: /var/log/dockerd.log)"
    rm -f /var/run/docker.pid
    # a session of its own: a Ctrl-C of `make test`, or the end of the job that ran make (a
    # process-group kill), must not take the engine down with it (nohup alone kept it in
    # make's process group: dockerd got the SIGINT and stopped every drill container)
    setsid nohup dockerd >/var/log/dockerd.log 2>&1 </dev/null &
    for _ in $(seq 1 150); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
    docker info >/dev/null 2>&1 || die "dockerd did not answer within 30 s; see /var/log/dockerd.log"
  fi
fi

# 2. Compose v2 (>= 2.20 for --wait and pull_policy)
compose_ok() {
  local v
  v=$(docker compose version --short 2>/dev/null) || return 1
  v=${v#v}
  local major=${v%%.*} rest=${v#*.}; local minor=${rest%%.*}
  [ "$major" -gt 2 ] || { [ "$major" = 2 ] && [ "$minor" -ge 20 ]; }
}
if ! compose_ok; then
  is_debian_root || die "Docker Compose v2.20+ is missing or too old; install the docker-compose-plugin package, then run make again"
  log "installing the Compose v2 plugin from Debian trixie's docker-compose package"
  mirror=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    mirror=$(awk '/^URIs:/ {print $2; exit}' "$f" | grep -v security || true)
    [ -n "$mirror" ] && break
  done
  if [ -z "$mirror" ] && [ -r /etc/apt/sources.list ]; then
    mirror=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
  fi
  [ -n "$mirror" ] || die "cannot find the machine's Debian mirror in the apt sources; install Compose v2 by hand"
  tmp=$(mktemp -d); chmod 755 "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/lists/partial" "$tmp/archives/partial"
  cat >"$tmp/trixie.sources" <<SRC
Types: deb
URIs: $mirror
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  opts=(-o "Dir::Etc::sourcelist=$tmp/trixie.sources" -o "Dir::Etc::sourceparts=-" -o "Dir::State::lists=$tmp/lists" -o "Dir::Cache::archives=$tmp/archives")
  apt-get "${opts[@]}" update -qq >/dev/null
  (cd "$tmp" && apt-get "${opts[@]}" download docker-compose >/dev/null)
  dpkg -x "$tmp"/docker-compose_*.deb "$tmp/x"
  install -D -m 0755 "$tmp/x/usr/libexec/docker/cli-plugins/docker-compose" /usr/libexec/docker/cli-plugins/docker-compose
  compose_ok || die "Compose v2 plugin installed but 'docker compose version' still fails"
fi
log "ok: $(docker version --format 'engine {{.Server.Version}}') $(docker compose version --short)"
