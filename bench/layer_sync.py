#!/usr/bin/env python3
"""How long making an extracted layer durable takes: one syncfs(2) of the
file system against an fsync of every file and directory (the two ways the
store could sync a layer before renaming it into layers/).

    python3 bench/layer_sync.py [LAYER_BLOB] [--rounds N]

LAYER_BLOB defaults to the largest blob of the cached python3 test image
($LAZYLAYER_IMAGE_CACHE or .cache/images). The tree is extracted with tar
next to this script's working directory (keep it on the store's file
system), synced each way on a fresh extraction, and removed.
"""
import glob
import os
import shutil
import subprocess
import sys
import time


def largest_python3_blob():
    cache = os.environ.get("LAZYLAYER_IMAGE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache/images"))
    blobs = glob.glob(os.path.join(cache, "python3/oci/blobs/sha256/*"))
    if not blobs:
        sys.exit(f"no python3 image in {cache}: build it with images/build.sh python3")
    return max(blobs, key=os.path.getsize)


def extract(blob, tree):
    shutil.rmtree(tree, ignore_errors=True)
    os.makedirs(tree)
    subprocess.run(["tar", "-xzf", blob, "-C", tree], check=True)


def syncfs(tree):
    # Python has no os.syncfs: coreutils' `sync -f` is syncfs(2) of the file's file system.
    subprocess.run(["sync", "-f", tree], check=True)
    return 1


def fsync_each(tree):
    n = 0
    for root, _dirs, files in os.walk(tree):
        for f in files:
            p = os.path.join(root, f)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
            os.fsync(fd)
            os.close(fd)
            n += 1
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        n += 1
    return n


def main():
    args = sys.argv[1:]
    rounds = 3
    if "--rounds" in args:
        i = args.index("--rounds")
        rounds = int(args[i + 1])
        del args[i : i + 2]
    blob = args[0] if args else largest_python3_blob()
    print(f"layer blob {os.path.basename(blob)[:12]}: {os.path.getsize(blob)} bytes")
    tree = "layer-sync-tree"
    try:
        for r in range(rounds):
            for name, sync in (("syncfs", syncfs), ("fsync each", fsync_each)):
                subprocess.run(["sync"], check=True)
                extract(blob, tree)
                t = time.monotonic()
                n = sync(tree)
                print(f"round {r}: {name}: {time.monotonic() - t:.3f} s ({n} syncs)")
    finally:
        shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    main()
