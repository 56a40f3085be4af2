#!/usr/bin/python3
"""Cold lazy starts of an optimized image across round-trip times, two lazylayer
binaries side by side in one run (A B A B ... per RTT).

    bench/rtt.py --new BIN --old BIN [--image python3] [--rtts 0,20,80] [--runs 5]
                 [--each-optimizes] [--run-args ARGS] [--cmd CMD --expect LINE]
                 [--known-registry IMAGE]

The kernel here has no netem, so distance is bench/relay.py, a TCP relay in front of a
loopback docker-registry that holds every chunk of each direction for RTT/2 ms before
passing it on (order kept), and a new connection's first bytes one RTT more (the
handshake): each request/response pair costs one RTT, like a distant registry; the
link itself is not rate-limited. From the relay's request log, each start's requests
before ready and the sequential rounds among them (bench/README.md) are printed too. The image is pushed from
images/build.sh's cache and optimized once with --new. Time to ready = from the
start of `run` to its container's first line on stdout; `run` is then interrupted
(its finishing prefetch is not timed). Each start has an empty store and a dropped
page cache. Needs root. Prints a table of medians and new/old ratios, and the
response body bytes before ready (--json too).

--each-optimizes: each binary optimizes the image itself (old into :optimized-old), so a
change of the image's format is compared as each version publishes it.
--known-registry IMAGE: each timed start's store first ran IMAGE (optimized, not timed) from
the same registry, as on a node that has pulled from it before.
--cmd CMD (shell words, run as the container's command) with --expect LINE times a
workload of its own, e.g. an untraced read: --run-args '--prefetch off' --cmd
"python3 -c 'import sqlite3; print(sqlite3.sqlite_version)'" --expect 3.46.1.
"""
import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import relay  # bench/relay.py: the delay relay and its request log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECT = {"python3": "ok", "busybox": "hello from busybox", "minbase": "ok"}


def log(msg):
    print(f"rtt: {msg}", file=sys.stderr, flush=True)


def sh(argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def start_once(binary, ref, expect, work, relay_log, run_args=(), cmd=(), before=None):
    """(seconds from `run` to the expected first line, the relay's summary of the
    requests before it), or (None, None). `before`: a ref run (whole, not timed) in the
    same store first."""
    root = tempfile.mkdtemp(dir=work)
    if before:
        r = subprocess.run([binary, "--root", root, "run", "--rm", "--net", "none", before],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            log(f"  {binary}: {before} failed: {r.stderr[-300:]!r}")
    drop_caches()
    off = relay.log_offset(relay_log)
    t0 = time.monotonic()
    argv = [binary, "--root", root, "run", "--rm", "--net", "none", *run_args, ref]
    if cmd:
        argv += ["--", *cmd]
    p = subprocess.Popen(argv,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    ready = time.monotonic() - t0
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    subprocess.run(["rm", "-rf", root])
    if line != expect:
        log(f"  {binary}: got {line!r}, stderr {err[-300:]!r}")
        return None, None
    return ready, relay.summarize(relay_log, off, t0, t0 + ready)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", required=True)
    ap.add_argument("--old", required=True)
    ap.add_argument("--image", default="python3", choices=sorted(EXPECT))
    ap.add_argument("--rtts", default="0,20,80", help="round-trip times in ms")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", help="write the raw figures here")
    ap.add_argument("--each-optimizes", action="store_true",
                    help="each binary optimizes the image itself (old into :optimized-old)")
    ap.add_argument("--run-args", default="", help="extra `run` options (shell words)")
    ap.add_argument("--cmd", default="", help="the container's command (shell words)")
    ap.add_argument("--expect", default=None, help="the first line --cmd prints")
    ap.add_argument("--known-registry", metavar="IMAGE", default=None,
                    help="each timed start's store first runs IMAGE from the same registry")
    a = ap.parse_args()
    if a.cmd and a.expect is None:
        ap.error("--cmd needs --expect")
    expect = a.expect if a.expect is not None else EXPECT[a.image]
    run_args, cmd = shlex.split(a.run_args), shlex.split(a.cmd)
    work = tempfile.mkdtemp(prefix="llrtt.", dir="/var/tmp")
    reg_dir = os.path.join(work, "registry")
    addr = None
    try:
        addr = sh(["bash", f"{ROOT}/images/registry.sh", "start", reg_dir]).stdout.strip()
        log(f"registry at {addr}; pushing {a.image}")
        sh(["bash", f"{ROOT}/images/build.sh", "--registry", addr, a.image]
           + ([a.known_registry] if a.known_registry else []))
        tags = {"new": "optimized", "old": "optimized-old" if a.each_optimizes else "optimized"}
        for who in ["new", "old"] if a.each_optimizes else ["new"]:
            for image in [a.image] + ([a.known_registry] if a.known_registry else []):
                sh([getattr(a, who), "--root", os.path.join(work, "opt"), "optimize",
                    f"{addr}/lazylayer/{image}:latest", f"{addr}/lazylayer/{image}:{tags[who]}"],
                   timeout=1200)
                subprocess.run(["rm", "-rf", os.path.join(work, "opt")])
        out = {"image": a.image, "new": a.new, "old": a.old, "rtts": {}}
        for rtt in [int(x) for x in a.rtts.split(",")]:
            relay_log = os.path.join(work, f"relay-{rtt}ms.log")
            rly = relay.RelayProcess(addr, rtt, relay_log)
            times = {"new": [], "old": []}
            reqs = {"new": [], "old": []}
            try:
                for i in range(a.runs):
                    order = ["new", "old"] if i % 2 == 0 else ["old", "new"]
                    for who in order:
                        ref = f"{rly.addr}/lazylayer/{a.image}:{tags[who]}"
                        before = (f"{rly.addr}/lazylayer/{a.known_registry}:{tags[who]}"
                                  if a.known_registry else None)
                        t, summary = start_once(getattr(a, who), ref, expect, work, relay_log,
                                                run_args, cmd, before)
                        times[who].append(t)
                        reqs[who].append(summary)
                        log(f"RTT {rtt} ms run {i + 1}/{a.runs} {who}: "
                            + (f"{t:.3f} s, {summary['requests']} requests in {summary['rounds']} rounds, "
                               f"{summary['body_bytes']} bytes"
                               if t is not None else "failed"))
            finally:
                rly.stop()
            out["rtts"][rtt] = times
            out.setdefault("relay", {})[rtt] = reqs
        print("| RTT | new (median, min-max) | old (median, min-max) | new / old "
              "| requests new / old | rounds new / old | bytes new / old |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for rtt, times in out["rtts"].items():
            ok = {k: [x for x in v if x is not None] for k, v in times.items()}
            if not ok["new"] or not ok["old"]:
                print(f"| {rtt} ms | failed | failed | - | - | - | - |")
                continue
            n, o = statistics.median(ok["new"]), statistics.median(ok["old"])

            def med(who, k):
                return f"{statistics.median(s[k] for s in out['relay'][rtt][who] if s):g}"
            print(f"| {rtt} ms | {n:.3f} s ({min(ok['new']):.3f}-{max(ok['new']):.3f}) "
                  f"| {o:.3f} s ({min(ok['old']):.3f}-{max(ok['old']):.3f}) | {n / o:.2f}x "
                  f"| {med('new', 'requests')} / {med('old', 'requests')} "
                  f"| {med('new', 'rounds')} / {med('old', 'rounds')} "
                  f"| {med('new', 'body_bytes')} / {med('old', 'body_bytes')} |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    finally:
        if addr:
            subprocess.run(["bash", f"{ROOT}/images/registry.sh", "stop", reg_dir])
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
