"""The lazy-pulling peers of the benchmark: converting an image to each peer's format
with the peer's own tool, fed the same workload trace lazylayer's `optimize` recorded.

nydus: Debian's nydus-snapshotter ships no working converter (its `converter` binary is
an empty stub) and nydusify is not packaged, so an image is converted the way
nydus-snapshotter's own converter package (pkg/converter, v0.13) does it, step by step
with nydus-image 2.2:
  1. each layer's tar -> `nydus-image create --type tar-rafs --blob-inline-meta
     --features blob-toc --fs-version 6 --whiteout-spec none --prefetch-policy fs`, the
     prefetch list on stdin; its output blob is the layer, stored as it is
     (application/vnd.oci.image.layer.nydus.blob.v1);
  2. the layers' bootstraps (named by their blob's digest: nydusd fetches a blob by that
     name) -> `nydus-image merge --prefetch-policy fs`, the prefetch list on stdin;
  3. the merged bootstrap as `image/image.boot` in a tar.gz, the last layer
     (annotation containerd.io/snapshot/nydus-bootstrap);
  4. the config's diff_ids: each blob's own digest, then the bootstrap tar's.
The prefetch list is every file the traced start opened, in the order it opened them:
what nydusify's --prefetch-patterns and nydus's optimizer NRI plugin would record.
"""
import gzip
import hashlib
import http.client
import io
import json
import os
import shutil
import subprocess
import tarfile
import urllib.request

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = OCI_MANIFEST + ",application/vnd.docker.distribution.manifest.v2+json"
NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _get(addr, path, headers=None):
    req = urllib.request.Request(f"http://{addr}{path}", headers=headers or {})
    return urllib.request.urlopen(req, timeout=600)


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return "sha256:" + h.hexdigest()


def _connect(addr, timeout):
    host, port = addr.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def _exchange(c, method, url, body=None, headers=None):
    """One request on connection c; the response, its body read."""
    c.request(method, url, body=body, headers=headers or {})
    r = c.getresponse()
    r.read()
    return r


def push_blob(addr, repo, path=None, data=None, digest=None):
    """Monolithic upload (POST, then PUT ?digest=); returns (digest, size). `digest`,
    when the caller has computed it, saves hashing the file again."""
    digest = digest or (_sha256_file(path) if path else "sha256:" + hashlib.sha256(data).hexdigest())
    size = os.path.getsize(path) if path else len(data)
    c = _connect(addr, 600)
    try:
        if _exchange(c, "HEAD", f"/v2/{repo}/blobs/{digest}").status == 200:
            return digest, size
        r = _exchange(c, "POST", f"/v2/{repo}/blobs/uploads/")
        if r.status != 202:
            raise RuntimeError(f"upload start for {repo}: HTTP {r.status}")
        loc = r.getheader("Location")
        loc = loc.split(addr, 1)[1] if "://" in loc else loc
        url = f"{loc}{'&' if '?' in loc else '?'}digest={digest}"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if path:
            with open(path, "rb") as f:
                r = _exchange(c, "PUT", url, body=f, headers=headers)
        else:
            r = _exchange(c, "PUT", url, body=data, headers=headers)
        if r.status != 201:
            raise RuntimeError(f"upload of {digest} to {repo}: HTTP {r.status}")
    finally:
        c.close()
    return digest, size


def push_manifest(addr, repo, tag, manifest):
    data = json.dumps(manifest, separators=(",", ":")).encode()
    c = _connect(addr, 60)
    try:
        r = _exchange(c, "PUT", f"/v2/{repo}/manifests/{tag}", body=data,
                      headers={"Content-Type": manifest["mediaType"]})
        if r.status != 201:
            raise RuntimeError(f"manifest push {repo}:{tag}: HTTP {r.status}")
    finally:
        c.close()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def trace_prefetch_list(trace_path):
    """The files a traced start opened, as absolute paths, in first-open order."""
    with open(trace_path) as f:
        trace = json.load(f)
    seen, out = set(), []
    for ev in trace["events"]:
        p = ev.get("path")
        if ev["access"] == "open" and p is not None and p not in seen:
            seen.add(p)
            out.append("/" + p.lstrip("/"))
    return out


