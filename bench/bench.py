#!/usr/bin/python3
"""Measurement driver of bench/run.sh. Do not run it by hand: run.sh prepares what it
needs (network namespace, registry with the images pushed, lazylayer built) and runs it
*inside* the namespace, so every client, daemon and container here talks to the
registry over the namespace's own shaped loopback.

Sections (see bench/README.md):
  1. time to ready, cold, per image x link (x RTT, --rtts) x contender (+ bytes over
     the link before ready, requests and sequential rounds through the delay relay,
     warm starts, link rates)
  2. steady-state file-system overhead over the same extracted layers
  3. optimize cost

Writes one JSON document (--json); bench/report.py turns it into Markdown + PNG.
"""
import argparse
import hashlib
import http.client
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import zlib

import peers  # bench/peers.py: converting images for the lazy-pulling peers
import relay  # bench/relay.py: the delay relay of the RTT axis and its request log

# --- what is measured -------------------------------------------------------------

# kind: batch (ready = first byte on stdout; whole stdout must contain `expect`),
# http (first 200 on GET /), redis (first PING answered +PONG). Every contender runs
# the image's own Cmd: nothing is overridden.
IMAGES = {
    "busybox": {"kind": "batch", "expect": "hello from busybox", "what": "`sh -c 'echo hello from busybox'`"},
    "minbase": {"kind": "batch", "expect": "ok", "what": "`bash -c 'echo ok'`"},
    "python3": {"kind": "batch", "expect": "ok", "what": "python3: import json, email, http.client; print"},
    "nginx": {"kind": "http", "port": 80, "what": "nginx: first HTTP 200 on :80"},
    "redis": {"kind": "redis", "port": 6379, "what": "redis-server: first PING -> PONG on :6379"},
    "gcc": {"kind": "batch", "expect": "hello from gcc", "what": "gcc -O2 hello.c && ./hello"},
    "pydev": {"kind": "batch", "expect": "hello from pydev",
              "what": "python3 + build-essential + -dev libs: import json, sqlite3, ssl, decimal, lzma; print"},
}
# bits per second; None = loopback without a qdisc.
LINKS = {"loopback": None, "1gbit": 1e9, "100mbit": 1e8, "10mbit": 1e7}
# With the delay relay in the path every payload byte crosses the loopback twice
# (registry -> relay, relay -> client). Two ways to keep the payload rate nominal
# (--relay-shaping): "client-hop" (default) shapes only the relay <-> client hop at the
# nominal rate and leaves the registry <-> relay hop unshaped (htb, a u32 filter on the
# registry's port); "double" shapes both at RELAY_HOPS x the nominal rate with one tbf,
# where the two hops share one bucket, so a transfer gets up to RTT/2 ahead while the
# other hop is idle (measured: -22 ms for 20 MB at 1 Gbit/s, RTT 80 ms; bench/README.md).
RELAY_HOPS = 2
RELAY_SHAPINGS = ("client-hop", "double")
# containerd-lazylayer: containerd with `lazylayer snapshotter` as a proxy plugin, the
# optimized image registered by `lazylayer containerd pull` and run by `ctr run
# --snapshotter lazylayer` (docs/containerd.md, the ctr path).
CONTENDERS = ["podman", "containerd", "containerd-lazylayer", "lazylayer", "lazylayer-attached",
              "lazylayer-unopt"]
# The sid stack (--sid-work, run.sh --sid): the same starts as podman, containerd and
# containerd-lazylayer with Debian sid's Podman 5.8 and containerd 2.1, run from the
# chroot root of scripts/stack.sh. Not in the default list. Contender -> its host twin.
SID_CONTENDERS = {"podman-sid": "podman", "containerd-sid": "containerd",
                  "containerd-sid-lazylayer": "containerd-lazylayer",
                  "podman-sid-zstdchunked": "podman-zstdchunked"}
# The lazy-pulling peers (--peers, run.sh --peers; tools set up by bench/peers.sh), each
# on an image its own tool converted, fed lazylayer's trace of the same start. Not in
# the default list. Contender -> the tag its converted image is pushed as.
#   nydus: containerd 1.6 + nydus-snapshotter (containerd-nydus-grpc) + nydusd, the image
#          pulled by ctr-remote rpull (bench/peers.py says how it is converted)
#   estargz: containerd 1.6 + the stargz snapshotter (containerd-stargz-grpc, defaults:
#          prefetch up to the landmark at mount, then the rest in the background), the
#          image converted by `ctr-remote image convert --estargz --estargz-record-in`
#          (the trace's files first, before the landmark) and pulled by ctr-remote rpull
#   podman-sid-zstdchunked: Podman 5.8 (the sid stack) pulling the image `podman push
#          --compression-format zstd:chunked` made, partial pulls enabled (not lazy: what
#          a Podman user is told to pick for faster pulls)
PEER_CONTENDERS = {"nydus": "nydus", "estargz": "estargz", "podman-sid-zstdchunked": "zstdchunked"}
# The peers that run as a containerd proxy snapshotter: contender -> its snapshotter's
# name in containerd.
PEER_SNAPSHOTTERS = {"nydus": "nydus", "estargz": "stargz"}
# nydusd's configuration: nydus-snapshotter's shipped default (misc/snapshotter/
# nydusd-config.fusedev.json: prefetch of the bootstrap's list at mount, then the
# rest, 8 threads), with scheme http for the benchmark's plain-HTTP registry (without
# it nydusd tries TLS first on every connection and falls back).
NYDUSD_CONFIG = {
    "device": {"backend": {"type": "registry", "config": {
        "scheme": "http", "timeout": 5, "connect_timeout": 5, "retry_limit": 2}},
        "cache": {"type": "blobcache"}},
    "mode": "direct", "digest_validate": False, "iostats_files": False, "enable_xattr": True,
    "fs_prefetch": {"enable": True, "threads_count": 8, "merging_size": 1048576, "prefetch_all": True},
}
# For side experiments, LLBENCH_NYDUS_PREFETCH=list prefetches the bootstrap's list only,
# =off nothing (on-demand reads alone); the default tables never set it.
if os.environ.get("LLBENCH_NYDUS_PREFETCH") == "list":
    NYDUSD_CONFIG["fs_prefetch"]["prefetch_all"] = False
elif os.environ.get("LLBENCH_NYDUS_PREFETCH") == "off":
    NYDUSD_CONFIG["fs_prefetch"]["enable"] = False
POLL = 0.020  # readiness poll interval for servers, seconds
# LLBENCH_KNOWN_LINK=1: the node has started from this registry over this link before.
# Each cell's `lazylayer run` contenders first make one untimed start, and their timed
# starts find the store empty but for its links/ (what the last start noted of the
# link: distance and rate; no image bytes). The default tables never set it.
KNOWN_LINK = os.environ.get("LLBENCH_KNOWN_LINK") == "1"
# The contenders that start with `lazylayer run` (this build and the --baseline one).
RUN_CONTENDERS = ("lazylayer", "lazylayer-base")


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def now():
    return time.monotonic()


def sh(argv, check=True, timeout=600, env=None, capture=True):
    """Run a command, return CompletedProcess (text)."""
    r = subprocess.run(argv, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                       stderr=subprocess.PIPE if capture else subprocess.DEVNULL,
                       text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {(r.stderr or '')[-2000:]}")
    return r


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mounts_under(path):
    path = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == path or mp.startswith(path + "/"):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


def umount_under(path, views=()):
    """Unmount below path and its other views (the same directory seen through the sid
    root: a mount private to one view is not seen from the other)."""
    for p in (path, *views):
        for mp in mounts_under(p):
            subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)


def terminate(proc, grace):
    """SIGTERM to a child still running, SIGKILL after `grace` seconds; reaped."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rmtree(path, views=()):
    if os.path.exists(path):
        umount_under(path, views)
        # Never remove through a mount (a bind of /dev would lose the host's nodes).
        left = [mp for p in (path, *views) for mp in mounts_under(p)]
        if left:
            raise RuntimeError(f"mounts left below {path}: {left[:5]}")
        shutil.rmtree(path, ignore_errors=True)


def wait_socket(proc, path, limit=20.0):
    """Wait for a daemon's unix socket to accept; False if proc exits or `limit` s pass."""
    end = now() + limit
    while now() < end:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return True
        except OSError:
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# --- readiness probes --------------------------------------------------------------

def probe(kind, port):
    try:
        if kind == "http":
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                c.request("GET", "/")
                return c.getresponse().status == 200
            finally:
                c.close()
        if kind == "redis":
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
    except (OSError, http.client.HTTPException):
        return False
    raise ValueError(kind)


def stop_process(proc, stop):
    """Stop a timed process that may still run: `stop(proc)` (its own way: a signal,
    a CLI), then 30 s for it to exit, then SIGKILL."""
    if proc.poll() is None:
        stop(proc)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port_closed(port, limit=20.0):
    end = now() + limit
    while now() < end:
        if not port_open(port):
            return True
        time.sleep(0.05)
    return False


# --- bytes over the namespace's link -----------------------------------------------

