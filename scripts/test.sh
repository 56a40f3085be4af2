#!/usr/bin/env bash
# The test command: install dependencies, check formatting and lints, build,
# and run every test (unit, property and end-to-end against a real registry,
# umoci, podman and the kernel's overlayfs). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --all-targets
# End-to-end tests start registries and mount file systems; two at a time
# keeps the 2-core machine responsive.
cargo test --workspace -- --test-threads=2
# The benchmark's delay relay (HTTP framing, round counting, a live relay in
# front of a real registry): what the RTT axis of bench/ measures with.
python3 -m unittest bench/test_relay.py
