#!/usr/bin/env bash
# The start-time benchmark: lazylayer (`run`, and containerd + `lazylayer snapshotter`)
# vs podman vs containerd over shaped links, the file-system overhead once every layer
# is local, and the cost of `optimize`.
#
#   bash bench/run.sh [--quick] [--runs N] [--out DIR]
#                     [--images LIST] [--links LIST] [--all-cells] [--no-fs] [--fs-reps N] [--no-build]
#                     [--baseline BIN] [--rtts LIST] [--rtt-links LIST] [--relay-shaping S]
#                     [--contenders LIST] [--sid] [--peers]
#
#   --quick       1 run; every image at loopback and 100 Mbit only; file-system
#                 section on python3, 1 repetition. ~13 min here (images cached).
#   --runs N      cold runs per cell and contender (default 3; the median is reported)
#   --out DIR     where latest.{json,md,png} go (default bench/results)
#   --images L    comma list of busybox,minbase,python3,nginx,redis,gcc,pydev (default all)
#   --links L     comma list of loopback,1gbit,100mbit,10mbit (default all)
#   --all-cells   also run gcc and pydev at 10 Mbit (skipped by default: ~3-4 min
#                 per cold pull)
#   --no-fs       skip section 2 (file-system overhead)
#   --fs-image I  the image of section 2 (default gcc; python3 with --quick)
#   --fs-reps N   repetitions of section 2 (default 3; 1 with --quick)
#   --no-build    use the existing target/release/lazylayer (no cargo build)
#   --baseline B  also time an older lazylayer binary B side by side in the same run
#                 (lazylayer run, and the FUSE root in section 2): a change's regression check,
#                 e.g. a release build of the commit before a refactor; it optimizes
#                 an image of its own (:optimized-base) and runs that one
#   --rtts L      comma list of round-trip times in ms (e.g. 0,20,80): the links of
#                 --rtt-links are measured once per RTT, every contender fetching through
#                 bench/relay.py (a delay relay in the namespace, in front of the
#                 registry). Without it nothing changes: no relay, as before.
#   --rtt-links L the links --rtts applies to (default 1gbit,100mbit); the others keep
#                 RTT 0 without the relay
#   --relay-shaping S  client-hop (default: only the relay <-> client hop shaped, at the
#                 nominal rate) or double (one tbf at twice the rate over both hops)
#   --contenders L  a comma list of podman,containerd,containerd-lazylayer,lazylayer,
#                 lazylayer-attached (SRC unchanged, `optimize --attach`), lazylayer-unopt
#                 (default all; lazylayer-base comes with --baseline),
#                 podman-sid, containerd-sid, containerd-sid-lazylayer (need --sid),
#                 nydus, estargz (need --peers), podman-sid-zstdchunked (--sid and --peers)
#   --sid         also time podman-sid, containerd-sid and containerd-sid-lazylayer:
#                 Debian sid's Podman 5.8 and containerd 2.1 from the chroot root of
#                 scripts/stack.sh (built if it is not, brought up for the run and down
#                 after it unless it was up), their stores in a fresh dir of its shared
#                 dir (LAZYLAYER_SID_ROOT, LAZYLAYER_SID_SHARED as for stack.sh);
#                 a --contenders list that names sid contenders gets only those
#   --peers       also time the lazy-pulling peers: nydus (nydus-snapshotter +
#                 nydusd under the host's containerd) and estargz (the stargz
#                 snapshotter under it), set up by bench/peers.sh
#                 (cached in LAZYLAYER_PEERS, default /var/cache/lazylayer/peers;
#                 the first set-up builds nydus-rs and the stargz snapshotter,
#                 ~11 min), each image converted
#                 with the peer's own tool and prefetch list from lazylayer's trace;
#                 with --sid also podman-sid-zstdchunked (Podman 5.8 pulling a
#                 zstd:chunked image, partial pulls on)
#
# LAZYLAYER_RUN_ARGS="--prefetch off" (say) adds options to every `lazylayer run`
# the harness times, for side experiments; the default tables never set it.
# LLBENCH_LOGS=DIR keeps each timed command's stderr there (with RUST_LOG, say
# RUST_LOG=lazylayer_fetch=debug for the start set's plan) instead of in the work dir.
#
# Needs root. Everything runs in a network namespace of its own (llbench-PID) whose
# loopback is shaped with tc tbf; the registry, containerd, the lazylayer snapshotter
# and every client and container live inside it. The trap removes the namespace, the
# daemons it started (by PID), the podman/containerd/lazylayer stores and every mount
# under its work dir.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=/usr/bin/python3 # Debian's python3 (matplotlib from apt), not a pyenv shim

