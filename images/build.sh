#!/usr/bin/env bash
# Build small, real OCI test images from Debian packages (no hub), cache them as
# OCI layouts, and optionally push them to a registry on loopback.
#
#   images/build.sh [--cache DIR] [--registry HOST:PORT] IMAGE...
#   IMAGE: busybox | multilayer | python3 | all
#          | minbase | nginx | redis | gcc | pydev
#          | bench (busybox minbase python3 nginx redis gcc pydev)
#
# stdout: one line per requested image, "NAME MANIFEST_DIGEST" (the digest of the
# manifest as stored in the layout; with --registry the pushed digest is the same).
# stderr: one progress line per step. Tool output goes to CACHE/NAME.log so the
# progress stays readable; the log's tail is shown when a step fails.
#
# Needs root (umoci unpack keeps owners, debootstrap, chroot), umoci, skopeo, jq,
# python3, busybox-static and, for python3, debootstrap and access to the mirror.
set -euo pipefail

# Everything a tool prints goes to stderr; fd 3 is the only way to stdout, so the
# result lines can be parsed by tests without filtering noise.
exec 3>&1 1>&2

readonly TAG=latest
# Fixed timestamp for everything we control (mtimes, config/history "created"), so
# the busybox and multilayer images come out the same when rebuilt on one machine.
readonly EPOCH=1700000000
readonly CREATED=2023-11-14T22:13:20Z
readonly PATH_ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The same mirror the host's apt uses (/etc/apt/sources.list.d/debian.sources).
readonly MIRROR=http://deb.debian.org/debian
readonly SUITE=bookworm
# pydev's packages: Debian's python3 plus what building C extensions needs (the
# python image people pull carries the same toolchain and -dev libraries).
readonly PYDEV_PACKAGES=(python3 python3-dev python3-venv python3-pip build-essential pkg-config
  libssl-dev zlib1g-dev libffi-dev libsqlite3-dev libbz2-dev libreadline-dev liblzma-dev
  libncurses-dev libexpat1-dev libgdbm-dev uuid-dev)

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${LAZYLAYER_IMAGE_CACHE:-$REPO_ROOT/.cache/images}
REGISTRY=

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
  cat >&2 <<'EOF'
usage: images/build.sh [--cache DIR] [--registry HOST:PORT] IMAGE...
  IMAGE: busybox | multilayer | python3 | all
         | minbase | nginx | redis | gcc | pydev
         | bench (busybox minbase python3 nginx redis gcc pydev)
  --cache DIR           where OCI layouts are built and cached
                        (default ${LAZYLAYER_IMAGE_CACHE:-<repo>/.cache/images})
  --registry HOST:PORT  push each image to docker://HOST:PORT/lazylayer/NAME:latest
stdout: "NAME MANIFEST_DIGEST" per image.
EOF
  exit 2
}

# --- helpers ---------------------------------------------------------------------

LOG=/dev/null
declare -A ENSURED=()  # images already checked or built in this run

# Run a tool with its output in the image's log; on failure show the log's tail,
# because the progress line alone does not say what went wrong.
run() {
  if ! "$@" >>"$LOG" 2>&1; then
    printf 'build.sh: command failed: %s\n--- last lines of %s ---\n' "$*" "$LOG" >&2
    tail -n 30 "$LOG" >&2 || true
    exit 1
  fi
}

