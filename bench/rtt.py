#!/usr/bin/python3
"""Cold lazy starts of an optimized image across round-trip times, two lazylayer
binaries side by side in one run (A B A B ... per RTT).

    bench/rtt.py --new BIN --old BIN [--image python3] [--rtts 0,20,80] [--runs 5]

The kernel here has no netem, so distance is a TCP relay in front of a loopback
docker-registry that holds every chunk of each direction for RTT/2 ms before passing
it on (order kept): each request/response pair costs one RTT, like a distant
registry; the link itself is not rate-limited. The image is pushed from
images/build.sh's cache and optimized once with --new. Time to ready = from the
start of `run` to its container's first line on stdout; `run` is then interrupted
(its finishing prefetch is not timed). Each start has an empty store and a dropped
page cache. Needs root. Prints a table of medians and new/old ratios (--json too).
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

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


class DelayRelay:
    """127.0.0.1:port -> upstream, each direction's bytes held `one_way` seconds."""

    def __init__(self, upstream_port, one_way):
        self.upstream_port, self.one_way = upstream_port, one_way
        self.loop = asyncio.new_event_loop()
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self.thread.start()
        started.wait()

    def _serve(self, started):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._conn, "127.0.0.1", self.port))
        started.set()
        self.loop.run_forever()

    async def _pipe(self, reader, writer):
        # A queue of (due time, bytes): the reader never waits for the delay,
        # so a stream keeps its rate and only gains latency.
        q = asyncio.Queue()

        async def pump():
            while (item := await q.get()) is not None:
                due, data = item
                delay = due - self.loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
            writer.close()

        task = asyncio.ensure_future(pump())
        try:
            while data := await reader.read(1 << 16):
                q.put_nowait((self.loop.time() + self.one_way, data))
        except (ConnectionError, OSError):
            pass
        q.put_nowait(None)
        try:
            await task
        except (ConnectionError, OSError):
            pass

    async def _conn(self, reader, writer):
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, uw), self._pipe(ur, writer))

    def close(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def start_once(binary, ref, expect, work):
    """Seconds from `run` to the expected first line, or None."""
    root = tempfile.mkdtemp(dir=work)
    drop_caches()
    t0 = time.monotonic()
    p = subprocess.Popen([binary, "--root", root, "run", "--rm", "--net", "none", ref],
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
        return None
    return ready


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", required=True)
    ap.add_argument("--old", required=True)
    ap.add_argument("--image", default="python3", choices=sorted(EXPECT))
    ap.add_argument("--rtts", default="0,20,80", help="round-trip times in ms")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", help="write the raw figures here")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="llrtt.", dir="/var/tmp")
    reg_dir = os.path.join(work, "registry")
    addr = None
    try:
        addr = sh(["bash", f"{ROOT}/images/registry.sh", "start", reg_dir]).stdout.strip()
        port = int(addr.rsplit(":", 1)[1])
        log(f"registry at {addr}; pushing {a.image}")
        sh(["bash", f"{ROOT}/images/build.sh", "--registry", addr, a.image])
        src, dst = f"{addr}/lazylayer/{a.image}:latest", f"{addr}/lazylayer/{a.image}:optimized"
        sh([a.new, "--root", os.path.join(work, "opt"), "optimize", src, dst], timeout=1200)
        subprocess.run(["rm", "-rf", os.path.join(work, "opt")])
        out = {"image": a.image, "new": a.new, "old": a.old, "rtts": {}}
        for rtt in [int(x) for x in a.rtts.split(",")]:
            relay = DelayRelay(port, rtt / 2000)
            ref = f"127.0.0.1:{relay.port}/lazylayer/{a.image}:optimized"
            times = {"new": [], "old": []}
            try:
                for i in range(a.runs):
                    order = ["new", "old"] if i % 2 == 0 else ["old", "new"]
                    for who in order:
                        t = start_once(getattr(a, who), ref, EXPECT[a.image], work)
                        times[who].append(t)
                        log(f"RTT {rtt} ms run {i + 1}/{a.runs} {who}: "
                            + (f"{t:.3f} s" if t is not None else "failed"))
            finally:
                relay.close()
            out["rtts"][rtt] = times
        print(f"| RTT | new (median, min-max) | old (median, min-max) | new / old |")
        print("|---:|---:|---:|---:|")
        for rtt, times in out["rtts"].items():
            ok = {k: [x for x in v if x is not None] for k, v in times.items()}
            if not ok["new"] or not ok["old"]:
                print(f"| {rtt} ms | failed | failed | - |")
                continue
            n, o = statistics.median(ok["new"]), statistics.median(ok["old"])
            print(f"| {rtt} ms | {n:.3f} s ({min(ok['new']):.3f}-{max(ok['new']):.3f}) "
                  f"| {o:.3f} s ({min(ok['old']):.3f}-{max(ok['old']):.3f}) | {n / o:.2f}x |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    finally:
        if addr:
            subprocess.run(["bash", f"{ROOT}/images/registry.sh", "stop", reg_dir])
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