QUICK=0 RUNS='' OUT=$ROOT/bench/results IMAGES='' LINKS='' ALL_CELLS=0 FS=1 BUILD=1 BASELINE=''
RTTS='' RTT_LINKS=1gbit,100mbit RELAY_SHAPING=client-hop CONTENDERS='' SID=0 PEERS=0
# bench.py's default list (its CONTENDERS), which --sid and --peers extend.
DEFAULT_CONTENDERS=podman,containerd,containerd-lazylayer,lazylayer,lazylayer-attached,lazylayer-unopt
while (($#)); do
  case $1 in
    --quick) QUICK=1; shift ;;
    --runs) RUNS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --images) IMAGES=$2; shift 2 ;;
    --links) LINKS=$2; shift 2 ;;
    --all-cells) ALL_CELLS=1; shift ;;
    --no-fs) FS=0; shift ;;
    --no-build) BUILD=0; shift ;;
    --baseline) BASELINE=$(realpath "$2"); shift 2 ;;
    --fs-image) FS_IMAGE_ARG=$2; shift 2 ;;
    --fs-reps) FS_REPS_ARG=$2; shift 2 ;;
    --rtts) RTTS=$2; shift 2 ;;
    --rtt-links) RTT_LINKS=$2; shift 2 ;;
    --relay-shaping) RELAY_SHAPING=$2; shift 2 ;;
    --contenders) CONTENDERS=$2; shift 2 ;;
    --sid) SID=1; shift ;;
    --peers) PEERS=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
log() { printf 'run.sh: %s\n' "$*" >&2; }
((EUID == 0)) || { log "must run as root"; exit 1; }

if ((QUICK)); then
  : "${RUNS:=1}" "${IMAGES:=busybox,minbase,python3,nginx,redis,gcc,pydev}" "${LINKS:=loopback,100mbit}"
  FS_IMAGE=python3 FS_REPS=1 FS_READS=5000
else
  : "${RUNS:=3}" "${IMAGES:=busybox,minbase,python3,nginx,redis,gcc,pydev}" "${LINKS:=loopback,1gbit,100mbit,10mbit}"
  FS_IMAGE=gcc FS_REPS=3 FS_READS=20000
fi
[[ -z ${FS_IMAGE_ARG:-} ]] || FS_IMAGE=$FS_IMAGE_ARG
[[ -z ${FS_REPS_ARG:-} ]] || FS_REPS=$FS_REPS_ARG
SID_ROOT=${LAZYLAYER_SID_ROOT:-/var/cache/lazylayer/sid-root}
SID_SHARED=${LAZYLAYER_SID_SHARED:-/tmp/lazylayer-sid}
if ((SID)); then
  # bench.py's default list (CONTENDERS) and the sid stack's three, unless --contenders
  # names sid contenders itself.
  if [[ ,$CONTENDERS, != *-sid* ]]; then
    CONTENDERS=${CONTENDERS:-$DEFAULT_CONTENDERS}
    CONTENDERS+=,podman-sid,containerd-sid,containerd-sid-lazylayer
  fi
fi
if ((PEERS)); then
  CONTENDERS=${CONTENDERS:-$DEFAULT_CONTENDERS}
  [[ ,$CONTENDERS, == *,nydus,* ]] || CONTENDERS+=,nydus
  [[ ,$CONTENDERS, == *,estargz,* ]] || CONTENDERS+=,estargz
  ((!SID)) || [[ ,$CONTENDERS, == *,podman-sid-zstdchunked,* ]] || CONTENDERS+=,podman-sid-zstdchunked
fi
((FS)) || FS_REPS=0
SKIP=
if ((!ALL_CELLS)); then
  SKIP="gcc@10mbit=skipped by default: 266 MB compressed is ~4 min per cold pull per contender (--all-cells runs it)"
  SKIP+=";pydev@10mbit=skipped by default: 212 MB compressed is ~3 min per cold pull per contender (--all-cells runs it)"
fi

