#!/usr/bin/env bash
# The test command: install dependencies, check formatting and lints, build,
# and run every test (unit, property and end-to-end against a real registry,
# umoci, podman, containerd 1.6 and 2.1 and the kernel's overlayfs). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
# Today's stack (Debian sid: containerd 2.1, Podman 5.8) in a root of its
# own, cached after the first build (~1 min): the integration tests run
# against it beside the host's. Unmounted when the tests end.
bash scripts/stack.sh build
bash scripts/stack.sh up
trap 'bash scripts/stack.sh down' EXIT
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --all-targets
# End-to-end tests start registries and mount file systems; two at a time
# keeps the 2-core machine responsive.
cargo test --workspace -- --test-threads=2
# The benchmark's delay relay (HTTP framing, round counting, a live relay in
# front of a real registry): what the RTT axis of bench/ measures with; and
# its peers' image helpers (bench/peers.py).
python3 -m unittest bench/test_relay.py bench/test_peers.py
