#!/usr/bin/python3
"""A TCP relay that puts a registry at a distance, and logs every HTTP/1.1 request
that crosses it.

    bench/relay.py --upstream 127.0.0.1:5000 --rtt-ms 20 --log FILE [--listen 127.0.0.1:0]
    bench/relay.py --show FILE [--offset N] [--since T --until T]   (a log's critical path)

prints the port it listens on (one line) once it accepts connections, and relays until
SIGTERM or SIGINT. The kernel here has no netem, so distance is made here:

- each direction's bytes are held RTT/2 before they are passed on, in order, while the
  reader keeps reading (a stream keeps its rate and only gains latency; the bytes held
  are bounded, see MAX_HELD);
- a new connection's first client bytes are held one RTT more, counted from the accept:
  the SYN / SYN-ACK exchange a real connection pays before its first request (here the
  connect itself completes at once, on loopback);
- every request is logged as one JSON line when its head has crossed ("ev": "req":
  conn, seq, method, path, range, t_first = when its first byte reached the relay,
  t_accept of its connection) and one when its response is complete ("ev": "resp":
  status, body_bytes, t_done = when the response's last byte left the relay). Times
  are CLOCK_MONOTONIC seconds (Python's time.monotonic()), the clock of the harness.
  Responses are framed by Content-Length, chunked transfer-encoding, or the
  connection's end; HEAD, 1xx, 204 and 304 have no body. What cannot be framed is
  never fatal: the connection is still relayed, logged once as "ev": "unparsed" with
  the reason, and its later requests are not counted.

The module also holds what reads the log back (requests_between, critical_rounds,
summarize), used by bench.py and rtt.py.
"""
import argparse
import asyncio
import collections
import json
import os
import signal
import subprocess
import sys

MAX_HEAD = 64 * 1024  # request/response head, chunk-size line or trailer; larger = unparsed
# Bytes one direction of one connection may hold while they wait out the delay before
# the relay stops reading that side: more than RTT/2 x 2 Gbit/s at 80 ms (10 MB), so
# the cap never slows a stream the benchmark makes.
MAX_HELD = 32 * 1024 * 1024
# Write buffer toward each side, past the delay: reading the other side pauses above
# HIGH and resumes below LOW. LOW must exceed what arrives in RTT/2 (10 MB at 2 Gbit/s,
# 80 ms): bytes read on resume are only due RTT/2 later, and with asyncio's 64 KiB
# default the link stood idle that long at each resume (measured: 942 instead of
# 987 Mbit/s at 1 Gbit/s, RTT 80 ms, the registry's hop unshaped).
WRITE_BUFFER_HIGH = 24 * 1024 * 1024
WRITE_BUFFER_LOW = 12 * 1024 * 1024
READ_SIZE = 256 * 1024


class Unparsed(Exception):
    """A byte stream that is not HTTP/1.1 as this framer understands it."""


