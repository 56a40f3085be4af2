#!/usr/bin/env bash
# The lazy-pulling peers the benchmark runs beside lazylayer, set up from
# package registries only and cached, so that a fresh machine needs no step
# by hand:
#
#   nydus   nydusd, nydus-image, nydusctl: crates.io's nydus-rs (cargo install,
#           ~4-6 min on 2 cores, once; needs Debian's cmake for libz-sys);
#           containerd-nydus-grpc (the nydus snapshotter) from Debian sid's
#           nydus-snapshotter .deb, and ctr-remote (pulls a nydus image into
#           containerd; plain ctr 1.6 has no processor for nydus blobs) from
#           sid's stargz-snapshotter .deb, both unpacked with dpkg -x (Go,
#           libc only: they run on this host). The .debs come through the apt of
#           scripts/stack.sh's sid root (built if it is not).
#   estargz containerd-stargz-grpc (the stargz snapshotter): Debian packages only
#           ctr-remote, not the daemon, and bookworm's Go packages are too old
#           for it (containerd 1.7's API, grpc, go-json), so it is built offline
#           (GOPROXY=off, GOPATH mode) in a throwaway sid root from sid's Go
#           packages, the daemon's own main package taken from the source
#           package (apt-get source); ~6 min, once. ctr-remote converts.
#
# usage: bench/peers.sh setup      build or reuse the cache; prints its dir
#        bench/peers.sh versions   one "name version" line per tool
#
# LAZYLAYER_PEERS   the cache (default /var/cache/lazylayer/peers)
# Needs root (apt, the sid root's chroot).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${LAZYLAYER_PEERS:-/var/cache/lazylayer/peers}
SID_ROOT=${LAZYLAYER_SID_ROOT:-/var/cache/lazylayer/sid-root}
NYDUS_RS_VERSION=2.2.0
DEBS=(nydus-snapshotter stargz-snapshotter)

say() { echo "peers: $*" >&2; }

nydus_rs() {
  local bin=$PEERS/nydus/bin
  if [[ -x $bin/nydusd && -x $bin/nydus-image && -f $PEERS/nydus/.version ]] &&
    [[ $(<"$PEERS/nydus/.version") == "$NYDUS_RS_VERSION" ]]; then
    return
  fi
  if ! command -v cmake >/dev/null; then
    say "installing cmake (libz-sys builds zlib-ng with it)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cmake >/dev/null ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cmake >/dev/null; }
  fi
  say "building nydus-rs $NYDUS_RS_VERSION from crates.io (cargo install; ~5 min, once)"
  local tmp=$PEERS/nydus.building
  rm -rf "$tmp"
  mkdir -p "$tmp"
  CARGO_TARGET_DIR=$tmp/target cargo install -q --locked nydus-rs --version "$NYDUS_RS_VERSION" \
    --root "$tmp" >"$tmp.log" 2>&1 || { tail -20 "$tmp.log" >&2; exit 1; }
  rm -rf "$tmp/target" "$PEERS/nydus"
  echo "$NYDUS_RS_VERSION" >"$tmp/.version"
  mv "$tmp" "$PEERS/nydus"
  rm -f "$tmp.log"
}

mounts_below() {
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo
}

# Go packages the daemon imports (GOPATH mode finds them in /usr/share/gocode).
GO_PACKAGES=(golang-go golang-github-containerd-stargz-snapshotter-dev golang-github-coreos-bbolt-dev
  golang-github-goccy-go-json-dev golang-github-docker-docker-dev ca-certificates)

