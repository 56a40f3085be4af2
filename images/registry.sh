#!/usr/bin/env bash
# Start or stop a throwaway docker-registry (Debian's distribution 2.8) on loopback.
#
#   images/registry.sh start DIR [PORT]   prints 127.0.0.1:PORT once /v2/ answers
#   images/registry.sh stop DIR
#
# DIR holds config.yml, storage/, registry.log (app log + HTTP access log: tests
# read it to assert which blobs were fetched) and registry.pid.
set -euo pipefail

die() { printf 'registry.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { printf 'usage: registry.sh start DIR [PORT] | stop DIR\n' >&2; exit 2; }

# A port the kernel just handed out is very likely still free a moment later; if it
# is taken meanwhile, the registry exits and start reports it.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# True if PID is alive and is a docker-registry (guards against a reused PID).
is_registry() {
  local pid=$1 cmd
  [[ -r /proc/$pid/cmdline ]] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline")
  [[ $cmd == *docker-registry* ]]
}

start() {
  local dir=$1 port=${2:-} pid i
  command -v docker-registry >/dev/null || die "docker-registry not installed"
  mkdir -p "$dir/storage"
  dir=$(realpath "$dir")
  if [[ -f $dir/registry.pid ]] && is_registry "$(<"$dir/registry.pid")"; then
    die "a registry is already running from $dir (pid $(<"$dir/registry.pid"))"
  fi
  if [[ -z $port ]]; then
    port=$(free_port)
  fi
  [[ $port =~ ^[0-9]+$ ]] || die "bad port '$port'"
  # accesslog stays enabled (the default, said explicitly): one line per request
  # in combined log format, e.g. "GET /v2/lazylayer/busybox/blobs/sha256:... 200".
  cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
  # stdin/stdout/stderr detached from the caller, so `addr=$(registry.sh start D)`
  # returns instead of waiting for the daemon to close the pipe.
  docker-registry serve "$dir/config.yml" </dev/null >>"$dir/registry.log" 2>&1 &
  pid=$!
  echo "$pid" >"$dir/registry.pid"
  for ((i = 0; i < 100; i++)); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$port/v2/" 2>/dev/null; then
      echo "127.0.0.1:$port"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 20 "$dir/registry.log" >&2 || true
      rm -f "$dir/registry.pid"
      die "docker-registry exited (port $port taken?)"
    fi
    sleep 0.1
  done
  kill "$pid" 2>/dev/null || true
  rm -f "$dir/registry.pid"
  die "docker-registry did not answer on 127.0.0.1:$port/v2/ within 10 s"
}

stop() {
  local dir=$1 pid i
  [[ -f $dir/registry.pid ]] || die "no $dir/registry.pid"
  pid=$(<"$dir/registry.pid")
  if is_registry "$pid"; then
    kill "$pid"
    # Not our child any more: poll instead of `wait`; SIGKILL after 10 s.
    for ((i = 0; i < 100; i++)); do
      is_registry "$pid" || break
      sleep 0.1
    done
    if is_registry "$pid"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$dir/registry.pid"
}

(($# >= 2)) || usage
case $1 in
  start) (($# <= 3)) || usage; start "$2" "${3:-}" ;;
  stop) (($# == 2)) || usage; stop "$2" ;;
  *) usage ;;
esac