class Framer:
    """Incremental framing of the HTTP/1.1 messages of one direction of a connection.

    feed(data) returns events: ("begin",) at a message's first byte, ("head", start
    line, headers) once its head is complete, ("interim",) after the head of a 1xx
    response, ("end", body bytes) once its body is complete. body_kind(start line,
    headers) says how the body is framed: ("none",), ("length", n), ("chunked",),
    ("close",) or ("interim",); it raises Unparsed for what it cannot frame.
    """

    HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILER, UNTIL_CLOSE = range(7)

    def __init__(self, body_kind):
        self.body_kind = body_kind
        self.state = self.HEAD
        self.buf = bytearray()
        self.left = 0  # bytes left of a Content-Length body or of a chunk
        self.body = 0  # body bytes of the current message
        self.in_message = False
        self.broken = None

    def feed(self, data):
        """Events of `data`; after an Unparsed, `broken` holds the reason and the
        events before it are still returned."""
        events = []
        if self.broken is None:
            try:
                self._feed(data, events)
            except Unparsed as e:
                self.broken = str(e)
            except (ValueError, IndexError, KeyError) as e:
                # Hostile bytes must not end the relay; say what broke instead.
                self.broken = f"{type(e).__name__}: {e}"
        return events

    def _feed(self, data, events):
        i, n = 0, len(data)
        while i < n:
            s = self.state
            if s == self.HEAD:
                if not self.in_message:
                    # Empty lines between messages are tolerated (RFC 9112 2.2).
                    while i < n and data[i] in b"\r\n":
                        i += 1
                    if i == n:
                        break
                    self.in_message = True
                    self.body = 0
                    events.append(("begin",))
                prev = len(self.buf)
                piece = data[i:i + MAX_HEAD + 4]
                self.buf += piece
                end = self.buf.find(b"\r\n\r\n", max(0, prev - 3))
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        raise Unparsed("head longer than 64 KiB")
                    i += len(piece)
                    continue
                i += end + 4 - prev
                head = bytes(self.buf[:end])
                self.buf.clear()
                start_line, headers = parse_head(head)
                kind = self.body_kind(start_line, headers)
                events.append(("head", start_line, headers))
                if kind[0] == "interim":
                    events.append(("interim",))
                    self.in_message = False
                elif kind[0] == "none":
                    self._end(events)
                elif kind[0] == "length":
                    self.left = kind[1]
                    self.state = self.LENGTH
                    if self.left == 0:
                        self._end(events)
                elif kind[0] == "chunked":
                    self.state = self.CHUNK_SIZE
                else:
                    self.state = self.UNTIL_CLOSE
            elif s == self.LENGTH or s == self.CHUNK_DATA:
                take = min(self.left, n - i)
                self.left -= take
                self.body += take
                i += take
                if self.left == 0:
                    if s == self.LENGTH:
                        self._end(events)
                    else:
                        self.state = self.CHUNK_CRLF
            elif s == self.CHUNK_SIZE or s == self.TRAILER or s == self.CHUNK_CRLF:
                nl = data.find(b"\n", i)
                piece = data[i:] if nl < 0 else data[i:nl + 1]
                self.buf += piece
                i += len(piece)
                if len(self.buf) > MAX_HEAD:
                    raise Unparsed("chunk-size line or trailer longer than 64 KiB")
                if nl < 0:
                    continue
                line = bytes(self.buf).rstrip(b"\r\n")
                self.buf.clear()
                if s == self.CHUNK_CRLF:
                    if line:
                        raise Unparsed("chunk data not followed by CRLF")
                    self.state = self.CHUNK_SIZE
                elif s == self.TRAILER:
                    if not line:
                        self._end(events)
                else:
                    size = line.split(b";", 1)[0].strip()
                    if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                        raise Unparsed(f"bad chunk size {size[:40]!r}")
                    self.left = int(size, 16)
                    self.state = self.TRAILER if self.left == 0 else self.CHUNK_DATA
            else:  # UNTIL_CLOSE
                self.body += n - i
                i = n

    def _end(self, events):
        events.append(("end", self.body))
        self.state = self.HEAD
        self.in_message = False

    def finish(self):
        """The stream ended: events of a message framed by the connection's end."""
        if self.state == self.UNTIL_CLOSE:
            events = []
            self._end(events)
            return events
        return []


