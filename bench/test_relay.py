#!/usr/bin/python3
"""Tests of bench/relay.py: the HTTP/1.1 framer on hand-made streams (including
hostile ones), the round counting on made-up logs, and the relay itself in front of a
real docker-registry (images/registry.sh).

    python3 -m unittest bench/test_relay.py      (from the repository root)

The live tests need docker-registry; under CI=true they fail instead of skipping when
it is missing.
"""
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relay  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def response_framer(methods):
    """A Framer of responses to requests of `methods`, in order (as Connection does)."""
    pending = list(methods)

    def kind(start_line, headers):
        status = int(start_line.split(" ")[1])
        if 100 <= status < 200:
            return ("interim",)
        method = pending.pop(0)
        if method == "HEAD" or status in (204, 304):
            return ("none",)
        chunked = relay.is_chunked(headers)
        if chunked:
            return ("chunked",)
        n = relay.content_length(headers)
        if n is not None and chunked is None:
            return ("none",) if n == 0 else ("length", n)
        return ("close",)
    return relay.Framer(kind)


def feed_in_pieces(framer, data, seed):
    """Feed `data` cut at random places: framing must not depend on read sizes."""
    rnd = random.Random(seed)
    events, i = [], 0
    while i < len(data):
        n = rnd.randint(1, 7)
        events += framer.feed(data[i:i + n])
        i += n
    return events


def ends(events):
    return [e[1] for e in events if e[0] == "end"]


class FramerTest(unittest.TestCase):
    STREAM = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
              b"HTTP/1.1 100 Continue\r\n\r\n"
              b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: y\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"  # answer to HEAD: no body
              b"HTTP/1.1 204 No Content\r\n\r\n"
              b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"
              b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    METHODS = ["GET", "GET", "HEAD", "GET", "GET", "GET"]

    def test_responses_framed_by_length_chunks_head_204_304_and_close(self):
        for seed in range(20):
            f = response_framer(self.METHODS)
            events = feed_in_pieces(f, self.STREAM, seed)
            self.assertIsNone(f.broken)
            self.assertEqual(ends(events), [5, 19, 0, 0, 0])
            self.assertEqual(ends(f.finish()), [len(b"until the end")])
            self.assertEqual(sum(1 for e in events if e[0] == "interim"), 1)

    def test_whole_stream_at_once(self):
        f = response_framer(self.METHODS)
        self.assertEqual(ends(f.feed(self.STREAM)), [5, 19, 0, 0, 0])

    def test_pipelined_requests_with_bodies(self):
        stream = (b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"\r\nPUT /up HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"
                  b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"
                  b"GET /v2/r/blobs/sha256:00 HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n")
        for seed in range(20):
            f = relay.Framer(relay.request_body)
            events = feed_in_pieces(f, stream, seed)
            self.assertIsNone(f.broken)
            heads = [e for e in events if e[0] == "head"]
            self.assertEqual([h[1].split(" ")[1] for h in heads], ["/v2/", "/up", "/c", "/v2/r/blobs/sha256:00"])
            self.assertEqual(heads[3][2]["range"], ["bytes=0-9"])
            self.assertEqual(ends(events), [0, 4, 2, 0])
            self.assertEqual(sum(1 for e in events if e[0] == "begin"), 4)

    def test_hostile_streams_are_unparsed_not_fatal(self):
        cases = {
            b"\x16\x03\x01\x02\x00garbage\r\n\r\n": "request line",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n": "header line",
            b"GET / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n": "Content-Length",
            b"GET / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n": "Content-Length",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n": "Content-Length",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n": "chunk size",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n": "chunk size",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n": "CRLF",
            b"GET / HTTP/1.1\r\nX: " + b"a" * (70 * 1024): "64 KiB",
        }
        for stream, why in cases.items():
            f = relay.Framer(relay.request_body)
            f.feed(stream)
            self.assertIsNotNone(f.broken, stream[:40])
            self.assertIn(why, f.broken)
            self.assertEqual(f.feed(b"GET / HTTP/1.1\r\n\r\n"), [])  # stays broken, quietly
        f = response_framer(["GET"])
        f.feed(b"HTTP/1.1 2x0 OK\r\n\r\n")
        self.assertIn("ValueError", f.broken)

    def test_random_bytes_never_raise(self):
        rnd = random.Random(7)
        for _ in range(300):
            data = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 300)))
            for f in (relay.Framer(relay.request_body), response_framer(["GET"] * 50)):
                f.feed(b"GET / HTTP/1.1\r\n" if rnd.random() < 0.5 else b"")
                f.feed(data)
                f.finish()


