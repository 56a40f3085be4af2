#!/usr/bin/env bash
# Install what lazylayer's build, tests and demo need on a Debian 12 machine.
# Idempotent: installs only what is missing, so a prepared machine pays nothing.
set -euo pipefail

PACKAGES=(
  docker-registry   # the real OCI registry tests and demos push to (loopback only)
  skopeo umoci      # build and push test images without any hub
  debootstrap busybox-static  # real root file systems for test images
  runc podman       # the OCI runtime, and podman as a peer to compare with
  containerd        # containerd + ctr, the other peer
  fuse-overlayfs    # benchmark peer
  apache2-utils     # htpasswd: a registry with Basic auth in tests
  protobuf-compiler libprotobuf-dev  # protoc + google/protobuf/*.proto: the snapshotter's gRPC codegen
  systemd           # systemd-analyze: the units in packaging/systemd are verified
  zstd              # the nydus peer's blob entries (bench/peers.py) and their tests
  curl jq bc openssl iproute2 util-linux python3 ca-certificates
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # With recommends: that is the configuration the tests were run with (podman, containerd).
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt >/dev/null 2>&1 || true
