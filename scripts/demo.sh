#!/usr/bin/env bash
# The main job on the embedded default: install what is needed, build lazylayer,
# start a docker-registry on loopback, build a real python3 image from Debian
# packages, push it, and pull it with lazylayer beside podman, printing both times.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec bash bench/pull.sh --runs 3 python3