def req(t_first, t_done, conn, seq, t_accept=None):
    return {"t_first": t_first, "t_done": t_done, "conn": conn, "seq": seq, "new_conn": seq == 0,
            "t_accept": t_first if t_accept is None else t_accept}


class RoundsTest(unittest.TestCase):
    def test_sequential_on_one_connection(self):
        # connect+manifest, config, then three blob GETs at once on open connections.
        reqs = [req(0.0, 1.0, 1, 0), req(1.1, 2.0, 1, 1),
                req(2.1, 3.0, 1, 2), req(2.1, 3.1, 2, 1, t_accept=0.5), req(2.2, 3.2, 3, 1, t_accept=0.5)]
        self.assertEqual(relay.critical_rounds(reqs), 4)  # handshake, manifest, config, blobs
        rounds, chain = relay.critical_path(reqs)
        self.assertEqual(rounds, 4)
        # Three blob GETs end equally long chains: the earliest one is shown.
        self.assertEqual([(r["conn"], r["seq"]) for r in chain], [(1, 0), (1, 1), (1, 2)])
        self.assertEqual([r["handshake_on_path"] for r in chain], [True, False, False])

    def test_new_connection_costs_a_round_unless_opened_ahead(self):
        base = [req(0.0, 1.0, 1, 0), req(1.1, 2.0, 1, 1)]
        late = base + [req(2.1, 3.0, 2, 0)]  # connected after config: +handshake
        early = base + [req(2.1, 3.0, 3, 0, t_accept=0.2)]  # handshake overlapped the manifest
        self.assertEqual(relay.critical_rounds(late), 5)
        self.assertEqual(relay.critical_rounds(early), 4)

    def test_overlapping_requests_are_one_round_and_incomplete_ones_end_a_chain(self):
        reqs = [req(0.0, 1.0, 1, 1, t_accept=-5), req(0.5, 1.5, 2, 1, t_accept=-5),
                req(1.6, None, 1, 2, t_accept=-5), req(1.7, 2.0, 2, 2, t_accept=-5)]
        self.assertEqual(relay.critical_rounds(reqs), 2)
        self.assertEqual(relay.critical_rounds([]), 0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveRelayTest(unittest.TestCase):
    """The relay between http.client and a real docker-registry."""

    @classmethod
    def setUpClass(cls):
        if not shutil.which("docker-registry"):
            if os.environ.get("CI") == "true":
                raise RuntimeError("docker-registry is not installed")
            raise unittest.SkipTest("docker-registry is not installed")
        cls.dir = tempfile.mkdtemp(prefix="relaytest.")
        cls.addr = subprocess.run(["bash", f"{ROOT}/images/registry.sh", "start", f"{cls.dir}/registry"],
                                  check=True, capture_output=True, text=True).stdout.strip()
        # A blob: the registry's monolithic upload (POST, then PUT with the body).
        cls.blob = os.urandom(3 * 1024 * 1024 + 17)
        import hashlib
        cls.digest = "sha256:" + hashlib.sha256(cls.blob).hexdigest()
        c = http.client.HTTPConnection(cls.addr)
        c.request("POST", "/v2/t/blobs/uploads/")
        r = c.getresponse()
        r.read()
        loc = r.getheader("Location")
        c.request("PUT", f"{loc}{'&' if '?' in loc else '?'}digest={cls.digest}", body=cls.blob,
                  headers={"Content-Type": "application/octet-stream"})
        r = c.getresponse()
        r.read()
        assert r.status == 201, r.status
        c.close()

    @classmethod
    def tearDownClass(cls):
        subprocess.run(["bash", f"{ROOT}/images/registry.sh", "stop", f"{cls.dir}/registry"], capture_output=True)
        shutil.rmtree(cls.dir, ignore_errors=True)

    def start_relay(self, rtt_ms):
        log = os.path.join(self.dir, f"relay-{rtt_ms}-{time.monotonic_ns()}.log")
        r = relay.RelayProcess(self.addr, rtt_ms, log)
        self.addCleanup(r.stop)
        return r, log

    def test_requests_logged_and_bodies_intact(self):
        r, log = self.start_relay(0)
        t0 = time.monotonic()
        c = http.client.HTTPConnection(r.addr)
        c.request("GET", "/v2/")
        c.getresponse().read()
        c.request("HEAD", f"/v2/t/blobs/{self.digest}")
        c.getresponse().read()
        c.request("GET", f"/v2/t/blobs/{self.digest}", headers={"Range": "bytes=10-1000009"})
        resp = c.getresponse()
        part = resp.read()
        c.request("GET", f"/v2/t/blobs/{self.digest}")
        whole = c.getresponse().read()
        c.request("GET", "/v2/t/manifests/nope")
        c.getresponse().read()
        c.close()
        self.assertEqual(resp.status, 206)
        self.assertEqual(part, self.blob[10:1000010])
        self.assertEqual(whole, self.blob)
        time.sleep(0.3)
        reqs, unparsed = relay.read_log(log)
        self.assertEqual(unparsed, [])
        self.assertEqual([(q["method"], q["status"], q["body_bytes"]) for q in reqs],
                         [("GET", 200, 2), ("HEAD", 200, 0), ("GET", 206, 1000000), ("GET", 200, len(self.blob)),
                          ("GET", 404, reqs[4]["body_bytes"])])
        self.assertEqual(reqs[2]["range"], "bytes=10-1000009")
        self.assertTrue(all(t0 <= q["t_first"] <= q["t_done"] for q in reqs))
        s = relay.summarize(log, 0, t0, time.monotonic())
        self.assertEqual((s["requests"], s["rounds"], s["connections"], s["blob_gets"]), (5, 6, 1, 2))

    def test_delay_each_way_and_handshake(self):
        rtt = 100
        r, log = self.start_relay(rtt)
        t0 = time.monotonic()
        c = http.client.HTTPConnection(r.addr)
        c.request("GET", "/v2/")
        c.getresponse().read()
        t1 = time.monotonic()
        c.request("GET", "/v2/")
        c.getresponse().read()
        t2 = time.monotonic()
        c.close()
        # New connection: handshake RTT + request RTT; then one RTT per request.
        self.assertGreaterEqual(t1 - t0, 2 * rtt / 1000)
        self.assertGreaterEqual(t2 - t1, rtt / 1000)
        self.assertLess(t2 - t1, 2 * rtt / 1000)
        time.sleep(0.2)
        s = relay.summarize(log, 0, t0, time.monotonic())
        self.assertEqual((s["requests"], s["rounds"]), (2, 3))

    def test_garbage_connection_is_relayed_and_counted(self):
        r, log = self.start_relay(0)
        t0 = time.monotonic()
        # A bad request line, and a TLS-like record that never makes a request head.
        for garbage in (b"\x16\x03\x01 not http\r\n\r\n", b"\x16\x03\x01\x00\x05\x01\x00\n"):
            with socket.create_connection(("127.0.0.1", r.port)) as s:
                s.sendall(garbage)
                s.settimeout(5)
                reply = s.recv(4096)
            self.assertTrue(reply.startswith(b"HTTP/1.1 400"), reply[:60])  # the registry answered
        c = http.client.HTTPConnection(r.addr)  # and the relay still serves
        c.request("GET", "/v2/")
        self.assertEqual(c.getresponse().status, 200)
        c.close()
        time.sleep(0.3)
        s = relay.summarize(log, 0, t0, time.monotonic())
        self.assertEqual((s["requests"], s["unparsed"]), (1, 2))
        self.assertEqual(len(s["unparsed_reasons"]), 2)
        self.assertTrue(any("bad request line" in x for x in s["unparsed_reasons"]), s["unparsed_reasons"])
        self.assertTrue(any("not HTTP/1.1" in x for x in s["unparsed_reasons"]), s["unparsed_reasons"])
        with open(log) as f:
            self.assertTrue(any(json.loads(l)["ev"] == "close" for l in f))


if __name__ == "__main__":
    unittest.main()