def parse_head(head):
    """(start line, {lower-case name: [values]}) of a message head; Unparsed if it is
    not one."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise Unparsed(f"bad header line {line[:80]!r}")
        headers.setdefault(name.lower(), []).append(value.strip())
    return lines[0], headers


def content_length(headers):
    values = {v for vs in headers.get("content-length", []) for v in vs.split(",")}
    values = {v.strip() for v in values}
    if not values:
        return None
    v = next(iter(values))
    if len(values) != 1 or not (v.isascii() and v.isdigit()) or len(v) > 18:
        raise Unparsed(f"bad Content-Length {sorted(values)[:3]}")
    return int(values.pop())


def is_chunked(headers):
    """True if chunked is the last transfer coding; None if there is no Transfer-Encoding."""
    codings = [c.strip().lower() for v in headers.get("transfer-encoding", []) for c in v.split(",")]
    if not codings:
        return None
    return codings[-1] == "chunked"


def request_body(start_line, headers):
    parts = start_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise Unparsed(f"bad request line {start_line[:80]!r}")
    chunked = is_chunked(headers)
    if chunked is not None:
        if not chunked:
            raise Unparsed("request body without chunked last coding")
        return ("chunked",)
    n = content_length(headers)
    return ("none",) if not n else ("length", n)


class DelayedPipe:
    """One direction of a relayed connection: bytes go out `delay` seconds after they
    came in, in order, with bookkeeping (callbacks) run as they leave."""

    def __init__(self, loop, delay, pause_src, resume_src):
        self.loop, self.delay = loop, delay
        self.pause_src, self.resume_src = pause_src, resume_src
        self.items = collections.deque()  # (due, bytes or None, callback or None)
        self.held = 0
        self.last_due = 0.0
        self.dst = None
        self.dst_paused = False
        self.src_paused = False
        self.timer = None

    def push(self, data, due, on_sent=None):
        due = max(due, self.last_due)
        self.last_due = due
        self.items.append((due, data, on_sent))
        if data:
            self.held += len(data)
        self._flow()
        if self.timer is None:
            self._schedule()

    def attach(self, dst):
        self.dst = dst
        self._schedule()

    def _schedule(self):
        if self.timer is not None or not self.items or self.dst is None:
            return
        due = self.items[0][0]
        if due <= self.loop.time():
            self.timer = self.loop.call_soon(self._flush)
        else:
            self.timer = self.loop.call_at(due, self._flush)

    def _flush(self):
        self.timer = None
        now = self.loop.time()
        while self.items and self.items[0][0] <= now:
            _, data, on_sent = self.items.popleft()
            if data:
                self.held -= len(data)
                if not self.dst.is_closing():
                    self.dst.write(data)
            if on_sent:
                on_sent(self.loop.time())
        self._flow()
        self._schedule()

    def set_dst_paused(self, paused):
        self.dst_paused = paused
        self._flow()

    def _flow(self):
        want = self.held > MAX_HELD or self.dst_paused
        if want != self.src_paused:
            self.src_paused = want
            (self.pause_src if want else self.resume_src)()


class Connection:
    """A client connection and its upstream one: two DelayedPipes and the request log."""

    def __init__(self, relay, cid, client):
        self.relay, self.cid, self.client = relay, cid, client
        loop = relay.loop
        self.t_accept = loop.time()
        self.upstream = None
        self.up = DelayedPipe(loop, relay.delay, client.pause_reading, client.resume_reading)
        self.down = DelayedPipe(loop, relay.delay, self._pause_upstream, self._resume_upstream)
        self.down.attach(client)
        self.req_framer = Framer(request_body)
        self.resp_framer = Framer(self._response_body)
        self.pending = collections.deque()  # requests whose response is not complete
        self.current = None  # the request whose head is being read
        self.seq = 0
        self.unparsed = None
        self.first_bytes = True
        self.closed = {"client": False, "upstream": False}
        self.bytes = {"up": 0, "down": 0}

    # upstream flow control (the pipe toward the client pauses reading the registry)
    def _pause_upstream(self):
        if self.upstream:
            self.upstream.pause_reading()

    def _resume_upstream(self):
        if self.upstream:
            self.upstream.resume_reading()

    def upstream_connected(self, transport):
        self.upstream = transport
        if self.down.src_paused:
            transport.pause_reading()
        self.up.attach(transport)

    # client -> upstream -------------------------------------------------------------
    def from_client(self, data):
        now = self.relay.loop.time()
        self.bytes["up"] += len(data)
        due = now + self.relay.delay
        if self.first_bytes:
            # The handshake: a real client could send only one RTT after its SYN.
            self.first_bytes = False
            due = max(now, self.t_accept + 2 * self.relay.delay) + self.relay.delay
        if self.unparsed is None:
            for ev in self.req_framer.feed(data):
                if ev[0] == "begin":
                    self.current = {"ev": "req", "conn": self.cid, "seq": self.seq, "t_first": now,
                                    "t_accept": self.t_accept}
                    self.seq += 1
                elif ev[0] == "head":
                    method, path, _ = ev[1].split(" ", 2)
                    self.current.update(method=method, path=path, range=(ev[2].get("range") or [None])[0])
                    self.pending.append(self.current)
                    self.relay.write_log(self.current)
            if self.req_framer.broken:
                self._unparsed(f"request: {self.req_framer.broken}")
        self.up.push(data, due)

    # upstream -> client -------------------------------------------------------------
    def _response_body(self, start_line, headers):
        parts = start_line.split(" ", 2)
        code = parts[1] if len(parts) > 1 else ""
        if not parts[0].startswith("HTTP/1.") or not (code.isascii() and code.isdigit() and len(code) == 3):
            raise Unparsed(f"bad status line {start_line[:80]!r}")
        if not self.pending:
            if self.req_framer.in_message:
                # The client's bytes never made a request head: not HTTP/1.1 (podman
                # tries a TLS ClientHello first), answered by the registry's 400.
                raise Unparsed("a response before any complete request head (not HTTP/1.1, e.g. TLS)")
            raise Unparsed("a response without a request")
        status = int(parts[1])
        if status == 101:
            raise Unparsed("101 switching protocols")
        if 100 <= status < 200:
            return ("interim",)
        self.pending[0]["status"] = status
        if self.pending[0]["method"] == "HEAD" or status in (204, 304):
            return ("none",)
        chunked = is_chunked(headers)
        if chunked:
            return ("chunked",)
        if chunked is None:
            n = content_length(headers)
            if n is not None:
                return ("none",) if n == 0 else ("length", n)
        return ("close",)

    def _completed(self, events):
        done = []
        for ev in events:
            if ev[0] == "end":
                req = self.pending.popleft()
                done.append({"ev": "resp", "conn": self.cid, "seq": req["seq"], "status": req.get("status"),
                             "body_bytes": ev[1]})
        return done

    def from_upstream(self, data):
        now = self.relay.loop.time()
        self.bytes["down"] += len(data)
        done = []
        if self.unparsed is None:
            done = self._completed(self.resp_framer.feed(data))
            if self.resp_framer.broken:
                self._unparsed(f"response: {self.resp_framer.broken}")
        self.down.push(data, now + self.relay.delay, self._sent(done) if done else None)

    def _sent(self, done):
        def log(t):
            for rec in done:
                rec["t_done"] = t
                self.relay.write_log(rec)
        return log

    def _unparsed(self, reason):
        self.unparsed = reason
        self.relay.unparsed += 1
        self.relay.write_log({"ev": "unparsed", "conn": self.cid, "reason": reason[:200],
                              "t": self.relay.loop.time()})

    # ends ---------------------------------------------------------------------------
    def client_closed(self):
        self.closed["client"] = True
        now = self.relay.loop.time()
        self.up.push(None, now + self.relay.delay, lambda t: self.upstream and self.upstream.close())
        if self.upstream is None:
            self._finished()

    def upstream_closed(self):
        self.closed["upstream"] = True
        now = self.relay.loop.time()
        done = []
        if self.unparsed is None:
            done = self._completed(self.resp_framer.finish())
        sent = self._sent(done)

        def close(t):
            sent(t)
            self.client.close()
            self._finished()
        self.down.push(None, now + self.relay.delay, close)

    def _finished(self):
        if getattr(self, "logged_close", False):
            return
        self.logged_close = True
        for req in self.pending:
            # Requests whose response never completed (cut connection).
            self.relay.write_log({"ev": "resp", "conn": self.cid, "seq": req["seq"], "status": req.get("status"),
                                  "body_bytes": None, "t_done": None})
        self.pending.clear()
        self.relay.write_log({"ev": "close", "conn": self.cid, "t_accept": self.t_accept,
                              "t_close": self.relay.loop.time(), "requests": self.seq,
                              "bytes_up": self.bytes["up"], "bytes_down": self.bytes["down"],
                              "unparsed": self.unparsed})


class ClientSide(asyncio.Protocol):
    def __init__(self, relay):
        self.relay = relay
        self.conn = None

    def connection_made(self, transport):
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        self.relay.next_id += 1
        self.conn = Connection(self.relay, self.relay.next_id, transport)
        self.relay.loop.create_task(self._connect())

    async def _connect(self):
        try:
            await self.relay.loop.create_connection(lambda: UpstreamSide(self.conn), *self.relay.upstream)
        except OSError as e:
            self.relay.write_log({"ev": "unparsed", "conn": self.conn.cid, "reason": f"upstream connect: {e}",
                                  "t": self.relay.loop.time()})
            self.conn.client.close()

    def data_received(self, data):
        self.conn.from_client(data)

    def eof_received(self):
        return None  # close this transport; the pipe closes the other side in turn

    def connection_lost(self, exc):
        self.conn.client_closed()

    def pause_writing(self):
        self.conn.down.set_dst_paused(True)

    def resume_writing(self):
        self.conn.down.set_dst_paused(False)


class UpstreamSide(asyncio.Protocol):
    def __init__(self, conn):
        self.conn = conn

    def connection_made(self, transport):
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        self.conn.upstream_connected(transport)

    def data_received(self, data):
        self.conn.from_upstream(data)

    def eof_received(self):
        return None

    def connection_lost(self, exc):
        self.conn.upstream_closed()

    def pause_writing(self):
        self.conn.up.set_dst_paused(True)

    def resume_writing(self):
        self.conn.up.set_dst_paused(False)


class Relay:
    def __init__(self, listen, upstream, rtt_ms, log_path):
        self.listen, self.upstream = listen, upstream
        self.delay = rtt_ms / 2000
        self.log = open(log_path, "a", buffering=1) if log_path else None
        self.next_id = 0
        self.unparsed = 0
        self.loop = None

    def write_log(self, rec):
        if self.log:
            self.log.write(json.dumps(rec, separators=(",", ":")) + "\n")

    async def serve(self):
        self.loop = asyncio.get_running_loop()
        server = await self.loop.create_server(lambda: ClientSide(self), *self.listen, backlog=512)
        port = server.sockets[0].getsockname()[1]
        self.write_log({"ev": "start", "t": self.loop.time(), "port": port, "rtt_ms": self.delay * 2000,
                        "upstream": f"{self.upstream[0]}:{self.upstream[1]}", "pid": os.getpid()})
        print(port, flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()


def host_port(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


# --- running it from the harness ---------------------------------------------------

class RelayProcess:
    """relay.py as a child process (its own interpreter, so the harness's threads do
    not share its GIL). The port it listens on is `port`; stop() ends it."""

    def __init__(self, upstream, rtt_ms, log_path, pid_file=None):
        self.rtt_ms, self.log_path = rtt_ms, log_path
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--upstream", upstream, "--rtt-ms", str(rtt_ms),
             "--log", log_path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        if pid_file:
            with open(pid_file, "w") as f:
                f.write(str(self.proc.pid))
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"relay did not start (printed {line!r})")
        self.port = int(line)
        self.addr = f"127.0.0.1:{self.port}"

    def cpu_seconds(self):
        """User + system CPU time the relay has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