def lo_bytes():
    """Bytes the namespace's loopback has transmitted so far. /proc/self/net/dev shows
    the reading task's network namespace (unlike /sys/class/net, which shows the one of
    whoever mounted sysfs). Every packet between registry and client goes through lo
    once and is counted once, whichever direction: requests and responses, with their
    TCP/IP headers."""
    with open("/proc/self/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    raise RuntimeError("no lo in /proc/self/net/dev")


def tcp_retrans():
    """TCP segments the namespace has retransmitted so far (/proc/self/net/snmp): a
    retransmitted segment crosses lo again and counts again in lo_bytes."""
    with open("/proc/self/net/snmp") as f:
        rows = [l.split() for l in f if l.startswith("Tcp:")]
    return int(rows[1][rows[0].index("RetransSegs")])


# --- registry access log -----------------------------------------------------------

ACCESS = re.compile(r'"(?P<m>[A-Z]+) (?P<p>\S+) HTTP/[0-9.]+" (?P<s>\d{3}) (?P<b>\d+|-)')


class RegistryLog:
    def __init__(self, path):
        self.path = path

    def offset(self):
        return os.path.getsize(self.path)

    def since(self, off):
        """Bytes the registry sent and the number of blob GETs since offset."""
        time.sleep(0.5)  # the access log line is written once the response is done
        with open(self.path, "rb") as f:
            f.seek(off)
            text = f.read().decode(errors="replace")
        total = blobs = 0
        for m in ACCESS.finditer(text):
            if m["b"] != "-":
                total += int(m["b"])
            if m["m"] == "GET" and "/blobs/" in m["p"]:
                blobs += 1
        return total, blobs


# --- the contenders ----------------------------------------------------------------

class Stack:
    """One container stack: where its podman, containerd and ctr run and keep their
    stores. host: Debian 12's, stores in the work dir. sid: Debian sid's, run as `chroot
    ROOT PROGRAM` (the same network namespace, so the same registry address), stores in
    a work dir inside the stack's shared dir, which has the same path in the root and
    out: the host's lazylayer (snapshotter, `containerd pull`) and the root's containerd
    see the same sockets, stores and FUSE mounts."""

    def __init__(self, work, root=None):
        self.root = root
        self.suffix = "" if root is None else "-sid"  # of its pid and log files
        self.pre = [] if root is None else ["chroot", root]
        # run.sh's cleanup finds the host's by "$WORK/containerd/" in a command line.
        self.ctrd_dir = os.path.join(work, "containerd" if root is None else "cd")
        self.ctrd_sock = os.path.join(self.ctrd_dir, "containerd.sock")
        self.ctrd = None
        # containerd-lazylayer: the snapshotter's store (its --root, shared with
        # `lazylayer containerd pull`) lives inside the containerd dir, so every
        # containerd_start empties both.
        self.snap_root = os.path.join(self.ctrd_dir, "ll")
        self.snap_sock = os.path.join(self.ctrd_dir, "snapshotter.sock")
        self.snap = None
        # nydus: containerd-nydus-grpc's root (its nydusd daemons, their sockets, mounts
        # and blob caches) and socket, in the containerd dir too.
        self.nydus_root = os.path.join(self.ctrd_dir, "nydus")
        self.nydus_sock = os.path.join(self.ctrd_dir, "nydus.sock")
        # stargz: containerd-stargz-grpc's root and socket.
        self.stargz_root = os.path.join(self.ctrd_dir, "stargz")
        self.stargz_sock = os.path.join(self.ctrd_dir, "stargz.sock")
        # The running peer snapshotter daemon (nydus or stargz), if any.
        self.peer_snap = None
        pm = os.path.join(work, "podman")
        store = ["--root", f"{pm}/root", "--runroot", f"{pm}/run", "--storage-driver", "overlay"]
        if root is None:
            self.podman_bin = ["podman"]  # CONTAINERS_CONF from run.sh's environment
        else:
            # run.sh writes this containers.conf as the host's (tmp_dir in the work dir);
            # the host's, in the environment, is not in the root.
            self.podman_bin = ["env", f"CONTAINERS_CONF={work}/containers.conf",
                               "PODMAN_IGNORE_CGROUPSV1_WARNING=1", "chroot", root, "podman"]
        self.podman = self.podman_bin + store
        self.ctr = self.pre + ["ctr", "-a", self.ctrd_sock, "-n", "llbench"]
        # sid: runc's state in the work dir too, not in the root's /run (run.sh's cleanup
        # deletes what a killed run left there).
        self.ctr_run = self.ctr + ["run"] + ([] if root is None else ["--runc-root", f"{self.ctrd_dir}/runc"])

    def views(self, path):
        """The other paths of a directory in the work dir (the root's view of it)."""
        return [] if self.root is None else [self.root + path]

    def containerd_config(self, snapshotter=None):
        """containerd 1.6 reads version 2; 2.1 version 3, whose CRI is three plugins, and
        whose Transfer Service (ctr's pull) unpacks only for a configured (platform,
        snapshotter) pair and passes the image's names to a proxy snapshotter only when
        it exports enable_remote_snapshot_annotations (docs/install.md)."""
        d = self.ctrd_dir
        cri = ('"io.containerd.grpc.v1.cri"' if self.root is None else
               '"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"')
        text = f"""version = {2 if self.root is None else 3}
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [{cri}]
[grpc]
  address = "{self.ctrd_sock}"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"""
        if snapshotter in ("nydus", "stargz"):
            sock = self.nydus_sock if snapshotter == "nydus" else self.stargz_sock
            text += f"""[proxy_plugins.{snapshotter}]
  type = "snapshot"
  address = "{sock}"
"""
        elif snapshotter:
            text += f"""[proxy_plugins.lazylayer]
  type = "snapshot"
  address = "{self.snap_sock}"
"""
            if self.root is not None:
                text += """  [proxy_plugins.lazylayer.exports]
    enable_remote_snapshot_annotations = "true"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "lazylayer"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "overlayfs"
"""
        return text

    def versions(self):
        """podman, containerd and runc versions, as run.sh records the host's."""
        def v(argv):
            r = sh(argv, check=False)
            words = r.stdout.split()
            return words[2] if r.returncode == 0 and len(words) > 2 else None
        return {"podman": v(self.podman_bin + ["--version"]), "containerd": v(self.pre + ["containerd", "--version"]),
                "runc": v(self.pre + ["runc", "--version"])}


class Bench:
    def __init__(self, a):
        self.a = a
        self.work = a.work
        self.ll = a.lazylayer
        # --baseline: an older lazylayer binary timed beside this one in the same run
        # (contenders lazylayer-base, lazylayer-fuse-base), the side-by-side check that a
        # change did not make starts or reads slower.
        self.ll_base = a.baseline
        # Images the baseline optimized itself (SRC:optimized-base), which its
        # contenders run: a format change is compared as each version publishes.
        self.base_optimized = set()
        self.reglog = RegistryLog(os.path.join(self.work, "registry", "registry.log"))
        self.logs = os.environ.get("LLBENCH_LOGS") or os.path.join(self.work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.host = Stack(self.work)
        self.sid = Stack(a.sid_work, a.sid_root) if a.sid_work else None
        self.stacks = [self.host] + ([self.sid] if self.sid else [])
        self.ll_root = os.path.join(self.work, "ll")
        # LLBENCH_KNOWN_LINK: each `lazylayer run` contender's links/ after its last
        # start in the current cell (run_cell clears it).
        self.known_links = {}
        self.run_available = sh([self.ll, "run", "--help"], check=False).returncode == 0
        self.snap_available = (sh([self.ll, "snapshotter", "--help"], check=False).returncode == 0
                               and sh([self.ll, "containerd", "pull", "--help"], check=False).returncode == 0)
        # bench/peers.sh's bin dir (--peers): the peers' tools.
        self.peers_bin = os.path.join(a.peers, "bin") if a.peers else None
        # The peers each image was converted for: {img: {peer, ...}} (convert_peers).
        self.peer_images = {}
        self.seq = 0

    # podman ---------------------------------------------------------------------------
    def podman_empty(self, st=None):
        """Empty the podman store of stack st (default: every stack)."""
        for st in [st] if st else self.stacks:
            sh(st.podman + ["rm", "-af", "-t", "0"], check=False)
            sh(st.podman + ["rmi", "-af"], check=False)
            left = sh(st.podman + ["images", "-q"], check=False).stdout.split()
            if left:
                raise RuntimeError(f"podman store not empty: {left}")

    # containerd: a fresh root for every cold run (daemon start is not timed) ----------
    def snapshotter_start(self, st):
        """`lazylayer snapshotter` on an empty root, the host's binary for either stack.
        bench.py runs inside the namespace, so the snapshotter (which fetches the lazy
        layers) reaches the registry over the shaped link; checked below."""
        logf = open(f"{self.logs}/snapshotter{st.suffix}.log", "a")
        st.snap = subprocess.Popen([self.ll, "--root", st.snap_root, "snapshotter", "--address", st.snap_sock],
                                   stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        with open(os.path.join(self.work, f"snapshotter{st.suffix}.pid"), "w") as f:
            f.write(str(st.snap.pid))
        if os.readlink(f"/proc/{st.snap.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
            raise RuntimeError("snapshotter is not in the benchmark's network namespace")
        if not wait_socket(st.snap, st.snap_sock):
            raise RuntimeError(f"lazylayer snapshotter did not start (see {self.logs}/snapshotter{st.suffix}.log)")

    def snapshotter_stop(self, st):
        """SIGTERM (the snapshotter unmounts its lazy FUSE roots), SIGKILL after 15 s."""
        terminate(st.snap, 15)
        st.snap = None

    def nydus_start(self, st):
        """containerd-nydus-grpc on an empty root, in the benchmark's namespace like
        containerd (its nydusd daemons fetch over the shaped link). Two settings differ
        from its shipped config.toml, both needed here: threads_number = 0 (nydusd 2.2
        rejects the --thread-num the snapshotter passes otherwise) and a nydusd wrapper
        that adds --rlimit-nofile 0 (nydusd's default raises the limit to 1000000, past
        this machine's hard limit, and exits)."""
        d = st.ctrd_dir
        os.makedirs(st.nydus_root, exist_ok=True)
        with open(f"{d}/nydusd.json", "w") as f:
            json.dump(NYDUSD_CONFIG, f)
        wrapper = f"{d}/nydusd"
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec {self.peers_bin}/nydusd \"$@\" --rlimit-nofile 0\n")
        os.chmod(wrapper, 0o755)
        with open(f"{d}/nydus.toml", "w") as f:
            f.write(f"""version = 1
root = "{st.nydus_root}"
address = "{st.nydus_sock}"
daemon_mode = "dedicated"
cleanup_on_close = true
[system]
enable = false
[metrics]
address = ""
[daemon]
nydusd_config = "{d}/nydusd.json"
nydusd_path = "{wrapper}"
nydusimage_path = "{self.peers_bin}/nydus-image"
fs_driver = "fusedev"
recover_policy = "none"
threads_number = 0
[log]
log_to_stdout = true
level = "info"
[cgroup]
enable = false
""")
        self.peer_snapshotter_start(st, "nydus", "containerd-nydus-grpc", ["--config", f"{d}/nydus.toml"],
                                    st.nydus_sock)

    def stargz_start(self, st):
        """containerd-stargz-grpc on an empty root with its defaults (an empty config:
        prefetch up to the landmark at mount, background fetch of the rest)."""
        os.makedirs(st.stargz_root, exist_ok=True)
        conf = f"{st.ctrd_dir}/stargz.toml"
        open(conf, "w").close()
        self.peer_snapshotter_start(st, "stargz", "containerd-stargz-grpc",
                                    ["-address", st.stargz_sock, "-root", st.stargz_root, "-config", conf],
                                    st.stargz_sock)

    def peer_snapshotter_start(self, st, name, binary, args, sock):
        """Start a peer's snapshotter daemon (in the namespace, like containerd) and wait
        for its socket; its pid goes to WORK/NAME.pid for run.sh's cleanup."""
        logf = open(f"{self.logs}/{name}-snapshotter{st.suffix}.log", "a")
        st.peer_snap = subprocess.Popen([f"{self.peers_bin}/{binary}", *args],
                                        stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        with open(os.path.join(self.work, f"{name}{st.suffix}.pid"), "w") as f:
            f.write(str(st.peer_snap.pid))
        if not wait_socket(st.peer_snap, sock):
            raise RuntimeError(f"{name} snapshotter did not start (see {self.logs}/{name}-snapshotter{st.suffix}.log)")

    def containerd_start(self, st, snapshotter=None):
        """containerd on an empty root, with the proxy snapshotter `snapshotter` (None,
        "lazylayer", "nydus" or "stargz") started first on an empty root of its own."""
        self.containerd_stop()
        d = st.ctrd_dir
        rmtree(d, st.views(d))
        os.makedirs(d)
        if snapshotter == "nydus":
            self.nydus_start(st)
        elif snapshotter == "stargz":
            self.stargz_start(st)
        elif snapshotter:
            self.snapshotter_start(st)
        with open(f"{d}/config.toml", "w") as f:
            f.write(st.containerd_config(snapshotter))
        logf = open(f"{self.logs}/containerd{st.suffix}.log", "a")
        st.ctrd = subprocess.Popen(st.pre + ["containerd", "--config", f"{d}/config.toml"],
                                   stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        with open(os.path.join(self.work, f"containerd{st.suffix}.pid"), "w") as f:
            f.write(str(st.ctrd.pid))
        for _ in range(200):
            if sh(st.ctr + ["version"], check=False).returncode == 0:
                return
            if st.ctrd.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"containerd did not start (see {self.logs}/containerd{st.suffix}.log)")

    def containerd_stop(self):
        """Stop every stack's containerd and snapshotter."""
        for st in self.stacks:
            if st.ctrd and st.ctrd.poll() is None:
                # Tasks a failed or interrupted run left (their shims would outlive the daemon).
                for cid in sh(st.ctr + ["task", "ls", "-q"], check=False).stdout.split():
                    sh(st.ctr + ["task", "kill", "-s", "SIGKILL", cid], check=False)
                    sh(st.ctr + ["task", "delete", "-f", cid], check=False)
                for cid in sh(st.ctr + ["container", "ls", "-q"], check=False).stdout.split():
                    sh(st.ctr + ["container", "rm", cid], check=False)
                terminate(st.ctrd, 15)
            st.ctrd = None
            self.snapshotter_stop(st)
            # SIGTERM: nydus's (cleanup_on_close) stops its nydusd daemons and unmounts.
            terminate(st.peer_snap, 15)
            st.peer_snap = None
            umount_under(st.ctrd_dir, st.views(st.ctrd_dir))

    def zstdchunked_conf(self, st):
        """A storage.conf for st's podman store with zstd:chunked partial pulls on: Debian
        ships none, and without one Podman 5.8 pulls a zstd:chunked layer whole ("partial
        images are disabled")."""
        path = os.path.join(os.path.dirname(st.ctrd_dir), "storage-zstdchunked.conf")
        pm = os.path.join(os.path.dirname(st.ctrd_dir), "podman")
        with open(path, "w") as f:
            f.write(f"""[storage]
driver = "overlay"
graphroot = "{pm}/root"
runroot = "{pm}/run"
[storage.options.pull_options]
enable_partial_images = "true"
use_hard_links = "false"
convert_images = "false"
""")
        return path

    def estargz_convert(self, addr, img, tag, prefetch):
        """SRC -> SRC:TAG with ctr-remote (`image convert --estargz --oci
        --estargz-record-in`) through a plain containerd on an empty root; the record file
        lists the files the traced start opened, as `ctr-remote image optimize` records."""
        st = self.host
        self.containerd_start(st)
        try:
            rec = os.path.join(st.ctrd_dir, "record.json")
            with open(rec, "w") as f:
                for p in prefetch:
                    f.write(json.dumps({"path": p.lstrip("/")}) + "\n")
            cr = [f"{self.peers_bin}/ctr-remote", "-a", st.ctrd_sock, "-n", "llbench-convert"]
            src, dst = f"{addr}/lazylayer/{img}:latest", f"{addr}/lazylayer/{img}:{tag}"
            sh(cr + ["image", "pull", "--plain-http", src], timeout=1200)
            sh(cr + ["image", "convert", "--estargz", "--oci", "--estargz-record-in", rec, src, dst], timeout=1800)
            sh(cr + ["image", "push", "--plain-http", dst], timeout=1800)
        finally:
            self.containerd_stop()
        m = manifest(addr, f"lazylayer/{img}", tag)
        toc = [l for l in m["layers"] if "containerd.io/snapshot/stargz/toc.digest" in (l.get("annotations") or {})]
        if len(toc) != len(m["layers"]):
            raise RuntimeError(f"{img}:{tag}: {len(m['layers']) - len(toc)} layers without an eStargz TOC")
        # The TOC is inside each layer, at its end.
        return {"blob_bytes": sum(l["size"] for l in m["layers"]), "bootstrap_bytes": None,
                "prefetch_files": len(prefetch)}

    def zstdchunked_convert(self, addr, img, tag):
        """SRC -> SRC:TAG with the sid stack's podman (`push --compression-format
        zstd:chunked`), from a store of its own, removed after."""
        st = self.sid
        tmp = os.path.join(os.path.dirname(st.ctrd_dir), "zstdchunked-convert")
        rmtree(tmp, st.views(tmp))
        pm = st.podman_bin + ["--root", f"{tmp}/root", "--runroot", f"{tmp}/run", "--storage-driver", "overlay"]
        src = f"{addr}/lazylayer/{img}:latest"
        try:
            sh(pm + ["pull", "-q", "--tls-verify=false", src], timeout=1200)
            sh(pm + ["push", "-q", "--tls-verify=false", "--compression-format", "zstd:chunked",
                     "--force-compression", src, f"docker://{addr}/lazylayer/{img}:{tag}"], timeout=1800)
        finally:
            sh(pm + ["system", "reset", "-f"], check=False)
            rmtree(tmp, st.views(tmp))
        m = manifest(addr, f"lazylayer/{img}", tag)
        zl = [l for l in m["layers"] if "io.github.containers.zstd-chunked.manifest-position" in
              (l.get("annotations") or {})]
        if len(zl) != len(m["layers"]):
            raise RuntimeError(f"{img}:{tag}: {len(m['layers']) - len(zl)} layers without a zstd:chunked TOC")
        # Its metadata (TOC, tar-split) is inside each layer; no prefetch list.
        return {"blob_bytes": sum(l["size"] for l in m["layers"]), "bootstrap_bytes": None, "prefetch_files": None}

    def peer_local(self, contender, ref):
        """Section 2: a peer's image under a running container (`sleep`), every file read
        once through it so that the peer's cache holds the whole image, as a pulled image
        is local; returns the container's root (the overlay over the peer's mount)."""
        st = self.host
        snap = PEER_SNAPSHOTTERS[contender]
        self.containerd_start(st, snapshotter=snap)
        pull, _, _ = self.commands(contender, None, ref, None)
        sh(pull, timeout=600)
        r = pull[-1]
        cid = f"llbench-fs-{contender}"
        sh(st.ctr_run + ["-d", "--snapshotter", snap, "--net-host", r, cid, "sleep", "1000000"])
        rootfs = os.path.join(st.ctrd_dir, "state", "io.containerd.runtime.v2.task", "llbench", cid, "rootfs")
        # Not `tar -f /dev/null`: GNU tar skips reading contents for it. pipefail: a read
        # error (EIO from the peer) fails the set-up instead of passing silently.
        sh(["bash", "-o", "pipefail", "-c", f"tar -C {shlex.quote(rootfs)} -cf - . | wc -c"], timeout=1800)
        return rootfs

    # lazylayer ----------------------------------------------------------------------
    def ll_empty(self):
        self.runc_cleanup()
        rmtree(self.ll_root)

    def runc_cleanup(self):
        """Delete containers named llbench-* that a killed lazylayer left to runc."""
        for root in [os.path.join(self.ll_root, "runc"), "/run/lazylayer/runc"]:
            if not os.path.isdir(root):
                continue
            r = sh(["runc", "--root", root, "list", "-q"], check=False)
            for cid in r.stdout.split():
                if cid.startswith("llbench-"):
                    sh(["runc", "--root", root, "delete", "-f", cid], check=False)

    # one cold (or warm) start ----------------------------------------------------------
    def which(self, contender):
        """(the host twin of a contender, its stack)."""
        if contender in SID_CONTENDERS:
            return SID_CONTENDERS[contender], self.sid
        return contender, self.host

    def commands(self, contender, img, ref, opt_ref):
        """(pull argv or None, run argv, stop function) of a contender."""
        cid = f"llbench-{contender}"
        kind, st = self.which(contender)
        if kind in ("podman", "podman-zstdchunked"):
            pm = st.podman
            if kind == "podman-zstdchunked":
                # Its own storage.conf: the same store, partial pulls on.
                pm = ["env", f"CONTAINERS_STORAGE_CONF={self.zstdchunked_conf(st)}"] + st.podman
                ref = ref.rsplit(":", 1)[0] + ":" + PEER_CONTENDERS[contender]
            pull = pm + ["pull", "-q", "--tls-verify=false", ref]
            run = pm + ["run", "--rm", "--pull=never", "--network=host", "--name", cid, ref]
            stop = lambda p: sh(pm + ["kill", "--signal", "KILL", cid], check=False)
        elif kind == "containerd":
            pull = st.ctr + ["image", "pull", "--plain-http", ref]
            run = st.ctr_run + ["--rm", "--net-host", ref, cid]
            stop = lambda p: sh(st.ctr + ["task", "kill", "-s", "SIGKILL", cid], check=False)
        elif kind in PEER_SNAPSHOTTERS:
            # The converted image: the same host as ref (the relay's, in an RTT cell).
            r = ref.rsplit(":", 1)[0] + ":" + PEER_CONTENDERS[kind]
            snap = PEER_SNAPSHOTTERS[kind]
            pull = [f"{self.peers_bin}/ctr-remote", "-a", st.ctrd_sock, "-n", "llbench", "image", "rpull",
                    "--plain-http", "--snapshotter", snap, r]
            if kind == "nydus":
                # nydus-snapshotter reads the image's names from containerd's labels.
                pull[-1:-1] = ["--use-containerd-labels"]
            run = st.ctr_run + ["--rm", "--snapshotter", snap, "--net-host", r, cid]
            stop = lambda p: sh(st.ctr + ["task", "kill", "-s", "SIGKILL", cid], check=False)
        elif kind == "containerd-lazylayer":
            pull = [self.ll, "--root", st.snap_root, "containerd", "pull", "--address", st.ctrd_sock,
                    "--namespace", "llbench", "--snapshotter", "lazylayer", opt_ref]
            run = st.ctr_run + ["--rm", "--snapshotter", "lazylayer", "--net-host", opt_ref, cid]
            stop = lambda p: sh(st.ctr + ["task", "kill", "-s", "SIGKILL", cid], check=False)
        else:
            r = opt_ref if contender in RUN_CONTENDERS else ref
            if contender == "lazylayer-attached":
                # SRC's copy with the boot layer attached (attach_one): same host as ref.
                r = attached_ref(ref)
            if contender == "lazylayer-base" and img in self.base_optimized:
                # Same host as opt_ref (the relay's, in an RTT cell), the baseline's tag.
                r = r.rsplit(":", 1)[0] + ":optimized-base"
            ll = self.ll_base if contender == "lazylayer-base" else self.ll
            pull = None
            # LAZYLAYER_RUN_ARGS: extra `run` options for experiments (e.g. "--prefetch off").
            extra = os.environ.get("LAZYLAYER_RUN_ARGS", "").split()
            run = [ll, "--root", self.ll_root, "run", "--rm", *extra, "--name", cid, "--net", "host", r]
            stop = lambda p: p.send_signal(signal.SIGINT)
        return pull, run, stop

    def start(self, contender, img, ref, opt_ref, timeout, warm=False):
        """Time from the pull command's start to ready. Returns a result dict."""
        spec = IMAGES[img]
        pull, run, stop = self.commands(contender, img, ref, opt_ref)
        if warm:
            pull = None
        self.seq += 1
        tag = f"{self.seq:04d}-{img}-{contender}{'-warm' if warm else ''}"
        errf = open(f"{self.logs}/{tag}.err", "w")
        port = spec.get("port")
        if port and not wait_port_closed(port, 10):
            raise RuntimeError(f"port {port} still open before {tag}")
        res = {"ok": False}
        lo0, re0 = lo_bytes(), tcp_retrans()
        t0 = now()
        # The relay's request log is on the same clock (CLOCK_MONOTONIC).
        res["t_start"] = t0
        deadline = t0 + timeout
        try:
            if pull:
                p = subprocess.run(pull, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=errf, timeout=timeout)
                res["pull"] = now() - t0
                if p.returncode != 0:
                    res["error"] = f"pull exited {p.returncode}"
                    return res
            proc = subprocess.Popen(run, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=errf)
            try:
                if spec["kind"] == "batch":
                    self._batch(proc, spec, res, t0, deadline, lo0, re0)
                else:
                    self._server(proc, spec, res, t0, deadline, lo0, re0)
            finally:
                stop_process(proc, stop)
                if port and not wait_port_closed(port, 20):
                    self.runc_cleanup()
                    res["ok"] = False
                    res["error"] = res.get("error") or "server still up after stop"
        except subprocess.TimeoutExpired:
            res["error"] = f"timeout after {timeout:.0f} s"
        finally:
            errf.close()
        if not res["ok"]:
            with open(f"{self.logs}/{tag}.err") as f:
                tail = f.read()[-600:].strip()
            res["error"] = f"{res.get('error', 'failed')}: {tail}" if tail else res.get("error", "failed")
            log(f"  {tag}: FAILED: {res['error']}")
        return res

    def _batch(self, proc, spec, res, t0, deadline, lo0, re0):
        fd = proc.stdout.fileno()
        out = b""
        while True:
            left = deadline - now()
            if left <= 0:
                res["error"] = "timeout waiting for output"
                proc.kill()
                return
            r, _, _ = select.select([fd], [], [], min(left, 1.0))
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                if not out:
                    res["ready"] = now() - t0
                    res["lo_bytes_ready"] = lo_bytes() - lo0
                    res["tcp_retrans_ready"] = tcp_retrans() - re0
                out += chunk
                if "ready" in res:
                    break
        rest, _ = proc.communicate(timeout=max(1.0, deadline - now()))
        out += rest or b""
        res["exit_code"] = proc.returncode
        res["done"] = now() - t0
        res["lo_bytes_done"] = lo_bytes() - lo0
        text = out.decode(errors="replace")
        if spec["expect"] in text and proc.returncode == 0:
            res["ok"] = True
        else:
            res["error"] = f"exit {proc.returncode}, stdout {text[:200]!r}"

    def _server(self, proc, spec, res, t0, deadline, lo0, re0):
        while now() < deadline:
            if probe(spec["kind"], spec["port"]):
                res["ready"] = now() - t0
                res["lo_bytes_ready"] = lo_bytes() - lo0
                res["tcp_retrans_ready"] = tcp_retrans() - re0
                res["ok"] = True
                break
            if proc.poll() is not None:
                res["error"] = f"exited {proc.returncode} before ready"
                return
            time.sleep(POLL)
        else:
            res["error"] = "timeout waiting for readiness"

    # section 1 ----------------------------------------------------------------------
    def prepare(self, contender):
        kind, st = self.which(contender)
        if kind in ("podman", "podman-zstdchunked"):
            self.podman_empty(st)
        elif kind == "containerd":
            self.containerd_start(st)
        elif kind == "containerd-lazylayer":
            self.containerd_start(st, snapshotter="lazylayer")
        elif kind in PEER_SNAPSHOTTERS:
            self.containerd_start(st, snapshotter=PEER_SNAPSHOTTERS[kind])
        else:
            self.ll_empty()

    def make_local(self, contender, addr, img, opt_ref):
        """Before a warm start: every layer of the optimized image in the contender's
        store, as after a pull (not timed). `run --rm` cuts its prefetch at exit and the
        snapshotter cuts its own when the image's last lazy snapshot goes, so both get
        the rest by `lazylayer pull` into their store (for the snapshotter, its --root,
        shared by design). Returns True when every layer is there."""
        kind, st = self.which(contender)
        root = {"lazylayer": self.ll_root, "lazylayer-base": self.ll_root,
                "containerd-lazylayer": st.snap_root}.get(kind)
        if root is None:
            return True
        ll = self.ll_base if contender == "lazylayer-base" else self.ll
        if sh([ll, "--root", root, "pull", "-q", opt_ref], check=False, timeout=1200).returncode != 0:
            return False
        # The pull leaves its extracted files dirty in the page cache (no fsync, as
        # podman's overlay driver); the warm start's own small syncs would otherwise
        # wait for their writeback (ext4 data=ordered), measured here at +0.15-0.3 s.
        # containerd's unpack syncs inside its pull; an image local "at rest" is warm.
        os.sync()
        repo, tag = opt_ref.split("/", 1)[1].rsplit(":", 1)
        return all(os.path.exists(os.path.join(root, "layers", "sha256", l["digest"].split(":")[1], "layer.json"))
                   for l in manifest(addr, repo, tag)["layers"])

    def cold(self, contender, img, ref, opt_ref, timeout, relay_log=None):
        self.prepare(contender)
        kept = self.known_links.get(contender)
        if kept:
            # LLBENCH_KNOWN_LINK: the store empty but for what the contender's last
            # start in this cell noted of the registry's link (no image bytes).
            shutil.copytree(kept, os.path.join(self.ll_root, "links"))
        drop_caches()
        off = self.reglog.offset()
        roff = relay.log_offset(relay_log) if relay_log else None
        res = self.start(contender, img, ref, opt_ref, timeout)
        links = os.path.join(self.ll_root, "links")
        if KNOWN_LINK and contender in RUN_CONTENDERS and os.path.isdir(links):
            dest = os.path.join(self.work, f"links-{contender}")
            rmtree(dest)
            shutil.copytree(links, dest)
            self.known_links[contender] = dest
        res["bytes"], res["blob_gets"] = self.reglog.since(off)
        if relay_log and res["ok"]:
            # Requests whose first byte reached the relay between the clock's start and
            # ready: how many, the sequential rounds among them, and the body bytes of
            # their responses complete by ready.
            t0 = res["t_start"]
            res["relay"] = relay.summarize(relay_log, roff, t0, t0 + res["ready"])
            # Where this start's requests are in the log run.sh keeps (OUT/relay/*.log.gz).
            res["relay_log"] = {"file": os.path.basename(relay_log), "offset": roff}
            if res["relay"]["requests"] == 0:
                # A cold start fetches something: none through the relay means the
                # contender reached the registry some other way, without the RTT.
                res["ok"] = False
                res["error"] = "no request went through the relay before ready"
        return res


def set_link(name, hops=1, unshaped_port=None):
    """Shape the namespace's loopback for link `name`. hops = how many times each payload
    byte crosses the one tbf (RELAY_HOPS for the relay's "double" shaping), so the payload
    rate stays the nominal one. unshaped_port: TCP traffic from or to this port (the
    registry's, behind the relay) bypasses the tbf, under an htb root whose default class
    holds it. Returns the tbf rate (bits/s) or None."""
    rate = LINKS[name]
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], stderr=subprocess.DEVNULL)
    if rate is None:
        return None
    tbf = ["tbf", "rate", f"{int(rate * hops)}bit", "burst", "256kb", "latency", "400ms"]
    if unshaped_port is None:
        sh(["tc", "qdisc", "replace", "dev", "lo", "root"] + tbf)
        return rate * hops
    tc = ["tc", "qdisc", "add", "dev", "lo"]
    sh(tc + ["root", "handle", "1:", "htb", "default", "20"])
    # htb classes far above any link here: only the tbf under 1:20 shapes.
    for cls in ("1:10", "1:20"):
        sh(["tc", "class", "add", "dev", "lo", "parent", "1:", "classid", cls, "htb", "rate", "100gbit"])
    sh(tc + ["parent", "1:20", "handle", "20:"] + tbf)
    for way in ("sport", "dport"):
        sh(["tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", way, str(unshaped_port), "0xffff", "flowid", "1:10"])
    return rate * hops


def registry_get(addr, path, headers=None, limit=None):
    req = urllib.request.Request(f"http://{addr}{path}", headers=headers or {})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read() if limit is None else r.read(limit)


MANIFEST_ACCEPT = ("application/vnd.oci.image.manifest.v1+json,"
                   "application/vnd.docker.distribution.manifest.v2+json")


def manifest(addr, repo, tag):
    return json.loads(registry_get(addr, f"/v2/{repo}/manifests/{tag}", {"Accept": MANIFEST_ACCEPT}))


def manifest_digest(addr, repo, tag):
    """sha256:<hex> of the manifest's bytes as the registry serves them."""
    body = registry_get(addr, f"/v2/{repo}/manifests/{tag}", {"Accept": MANIFEST_ACCEPT})
    return "sha256:" + hashlib.sha256(body).hexdigest()


def measure_link(addr, name, blob, rly=None):
    """Measured throughput of a blob GET (a Range of at most ~2 s of the link): Bps over
    the whole request, body_Bps from the response's first byte (without the round
    trips a relay adds), and with a relay, the CPU it used meanwhile."""
    rate = LINKS[name]
    repo, digest, size = blob
    want = size if rate is None else min(size, int(rate / 8 * 2))
    cpu0 = rly.cpu_seconds() if rly else None
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=600)
    try:
        t0 = now()
        c.request("GET", f"/v2/{repo}/blobs/{digest}", headers={"Range": f"bytes=0-{want - 1}"})
        r = c.getresponse()
        first = r.read(1)
        t1 = now()
        n = len(first)
        while chunk := r.read(1 << 20):
            n += len(chunk)
        dt = now() - t0
    finally:
        c.close()
    out = {"bytes": n, "seconds": dt, "Bps": n / dt, "body_Bps": (n - 1) / max(dt - (t1 - t0), 1e-9)}
    if rly:
        out["relay_cpu_seconds"] = rly.cpu_seconds() - cpu0
    return out


# --- main -------------------------------------------------------------------------

def optimize_images(b, addr, images, out):
    """optimize SRC -> SRC:optimized, once per image, cold store, unshaped link;
    with --baseline, the baseline binary also optimizes SRC -> SRC:optimized-base."""
    for img in images:
        optimize_one(b, addr, img, out, b.ll, "optimized")
        if "lazylayer-attached" in CONTENDERS:
            attach_one(b, addr, img, out["images"][img])
        if b.ll_base:
            base = {"compressed": out["images"][img]["compressed"]}
            optimize_one(b, addr, img, {"images": {img: base}}, b.ll_base, "optimized-base")
            if base.get("opt_ref"):
                b.base_optimized.add(img)
                out["images"][img]["opt_ref_base"] = base["opt_ref"]
                out["images"][img]["boot_start_bytes_base"] = base.get("boot_start_bytes")


def optimize_one(b, addr, img, out, ll, tag):
    """`ll` optimizes SRC -> SRC:TAG; what it made goes into out["images"][img]."""
    spec = IMAGES[img]
    src, dst = f"{addr}/lazylayer/{img}:latest", f"{addr}/lazylayer/{img}:{tag}"
    root = os.path.join(b.work, "opt")
    rmtree(root)
    # The trace feeds the peers' own prefetch lists (convert_peers).
    trace = os.path.join(b.work, f"trace-{img}-{tag}.json")
    argv = [ll, "--root", root, "optimize", "--json", "--trace-out", trace]
    if spec.get("kind") == "http":
        # Ready = first request served, as the measurement defines it, so the
        # trace holds what serving that request reads.
        argv += ["--wait", f"http:{spec['port']}/", "--net", "host"]
    elif spec.get("port"):
        argv += ["--wait", f"port:{spec['port']}", "--net", "host"]
    argv += [src, dst]
    drop_caches()
    log(f"optimize {img} -> :{tag}")
    t0 = now()
    r = sh(argv, check=False, timeout=1200)
    dt = now() - t0
    info = out["images"][img]
    info["optimize_seconds"] = dt
    if r.returncode != 0:
        info["optimize_error"] = r.stderr.strip()[-800:]
        log(f"  optimize {img} FAILED: {info['optimize_error']}")
    else:
        try:
            info["optimize_report"] = json.loads(r.stdout)
        except json.JSONDecodeError:
            info["optimize_report"] = None
        m = manifest(addr, f"lazylayer/{img}", tag)
        boot = m["layers"][-1]["size"]
        info["opt_ref"] = dst
        info["boot_bytes"] = boot
        # Compressed bytes the start reads before the workload runs (index region +
        # the boot chunks the trace read), when this lazylayer reports it.
        info["boot_start_bytes"] = (info["optimize_report"] or {}).get("boot_start_bytes")
        info["boot_share"] = boot / info["compressed"]
        log(f"  {img}: {dt:.1f} s, boot layer {boot / 1e6:.1f} MB "
            f"({100 * boot / info['compressed']:.1f}% of {info['compressed'] / 1e6:.1f} MB)")
        if tag == "optimized":
            convert_peers(b, addr, img, trace, info)
    rmtree(root)


def attached_ref(ref):
    """SRC's copy that carries an attached boot layer: `lazylayer/IMG-attached`, where
    IMG's own repository stays plain (lazylayer-unopt runs it: an artifact there would
    make that start lazy too)."""
    repo, tag = ref.rsplit(":", 1)
    return f"{repo}-attached:{tag}"


def attach_one(b, addr, img, info):
    """SRC copied into its own repository (the same manifest, so the same digest, its
    layers mounted, not uploaded) and `optimize --attach` of that copy, the workload as
    optimize_one's; info["attached_ref"] on success."""
    spec = IMAGES[img]
    src = f"{addr}/lazylayer/{img}:latest"
    att = attached_ref(src)
    root = os.path.join(b.work, "attach")
    rmtree(root)
    try:
        sh([b.ll, "--root", root, "pull", "-q", src], timeout=1200)
        sh([b.ll, "--root", root, "push", src, att], timeout=1200)
        argv = [b.ll, "--root", root, "optimize", "--json", "--attach"]
        if spec.get("kind") == "http":
            argv += ["--wait", f"http:{spec['port']}/", "--net", "host"]
        elif spec.get("port"):
            argv += ["--wait", f"port:{spec['port']}", "--net", "host"]
        t0 = now()
        r = sh(argv + [att], check=False, timeout=1200)
        if r.returncode != 0:
            info["attach_error"] = r.stderr.strip()[-800:]
            log(f"  optimize --attach {img} FAILED: {info['attach_error']}")
            return
        rep = json.loads(r.stdout)
        if rep["manifest_digest"] != manifest_digest(addr, f"lazylayer/{img}", "latest"):
            raise RuntimeError(f"{att} does not have {src}'s manifest digest")
        info["attached_ref"] = att
        info["attach_seconds"] = now() - t0
        info["attached_boot_start_bytes"] = rep.get("boot_start_bytes")
        log(f"  {img}: boot layer attached to {att} in {info['attach_seconds']:.1f} s "
            f"(artifact {rep['attached']['artifact_digest'][:19]})")
    finally:
        rmtree(root)


def convert_peers(b, addr, img, trace, info):
    """Each peer timed converts SRC -> SRC:<its tag> with its own tool, its prefetch list
    the files the traced start opened (the same workload lazylayer's boot layer holds)."""
    for c in [c for c in CONTENDERS if c in PEER_CONTENDERS]:
        t0 = now()
        try:
            if c == "nydus":
                prefetch = peers.trace_prefetch_list(trace)
                res = peers.nydus_convert(addr, f"lazylayer/{img}", "latest", PEER_CONTENDERS[c], prefetch,
                                          f"{b.peers_bin}/nydus-image", os.path.join(b.work, f"convert-{c}"))
            elif c == "estargz":
                res = b.estargz_convert(addr, img, PEER_CONTENDERS[c], peers.trace_prefetch_list(trace))
            else:
                res = b.zstdchunked_convert(addr, img, PEER_CONTENDERS[c])
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
            info.setdefault("peers", {})[c] = {"error": str(e)[-800:]}
            log(f"  {img}: {c} conversion FAILED: {e}")
            continue
        res["seconds"] = now() - t0
        info.setdefault("peers", {})[c] = res
        b.peer_images.setdefault(img, set()).add(c)
        log(f"  {img}: {c} image in {res['seconds']:.1f} s: layers {res['blob_bytes'] / 1e6:.1f} MB"
            + (f", bootstrap {res['bootstrap_bytes'] / 1e3:.0f} kB, {res['prefetch_files']} files to prefetch"
               if res["bootstrap_bytes"] is not None else ""))


def section1(b, addr, images, links, runs, skip, out, rtts=(), rtt_links=(), relay_shaping="client-hop"):
    """Cold starts per image x link x contender. With `rtts`, the links in `rtt_links` are
    measured once per RTT with the delay relay (bench/relay.py) in front of the registry:
    every contender of such a cell fetches through it, at the nominal payload rate."""
    first_path = None
    for link in links:
        out["links"][link] = {"nominal_bps": LINKS[link]}
        big = max(((f"lazylayer/{i}", l["digest"], l["size"]) for i in images
                   for l in manifest(addr, f"lazylayer/{i}", "latest")["layers"]), key=lambda x: x[2])
        for rtt in (rtts if link in rtt_links else [None]):
            first_path = first_path or (link, rtt)
            rly = None
            try:
                if rtt is None:
                    out["links"][link]["tbf_bps"] = set_link(link)
                    out["links"][link].update(measure_link(addr, link, big))
                    log(f"link {link}: measured {out['links'][link]['Bps'] * 8 / 1e6:.0f} Mbit/s")
                    path_addr, relay_log = addr, None
                else:
                    os.makedirs(os.path.join(b.work, "relay"), exist_ok=True)
                    relay_log = os.path.join(b.work, "relay", f"{link}-{rtt}ms.log")
                    rly = relay.RelayProcess(addr, rtt, relay_log, pid_file=os.path.join(b.work, "relay.pid"))
                    path_addr = rly.addr
                    if relay_shaping == "double":
                        tbf = set_link(link, hops=RELAY_HOPS)
                    else:
                        tbf = set_link(link, unshaped_port=int(addr.rsplit(":", 1)[1]))
                    m = measure_link(path_addr, link, big, rly)
                    m.update(tbf_bps=tbf, relay_shaping=relay_shaping)
                    out["links"][link]["tbf_bps"] = tbf
                    out["links"][link].setdefault("rtts", {})[str(rtt)] = m
                    # The link's own figure: through the relay (the path every contender takes).
                    for k in ("bytes", "seconds", "Bps", "body_Bps"):
                        out["links"][link].setdefault(k, m[k])
                    log(f"link {link} at RTT {rtt} ms through the relay (tbf {tbf / 1e6:.0f} Mbit/s, "
                        f"{relay_shaping}): payload "
                        f"{m['body_Bps'] * 8 / 1e6:.0f} Mbit/s from the first byte, "
                        f"{m['Bps'] * 8 / 1e6:.0f} Mbit/s whole request; relay CPU "
                        f"{100 * m['relay_cpu_seconds'] / m['seconds']:.0f}% of a core")
                for img in images:
                    cell = {"image": img, "link": link, "rtt_ms": rtt, "relay": rtt is not None,
                            "lo_hops": RELAY_HOPS if rtt is not None else 1, "contenders": {}}
                    out["cells"].append(cell)
                    if (img, link) in skip:
                        cell["skipped"] = skip[(img, link)]
                        log(f"{img} @ {link}: skipped ({cell['skipped']})")
                        continue
                    warm = (link, rtt) == first_path
                    run_cell(b, addr, path_addr, relay_log, cell, runs, warm, out)
                    save(out)
            finally:
                if rly:
                    rly.stop()
    set_link("loopback")


def run_cell(b, addr, path_addr, relay_log, cell, runs, warm, out):
    """The cold runs of one cell, every contender fetching from `path_addr` (the registry
    or the relay in front of it); with `warm`, a warm start after each contender's cold one
    (once per image, for the floor)."""
    img, link = cell["image"], cell["link"]
    where = f"{img} @ {link}" + (f" RTT {cell['rtt_ms']} ms" if cell["relay"] else "")
    info = out["images"][img]
    ref, opt_ref = info["ref"], info.get("opt_ref")
    if path_addr != addr:
        ref = ref.replace(addr, path_addr, 1)
        opt_ref = opt_ref and opt_ref.replace(addr, path_addr, 1)
    rate = LINKS[link] or 8e9
    timeout = 300 + 3 * info["compressed"] * 8 / rate
    for c in CONTENDERS:
        cell["contenders"][c] = {"runs": []}
    b.known_links.clear()
    if KNOWN_LINK:
        # A node that started from this registry before, over this link: one untimed
        # start per `lazylayer run` contender notes the link for the timed ones.
        for c in RUN_CONTENDERS:
            if c in CONTENDERS and b.run_available and opt_ref:
                try:
                    b.cold(c, img, ref, opt_ref, timeout, None)
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    log(f"  {where} {c}: the untimed start that notes the link failed: {e}")
    for r in range(runs):
        k = r % len(CONTENDERS)
        order = CONTENDERS[k:] + CONTENDERS[:k]
        for c in order:
            cc = cell["contenders"][c]
            if c.startswith("lazylayer") and not b.run_available:
                cc["na"] = "run not available"
                continue
            if c in ("containerd-lazylayer", "containerd-sid-lazylayer") and not b.snap_available:
                cc["na"] = "snapshotter not available"
                continue
            if c in ("lazylayer", "lazylayer-base", "containerd-lazylayer", "containerd-sid-lazylayer") and not opt_ref:
                cc["na"] = "optimize failed"
                continue
            if c in PEER_CONTENDERS and c not in b.peer_images.get(img, ()):
                cc["na"] = "conversion failed"
                continue
            if c == "lazylayer-attached" and not info.get("attached_ref"):
                cc["na"] = "optimize --attach failed"
                continue
            try:
                res = b.cold(c, img, ref, opt_ref, timeout, relay_log)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                res = {"ok": False, "error": str(e)[-600:], "bytes": None, "blob_gets": None}
                log(f"  {where} {c}: FAILED: {res['error']}")
            cc["runs"].append(res)
            rq = res.get("relay")
            log(f"{where} run {r + 1}/{runs} {c}: "
                + (f"{res['ready']:.2f} s, {res['lo_bytes_ready'] / 1e6:.1f} MB on lo before ready, "
                   f"registry sent {res['bytes'] / 1e6:.1f} MB"
                   + (f", {rq['requests']} requests in {rq['rounds']} rounds before ready" if rq else "")
                   if res["ok"] else "failed"))
            # Warm starts (for the floor) once per image, on the first link of the run.
            # The sid contenders' too: their images stay local as their twins' do.
            # Not the peers': their images are never whole in a store of theirs.
            # Not lazylayer-attached's: once local it is lazylayer's native start.
            if (warm and res["ok"] and c not in ("lazylayer-unopt", "lazylayer-attached")
                    and c not in PEER_CONTENDERS):
                # Warm = the image local whole, as containerd's and podman's are.
                if not b.make_local(c, addr, img, opt_ref):
                    log(f"  {img} {c}: the image did not become local before the warm start")
                w = b.start(c, img, ref, opt_ref, timeout, warm=True)
                out["warm"].setdefault(img, {}).setdefault(c, []).append(
                    w.get("ready") if w["ok"] else None)
                # Again with the page cache dropped, as before a cold start: what
                # reading the runtime, the tools and the image's files from disk
                # adds to a start that fetches nothing (not part of the floor).
                drop_caches()
                w = b.start(c, img, ref, opt_ref, timeout, warm=True)
                out.setdefault("warm_cache_dropped", {}).setdefault(img, {}).setdefault(c, []).append(
                    w.get("ready") if w["ok"] else None)
            if c.startswith("containerd") or c in PEER_CONTENDERS:
                # Not left running under the next contender: the snapshotter
                # may still be prefetching over the link (not timed).
                b.containerd_stop()
    for c, cc in cell["contenders"].items():
        ok = [x for x in cc["runs"] if x["ok"]]
        cc["median"] = median([x["ready"] for x in ok])
        cc["median_bytes"] = median([x["bytes"] for x in ok])
        cc["median_lo_bytes_ready"] = median([x.get("lo_bytes_ready") for x in ok])
        cc["max_tcp_retrans_ready"] = max([x.get("tcp_retrans_ready") or 0 for x in ok], default=None)
        if cell["relay"]:
            for k in ("requests", "rounds", "connections", "body_bytes", "blob_gets"):
                cc[f"median_{k}_ready"] = median([(x.get("relay") or {}).get(k) for x in ok])
            cc["unparsed"] = sum((x.get("relay") or {}).get("unparsed", 0) for x in ok)
        cc["failed"] = len(cc["runs"]) - len(ok)
    b.containerd_stop()
    b.podman_empty()
    b.ll_empty()


# --- section 2: steady-state file-system overhead ------------------------------------

RANDOM_PY = r"""
import os, random, sys
files = [os.open(p, os.O_RDONLY) for p in sys.argv[2:]]
sizes = [os.fstat(f).st_size for f in files]
rnd = random.Random(42)
n = int(sys.argv[1]); total = 0
for _ in range(n):
    i = rnd.randrange(len(files))
    total += len(os.pread(files[i], 4096, rnd.randrange(0, max(1, sizes[i] - 4096))))
print(total, file=sys.stderr)
"""


def fs_workloads(merged, reads):
    """Shell snippets run inside the image root (chroot or container)."""
    usr = os.path.join(merged, "usr")
    files = []
    for dp, _, fns in os.walk(usr):
        for fn in fns:
            p = os.path.join(dp, fn)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if os.path.isfile(p) and not os.path.islink(p):
                files.append((st.st_size, "/" + os.path.relpath(p, merged)))
    files.sort(reverse=True)
    largest = [p for _, p in files[:30]]
    large_bytes = sum(s for s, _ in files[:30])
    rand = [p for s, p in files if s >= 256 * 1024][:300]
    q = " ".join(shlex.quote(p) for p in largest)
    return {
        "seq_largest": (f"cat {q} | wc -c", f"cat of the 30 largest files in /usr ({large_bytes / 1e6:.0f} MB)"),
        "tar_usr": ("tar cf - /usr | wc -c", "tar c /usr | wc -c (every file read, in tree order)"),
        "random_4k": (f"python3 -c {shlex.quote(RANDOM_PY)} {reads} " + " ".join(shlex.quote(p) for p in rand),
                      f"{reads} random 4 KiB preads over {len(rand)} files >= 256 KiB (python3)"),
        "walk_stat": ("find /usr -xdev -printf '%s %m %U %T@\\n' | wc -l",
                      "find /usr -xdev -printf size/mode/uid/mtime (readdir + stat of every entry)"),
    }


def peer_fs_setup(b, c, info, mnts, res):
    """Section 2: peer c's image local under a container (Bench.peer_local), its root
    checked against the image's layers under overlayfs once. False if it failed."""
    log(f"fs: {c} image under a container, every file read once (its cache filled)")
    try:
        mnts[c] = b.peer_local(c, info["ref"])
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log(f"fs: {c} set-up FAILED: {e}")
        res["notes"].append(f"{c}: set-up failed: {str(e)[-300:]}")
        return False
    if c not in res.setdefault("peer_trees", {}):
        # The converted image must be the same root: paths, types, modes, sizes.
        want, got = tree_of(mnts["overlayfs"]), tree_of(mnts[c])
        # ctr run --net-host creates these in the container's root to bind the host's on.
        for p in RUNTIME_FILES:
            if p not in want:
                got.pop(p, None)
        diff = sorted(set(want.items()) ^ set(got.items()))
        res["peer_trees"][c] = {"entries": len(got), "differ": len(diff), "first": [str(x) for x in diff[:10]]}
        log(f"fs: {c} root vs the image's layers: {len(got)} entries, {len(diff)} differ"
            + (f" (first: {diff[:3]})" if diff else ""))
    return True


RUNTIME_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname")


def tree_of(root):
    """{path: (type and mode, size or link target)} of every entry below root."""
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            extra = os.readlink(p) if os.path.islink(p) else (st.st_size if os.path.isfile(p) else None)
            out["/" + os.path.relpath(p, root)] = (st.st_mode, extra)
    return out


# The workload runs in one shell right after caches were dropped (cold), then at once
# FS_WARM_PASSES times more (warm: their median; a warm `cat` of python3 lasts ~25 ms, where
# one pass can come out twice another's on this 2-core VM). Times are taken inside, so
# container start-up is not counted.
# A section-2 workload starts FS_SETTLE_S after its shell does, and the page cache is dropped
# FS_DROP_AT_S after the root's command was launched: "cold" is then the file system's cold
# steady state, the same for every root, not the first second of a container's life (a lazy
# root's daemon records the image and writes its store then, with fsyncs that a cold read
# would queue behind: python3's cold `cat` measured 1.24x on the stub-tree root started that
# way, 1.0x with the start settled, 6 pairs each).
FS_SETTLE_S, FS_DROP_AT_S, FS_WARM_PASSES = 2, 1.0, 3


def fs_script(snippet):
    # The shell and its workload on CPU 0 (the image's taskset, util-linux): `cat | wc -c`
    # spread over both CPUs took ~30 ms where on one it took ~21 ms, and the scheduler
    # picks either from pass to pass, a noise several times the bar's margin. A root's daemon, if
    # it has one, is outside the shell and keeps both CPUs.
    q = shlex.quote(snippet)
    return ("command -v taskset >/dev/null && taskset -pc 0 $$ >/dev/null && echo PINNED; "
            't() { s=$(date +%s%N); eval "$1" >&2; e=$(date +%s%N); echo "T $((e - s))"; }; '
            f"sleep {FS_SETTLE_S}; t {q}" + f"; t {q}" * FS_WARM_PASSES)


def run_cold(argv, timeout):
    """Run a section-2 workload (`fs_script`): the page cache dropped before it starts and
    again FS_DROP_AT_S into it, while its script sleeps."""
    drop_caches()
    later = threading.Timer(FS_DROP_AT_S, drop_caches)
    later.start()
    try:
        return sh(argv, check=False, timeout=timeout)
    finally:
        later.cancel()
        later.join()


def parse_times(stdout):
    """(cold, warm): the first pass, and the median of the FS_WARM_PASSES after it."""
    ts = [int(l.split()[1]) / 1e9 for l in stdout.splitlines() if l.startswith("T ")]
    if len(ts) != 1 + FS_WARM_PASSES:
        raise RuntimeError(f"workload printed {stdout[-300:]!r}")
    return ts[0], median(ts[1:])


def section2(b, addr, img, reps, reads, out):
    info = out["images"][img]
    res = {"image": img, "workloads": {}, "fs": {}, "notes": [], "warm_passes": FS_WARM_PASSES}
    out["fs"] = res
    base = os.path.join(b.work, "fsb")
    rmtree(base)
    os.makedirs(base)
    store = os.path.join(base, "store")
    log(f"fs: lazylayer pull {info['ref']} (layers for the overlay mounts)")
    sh([b.ll, "--root", store, "pull", "-q", info["ref"]], timeout=1200)
    layers = [l["digest"] for l in manifest(addr, f"lazylayer/{img}", "latest")["layers"]]
    lower = ":".join(os.path.join(store, "layers", "sha256", d.split(":")[1], "fs") for d in reversed(layers))
    mnts = {}
    for name in ["overlayfs", "fuse-overlayfs"]:
        d = os.path.join(base, name)
        for s in ["upper", "work", "merged"]:
            os.makedirs(os.path.join(d, s))
        opts = f"lowerdir={lower},upperdir={d}/upper,workdir={d}/work"
        if name == "overlayfs":
            sh(["mount", "-t", "overlay", "llbench", "-o", opts, f"{d}/merged"])
        else:
            sh(["fuse-overlayfs", "-o", opts, f"{d}/merged"])
        mnts[name] = f"{d}/merged"
    wl = fs_workloads(mnts["overlayfs"], reads)
    res["workloads"] = {k: v[1] for k, v in wl.items()}
    # lazylayer: the optimized image local whole, so `run` stacks the store's layers
    # under kernel overlayfs (no FUSE); lazylayer-fuse: the same layers in the store
    # but the image's record forgotten (`rmi`), so `run` opens it lazily and serves
    # the root through FUSE (passthrough reads), the path a lazily started
    # container keeps; its warm pass is the metadata after first touch.
    # lazylayer-fuse-pt: the same with FUSE passthrough on (`run --passthrough on`: every open
    # a round trip, reads by the kernel from the store's files), the default before Part 17.
    # lazylayer-lazy: the same lazily opened root as `run` serves it by default (Linux 6.5+):
    # overlayfs over a tmpfs tree of metadata stubs, the bytes from the store's layers (the
    # FUSE mount only as the data of files not local yet); lazylayer-fuse and -fuse-pt ask for
    # the FUSE root (`--lazy-root fuse`).
    contenders = ["overlayfs", "fuse-overlayfs", "lazylayer", "lazylayer-lazy", "lazylayer-fuse",
                  "lazylayer-fuse-pt"]
    if b.ll_base:
        contenders.append("lazylayer-fuse-base")
    # The snapshotter peers: the image local in the peer's cache, read through its FUSE
    # mount under the container's overlay. One at a time: each runs on its own
    # containerd, stopped before the next.
    contenders += [c for c in CONTENDERS if c in PEER_SNAPSHOTTERS and c in b.peer_images.get(img, ())]
    opt_ref = info.get("opt_ref")
    opt_ref_base = info.get("opt_ref_base", opt_ref)
    llroot = os.path.join(base, "ll")
    # The baseline binary keeps a store of its own: an older binary need not read a newer store.
    llroot_base = os.path.join(base, "ll-base")
    if b.run_available and opt_ref:
        log(f"fs: lazylayer pull {opt_ref} (every layer local before run)")
        sh([b.ll, "--root", llroot, "pull", "-q", opt_ref], timeout=1200)
        if b.ll_base:
            sh([b.ll_base, "--root", llroot_base, "pull", "-q", opt_ref_base], timeout=1200)
    else:
        res["notes"].append("lazylayer: " + ("`lazylayer run` not available yet" if not b.run_available
                                             else "no optimized image") + " - slot left empty")
    for c in contenders:
        res["fs"][c] = {k: {"cold": [], "warm": []} for k in wl}
    for rep in range(reps):
        k = rep % len(contenders)
        order = contenders[k:] + contenders[:k]
        for c in order:
            if c.startswith("lazylayer") and not (b.run_available and opt_ref):
                continue
            if c in PEER_SNAPSHOTTERS:
                if not peer_fs_setup(b, c, info, mnts, res):
                    continue
            for k, (snippet, _) in wl.items():
                script = fs_script(snippet)
                if c.startswith("lazylayer"):
                    ll, root, ref_c = ((b.ll_base, llroot_base, opt_ref_base) if c.endswith("-base")
                                       else (b.ll, llroot, opt_ref))
                    # native needs the image record (a lazylayer-fuse run writes it back
                    # once it finds every layer local); lazylayer-fuse needs it gone.
                    if c == "lazylayer":
                        sh([ll, "--root", root, "pull", "-q", ref_c], timeout=1200)
                    else:
                        sh([ll, "--root", root, "rmi", ref_c], check=False)
                    argv = [ll, "--root", root, "run", "--rm", "--stats", "--net", "none", "--prefetch", "off",
                            *lazy_root_flags(c), ref_c, "--", "/bin/sh", "-c", script]
                else:
                    argv = ["chroot", mnts[c], "/bin/sh", "-c", script]
                off = b.reglog.offset()
                r = run_cold(argv, 1800)
                if c.startswith("lazylayer"):
                    res["lazylayer_registry_bytes"] = res.get("lazylayer_registry_bytes", 0) + b.reglog.since(off)[0]
                try:
                    cold, warm = parse_times(r.stdout)
                    res.setdefault("pinned", {})[c] = "PINNED" in r.stdout.splitlines()
                    if c.startswith("lazylayer") and ("no FUSE" in r.stderr) != (c == "lazylayer"):
                        raise RuntimeError(f"{c}: `run` took the other path (stderr {r.stderr[-300:]!r})")
                except RuntimeError as e:
                    log(f"fs {c} {k}: FAILED ({e}; stderr {r.stderr[-300:]!r})")
                    res["fs"][c][k]["error"] = r.stderr[-300:]
                    continue
                res["fs"][c][k]["cold"].append(cold)
                res["fs"][c][k]["warm"].append(warm)
                log(f"fs {c} {k}: cold {cold:.2f} s, warm {warm:.2f} s")
        save(out)
    for c in contenders:
        for k in wl:
            d = res["fs"][c][k]
            d["cold_median"], d["warm_median"] = median(d["cold"]), median(d["warm"])
    b.containerd_stop()  # a peer's container, if any (its root is no mount of ours)
    for m in mnts.values():
        subprocess.run(["umount", m], stderr=subprocess.DEVNULL)
    rmtree(base)


def lazy_root_flags(c):
    """`run`'s flags for a lazily opened contender of section 2: the default lazy root
    (lazylayer-lazy), the FUSE root (lazylayer-fuse, -fuse-pt with passthrough on); a
    baseline binary's own default (it may predate the flags)."""
    return {"lazylayer-fuse": ["--lazy-root", "fuse"],
            "lazylayer-fuse-pt": ["--lazy-root", "fuse", "--passthrough", "on"]}.get(c, [])


# The server case of section 2: nginx (one worker, no open-file cache, so every request
# opens its file) serving SERVER_FILES different small files of the image from /usr/share,
# SERVER_REQUESTS requests spread over them by h2load (8 connections, keep-alive), in a
# container whose root is kernel overlayfs (lazylayer with the image recorded), or what a
# lazily started server keeps (after `rmi`, every layer local): the default lazy root
# (lazylayer-lazy), the FUSE root (lazylayer-fuse), and that with passthrough on
# (lazylayer-fuse-pt). The contenders' servers run side by side, each on a port of its own,
# and their rounds alternate: one round lasts ~0.2 s, and on this 2-core VM the rate drifts
# by ±10% over seconds, which rounds taken one contender after the other read as a
# difference of roots. Every server is warm and settled before the first round, so what is
# timed is the steady state a long-lived server lives in, not its start's aftermath.
SERVER_FILES, SERVER_REQUESTS, SERVER_ROUNDS, SERVER_PORT = 200, 10000, 5, 8080
SERVER_CONTENDERS = ["lazylayer", "lazylayer-lazy", "lazylayer-fuse", "lazylayer-fuse-pt"]


def server_conf(port):
    return (f"daemon off; worker_processes 1; pid /tmp/llbench-nginx-{port}.pid; error_log stderr warn; "
            f"events {{ worker_connections 256; }} "
            f"http {{ access_log off; sendfile on; server {{ listen {port}; root /usr/share; }} }}")


def server_case(b, out, reps):
    info = out["images"].get("nginx") or {}
    res = {"files": SERVER_FILES, "requests": SERVER_REQUESTS, "rounds": SERVER_ROUNDS, "side_by_side": True,
           "rps": {}, "notes": []}
    out["fs"]["server"] = res
    opt_ref = info.get("opt_ref")
    if not (b.run_available and opt_ref):
        res["notes"].append("no optimized nginx image - not run")
        return
    root = os.path.join(b.work, "srv")
    rmtree(root)
    ll = [b.ll, "--root", root]
    log(f"fs server: lazylayer pull {opt_ref} (every layer local)")
    sh(ll + ["pull", "-q", opt_ref], timeout=1200)
    found = sh(ll + ["run", "--rm", "--net", "none", opt_ref, "--", "sh", "-c",
                     "cd /usr/share && find . -type f -size -65k -size +0 | sort"], timeout=300).stdout.split()
    if len(found) < SERVER_FILES:
        res["notes"].append(f"only {len(found)} small files in /usr/share - not run")
        return
    step = len(found) / SERVER_FILES
    files = [urllib.parse.quote(found[int(i * step)][1:]) for i in range(SERVER_FILES)]
    contenders = SERVER_CONTENDERS
    port = {c: SERVER_PORT + i for i, c in enumerate(contenders)}
    urls = {c: [f"http://127.0.0.1:{port[c]}{f}" for f in files] for c in contenders}
    for c in contenders:
        res["rps"][c] = []
    for rep in range(reps):
        procs, errs, got = {}, {}, {c: [] for c in contenders}
        try:
            # The lazy roots first, each on an image not recorded (a lazy run that finds every
            # layer local records the image again); the recorded one last.
            for c in contenders[1:] + contenders[:1]:
                if c == "lazylayer":
                    sh(ll + ["pull", "-q", opt_ref], timeout=1200)
                else:
                    sh(ll + ["rmi", opt_ref], check=False)
                if not wait_port_closed(port[c], 20):
                    raise RuntimeError(f"port {port[c]} busy before the server case")
                argv = ll + ["run", "--rm", "--stats", "--net", "host", "--prefetch", "off", *lazy_root_flags(c),
                             opt_ref, "--", "sh", "-c",
                             'printf "%s" "$1" > /tmp/ll.conf && exec nginx -c /tmp/ll.conf', "sh",
                             server_conf(port[c])]
                errs[c] = os.path.join(b.logs, f"server-{rep}-{c}.err")
                with open(errs[c], "w") as errf:
                    procs[c] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                stderr=errf)
                end = now() + 120
                while now() < end and not port_open(port[c]) and procs[c].poll() is None:
                    time.sleep(0.05)
                with open(errs[c]) as f:
                    err = f.read()
                if not port_open(port[c]):
                    raise RuntimeError(f"fs server {c}: nginx not serving (stderr {err[-300:]!r})")
                # Every file served once: pages cached, the root settled.
                warm = sh(["h2load", "--h1", "-n", str(SERVER_FILES), "-c", "1", *urls[c]], check=False,
                          timeout=120)
                if warm.returncode != 0:
                    raise RuntimeError(f"fs server {c}: warm-up failed ({warm.stdout[-300:]!r})")
            for rnd in range(SERVER_ROUNDS):
                k = (rep * SERVER_ROUNDS + rnd) % len(contenders)
                for c in contenders[k:] + contenders[:k]:
                    r = sh(["h2load", "--h1", "-n", str(SERVER_REQUESTS), "-c", "8", "-t", "1", *urls[c]],
                           check=False, timeout=600)
                    m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", r.stdout)
                    ok = re.search(r"status codes: (\d+) 2xx", r.stdout)
                    if not m or not ok or int(ok.group(1)) != SERVER_REQUESTS:
                        log(f"fs server {c}: FAILED ({(r.stdout + r.stderr)[-400:]!r})")
                        continue
                    got[c].append(float(m.group(1)))
                    log(f"fs server {c}: {float(m.group(1)):.0f} req/s")
        except RuntimeError as e:
            log(str(e))
            res["notes"].append(f"repetition {rep + 1}: {e}")
        finally:
            for p in procs.values():
                stop_process(p, lambda p: p.send_signal(signal.SIGINT))
        # `run --stats` says at exit which root it gave: a round counts only on the right one.
        for c, path in errs.items():
            with open(path) as f:
                err = f.read()
            if ("no FUSE" in err) != (c == "lazylayer"):
                log(f"fs server {c}: `run` took the other path (stderr {err[-300:]!r})")
                res["notes"].append(f"repetition {rep + 1}: {c} took the other path - its rounds dropped")
            else:
                res["rps"][c] += got[c]
        save(out)
    for c in contenders:
        res.setdefault("median", {})[c] = median(res["rps"][c])
    rmtree(root)


