#!/usr/bin/env bash
# Does bench/relay.py keep up, and is the payload rate through it the nominal one?
#
#   bash bench/relay_check.sh [--rtt MS] [--rate 1000mbit] [--sizes 1000000,4000000,20000000]
#
# In a network namespace of its own (removed on exit): a docker-registry holding one 300 MB
# random blob and the relay in front of it (RTT --rtt, default 0). Prints
#  1. throughput of a whole-blob GET (curl): direct at tbf RATE, through the relay with
#     one tbf at 2 x RATE over both hops ("double"), through the relay with only the
#     relay <-> client hop shaped at RATE ("client-hop"), and both unshaped; with the
#     relay's CPU time meanwhile;
#  2. the time of ranged GETs of each size (median of 5, a new connection each): direct,
#     the ideal through a relay (direct + 2 x RTT: handshake and request), double,
#     client-hop.
# Needs root.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RTT=0 RATE=1000mbit SIZES=1000000,4000000,20000000
while (($#)); do
  case $1 in
    --rtt) RTT=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --sizes) SIZES=$2; shift 2 ;;
    *) echo "relay_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ $RATE =~ ^[0-9]+mbit$ ]] || { echo "relay_check.sh: --rate takes NNNmbit" >&2; exit 2; }
((EUID == 0)) || { echo "relay_check.sh: must run as root" >&2; exit 1; }

NS=llrelaycheck-$$
WORK=$(mktemp -d /var/tmp/llrelaycheck.XXXXXX)
RELAY_PID=
N=(nsenter "--net=/var/run/netns/$NS")
cleanup() {
  [[ -z $RELAY_PID ]] || kill "$RELAY_PID" 2>/dev/null || true
  "${N[@]}" bash "$ROOT/images/registry.sh" stop "$WORK/registry" >/dev/null 2>&1 || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up

ADDR=$("${N[@]}" bash "$ROOT/images/registry.sh" start "$WORK/registry")
REG_PORT=${ADDR##*:}
head -c 300000000 /dev/urandom >"$WORK/blob"
DIGEST=sha256:$(sha256sum "$WORK/blob" | cut -d' ' -f1)
LOC=$("${N[@]}" curl -fsSi -X POST "http://$ADDR/v2/check/blobs/uploads/" |
  awk -F': ' 'tolower($1) == "location" {print $2}' | tr -d '\r')
[[ $LOC == http* ]] || LOC=http://$ADDR$LOC
"${N[@]}" curl -fsS -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$WORK/blob" \
  "$LOC&digest=$DIGEST" -o /dev/null
rm "$WORK/blob"
"${N[@]}" /usr/bin/python3 "$ROOT/bench/relay.py" --upstream "$ADDR" --rtt-ms "$RTT" --log "$WORK/relay.log" \
  >"$WORK/port" &
RELAY_PID=$!
for ((i = 0; i < 50; i++)); do [[ -s $WORK/port ]] && break; sleep 0.1; done
RELAY=127.0.0.1:$(<"$WORK/port")
DOUBLE=$((${RATE%mbit} * 2))mbit

shape() { # none | double | client-hop | RATE
  "${N[@]}" tc qdisc del dev lo root 2>/dev/null || true
  case $1 in
    none) ;;
    client-hop) # as bench.py's set_link(unshaped_port=...)
      "${N[@]}" tc qdisc add dev lo root handle 1: htb default 20
      "${N[@]}" tc class add dev lo parent 1: classid 1:10 htb rate 100gbit 2>/dev/null
      "${N[@]}" tc class add dev lo parent 1: classid 1:20 htb rate 100gbit 2>/dev/null
      "${N[@]}" tc qdisc add dev lo parent 1:20 handle 20: tbf rate "$RATE" burst 256kb latency 400ms
      for way in sport dport; do
        "${N[@]}" tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip $way "$REG_PORT" 0xffff flowid 1:10
      done ;;
    double) "${N[@]}" tc qdisc add dev lo root tbf rate "$DOUBLE" burst 256kb latency 400ms ;;
    *) "${N[@]}" tc qdisc add dev lo root tbf rate "$1" burst 256kb latency 400ms ;;
  esac
}
cpu() { awk '{print $14 + $15}' "/proc/$RELAY_PID/stat"; }
whole() { # label addr
  local c0 c1 out
  c0=$(cpu)
  out=$("${N[@]}" curl -fsS -o /dev/null -w '%{time_total} %{size_download} %{time_starttransfer}' \
    "http://$2/v2/check/blobs/$DIGEST")
  c1=$(cpu)
  awk -v n="$1" -v c=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v o="$out" 'BEGIN {
    split(o, f, " "); t = f[1]; s = f[2]; ts = f[3]
    printf "%-34s %5.2f s: %6.0f Mbit/s (%6.0f from the first byte); relay CPU %.2f s = %3.0f%% of a core\n",
      n, t, s * 8 / t / 1e6, s * 8 / (t - ts) / 1e6, c / hz, 100 * c / hz / t }'
}
ranged() { # addr size -> median seconds of 5
  local i
  for i in 1 2 3 4 5; do
    sleep 0.3
    "${N[@]}" curl -fsS -o /dev/null -H "Range: bytes=0-$(($2 - 1))" -w '%{time_total}\n' \
      "http://$1/v2/check/blobs/$DIGEST"
  done | sort -n | sed -n 3p
}

echo "1. whole blob (300 MB), RTT $RTT ms, nominal $RATE"
shape "$RATE"; whole "direct, tbf $RATE" "$ADDR"
shape double; whole "relay, double (tbf $DOUBLE)" "$RELAY"
shape client-hop; whole "relay, client-hop (tbf $RATE)" "$RELAY"
shape none; whole "direct, unshaped" "$ADDR"
whole "relay, unshaped" "$RELAY"
echo "2. ranged GETs, RTT $RTT ms, nominal $RATE (median of 5, seconds)"
for size in ${SIZES//,/ }; do
  shape "$RATE"; d=$(ranged "$ADDR" "$size")
  shape double; r2=$(ranged "$RELAY" "$size")
  shape client-hop; r1=$(ranged "$RELAY" "$size")
  awk -v s="$size" -v d="$d" -v rtt="$RTT" -v r2="$r2" -v r1="$r1" 'BEGIN {
    printf "%10d bytes: direct %.3f, ideal %.3f, double %.3f, client-hop %.3f\n", s, d, d + 2 * rtt / 1000, r2, r1 }'
done
