#!/usr/bin/python3
"""Tests of bench/peers.py: the prefetch list taken from a trace, the entries of a nydus
blob (headers after their data, some zstd frames), and the push helpers against a real
docker-registry (images/registry.sh).

    python3 -m unittest bench/test_peers.py      (from the repository root)

The live tests need docker-registry and the zstd test the zstd command; under CI=true
they fail instead of skipping when one is missing.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def need(tool):
    if not shutil.which(tool):
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"{tool} is not installed")
        raise unittest.SkipTest(f"{tool} is not installed")


def header(name, size):
    t = tarfile.TarInfo(name)
    t.size = size
    return t.tobuf(format=tarfile.USTAR_FORMAT)


class TraceTest(unittest.TestCase):
    def test_prefetch_list_is_the_opened_files_in_first_open_order(self):
        trace = {"version": 1, "events": [
            {"path": "usr/bin/python3.11", "access": "lookup"},
            {"path": "etc/passwd", "access": "open"},
            {"path": "usr/lib", "access": "readdir"},
            {"path": "usr/bin/python3.11", "access": "open"},
            {"path": "etc/passwd", "access": "open"},
            {"path_hex": "ff00", "access": "open"},
            {"path": "nope", "access": "missing"},
        ]}
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(trace, f)
            f.flush()
            self.assertEqual(peers.trace_prefetch_list(f.name), ["/etc/passwd", "/usr/bin/python3.11"])


class BlobEntryTest(unittest.TestCase):
    """A blob as nydus-image --blob-inline-meta --features blob-toc writes it: data, then
    its 512-byte header, unpadded, entry after entry."""

    def blob(self, entries):
        out = b""
        for name, data in entries:
            out += data + header(name, len(data))
        f = tempfile.NamedTemporaryFile(delete=False)
        f.write(out)
        f.close()
        self.addCleanup(os.unlink, f.name)
        return f.name

    def test_finds_an_entry_behind_others(self):
        path = self.blob([("image.blob", b"x" * 1000), ("image.boot", b"bootstrap!" * 7),
                          ("rafs.blob.toc", b"t" * 640)])
        self.assertEqual(peers.blob_entry(path, "image.boot"), b"bootstrap!" * 7)
        self.assertEqual(peers.blob_entry(path, "image.blob"), b"x" * 1000)

    def test_a_zstd_entry_is_decompressed(self):
        need("zstd")
        raw = os.urandom(3000) * 3
        z = subprocess.run(["zstd", "-c", "-q"], input=raw, stdout=subprocess.PIPE, check=True).stdout
        path = self.blob([("image.boot", z), ("rafs.blob.toc", b"t" * 128)])
        self.assertEqual(peers.blob_entry(path, "image.boot"), raw)

    def test_a_missing_entry_is_an_error(self):
        path = self.blob([("image.blob", b"x" * 10)])
        with self.assertRaisesRegex(RuntimeError, "no image.boot entry"):
            peers.blob_entry(path, "image.boot")

    def test_a_size_past_the_start_is_an_error_not_a_hang(self):
        path = self.blob([("image.boot", b"x" * 10)])
        with open(path, "r+b") as f:
            # The last header claims more data than the blob holds.
            f.seek(-512, os.SEEK_END)
            f.write(header("image.blob", 1 << 20))
        with self.assertRaisesRegex(RuntimeError, "no image.boot entry"):
            peers.blob_entry(path, "image.boot")


class LivePushTest(unittest.TestCase):
    """push_blob and push_manifest against a real docker-registry."""

    @classmethod
    def setUpClass(cls):
        need("docker-registry")
        cls.dir = tempfile.mkdtemp(prefix="peerstest.")
        cls.addr = subprocess.run(["bash", f"{ROOT}/images/registry.sh", "start", f"{cls.dir}/registry"],
                                  check=True, capture_output=True, text=True).stdout.strip()

    @classmethod
    def tearDownClass(cls):
        subprocess.run(["bash", f"{ROOT}/images/registry.sh", "stop", f"{cls.dir}/registry"],
                       capture_output=True)
        shutil.rmtree(cls.dir, ignore_errors=True)

    def get(self, path, headers=None):
        req = urllib.request.Request(f"http://{self.addr}{path}", headers=headers or {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def test_blobs_and_a_manifest_round_trip(self):
        data = os.urandom(2 * 1024 * 1024 + 5)
        path = os.path.join(self.dir, "blob")
        with open(path, "wb") as f:
            f.write(data)
        digest, size = peers.push_blob(self.addr, "t/peers", path=path)
        self.assertEqual((digest, size), ("sha256:" + hashlib.sha256(data).hexdigest(), len(data)))
        self.assertEqual(self.get(f"/v2/t/peers/blobs/{digest}"), data)
        # Pushed again: found by HEAD, not uploaded twice.
        self.assertEqual(peers.push_blob(self.addr, "t/peers", path=path), (digest, size))
        cfg = json.dumps({"architecture": "amd64", "os": "linux",
                          "rootfs": {"type": "layers", "diff_ids": [digest]}}).encode()
        cdigest, csize = peers.push_blob(self.addr, "t/peers", data=cfg)
        m = {"schemaVersion": 2, "mediaType": peers.OCI_MANIFEST,
             "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
             "layers": [{"mediaType": peers.NYDUS_BLOB, "digest": digest, "size": size}]}
        mdigest = peers.push_manifest(self.addr, "t/peers", "x", m)
        got = self.get("/v2/t/peers/manifests/x", {"Accept": peers.OCI_MANIFEST})
        self.assertEqual("sha256:" + hashlib.sha256(got).hexdigest(), mdigest)
        self.assertEqual(json.loads(got), m)

    def test_a_manifest_naming_a_missing_blob_is_refused(self):
        m = {"schemaVersion": 2, "mediaType": peers.OCI_MANIFEST,
             "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                        "digest": "sha256:" + "0" * 64, "size": 2},
             "layers": []}
        with self.assertRaisesRegex(RuntimeError, "manifest push t/peers:bad: HTTP 400"):
            peers.push_manifest(self.addr, "t/peers", "bad", m)


if __name__ == "__main__":
    unittest.main()