def unpacked_size(cache, img, m):
    """Sum of the uncompressed layer tars, read from images/build.sh's OCI layout."""
    if not cache:
        return None
    total = 0
    for l in m["layers"]:
        path = os.path.join(cache, img, "oci", "blobs", "sha256", l["digest"].split(":")[1])
        if not os.path.exists(path):
            return None
        d = zlib.decompressobj(wbits=31)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(d.decompress(chunk))
        total += len(d.flush())
    return total


OUT_PATH = None


def save(out):
    tmp = OUT_PATH + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, OUT_PATH)


def _terminate(*_):
    raise KeyboardInterrupt


def main():
    global OUT_PATH
    # run.sh starts us in the background, where SIGINT arrives ignored: take both
    # SIGINT and SIGTERM as an interrupt, so the finally clauses stop what we started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--registry", required=True)
    ap.add_argument("--lazylayer", required=True)
    ap.add_argument("--baseline", default=None, help="an older lazylayer binary timed side by side")
    ap.add_argument("--json", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--links", required=True)
    ap.add_argument("--rtts", default="", help="round-trip times in ms through the delay relay, e.g. 0,20,80 "
                    "(empty: no relay)")
    ap.add_argument("--rtt-links", default="1gbit,100mbit", help="the links --rtts applies to")
    ap.add_argument("--relay-shaping", default="client-hop", choices=RELAY_SHAPINGS,
                    help="how the relay's two hops are shaped (see RELAY_HOPS)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--contenders", default="", help="a comma list of contenders to time (default: all but "
                    "the sid ones; lazylayer-base comes with --baseline)")
    ap.add_argument("--sid-root", default="/var/cache/lazylayer/sid-root", help="scripts/stack.sh's root")
    ap.add_argument("--sid-work", default=None, help="a fresh dir in the sid stack's shared dir (run.sh "
                    "--sid makes it): the sid contenders' stores and sockets")
    ap.add_argument("--peers", default=None, help="bench/peers.sh's cache dir (run.sh --peers): the "
                    "peers' tools, for the peer contenders")
    ap.add_argument("--peer-versions", default="", help="JSON: each peer tool's version (run.sh)")
    ap.add_argument("--skip", default="", help="IMAGE@LINK=reason;...")
    ap.add_argument("--fs-image", default="gcc")
    ap.add_argument("--fs-reps", type=int, default=3)
    ap.add_argument("--fs-reads", type=int, default=20000)
    ap.add_argument("--meta", default="{}")
    ap.add_argument("--image-cache", default=None, help="images/build.sh cache (for unpacked sizes)")
    a = ap.parse_args()
    OUT_PATH = a.json
    images, links = a.images.split(","), a.links.split(",")
    rtts = [int(x) for x in a.rtts.split(",") if x.strip()]
    rtt_links = [l for l in a.rtt_links.split(",") if l] if rtts else []
    skip = {}
    for s in filter(None, a.skip.split(";")):
        k, reason = s.split("=", 1)
        i, l = k.split("@")
        skip[(i, l)] = reason
    b = Bench(a)
    if a.contenders:
        wanted = a.contenders.split(",")
        known = list(dict.fromkeys(CONTENDERS + list(SID_CONTENDERS) + list(PEER_CONTENDERS)))
        unknown = [c for c in wanted if c not in known + ["lazylayer-base"]]
        if unknown:
            raise SystemExit(f"bench: unknown contenders {unknown}; known: {known}")
        CONTENDERS[:] = [c for c in known if c in wanted]
    if any(c in SID_CONTENDERS for c in CONTENDERS) and not b.sid:
        raise SystemExit("bench: the sid contenders need --sid-work (bash bench/run.sh --sid)")
    if any(c in PEER_CONTENDERS for c in CONTENDERS) and not b.peers_bin:
        raise SystemExit("bench: the peer contenders need --peers (bash bench/run.sh --peers)")
    if a.baseline:
        CONTENDERS.insert(CONTENDERS.index("lazylayer") + 1 if "lazylayer" in CONTENDERS else len(CONTENDERS),
                          "lazylayer-base")
    out = {"meta": json.loads(a.meta), "images": {}, "links": {}, "cells": [], "warm": {}, "fs": None}
    out["meta"].update({"runs": a.runs, "run_available": b.run_available, "contenders": CONTENDERS,
                        "poll_ms": POLL * 1000, "rtts_ms": rtts, "rtt_links": rtt_links,
                        "relay_shaping": a.relay_shaping if rtts else None,
                        "links_not_run": [l for l in LINKS if l not in links],
                        "images_not_run": [i for i in IMAGES if i not in images]})
    out["meta"]["snapshotter_available"] = b.snap_available
    out["meta"]["known_link"] = KNOWN_LINK
    if b.peers_bin:
        out["meta"]["peers"] = json.loads(a.peer_versions) if a.peer_versions else {}
    if b.sid:
        out["meta"]["sid"] = dict(b.sid.versions(), root=a.sid_root)
        log(f"sid stack: {out['meta']['sid']}")
    if a.baseline:
        out["meta"]["baseline"] = a.baseline
        out["meta"]["baseline_version"] = sh([a.baseline, "--version"], check=False).stdout.strip()
    log(f"lazylayer run available: {b.run_available}; snapshotter: {b.snap_available}")
    set_link("loopback")
    # Section 2's server case serves nginx.
    wanted = set(images) | ({a.fs_image, "nginx"} if a.fs_reps > 0 and a.fs_image else set())
    for img in sorted(wanted, key=list(IMAGES).index):
        m = manifest(a.registry, f"lazylayer/{img}", "latest")
        out["images"][img] = {
            "ref": f"{a.registry}/lazylayer/{img}:latest", "what": IMAGES[img]["what"],
            "kind": IMAGES[img]["kind"], "layers": len(m["layers"]),
            "compressed": sum(l["size"] for l in m["layers"]),
            "unpacked": unpacked_size(a.image_cache, img, m),
        }
    try:
        t0 = now()
        optimize_images(b, a.registry, [i for i in out["images"]], out)
        out["meta"]["seconds_optimize"] = now() - t0
        save(out)
        t0 = now()
        section1(b, a.registry, images, links, a.runs, skip, out, rtts, rtt_links, a.relay_shaping)
        out["meta"]["seconds_section1"] = now() - t0
        save(out)
        t0 = now()
        if a.fs_reps > 0:
            section2(b, a.registry, a.fs_image, a.fs_reps, a.fs_reads, out)
            server_case(b, out, a.fs_reps)
        out["meta"]["seconds_section2"] = now() - t0
        save(out)
    finally:
        b.containerd_stop()
        b.ll_empty()
    log("done")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        log("interrupted; partial results are in the JSON")
        sys.exit(130)
