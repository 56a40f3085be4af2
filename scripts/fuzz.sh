#!/usr/bin/env bash
# Run every fuzz harness of the decoders of outside input (issue #19,
# docs/security.md "Hostile input") with many cases: LAZYLAYER_FUZZ_CASES
# (default here 100000) per decoder, LAZYLAYER_FUZZ_SEED to explore another
# seed. `scripts/test.sh` runs the same harnesses with a bounded share.
set -euo pipefail
cd "$(dirname "$0")/.."
export LAZYLAYER_FUZZ_CASES="${LAZYLAYER_FUZZ_CASES:-100000}"
for target in "-p lazylayer-index --lib" "-p lazylayer-seek --test fuzz" \
    "-p lazylayer-oci --lib" "-p lazylayer-oci --test fuzz" \
    "-p lazylayer-layer --test fuzz" "-p lazylayer-runtime --lib" "-p lazylayer-sys --lib"; do
    # shellcheck disable=SC2086
    cargo test $target -- fuzz_ --nocapture --test-threads=1
done
