#!/usr/bin/env bash
# Today's container stack beside the host's: Debian sid's containerd 2.1,
# Podman 5.8, runc, crun and conmon in a root of their own, so that the
# tests run against both it and the host's (Debian 12: containerd 1.6,
# Podman 4.3) without touching the host's packages.
#
# usage: scripts/stack.sh build       cache the root (debootstrap + packages; ~1 min, once)
#        scripts/stack.sh up          mount what its programs need (idempotent)
#        scripts/stack.sh down        unmount all of it (idempotent)
#        scripts/stack.sh exec CMD... run CMD in the root (chroot)
#        scripts/stack.sh versions    the packages of the root, one per line
#
# LAZYLAYER_SID_ROOT   the root (default /var/cache/lazylayer/sid-root)
# LAZYLAYER_SID_SHARED a directory that is the same inside the root and on
#                      the host, mounts made later included (one peer group):
#                      what both sides must see (a snapshotter's socket and
#                      mounts, a test's directories) goes there
#                      (default /tmp/lazylayer-sid)
#
# Needs root. Programs in the root share the host's network (a registry on
# 127.0.0.1 is reachable) and cgroups. Crun refuses this host's hybrid
# cgroups: use runc there.
set -euo pipefail

ROOT=${LAZYLAYER_SID_ROOT:-/var/cache/lazylayer/sid-root}
SHARED=${LAZYLAYER_SID_SHARED:-/tmp/lazylayer-sid}
MIRROR=${LAZYLAYER_SID_MIRROR:-http://deb.debian.org/debian}
PACKAGES=(containerd podman runc crun conmon fuse-overlayfs skopeo ca-certificates)
STAMP=.lazylayer-stack

say() { echo "stack: $*" >&2; }

is_mount() { mountpoint -q "$1" 2>/dev/null; }

# Mount points at or below $1. A tree with mounts in it (proc, an rbind of
# /sys or /dev) must never be copied or removed: rm -rf through an rbind of
# /dev deletes the host's device nodes.
mounts_below() {
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo
}

build() {
  if [[ -f $ROOT/$STAMP ]] && [[ "$(head -1 "$ROOT/$STAMP")" == "packages: ${PACKAGES[*]}" ]]; then
    return
  fi
  local tmp=$ROOT.building
  if [[ -n "$(mounts_below "$ROOT")$(mounts_below "$tmp")" ]]; then
    say "mounts below $ROOT or $tmp: run 'down' first (nothing removed)"
    exit 1
  fi
  rm -rf "$tmp" "$ROOT"
  mkdir -p "$(dirname "$ROOT")"
  say "debootstrap sid into $tmp (from $MIRROR)"
  debootstrap --variant=minbase sid "$tmp" "$MIRROR" >"$tmp.log" 2>&1 ||
    { tail -20 "$tmp.log" >&2; exit 1; }
  # The sid Release file the package registry serves may have expired.
  echo 'Acquire::Check-Valid-Until "false";' >"$tmp/etc/apt/apt.conf.d/99lazylayer"
  say "installing ${PACKAGES[*]}"
  mount -t proc proc "$tmp/proc"
  local rc=0
  chroot "$tmp" sh -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends ${PACKAGES[*]} && apt-get clean" \
      >>"$tmp.log" 2>&1 || rc=$?
  umount "$tmp/proc"
  ((rc == 0)) || { tail -20 "$tmp.log" >&2; exit 1; }
  [[ -z "$(mounts_below "$tmp")" ]] || { say "mounts left below $tmp"; exit 1; }
  { echo "packages: ${PACKAGES[*]}"; chroot "$tmp" dpkg-query -W "${PACKAGES[@]}"; } >"$tmp/$STAMP"
  mv "$tmp" "$ROOT"
  rm -f "$tmp.log"
  say "built $ROOT"
}

up() {
  [[ -f $ROOT/$STAMP ]] || { say "no stack at $ROOT: run 'build' first"; exit 1; }
  if ! is_mount "$ROOT"; then
    # runc wants the root to be a mount point, and nothing of it to
    # propagate back to the host.
    mount --bind "$ROOT" "$ROOT"
    mount --make-private "$ROOT"
    mount -t proc proc "$ROOT/proc"
    mount --rbind /sys "$ROOT/sys"
    mount --make-rslave "$ROOT/sys"
    mount --rbind /dev "$ROOT/dev"
    mount --make-rslave "$ROOT/dev"
    mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$ROOT/run"
  fi
  # debootstrap writes no /etc/hosts; a host-network pod sandbox copies it.
  [[ -e $ROOT/etc/hosts ]] || printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$ROOT/etc/hosts"
  mkdir -p "$SHARED"
  chmod 0711 "$SHARED"
  if ! is_mount "$SHARED"; then
    mount --bind "$SHARED" "$SHARED"
    mount --make-shared "$SHARED"
  fi
  mkdir -p "$ROOT$SHARED"
  # A bind of a shared mount joins its peer group: a mount made under
  # either path appears under both.
  is_mount "$ROOT$SHARED" || mount --bind "$SHARED" "$ROOT$SHARED"
}

down() {
  if is_mount "$ROOT"; then
    umount -R "$ROOT" || { say "busy; detaching $ROOT"; umount -R -l "$ROOT"; }
  fi
  if is_mount "$SHARED"; then
    umount -R "$SHARED" || { say "busy; detaching $SHARED"; umount -R -l "$SHARED"; }
  fi
  rmdir "$SHARED" 2>/dev/null || true
}

case ${1:-} in
  build) build ;;
  up) up ;;
  down) down ;;
  exec) shift; exec chroot "$ROOT" "$@" ;;
  versions) tail -n +2 "$ROOT/$STAMP" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