# --- dependencies (like scripts/install-deps.sh; python3-matplotlib for the chart) ----
PACKAGES=(docker-registry skopeo umoci debootstrap busybox-static runc podman containerd zstd nghttp2-client
  fuse-overlayfs python3 python3-matplotlib curl jq iproute2 util-linux)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

LL=$ROOT/target/release/lazylayer
if ((BUILD)); then
  log "building lazylayer (release)"
  cargo build --release -q -p lazylayer --manifest-path "$ROOT/Cargo.toml"
else
  [[ -x $LL ]] || { log "--no-build: $LL does not exist"; exit 1; }
  log "--no-build: using $LL as built $(date -r "$LL" -u +%Y-%m-%dT%H:%MZ)"
fi

PEERS_DIR='' PEER_VERSIONS=''
if [[ ,$CONTENDERS, == *,nydus,* || ,$CONTENDERS, == *,estargz,* ]]; then
  # Outside the namespace (crates.io, apt): the peers' tools, cached.
  PEERS_DIR=$(bash "$ROOT/bench/peers.sh" setup)
  PEER_VERSIONS=$(bash "$ROOT/bench/peers.sh" versions | jq -Rn '[inputs | split(" ") | {(.[0]): .[1]}] | add')
  log "peers: $(echo "$PEER_VERSIONS" | jq -c .)"
fi

# Images are built outside the namespace (debootstrap and apt need the mirror) and
# cached; only the push happens inside.
((FS_REPS)) || FS_IMAGE=
# Section 2's server case serves nginx.
ALL_IMAGES=$(printf '%s\n' "${IMAGES//,/ }" "$FS_IMAGE" ${FS_IMAGE:+nginx} | tr ' ' '\n' | awk 'NF && !s[$0]++' | tr '\n' ' ')
log "images: $ALL_IMAGES(cached by images/build.sh)"
# shellcheck disable=SC2086
bash "$ROOT/images/build.sh" $ALL_IMAGES >/dev/null

# --- the namespace, the registry, and the trap that removes them --------------------
WORK=$(mktemp -d /var/tmp/llbench.XXXXXX)
NS=llbench-$$
BENCH_PID=
NSENTER=(nsenter "--net=/var/run/netns/$NS")
SID_WORK='' SID_BROUGHT_UP=0

sid_is_up() { [[ -f $SID_ROOT/.lazylayer-stack ]] && mountpoint -q "$SID_ROOT$SID_SHARED"; }

