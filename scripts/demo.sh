#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine:
#   install what is needed, build lazylayer, start a docker-registry on loopback,
#   build a real python3 image from Debian packages and push it, `optimize` it,
#   then start it cold three ways, side by side, and print the times:
#     - lazylayer run of the optimized image (lazy: boot layer only before start)
#     - lazylayer run of the original image (no boot layer: full pull, then run)
#     - podman pull + podman run of the original image
# Every cold start begins with empty stores and a dropped page cache.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-3}
log() { printf '==> %s\n' "$*" >&2; }

bash "$ROOT/scripts/install-deps.sh"
log "building lazylayer (release)"
cargo build --release -q -p lazylayer --manifest-path "$ROOT/Cargo.toml"
LL=$ROOT/target/release/lazylayer

WORK=$(mktemp -d /var/tmp/lazylayer-demo.XXXXXX)
PODMAN=(podman --root "$WORK/podman/root" --runroot "$WORK/podman/run" --storage-driver overlay)
cleanup() {
  "${PODMAN[@]}" system reset -f >/dev/null 2>&1 || true
  bash "$ROOT/images/registry.sh" stop "$WORK/registry" >/dev/null 2>&1 || true
  grep -o " $WORK[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
printf '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n' >"$WORK/containers.conf"
export CONTAINERS_CONF=$WORK/containers.conf

ADDR=$(bash "$ROOT/images/registry.sh" start "$WORK/registry")
log "registry at $ADDR; building the python3 image from Debian packages (cached after the first time)"
bash "$ROOT/images/build.sh" --registry "$ADDR" python3 >/dev/null
SRC=$ADDR/lazylayer/python3:latest
DST=$ADDR/lazylayer/python3:lazy

log "optimize: tracing the workload and pushing $DST"
"$LL" --root "$WORK/optimize-store" optimize "$SRC" "$DST"

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
now() { date +%s.%N; }
declare -A T
time_it() { # name command...: run cold, record seconds, check the output
  local name=$1 t0 t1 out; shift
  drop_caches
  t0=$(now); out=$("$@"); t1=$(now)
  [[ $out == *ok* ]] || { echo "unexpected output from $name: $out" >&2; exit 1; }
  T[$name]+="$(echo "$t1 - $t0" | bc) "
}
for ((i = 1; i <= RUNS; i++)); do
  rm -rf "$WORK/s1" "$WORK/s2"; "${PODMAN[@]}" system reset -f >/dev/null 2>&1 || true
  time_it lazy "$LL" --root "$WORK/s1" run --rm "$DST"
  time_it full "$LL" --root "$WORK/s2" run --rm "$SRC"
  time_it podman bash -c "${PODMAN[*]} pull -q --tls-verify=false $SRC >/dev/null && ${PODMAN[*]} run --rm --network=none $SRC"
  last() { awk '{print $NF}' <<<"$1"; }
  log "run $i: lazy $(last "${T[lazy]}") s, full $(last "${T[full]}") s, podman $(last "${T[podman]}") s"
done
median() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
pm=$(median "${T[podman]}")
printf '\nCold start of the python3 image (Debian bookworm + python3, %s): seconds until the command returns\n(the workload prints ok and exits), median of %d:\n\n' \
  "$(jq -r '[.layers[].size] | add / 1e6 | floor | tostring + " MB compressed"' < <("$LL" --root "$WORK/s2" inspect --json "$SRC"))" "$RUNS"
printf '| how | seconds | vs podman |\n|---|---:|---:|\n'
for k in lazy full podman; do
  m=$(median "${T[$k]}")
  case $k in
    lazy) label="lazylayer run (optimized image, lazy)" ;;
    full) label="lazylayer run (original image, full pull)" ;;
    podman) label="podman pull + podman run" ;;
  esac
  printf '| %s | %.2f | %.2f |\n' "$label" "$m" "$(echo "$m / $pm" | bc -l)"
done
