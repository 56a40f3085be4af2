#!/usr/bin/env bash
# Full-pull speed: `lazylayer pull` vs `podman pull` of the same image from the
# same loopback registry, side by side in one run, page cache dropped and both
# stores emptied before every cold pull.
#
#   bench/pull.sh [--runs N] [IMAGE]        IMAGE: python3 (default) | busybox | multilayer
#
# Prints a Markdown table (median of N runs) on stdout; progress on stderr.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=3
IMAGE=python3
while (($#)); do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) IMAGE=$1; shift ;;
  esac
done

log() { printf 'bench: %s\n' "$*" >&2; }
WORK=$(mktemp -d /var/tmp/lazylayer-bench.XXXXXX)
PODMAN=(podman --root "$WORK/podman/root" --runroot "$WORK/podman/run" --storage-driver overlay)
cleanup() {
  "${PODMAN[@]}" system reset -f >/dev/null 2>&1 || true
  bash "$ROOT/images/registry.sh" stop "$WORK/registry" >/dev/null 2>&1 || true
  # podman may leave its overlay mounts behind on a failed run: unmount ours only.
  grep -o " $WORK[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF=$WORK/containers.conf

log "building lazylayer (release)"
cargo build --release -q -p lazylayer --manifest-path "$ROOT/Cargo.toml"
LL=$ROOT/target/release/lazylayer
ADDR=$(bash "$ROOT/images/registry.sh" start "$WORK/registry")
log "registry at $ADDR; building and pushing $IMAGE"
bash "$ROOT/images/build.sh" --registry "$ADDR" "$IMAGE" >/dev/null
REF=$ADDR/lazylayer/$IMAGE:latest

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
now() { date +%s.%N; }

ll_times=() pm_times=()
for ((i = 1; i <= RUNS; i++)); do
  rm -rf "$WORK/ll"; drop_caches
  t0=$(now); "$LL" --root "$WORK/ll" pull -q "$REF" >/dev/null; t1=$(now)
  ll_times+=("$(echo "$t1 - $t0" | bc)")
  "${PODMAN[@]}" system reset -f >/dev/null 2>&1 || true; drop_caches
  t0=$(now); "${PODMAN[@]}" pull -q --tls-verify=false "$REF" >/dev/null; t1=$(now)
  pm_times+=("$(echo "$t1 - $t0" | bc)")
  log "run $i: lazylayer ${ll_times[-1]} s, podman ${pm_times[-1]} s"
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ll=$(median "${ll_times[@]}"); pm=$(median "${pm_times[@]}")
size=$("$LL" --root "$WORK/ll" inspect --json "$REF" | jq .size)
printf '| image | compressed size | lazylayer pull | podman pull | lazylayer / podman |\n'
printf '|---|---:|---:|---:|---:|\n'
printf '| %s | %.1f MB | %.2f s | %.2f s | %.2f |\n' "$IMAGE" "$(echo "$size / 1000000" | bc -l)" "$ll" "$pm" "$(echo "$ll / $pm" | bc -l)"
printf '\nMedian of %d cold runs each, alternating, page cache dropped before each; %s, %s cores, %s.\n' \
  "$RUNS" "$(uname -r)" "$(nproc)" "$(date -u +%Y-%m-%d)"