def blob_entry(path, name):
    """An entry of a nydus blob built with --blob-inline-meta --features blob-toc: its
    entries are tar-like but each header FOLLOWS its data, unpadded, so the blob is
    walked back from its end (as nydus-snapshotter's seekFileByTarHeader does)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        while end >= 512:
            f.seek(end - 512)
            hdr = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape")
            start = end - 512 - hdr.size
            if start < 0:
                break
            if hdr.name == name:
                f.seek(start)
                data = f.read(hdr.size)
                # Entries may be zstd frames (the TOC says so; the magic does too).
                if data[:4] == b"\x28\xb5\x2f\xfd":
                    data = subprocess.run(["zstd", "-dcq"], input=data, stdout=subprocess.PIPE,
                                          check=True).stdout
                return data
            end = start
    raise RuntimeError(f"{path}: no {name} entry")


def _run(argv, stdin_text, log_path):
    with open(log_path, "a") as logf:
        r = subprocess.run(argv, input=stdin_text.encode(), stdout=logf, stderr=logf)
    if r.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-1500:]
        raise RuntimeError(f"{' '.join(argv[:2])} exited {r.returncode}: {tail}")


def nydus_convert(addr, repo, src_tag, dst_tag, prefetch, nydus_image, work):
    """SRC -> DST as a nydus (RAFS v6) image in the same repository. Returns a dict:
    the manifest digest, blob and bootstrap sizes, and the prefetch list's length."""
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work)
    log_path = os.path.join(work, "nydus-image.log")
    patterns = "\n".join(prefetch) + "\n" if prefetch else "/\n"
    src = json.load(_get(addr, f"/v2/{repo}/manifests/{src_tag}", {"Accept": ACCEPT}))
    config = json.load(_get(addr, f"/v2/{repo}/blobs/{src['config']['digest']}"))
    blobs, boots = [], []
    for i, layer in enumerate(src["layers"]):
        tar_path = os.path.join(work, f"layer{i}.tar")
        with _get(addr, f"/v2/{repo}/blobs/{layer['digest']}") as r, open(tar_path, "wb") as out:
            data = r.read()
            if "sha256:" + hashlib.sha256(data).hexdigest() != layer["digest"]:
                raise RuntimeError(f"layer {layer['digest']}: digest mismatch")
            if layer["mediaType"].endswith("gzip"):
                data = gzip.decompress(data)
            elif layer["mediaType"].endswith("zstd"):
                raise RuntimeError("zstd source layers are not handled")
            out.write(data)
        blob_tmp = os.path.join(work, f"layer{i}.blob")
        _run([nydus_image, "create", "--log-level", "warn", "--prefetch-policy", "fs",
              "--blob", blob_tmp, "--whiteout-spec", "none",
              "--fs-version", "6", "--type", "tar-rafs", "--blob-inline-meta",
              "--features", "blob-toc", tar_path], patterns, log_path)
        os.unlink(tar_path)
        digest = _sha256_file(blob_tmp)
        hexd = digest.split(":")[1]
        # The merge takes a blob's id from its bootstrap's file name.
        boot = os.path.join(work, hexd)
        with open(boot, "wb") as f:
            f.write(blob_entry(blob_tmp, "image.boot"))
        blob = os.path.join(work, hexd + ".blob")
        os.replace(blob_tmp, blob)
        blobs.append((digest, blob))
        boots.append(boot)
    merged = os.path.join(work, "bootstrap")
    _run([nydus_image, "merge", "--log-level", "warn", "--prefetch-policy", "fs",
          "--output-json", os.path.join(work, "merge.json"), "--bootstrap", merged, *boots],
         patterns, log_path)
    # The bootstrap layer: image/image.boot in a tar.gz.
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        d = tarfile.TarInfo("image")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        t.addfile(d)
        f = t.gettarinfo(merged, arcname="image/image.boot")
        f.mtime, f.uid, f.gid, f.uname, f.gname = 0, 0, 0, "", ""
        with open(merged, "rb") as fh:
            t.addfile(f, fh)
    boot_tar = raw.getvalue()
    boot_gz = gzip.compress(boot_tar, mtime=0)
    layers, diff_ids = [], []
    for digest, path in blobs:
        push_blob(addr, repo, path=path, digest=digest)
        layers.append({"mediaType": NYDUS_BLOB, "digest": digest, "size": os.path.getsize(path),
                       "annotations": {"containerd.io/snapshot/nydus-blob": "true"}})
        diff_ids.append(digest)
    bdigest, bsize = push_blob(addr, repo, data=boot_gz)
    layers.append({"mediaType": GZIP_LAYER, "digest": bdigest, "size": bsize,
                   "annotations": {"containerd.io/snapshot/nydus-bootstrap": "true",
                                   "containerd.io/snapshot/nydus-fs-version": "6"}})
    diff_ids.append("sha256:" + hashlib.sha256(boot_tar).hexdigest())
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config.setdefault("history", []).append(
        {"created_by": "Nydus Converter", "comment": "Nydus Bootstrap Layer"})
    cdata = json.dumps(config, separators=(",", ":")).encode()
    cdigest, csize = push_blob(addr, repo, data=cdata)
    m = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
         "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
         "layers": layers}
    mdigest = push_manifest(addr, repo, dst_tag, m)
    info = {"digest": mdigest, "blob_bytes": sum(os.path.getsize(p) for _, p in blobs),
            "bootstrap_bytes": bsize, "prefetch_files": len(prefetch)}
    shutil.rmtree(work)
    return info