stargz_grpc() {
  local ver out=$PEERS/estargz b=$PEERS/go-build mirror rc=0
  ver=$(awk '$1 == "stargz-snapshotter" {print $2}' "$PEERS/debs/.versions")
  if [[ -x $out/containerd-stargz-grpc && $(cat "$out/.version" 2>/dev/null) == "$ver" ]]; then
    return
  fi
  [[ -z "$(mounts_below "$b")" ]] || { say "mounts below $b: unmount them first (nothing removed)"; exit 1; }
  rm -rf "$b"
  mkdir -p "$b"
  # The mirror the sid root was built from.
  mirror=$(awk '$1 == "deb" {print $2; exit}' "$SID_ROOT/etc/apt/sources.list")
  say "building containerd-stargz-grpc $ver from sid's Go packages in $b (~6 min, once)"
  debootstrap --variant=minbase sid "$b/root" "$mirror" >"$b.log" 2>&1 || { tail -20 "$b.log" >&2; exit 1; }
  cp "$SID_ROOT/etc/apt/apt.conf.d/99lazylayer" "$b/root/etc/apt/apt.conf.d/"
  sed -n 's/^deb /deb-src /p' "$b/root/etc/apt/sources.list" >>"$b/root/etc/apt/sources.list"
  mount -t proc proc "$b/root/proc"
  chroot "$b/root" env DEBIAN_FRONTEND=noninteractive VER="$ver" sh -euc '
    apt-get update -q
    apt-get install -y -q --no-install-recommends '"${GO_PACKAGES[*]}"'
    mkdir -p /build/src && cd /build/src
    # The binary packages leave the daemon out; the source package has it. The mirror
    # may lack some of its files (the .dsc): apt checks what it gets against the
    # signed index and keeps only what matches.
    apt-get source --download-only golang-github-containerd-stargz-snapshotter || true
    orig=$(ls ./*.orig.tar.gz)
    G=/build/gopath/src/github.com
    mkdir -p $G/containerd/stargz-snapshotter/cmd $G/coreos/go-systemd
    tar xzf "$orig" -C $G/containerd/stargz-snapshotter/cmd --strip-components=2 \
      --wildcards "*/cmd/containerd-stargz-grpc"
    # Debian installs the module github.com/coreos/go-systemd/v22 without its /v22.
    ln -sfn /usr/share/gocode/src/github.com/coreos/go-systemd $G/coreos/go-systemd/v22
    cd $G/containerd/stargz-snapshotter/cmd
    up=${VER%-*}
    env GOPATH=/build/gopath:/usr/share/gocode GO111MODULE=off GOPROXY=off GOTOOLCHAIN=local \
      GOCACHE=/build/gocache CGO_ENABLED=0 go build -trimpath -ldflags "-s -w \
      -X github.com/containerd/stargz-snapshotter/version.Version=v$up \
      -X github.com/containerd/stargz-snapshotter/version.Revision=debian-$VER" \
      -o /build/containerd-stargz-grpc ./containerd-stargz-grpc' >>"$b.log" 2>&1 || rc=$?
  umount "$b/root/proc"
  ((rc == 0)) || { tail -20 "$b.log" >&2; exit 1; }
  mkdir -p "$out"
  cp "$b/root/build/containerd-stargz-grpc" "$out/"
  echo "$ver" >"$out/.version"
  [[ -z "$(mounts_below "$b")" ]] && rm -rf "$b" "$b.log"
}

debs() {
  local stamp=$PEERS/debs/.versions want have
  [[ -f $SID_ROOT/.lazylayer-stack ]] || bash "$ROOT/scripts/stack.sh" build
  # The versions the sid root's apt offers now; a cache of other versions is replaced.
  want=$(chroot "$SID_ROOT" apt-cache policy "${DEBS[@]}" 2>/dev/null | awk '/^[^ ]/ {p=$1; sub(/:$/, "", p)} /Candidate:/ {print p, $2}')
  have=$(cat "$stamp" 2>/dev/null || true)
  if [[ -n $have && ( -z $want || $want == "$have" ) && -x $PEERS/debs/usr/bin/containerd-nydus-grpc ]]; then
    return
  fi
  say "downloading ${DEBS[*]} through the sid root's apt"
  local dl=$SID_ROOT/var/cache/lazylayer-peer-debs
  rm -rf "$dl" "$PEERS/debs.new"
  mkdir -p "$dl" "$PEERS/debs.new"
  chroot "$SID_ROOT" sh -c "apt-get update -qq && cd /var/cache/lazylayer-peer-debs && apt-get download -q ${DEBS[*]}" \
    >"$PEERS/debs.log" 2>&1 || { tail -20 "$PEERS/debs.log" >&2; exit 1; }
  local d
  for d in "$dl"/*.deb; do dpkg -x "$d" "$PEERS/debs.new"; done
  rm -rf "$dl"
  chroot "$SID_ROOT" apt-cache policy "${DEBS[@]}" | awk '/^[^ ]/ {p=$1; sub(/:$/, "", p)} /Candidate:/ {print p, $2}' >"$PEERS/debs.new/.versions"
  rm -rf "$PEERS/debs"
  mv "$PEERS/debs.new" "$PEERS/debs"
  rm -f "$PEERS/debs.log"
}

setup() {
  mkdir -p "$PEERS"
  chmod 0700 "$PEERS"
  nydus_rs
  debs
  stargz_grpc
  # One bin dir of what the benchmark runs.
  mkdir -p "$PEERS/bin"
  local t
  for t in nydusd nydus-image nydusctl; do ln -sfn "../nydus/bin/$t" "$PEERS/bin/$t"; done
  for t in containerd-nydus-grpc ctr-remote; do ln -sfn "../debs/usr/bin/$t" "$PEERS/bin/$t"; done
  ln -sfn ../estargz/containerd-stargz-grpc "$PEERS/bin/containerd-stargz-grpc"
  echo "$PEERS"
}

versions() {
  echo "nydus-rs $(<"$PEERS/nydus/.version")"
  cat "$PEERS/debs/.versions"
  echo "containerd-stargz-grpc $(<"$PEERS/estargz/.version")"
}

case ${1:-} in
  setup) setup ;;
  versions) versions ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