# Refuse to delete a tree that still has something mounted below it: a leftover
# bind mount of /dev or /proc inside a rootfs would make rm -rf delete host files.
# (Our own mounts live in private mount namespaces, so this should never fire.)
safe_rm() {
  local path=$1 mp
  [[ -e $path ]] || return 0
  path=$(realpath "$path")
  while read -r _ _ _ _ mp _; do
    if [[ $mp == "$path" || $mp == "$path"/* ]]; then
      die "refusing to remove $path: $mp is mounted inside it"
    fi
  done </proc/self/mountinfo
  rm -rf -- "$path"
}

# Manifest digest of TAG in an OCI layout, from its index.json.
layout_digest() {
  jq -er --arg t "$TAG" \
    '[.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t)][0].digest' \
    "$1/index.json"
}

# Run a command chrooted into ROOT with /dev and /proc mounted. The mounts are made
# inside a private mount namespace that dies with the command, so they can never
# outlive it (not even on SIGKILL) and never show up on the host: that is stronger
# than unmounting in a trap. ROOT/dev itself stays an empty directory on disk.
chroot_run() {
  local root=$1
  shift
  # shellcheck disable=SC2016 # the inner script expands its own positional args
  unshare --mount --propagation private -- /bin/sh -euc '
    root=$1; shift
    mount --bind /dev "$root/dev"
    mount -t proc proc "$root/proc"
    exec chroot "$root" "$@"
  ' chroot_run "$root" "$@"
}

# umoci repack with the bookkeeping every layer needs. --refresh-bundle updates the
# bundle's mtree so the next repack of the same bundle yields only the new diff.
repack() {
  local layout=$1 bundle=$2 what=$3
  run umoci repack --refresh-bundle --image "$layout:$TAG" \
    --history.created "$CREATED" --history.created_by "$what" "$bundle"
}

# --- busybox: one layer from Debian's busybox-static ------------------------------

populate_busybox_rootfs() {
  local root=$1 p applets
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp}
  install -m 0755 /bin/busybox "$root/bin/busybox"
  # `busybox --install -s` semantics (absolute links to /bin/busybox at each
  # applet's usual path), but created inside the rootfs, not on the host. Ask the
  # copied binary (static, runs here) so the list matches what is installed.
  applets=$("$root/bin/busybox" --list-full)
  while read -r p; do
    [[ $p == bin/busybox ]] && continue
    mkdir -p "$root/$(dirname "$p")"
    ln -sfn /bin/busybox "$root/$p"
  done <<<"$applets"
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
www-data:x:33:33:www-data:/var/www:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
www-data:x:33:
user:x:1000:
nogroup:x:65534:
EOF
  chmod 0644 "$root/etc/passwd" "$root/etc/group"
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root"
  # Fixed mtimes make the layer reproducible for a given busybox-static version.
  find "$root" -exec touch -h -d "@$EPOCH" {} +
}

build_busybox() {
  local dir=$1 layout=$1/oci bundle=$1/work/bundle
  log "busybox: umoci init + new"
  run umoci init --layout "$layout"
  run umoci new --image "$layout:$TAG"
  run umoci unpack --image "$layout:$TAG" "$bundle"
  log "busybox: rootfs from busybox-static ($(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo '?'))"
  populate_busybox_rootfs "$bundle/rootfs"
  log "busybox: repack layer 1/1"
  repack "$layout" "$bundle" "busybox-static rootfs"
  log "busybox: config"
  # No entrypoint: umoci new leaves it unset.
  run umoci config --image "$layout:$TAG" --created "$CREATED" \
    --history.created "$CREATED" --history.created_by "config" \
    --config.env "$PATH_ENV" \
    --config.cmd /bin/sh --config.cmd -c --config.cmd "echo hello from busybox"
}

# --- multilayer: busybox base + crafted tar layers --------------------------------

# Writes layer2.tar .. layer5.tar into DIR. Deterministic: PAX format, fixed mtime,
# explicit uid/gid and no user/group names, entries sorted by name (a parent always
# sorts before its children, and a hardlink's target before the link).
gen_multilayer_tars() {
  python3 - "$1" "$EPOCH" <<'PY'
import io, random, sys, tarfile

out, mtime = sys.argv[1], int(sys.argv[2])

def entry(name, type_, mode, uid=0, gid=0, **kw):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = type_, mode, uid, gid, mtime
    ti.uname = ti.gname = ""
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti

def d(name, mode=0o755, uid=0, gid=0):
    return entry(name, tarfile.DIRTYPE, mode, uid, gid), None

def f(name, data=b"", mode=0o644, uid=0, gid=0, xattrs=None):
    if isinstance(data, str):
        data = data.encode()
    ti = entry(name, tarfile.REGTYPE, mode, uid, gid, size=len(data))
    if xattrs:
        ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in xattrs.items()}
    return ti, data

def sym(name, target):
    return entry(name, tarfile.SYMTYPE, 0o777, linkname=target), None

def hard(name, target):
    return entry(name, tarfile.LNKTYPE, 0o644, linkname=target), None

def fifo(name, mode=0o644):
    return entry(name, tarfile.FIFOTYPE, mode), None

def chardev(name, major, minor, mode=0o666):
    return entry(name, tarfile.CHRTYPE, mode, devmajor=major, devminor=minor), None

def whiteout(path):  # an empty regular file; the name carries the meaning
    return f(path)

def write(n, entries):
    names = [ti.name for ti, _ in entries]
    assert len(names) == len(set(names)), "duplicate entry"
    with tarfile.open(f"{out}/layer{n}.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in sorted(entries, key=lambda e: e[0].name):
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)

# Layer 2: the tree the later layers modify, plus modes, owners, xattr, links.
random_bytes = random.Random(mtime).randbytes(5 * 1024 * 1024)
write(2, [
    d("data"),
    d("data/keep"), f("data/keep/a.txt", "a: kept\n"),
    f("data/keep/b.txt", "b: whited out in layer 3\n"),
    sym("data/keep-link", "keep"),                      # symlink to a directory
    d("data/gone"), f("data/gone/x.txt", "x: directory whited out in layer 3\n"),
    d("data/opq"), f("data/opq/old1.txt", "old1\n"), f("data/opq/old2.txt", "old2\n"),
    d("data/opq/sub"), f("data/opq/sub/deep.txt", "deep\n"),
    d("data/modes"),
    f("data/modes/0644.txt", "mode 0644\n", 0o644),
    f("data/modes/0755.sh", "#!/bin/sh\necho mode-0755\n", 0o755),
    f("data/modes/0600.txt", "mode 0600\n", 0o600),
    f("data/modes/setuid", "#!/bin/sh\necho setuid\n", 0o4755),
    d("data/owners", 0o750, 1000, 1000),
    f("data/owners/u1000.txt", "owned by 1000:1000\n", 0o644, 1000, 1000),
    f("data/owners/www-data.txt", "owned by 33:33\n", 0o640, 33, 33),
    f("data/xattr.txt", "has user.lazylayer\n", xattrs={"user.lazylayer": "hello"}),
    f("data/empty"),
    f("data/random.bin", random_bytes),
    d("data/hl"), f("data/hl/one", "hardlinked\n"), hard("data/hl/two", "data/hl/one"),
    d("data/typechange"),
    f("data/typechange/file_to_dir", "a file until layer 4\n"),
    d("data/typechange/dir_to_link"), f("data/typechange/dir_to_link/inner.txt", "inner\n"),
    d("data/change"), f("data/change/file.txt", "version 1\n", 0o644),
    d("etc"), sym("etc/alt", "/etc/passwd"),            # absolute symlink
    sym("dangling", "/nonexistent"),                    # dangling symlink
    d("usr"), d("usr/local"), d("usr/local/bin"), d("usr/local/lib"),
    f("usr/local/lib/tool.sh", "#!/bin/sh\necho tool ok\n", 0o755),
    sym("usr/local/bin/tool", "../lib/tool.sh"),        # relative symlink
])

# Layer 3: whiteouts of a file and of a directory, an opaque directory, new content.
write(3, [
    d("data"),
    d("data/keep"), whiteout("data/keep/.wh.b.txt"),
    whiteout("data/.wh.gone"),
    d("data/opq"), whiteout("data/opq/.wh..wh..opq"), f("data/opq/new.txt", "new\n"),
    d("data/change"), f("data/change/file.txt", "version 2\n", 0o644),
])

# Layer 4: type changes (file -> dir, dir -> symlink) and a mode-only change.
write(4, [
    d("data"), d("data/typechange"),
    d("data/typechange/file_to_dir"),
    f("data/typechange/file_to_dir/inside.txt", "a directory since layer 4\n"),
    sym("data/typechange/dir_to_link", "../keep"),
    d("data/change"), f("data/change/file.txt", "version 2\n", 0o600),
])

# Layer 5: codec edge cases: PAX long names and link targets, UTF-8 names, an id
# too large for the octal header field, a sticky directory, a FIFO, a char device.
long_dir = "data/long/" + "d" * 120
long_file = long_dir + "/" + "f" * 150 + ".txt"
write(5, [
    d("data"), d("data/long"), d(long_dir), f(long_file, "long path\n"),
    sym("data/long/link", "/" + long_file),
    d("data/unicode"), f("data/unicode/h\u00e9llo w\u00f6rld \u2713.txt", "utf-8 name\n"),
    d("data/owners", 0o750, 1000, 1000),
    f("data/owners/bigid.txt", "uid/gid 3000000\n", 0o644, 3000000, 3000000),
    d("data/sticky", 0o1777),
    d("data/special"), fifo("data/special/fifo"), chardev("data/special/null", 1, 3),
])
PY
}

build_multilayer() {
  local dir=$1 layout=$1/oci work=$1/work n
  local -A what=(
    [2]="tree, modes, owners, xattr, empty, 5 MiB random, symlinks, hardlinks"
    [3]="whiteouts (file, dir), opaque dir, content change"
    [4]="type changes (file->dir, dir->symlink), mode-only change"
    [5]="long names, utf-8 names, big ids, sticky dir, fifo, char device"
  )
  log "multilayer: base layer = busybox image"
  # The same layer blob as the busybox image: layers shared across images.
  cp -a "$CACHE/busybox/oci" "$layout"
  mkdir -p "$work"
  log "multilayer: crafting layer tars with python3 tarfile"
  gen_multilayer_tars "$work"
  for n in 2 3 4 5; do
    log "multilayer: add layer $n/5 (${what[$n]})"
    # umoci stores the uncompressed tar verbatim, gzip-compressed (tar+gzip).
    run umoci raw add-layer --image "$layout:$TAG" \
      --history.created "$CREATED" --history.created_by "layer$n: ${what[$n]}" \
      "$work/layer$n.tar"
  done
  log "multilayer: config"
  run umoci config --image "$layout:$TAG" --created "$CREATED" \
    --history.created "$CREATED" --history.created_by "config" \
    --config.cmd /bin/sh --config.cmd -c --config.cmd "cat /data/keep/a.txt; ls /data/opq"
}

# --- python3: debootstrap minbase + python3 ---------------------------------------

# What every python3 layer drops: runtimes supply /dev, /etc/resolv.conf and
# /etc/hostname; apt caches and lists would add ~50 MB for nothing.
clean_rootfs() {
  local root=$1
  find "$root/dev" -mindepth 1 -delete
  rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
    "$root"/var/cache/apt/archives/*.deb "$root/var/cache/apt/archives/partial"/*
  rm -rf "$root"/tmp/* "$root"/var/tmp/*
}

build_python3() {
  local dir=$1 layout=$1/oci bundle=$1/work/bundle
  local root=$bundle/rootfs
  log "python3: umoci init + new"
  run umoci init --layout "$layout"
  run umoci new --image "$layout:$TAG"
  run umoci unpack --image "$layout:$TAG" "$bundle"

  log "python3: debootstrap --variant=minbase $SUITE from $MIRROR (~1-2 min)"
  # debootstrap mounts /proc and /sys in the target itself; a private mount
  # namespace keeps those mounts off the host even if debootstrap dies midway.
  run unshare --mount --propagation private -- \
    debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR"
  clean_rootfs "$root"
  log "python3: repack layer 1/4 (minbase)"
  repack "$layout" "$bundle" "debootstrap --variant=minbase $SUITE"

  log "python3: apt-get install python3 in chroot"
  # DNS for apt inside the chroot; clean_rootfs removes it again, so the layer
  # does not carry it (it was not in layer 1 either: no whiteout).
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  run chroot_run "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get update
  run chroot_run "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends python3
  run chroot_run "$root" apt-get clean
  clean_rootfs "$root"
  log "python3: repack layer 2/4 (python3)"
  repack "$layout" "$bundle" "apt-get install --no-install-recommends python3"

  log "python3: /app/hello.py"
  mkdir -p "$root/app"
  cat >"$root/app/hello.py" <<'EOF'
import json, email, http.client  # stdlib modules spread over many files

json.dumps({"ok": True}); email.message_from_string("a: b\n\n"); http.client.HTTPConnection
print("ok")
EOF
  chmod 0644 "$root/app/hello.py"
  log "python3: repack layer 3/4 (app)"
  repack "$layout" "$bundle" "/app/hello.py"

  log "python3: delete /usr/share/doc/* (whiteouts)"
  find "$root/usr/share/doc" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
  log "python3: repack layer 4/4 (whiteouts)"
  repack "$layout" "$bundle" "rm -rf /usr/share/doc/*"

  log "python3: config"
  run umoci config --image "$layout:$TAG" --created "$CREATED" \
    --history.created "$CREATED" --history.created_by "config" \
    --config.env "$PATH_ENV" --config.workingdir /app \
    --config.cmd python3 --config.cmd /app/hello.py

  log "python3: smoke test (chroot python3 /app/hello.py)"
  local out
  out=$(chroot_run "$root" python3 /app/hello.py)
  [[ $out == ok ]] || die "python3 smoke test printed '$out', not 'ok'"
}

# --- bench images: Debian minbase and images derived from it ------------------------

# minbase: one layer, `debootstrap --variant=minbase`, Cmd bash -c 'echo ok'. nginx,
# redis and gcc start from this very layer blob (like multilayer from busybox).
build_minbase() {
  local dir=$1 layout=$1/oci bundle=$1/work/bundle
  local root=$bundle/rootfs
  log "minbase: umoci init + new"
  run umoci init --layout "$layout"
  run umoci new --image "$layout:$TAG"
  run umoci unpack --image "$layout:$TAG" "$bundle"
  log "minbase: debootstrap --variant=minbase $SUITE from $MIRROR (~1-2 min)"
  run unshare --mount --propagation private -- \
    debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR"
  clean_rootfs "$root"
  log "minbase: repack layer 1/1 (minbase)"
  repack "$layout" "$bundle" "debootstrap --variant=minbase $SUITE"
  log "minbase: config"
  run umoci config --image "$layout:$TAG" --created "$CREATED" \
    --history.created "$CREATED" --history.created_by "config" \
    --config.env "$PATH_ENV" \
    --config.cmd bash --config.cmd -c --config.cmd "echo ok"
}

# Copy the minbase layout and unpack it as the bundle the next layers are made in.
derive_from_minbase() {
  local name=$1 layout=$2 bundle=$3
  log "$name: base layer = minbase image"
  cp -a "$CACHE/minbase/oci" "$layout"
  run umoci unpack --image "$layout:$TAG" "$bundle"
}

# apt-get install PACKAGES (no recommends) in the chroot, then drop caches and lists.
apt_install() {
  local root=$1
  shift
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  run chroot_run "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get update
  run chroot_run "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "$@"
  run chroot_run "$root" apt-get clean
  clean_rootfs "$root"
  rm -rf "$root"/var/log/apt/* "$root"/var/log/dpkg.log "$root"/var/cache/debconf/*-old
}

# nginx: minbase + nginx + a one-site config (IPv4 :80, logs to stdout/stderr, no
# daemon). Ready = first HTTP 200 on 127.0.0.1:80.
build_nginx() {
  local dir=$1 layout=$1/oci bundle=$1/work/bundle
  local root=$bundle/rootfs
  derive_from_minbase nginx "$layout" "$bundle"
  log "nginx: apt-get install nginx in chroot"
  apt_install "$root" nginx
  rm -rf "$root"/var/log/nginx/*
  log "nginx: repack layer 2/3 (nginx)"
  repack "$layout" "$bundle" "apt-get install --no-install-recommends nginx"
  log "nginx: site config"
  rm -f "$root/etc/nginx/sites-enabled/default"
  cat >"$root/etc/nginx/conf.d/bench.conf" <<'CONF'
server {
    listen 80 default_server;
    root /var/www/html;
    index index.nginx-debian.html;
    access_log /dev/stdout;
    error_log /dev/stderr;
}
CONF
  chmod 0644 "$root/etc/nginx/conf.d/bench.conf"
  log "nginx: repack layer 3/3 (config)"
  repack "$layout" "$bundle" "nginx site: listen 80, logs to stdio"
  run umoci config --image "$layout:$TAG" --created "$CREATED" \
    --history.created "$CREATED" --history.created_by "config" \
    --config.env "$PATH_ENV" --config.stopsignal SIGQUIT \
    --config.cmd nginx --config.cmd -g --config.cmd "daemon off; error_log stderr;"
  log "nginx: smoke test (chroot nginx -t)"
  run chroot_run "$root" nginx -t
}

# redis: minbase + redis-server. Ready = first PING answered +PONG on 127.0.0.1:6379.
build_redis() {
  local dir=$1 layout=$1/oci bundle=$1/work/bundle
  local root=$bundle/rootfs
  derive_from_minbase redis "$layout" "$bundle"
  log "redis: apt-get install redis-server in chroot"
  apt_install "$root" redis-server
  rm -rf "$root"/var/log/redis/*
  log "redis: repack layer 2/2 (redis-server)"
  repack "$layout" "$bundle" "apt-get install --no-install-recommends redis-server"
  run umoci config --image "$layout:$TAG" --created "$CREATED" \
    --history.created "$CREATED" --history.created_by "config" \
    --config.env "$PATH_ENV" --config.workingdir /var/lib/redis \
    --config.cmd redis-server --config.cmd --bind --config.cmd 127.0.0.1 \
    --config.cmd --port --config.cmd 6379 --config.cmd --protected-mode --config.cmd no \
    --config.cmd --save --config.cmd "" --config.cmd --appendonly --config.cmd no
  log "redis: smoke test (chroot redis-server --version)"
  run chroot_run "$root" redis-server --version
}

# gcc: the large image (> 500 MB unpacked): minbase + C/C++ toolchain + more tools
# (gfortran, gdb, cmake, git, python3) + /app/hello.c. Cmd compiles and runs it.
build_gcc() {
  local dir=$1 layout=$1/oci bundle=$1/work/bundle
  local root=$bundle/rootfs
  derive_from_minbase gcc "$layout" "$bundle"
  log "gcc: apt-get install gcc g++ make libc6-dev in chroot"
  apt_install "$root" gcc g++ make libc6-dev
  log "gcc: repack layer 2/4 (toolchain)"
  repack "$layout" "$bundle" "apt-get install --no-install-recommends gcc g++ make libc6-dev"
  log "gcc: apt-get install gfortran gdb cmake git python3 in chroot"
  apt_install "$root" gfortran gdb cmake git python3
  log "gcc: repack layer 3/4 (more tools)"
  repack "$layout" "$bundle" "apt-get install --no-install-recommends gfortran gdb cmake git python3"
  log "gcc: /app/hello.c"
  mkdir -p "$root/app"
  cat >"$root/app/hello.c" <<'C'
#include <stdio.h>

int main(void) {
    printf("hello from gcc\n");
    return 0;
}
C
  chmod 0644 "$root/app/hello.c"
  touch -h -d "@$EPOCH" "$root/app" "$root/app/hello.c"
  log "gcc: repack layer 4/4 (app)"
  repack "$layout" "$bundle" "/app/hello.c"
  run umoci config --image "$layout:$TAG" --created "$CREATED" \
    --history.created "$CREATED" --history.created_by "config" \
    --config.env "$PATH_ENV" --config.workingdir /app \
    --config.cmd sh --config.cmd -c \
    --config.cmd "gcc -O2 -o /tmp/hello /app/hello.c && /tmp/hello"
  log "gcc: smoke test (chroot: compile and run hello.c)"
  local out
  out=$(chroot_run "$root" sh -c 'gcc -O2 -o /tmp/hello /app/hello.c && /tmp/hello && rm -f /tmp/hello')
  [[ $out == "hello from gcc" ]] || die "gcc smoke test printed '$out'"
}

# pydev: the big python image, like the python image people pull (Debian python3 with
# a C toolchain and the usual -dev libraries to build extension modules): its own
# debootstrap minbase (as python3), the packages, /app/hello.py. Several hundred MB
# unpacked. Cmd imports a few stdlib modules backed by C libraries and prints one line.
build_pydev() {
  local dir=$1 layout=$1/oci bundle=$1/work/bundle
  local root=$bundle/rootfs
  log "pydev: umoci init + new"
  run umoci init --layout "$layout"
  run umoci new --image "$layout:$TAG"
  run umoci unpack --image "$layout:$TAG" "$bundle"
  log "pydev: debootstrap --variant=minbase $SUITE from $MIRROR (~1-2 min)"
  run unshare --mount --propagation private -- \
    debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR"
  clean_rootfs "$root"
  log "pydev: repack layer 1/3 (minbase)"
  repack "$layout" "$bundle" "debootstrap --variant=minbase $SUITE"

  log "pydev: apt-get install python3, build-essential and -dev libraries in chroot (~2-4 min)"
  apt_install "$root" "${PYDEV_PACKAGES[@]}"
  log "pydev: repack layer 2/3 (packages)"
  repack "$layout" "$bundle" "apt-get install --no-install-recommends ${PYDEV_PACKAGES[*]}"

  log "pydev: /app/hello.py"
  mkdir -p "$root/app"
  cat >"$root/app/hello.py" <<'EOF'
import decimal, hashlib, json, lzma, sqlite3, ssl, uuid  # stdlib modules backed by C libraries

db = sqlite3.connect(":memory:")
n = db.execute("select count(*) from (select 1 union select 2)").fetchone()[0]
d = decimal.Decimal(1) / decimal.Decimal(8)
h = hashlib.sha256(lzma.compress(json.dumps({"n": n}).encode())).hexdigest()
ssl.create_default_context(); uuid.uuid4()
print(f"hello from pydev: sqlite {sqlite3.sqlite_version}, {ssl.OPENSSL_VERSION}, {n} rows, {d}, {h[:8]}")
EOF
  chmod 0644 "$root/app/hello.py"
  touch -h -d "@$EPOCH" "$root/app" "$root/app/hello.py"
  log "pydev: repack layer 3/3 (app)"
  repack "$layout" "$bundle" "/app/hello.py"

  log "pydev: config"
  run umoci config --image "$layout:$TAG" --created "$CREATED" \
    --history.created "$CREATED" --history.created_by "config" \
    --config.env "$PATH_ENV" --config.workingdir /app \
    --config.cmd python3 --config.cmd /app/hello.py

  log "pydev: smoke test (chroot python3 /app/hello.py; a C program embedding libpython)"
  local out
  out=$(chroot_run "$root" python3 /app/hello.py)
  [[ $out == "hello from pydev: "* ]] || die "pydev smoke test printed '$out'"
  # shellcheck disable=SC2016 # expanded in the chroot
  run chroot_run "$root" sh -ec '
    printf "#include <Python.h>\nint main(void) { Py_Initialize(); return Py_FinalizeEx(); }\n" >/tmp/t.c
    gcc -o /tmp/t /tmp/t.c $(python3-config --includes) $(python3-config --embed --ldflags)
    /tmp/t
    rm -f /tmp/t /tmp/t.c'
}

# --- cache + push -----------------------------------------------------------------

# The cache key of a recipe: its function bodies as bash prints them (comments are
# stripped, so editing comments does not force the slow python3 rebuild), plus the
# busybox manifest for multilayer, whose base layer comes from it.
recipe_key() {
  local name=$1
  {
    case $name in
      busybox) declare -f build_busybox populate_busybox_rootfs repack ;;
      multilayer) declare -f build_multilayer gen_multilayer_tars; layout_digest "$CACHE/busybox/oci" ;;
      python3) declare -f build_python3 clean_rootfs chroot_run repack; echo "$SUITE $MIRROR" ;;
      pydev) declare -f build_pydev apt_install clean_rootfs chroot_run repack; echo "$SUITE $MIRROR ${PYDEV_PACKAGES[*]}" ;;
      minbase) declare -f build_minbase clean_rootfs repack; echo "$SUITE $MIRROR" ;;
      nginx | redis | gcc)
        declare -f "build_$name" derive_from_minbase apt_install clean_rootfs chroot_run repack
        layout_digest "$CACHE/minbase/oci" ;;
      *) die "no recipe for $name" ;;
    esac
    echo "$TAG $EPOCH $PATH_ENV"
  } | sha256sum | cut -d' ' -f1
}

# Build NAME into CACHE/NAME/oci unless a complete build with the same recipe is
# there. The stamp is written last: a build that died midway has none and is
# redone from scratch.
ensure_image() {
  local name=$1 dir=$CACHE/$1 key start digest
  [[ -z ${ENSURED[$name]:-} ]] || return 0
  ENSURED[$name]=1
  key=$(recipe_key "$name")
  if [[ -f $dir/stamp && $(<"$dir/stamp") == "$key" && -f $dir/oci/index.json ]]; then
    log "$name: cached in $dir/oci"
    return 0
  fi
  LOG=$CACHE/$name.log
  : >"$LOG"
  start=$SECONDS
  log "$name: building in $dir (log: $LOG)"
  safe_rm "$dir"
  mkdir -p "$dir"
  "build_$name" "$dir"
  log "$name: umoci gc, removing work dir"
  run umoci gc --layout "$dir/oci"
  safe_rm "$dir/work"
  echo "$key" >"$dir/stamp"
  digest=$(layout_digest "$dir/oci")
  log "$name: built in $((SECONDS - start)) s, manifest $digest"
}

push_image() {
  local name=$1 dest=docker://$REGISTRY/lazylayer/$1:$TAG
  LOG=$CACHE/$name.log
  log "$name: push to $dest"
  # skopeo 1.9 has --preserve-digests: it fails rather than silently rewriting the
  # manifest, so the registry's manifest digest equals the layout's.
  run skopeo copy --preserve-digests --dest-tls-verify=false \
    "oci:$CACHE/$name/oci:$TAG" "$dest"
}

# --- main -------------------------------------------------------------------------

main() {
  local -a want=()
  local arg name
  while (($#)); do
    arg=$1
    case $arg in
      --cache) (($# >= 2)) || usage; CACHE=$2; shift 2 ;;
      --cache=*) CACHE=${arg#*=}; shift ;;
      --registry) (($# >= 2)) || usage; REGISTRY=$2; shift 2 ;;
      --registry=*) REGISTRY=${arg#*=}; shift ;;
      -h | --help) usage ;;
      all) want+=(busybox multilayer python3); shift ;;
      bench) want+=(busybox minbase python3 nginx redis gcc pydev); shift ;;
      busybox | multilayer | python3 | minbase | nginx | redis | gcc | pydev) want+=("$arg"); shift ;;
      *) printf 'build.sh: unknown argument: %s\n' "$arg" >&2; usage ;;
    esac
  done
  ((${#want[@]})) || usage
  if [[ -n $REGISTRY && ! $REGISTRY =~ ^[^/:[:space:]]+:[0-9]+$ ]]; then
    die "--registry wants HOST:PORT, got '$REGISTRY'"
  fi
  ((EUID == 0)) || die "must run as root (umoci unpack with owners, debootstrap, chroot)"
  local tool
  for tool in umoci skopeo jq python3 unshare flock; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
  done
  [[ -x /bin/busybox ]] || die "missing /bin/busybox (apt-get install busybox-static)"

  mkdir -p "$CACHE"
  CACHE=$(realpath "$CACHE")
  # skopeo's oci: transport splits the reference at ':' (path:tag).
  [[ $CACHE != *:* ]] || die "cache path must not contain ':' ($CACHE)"
  # One build at a time per cache: tests may run several build.sh at once.
  exec 9>"$CACHE/.lock"
  flock 9

  # Deduplicate, keep order; multilayer needs busybox built first.
  local -A seen=()
  local -a order=()
  for name in "${want[@]}"; do
    [[ -n ${seen[$name]:-} ]] && continue
    seen[$name]=1
    order+=("$name")
  done
  for name in "${order[@]}"; do
    if [[ $name == multilayer ]]; then
      ensure_image busybox
    fi
    case $name in
      nginx | redis | gcc) ensure_image minbase ;;
    esac
    if [[ $name == python3 || $name == minbase || $name == pydev ]] && ! command -v debootstrap >/dev/null; then
      die "missing tool: debootstrap"
    fi
    ensure_image "$name"
  done
  if [[ -n $REGISTRY ]]; then
    for name in "${order[@]}"; do push_image "$name"; done
  fi
  local digest
  for name in "${order[@]}"; do
    digest=$(layout_digest "$CACHE/$name/oci")
    printf '%s %s\n' "$name" "$digest" >&3
  done
}

main "$@"