# Mount points below $1, deepest first (the sid work dir seen from the host or the root).
mounts_below() {
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

# The sid work dir: the processes that name it (containerd, its shims, the snapshotter,
# conmon), the containers they ran, podman's store, the mounts in both views, the dir; and
# the stack, if this run brought it up.
sid_cleanup() {
  local pid f arg i pids=() r id
  if [[ -n $SID_WORK && -d $SID_WORK ]]; then
    # Read with builtins: a grep would name the dir in its own command line.
    for f in /proc/[0-9]*/cmdline; do
      pid=${f#/proc/} pid=${pid%/cmdline}
      [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
      while IFS= read -r -d '' arg; do
        [[ $arg == *"$SID_WORK"* ]] && { pids+=("$pid"); break; }
      done <"$f" 2>/dev/null
    done
    if ((${#pids[@]})); then
      log "stopping ${#pids[@]} process(es) of $SID_WORK: ${pids[*]}"
      kill -TERM "${pids[@]}" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        kill -0 "${pids[@]}" 2>/dev/null || break
        sleep 0.1
      done
      kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    for r in "$SID_WORK"/cd/runc/*; do
      [[ -d $r ]] || continue
      for id in $(chroot "$SID_ROOT" runc --root "$r" list -q 2>/dev/null || true); do
        chroot "$SID_ROOT" runc --root "$r" delete -f "$id" >/dev/null 2>&1 || true
      done
    done
    if [[ -d $SID_WORK/podman/root ]]; then
      local pm=(env "CONTAINERS_CONF=$SID_WORK/containers.conf" PODMAN_IGNORE_CGROUPSV1_WARNING=1
        chroot "$SID_ROOT" podman --root "$SID_WORK/podman/root" --runroot "$SID_WORK/podman/run"
        --storage-driver overlay)
      "${pm[@]}" rm -af -t 0 >/dev/null 2>&1 || true
      "${pm[@]}" system reset -f >/dev/null 2>&1 || true
    fi
    mounts_below "$SID_ROOT$SID_WORK" | xargs -r -n1 umount -l 2>/dev/null || true
    mounts_below "$SID_WORK" | xargs -r -n1 umount -l 2>/dev/null || true
    # Never removed through a mount.
    if [[ -z "$(mounts_below "$SID_WORK")$(mounts_below "$SID_ROOT$SID_WORK")" ]]; then
      rm -rf --one-file-system "$SID_WORK"
    else
      log "mounts left below $SID_WORK: not removed"
    fi
  fi
  if ((SID_BROUGHT_UP)); then
    log "bringing the sid stack down (this run brought it up)"
    bash "$ROOT/scripts/stack.sh" down || true
  fi
}

# SIGTERM to the process whose pid file $1 names, if its command line still matches
# the pattern $2 (not a reused pid); wait up to 5 s for it to go.
term_pid_file() {
  local pid i
  [[ -f $1 ]] || return 0
  pid=$(<"$1")
  if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"; then
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
}

cleanup() {
  local rc=$? pid i
  trap - EXIT INT TERM
  log "cleaning up ($WORK, netns $NS)"
  if [[ -n ${BENCH_PID:-} ]] && kill -0 "$BENCH_PID" 2>/dev/null; then
    kill -TERM "$BENCH_PID" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
      kill -0 "$BENCH_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$BENCH_PID" 2>/dev/null || true
  fi
  # containerd (started by bench.py, pid in WORK) and any shim it left behind: the
  # shims are found by the socket path inside our work dir, and killed by PID.
  if [[ -f $WORK/containerd.pid ]]; then
    pid=$(<"$WORK/containerd.pid")
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "^containerd --config $WORK/"; then
      kill "$pid" 2>/dev/null || true
      sleep 1
    fi
  fi
  # The snapshotters (pids in WORK): SIGTERM; lazylayer's unmounts its lazy FUSE roots,
  # nydus's stops its nydusd daemons and unmounts.
  term_pid_file "$WORK/snapshotter.pid" " snapshotter --address $WORK/"
  term_pid_file "$WORK/nydus.pid" "-grpc .*$WORK/"
  term_pid_file "$WORK/stargz.pid" "-grpc .*$WORK/"
  # What is left with our containerd dir in its command line (shims, the snapshotters,
  # nydusd, a `lazylayer containerd pull`), by PID.
  local exe
  while read -r pid; do
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
    if [[ $exe == */containerd* || $exe == "$(readlink -f "$LL")" || ( -n $PEERS_DIR && $exe == "$PEERS_DIR"/* ) ]]; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done < <(grep -l -s -F "$WORK/containerd/" /proc/[0-9]*/cmdline | cut -d/ -f3)
  # The delay relay (bench/relay.py, started by bench.py; pid in WORK).
  if [[ -f $WORK/relay.pid ]]; then
    pid=$(<"$WORK/relay.pid")
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "bench/relay.py --upstream"; then
      kill "$pid" 2>/dev/null || true
    fi
  fi
  # lazylayer containers named llbench-* left to runc by a killed run.
  for r in "$WORK/ll/runc" /run/lazylayer/runc; do
    [[ -d $r ]] || continue
    for id in $(runc --root "$r" list -q 2>/dev/null | grep '^llbench-' || true); do
      runc --root "$r" delete -f "$id" >/dev/null 2>&1 || true
    done
  done
  if [[ -d $WORK/podman/root ]]; then
    podman --root "$WORK/podman/root" --runroot "$WORK/podman/run" --storage-driver overlay \
      rm -af -t 0 >/dev/null 2>&1 || true
    podman --root "$WORK/podman/root" --runroot "$WORK/podman/run" --storage-driver overlay \
      system reset -f >/dev/null 2>&1 || true
  fi
  sid_cleanup || log "sid cleanup failed"
  if [[ -f $WORK/registry/registry.pid ]]; then
    bash "$ROOT/images/registry.sh" stop "$WORK/registry" >/dev/null 2>&1 || true
  fi
  grep -o " ${WORK}[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS"
ip -n "$NS" link set lo up
# podman's containers.conf for the work dir $1 (its tmp_dir there).
containers_conf() {
  mkdir -p "$1/podman/tmp"
  cat >"$1/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$1/podman/tmp"
CONF
}
containers_conf "$WORK"
export CONTAINERS_CONF=$WORK/containers.conf

if ((SID)); then
  if sid_is_up; then
    log "sid stack up at $SID_ROOT (left up)"
  else
    [[ -f $SID_ROOT/.lazylayer-stack ]] || bash "$ROOT/scripts/stack.sh" build
    SID_BROUGHT_UP=1
    bash "$ROOT/scripts/stack.sh" up
    log "sid stack brought up at $SID_ROOT"
  fi
  # What the root's programs and the host's lazylayer must both see: in the shared dir.
  SID_WORK=$(mktemp -d "$SID_SHARED/llbench.XXXXXX")
  containers_conf "$SID_WORK" # bench.py gives it to the root's podman (CONTAINERS_CONF)
fi

ADDR=$("${NSENTER[@]}" bash "$ROOT/images/registry.sh" start "$WORK/registry")
log "registry at $ADDR inside netns $NS; pushing images"
# shellcheck disable=SC2086
"${NSENTER[@]}" bash "$ROOT/images/build.sh" --registry "$ADDR" $ALL_IMAGES >/dev/null

mem=$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD -- crates 2>/dev/null || rev="$rev+dirty"
META=$(jq -nc --arg date "$(date -u +%Y-%m-%dT%H:%MZ)" --arg kernel "$(uname -r)" \
  --arg nproc "$(nproc)" --arg mem "$mem" --arg cpu "$cpu" --arg rev "$rev" \
  --arg quick "$QUICK" --arg podman "$(podman --version | awk '{print $3}')" \
  --arg containerd "$(containerd --version | awk '{print $3}')" \
  --arg runc "$(runc --version | awk 'NR==1 {print $3}')" \
  --arg fuseovl "$(dpkg-query -W -f='${Version}' fuse-overlayfs)" \
  --arg registry "$(dpkg-query -W -f='${Version}' docker-registry)" \
  '{date: $date, kernel: $kernel, nproc: $nproc, memory: $mem, cpu: $cpu, lazylayer_rev: $rev,
    quick: ($quick == "1"), podman: $podman, containerd: $containerd, runc: $runc,
    fuse_overlayfs: $fuseovl, docker_registry: $registry}')

mkdir -p "$OUT"
START=$SECONDS
# In the background + wait, so that a signal to this script runs the trap at once
# (the trap stops bench.py first; its own cleanup stops containerd).
"${NSENTER[@]}" "$PY" "$ROOT/bench/bench.py" --work "$WORK" --registry "$ADDR" --lazylayer "$LL" \
  --json "$OUT/latest.json" --images "$IMAGES" --links "$LINKS" --runs "$RUNS" --skip "$SKIP" \
  --fs-image "$FS_IMAGE" --fs-reps "$FS_REPS" --fs-reads "$FS_READS" --meta "$META" \
  --image-cache "${LAZYLAYER_IMAGE_CACHE:-$ROOT/.cache/images}" ${BASELINE:+--baseline "$BASELINE"} \
  --rtts "$RTTS" --rtt-links "$RTT_LINKS" --relay-shaping "$RELAY_SHAPING" \
  ${CONTENDERS:+--contenders "$CONTENDERS"} ${SID_WORK:+--sid-root "$SID_ROOT" --sid-work "$SID_WORK"} \
  ${PEERS_DIR:+--peers "$PEERS_DIR" --peer-versions "$PEER_VERSIONS"} &
BENCH_PID=$!
wait "$BENCH_PID"
BENCH_PID=
log "measurements took $((SECONDS - START)) s"
# The relay's request logs (every request of every start, for a look at the critical
# path; each run's JSON has its file, offset, t_start and ready).
if compgen -G "$WORK/relay/*.log" >/dev/null; then
  mkdir -p "$OUT/relay"
  for f in "$WORK"/relay/*.log; do gzip -c "$f" >"$OUT/relay/$(basename "$f").gz"; done
fi
"$PY" "$ROOT/bench/report.py" "$OUT/latest.json" --md "$OUT/latest.md" --png "$OUT/latest.png" \
  --seconds "$((SECONDS - START))"
log "wrote $OUT/latest.md, $OUT/latest.png, $OUT/latest.json"