# --- reading the log back ----------------------------------------------------------

def log_offset(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


def read_log(path, offset=0):
    """Requests logged since `offset` (each a dict: method, path, range, t_first,
    t_accept, new_conn, status, body_bytes, t_done; t_done None while or if the
    response is not complete) and the unparsed events."""
    reqs, unparsed = {}, []
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line still being written
            ev = rec.get("ev")
            if ev == "req":
                rec.setdefault("t_done", None)
                rec["new_conn"] = rec["seq"] == 0
                reqs[(rec["conn"], rec["seq"])] = rec
            elif ev == "resp" and (rec["conn"], rec["seq"]) in reqs:
                reqs[(rec["conn"], rec["seq"])].update(
                    status=rec["status"], body_bytes=rec["body_bytes"], t_done=rec["t_done"])
            elif ev == "unparsed":
                unparsed.append(rec)
    return sorted(reqs.values(), key=lambda r: r["t_first"]), unparsed


def requests_between(reqs, t0, t1):
    """The requests whose first byte reached the relay in [t0, t1]."""
    return [r for r in reqs if t0 <= r["t_first"] <= t1]


def critical_path(reqs):
    """The longest chain of requests in which each one's first byte reached the relay
    after the previous one's response had left it whole: the sequential round trips of
    the critical path. The first request on a connection counts its handshake as one
    more round, chained after the requests complete before its connection was accepted
    (a connection opened ahead of time overlaps its handshake). Returns (rounds, the
    chain's requests in order, ending at the earliest request that ends a longest chain);
    a request whose handshake is on the chain has "handshake_on_path" set in the
    returned copy."""
    reqs = sorted(reqs, key=lambda r: r["t_first"])
    depth, prev, handshake = [], [], []

    def deepest(i, t):
        best = None
        for j in range(i):
            done = reqs[j]["t_done"]
            if done is not None and done <= t and (best is None or depth[j] > depth[best]):
                best = j
        return best, (depth[best] if best is not None else 0)

    for i, r in enumerate(reqs):
        p, d = deepest(i, r["t_first"])
        hs = False
        if r["new_conn"]:
            hp, hd = deepest(i, r["t_accept"])
            if hd + 1 > d:
                p, d, hs = hp, hd + 1, True
        depth.append(d + 1)
        prev.append(p)
        handshake.append(hs)
    if not reqs:
        return 0, []
    i = max(range(len(reqs)), key=lambda k: depth[k])
    rounds, chain = depth[i], []
    while i is not None:
        chain.append(dict(reqs[i], handshake_on_path=handshake[i]))
        i = prev[i]
    return rounds, chain[::-1]


def critical_rounds(reqs):
    """The number of sequential rounds on the critical path (see critical_path)."""
    return critical_path(reqs)[0]


def summarize(path, offset, t0, t1):
    """Requests, rounds and response body bytes of the requests that reached the relay
    in [t0, t1] (body bytes of responses complete by t1), and the unparsed events."""
    reqs, unparsed = read_log(path, offset)
    win = requests_between(reqs, t0, t1)
    return {
        "requests": len(win),
        "rounds": critical_rounds(win),
        "connections": sum(1 for r in win if r["new_conn"]),
        "body_bytes": sum(r["body_bytes"] or 0 for r in win if r["t_done"] is not None and r["t_done"] <= t1),
        "blob_gets": sum(1 for r in win if r.get("method") == "GET" and "/blobs/" in (r.get("path") or "")),
        "unparsed": len([u for u in unparsed if t0 <= u["t"] <= t1]),
        "unparsed_reasons": sorted({u["reason"][:80] for u in unparsed if t0 <= u["t"] <= t1})[:5],
    }


def show(path, offset, t0, t1):
    """Print the requests of a log between t0 and t1 (monotonic seconds; default: all),
    the critical path's marked with its round number."""
    reqs, unparsed = read_log(path, offset)
    t0 = reqs[0]["t_first"] if (t0 is None and reqs) else (t0 or 0)
    win = requests_between(reqs, t0, float("inf") if t1 is None else t1)
    rounds, chain = critical_path(win)
    on_path, n = {}, 0
    for r in chain:
        n += 2 if r["handshake_on_path"] else 1
        on_path[(r["conn"], r["seq"])] = n
    print(f"{len(win)} requests, {rounds} rounds on the critical path, {len(unparsed)} unparsed; "
          "times in ms from --since (else the first request)")
    print(" round  conn seq   accept    first     done  status      bytes  request")
    for r in win:
        mark = on_path.get((r["conn"], r["seq"]))
        done = "-" if r["t_done"] is None else f"{1000 * (r['t_done'] - t0):8.1f}"
        print(f"{mark if mark else '':>6} {r['conn']:5d} {r['seq']:3d} {1000 * (r['t_accept'] - t0):8.1f} "
              f"{1000 * (r['t_first'] - t0):8.1f} {done:>8} {r.get('status') or '-':>7} "
              f"{r.get('body_bytes') if r.get('body_bytes') is not None else '-':>10}  "
              f"{r.get('method')} {r.get('path')}" + (f" {r['range']}" if r.get("range") else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", help="HOST:PORT of the registry (relay mode)")
    ap.add_argument("--rtt-ms", type=float)
    ap.add_argument("--log", default=None, help="request log (JSON lines, appended)")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--show", metavar="LOG", help="print a request log and its critical path instead")
    ap.add_argument("--offset", type=int, default=0, help="--show: from this byte of the log")
    ap.add_argument("--since", type=float, help="--show: from this monotonic time (a run's t_start)")
    ap.add_argument("--until", type=float, help="--show: up to this monotonic time (t_start + ready)")
    a = ap.parse_args()
    if a.show:
        show(a.show, a.offset, a.since, a.until)
        return
    if a.upstream is None or a.rtt_ms is None:
        ap.error("--upstream and --rtt-ms are required (or --show LOG)")
    asyncio.run(Relay(host_port(a.listen), host_port(a.upstream), a.rtt_ms, a.log).serve())


if __name__ == "__main__":
    main()
