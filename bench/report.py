#!/usr/bin/python3
"""Turn bench/bench.py's JSON into Markdown tables and a chart.

    report.py latest.json --md latest.md --png latest.png [--seconds N]
"""
import argparse
import json
import math

NAMES = {
    "podman": "podman pull + run",
    "containerd": "ctr pull + run",
    "containerd-lazylayer": "ctr + lazylayer snapshotter",
    "lazylayer": "lazylayer run (optimized)",
    "lazylayer-attached": "lazylayer run (attached: SRC unchanged)",
    "lazylayer-unopt": "lazylayer run (unoptimized)",
    "lazylayer-base": "lazylayer run (optimized, baseline binary)",
    "podman-sid": "podman 5.8 (sid)",
    "containerd-sid": "containerd 2.1 (sid)",
    "containerd-sid-lazylayer": "ctr 2.1 + lazylayer snapshotter (sid)",
    "nydus": "nydus (ctr-remote rpull + nydus snapshotter)",
    "estargz": "eStargz (ctr-remote rpull + stargz snapshotter)",
    "podman-sid-zstdchunked": "podman 5.8 zstd:chunked (sid)",
}
# The sid stack's contenders in the light shade of their host twin's colour.
COLORS = {"podman": "#7f7f7f", "containerd": "#1f77b4", "containerd-lazylayer": "#9467bd",
          "lazylayer": "#d62728", "lazylayer-attached": "#e377c2", "lazylayer-unopt": "#ff9896", "lazylayer-base": "#bcbd22",
          "podman-sid": "#c7c7c7", "containerd-sid": "#aec7e8", "containerd-sid-lazylayer": "#c5b0d5",
          "nydus": "#2ca02c", "estargz": "#17becf", "podman-sid-zstdchunked": "#8c564b"}
SID = ("podman-sid", "containerd-sid", "containerd-sid-lazylayer")
# The lazy-pulling peers (bench.py PEER_CONTENDERS).
PEERS = ("nydus", "estargz", "podman-sid-zstdchunked")
LINK_NAMES = {"loopback": "loopback (unshaped)", "1gbit": "1 Gbit/s", "100mbit": "100 Mbit/s", "10mbit": "10 Mbit/s"}
# Start-up speedup over a full pull that the layer-granular method lazylayer follows
# reported per link (docs/architecture.md): podman-like pull + run / optimized start.
PAPER = {"1gbit": 4.9, "100mbit": 10.0, "10mbit": 15.0}
# Round trips no start can avoid, on top of its bytes: connect, manifest, config (with a
# lazy start: and the boot layer's index region), then the start set (or the layers).
FLOOR_ROUND_TRIPS = 4
LAZY = ("lazylayer", "lazylayer-attached", "lazylayer-base", "containerd-lazylayer",
        "containerd-sid-lazylayer")
# Warm starts: the contenders whose image is local whole after a pull (lazylayer-unopt's
# is not: its warm start is not measured).
WARM = ("podman", "containerd", "containerd-lazylayer", "lazylayer") + SID


def esc(text):
    """A table cell: a literal | would end the cell."""
    return str(text).replace("|", "\\|")


def mb(x):
    return "-" if x is None else f"{x / 1e6:.1f} MB"


def secs(x):
    if x is None:
        return "-"
    return f"{x:.2f} s" if x < 100 else f"{x:.0f} s"


def med(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def warm_of(d, img):
    """Warm start used for the floor: the fastest median warm start of the container
    (image local) by any runtime measured - the least any start can cost on top of
    the bytes."""
    w = d["warm"].get(img, {})
    best = [(med(w.get(c, [])), c) for c in WARM]
    best = [b for b in best if b[0] is not None]
    return min(best) if best else (None, None)


def rtt_of(cell):
    """The cell's round-trip time in seconds (0 without the relay)."""
    return (cell.get("rtt_ms") or 0) / 1000


def rtt_text(cell):
    return f"{cell['rtt_ms']} ms" if cell.get("relay") else "- (no relay)"


def where(cell):
    """A cell's name in running text."""
    return (f"{cell['image']} @ {LINK_NAMES.get(cell['link'], cell['link'])}"
            + (f", RTT {cell['rtt_ms']} ms" if cell.get("relay") else ""))


def link_rate(d, link):
    """Bytes/s: shaped links, the tbf rate (a 2 s sample overstates it by the 256 kB
    burst); unshaped loopback, the measured rate of one blob GET."""
    li = d["links"].get(link, {})
    return li["nominal_bps"] / 8 if li.get("nominal_bps") else li.get("Bps")


def start_bytes(info):
    """(compressed bytes the optimized start reads before the workload runs, exact?):
    the optimize report's boot_start_bytes (index region + the boot chunks the trace
    read) when lazylayer reports it, else the whole boot layer."""
    v = info.get("boot_start_bytes")
    if v is None:
        v = (info.get("optimize_report") or {}).get("boot_start_bytes")
    if v is not None:
        return v, True
    return info.get("boot_bytes"), False


def floor_of(d, cell):
    """File floor: the whole boot layer (every file the workload touched) / link rate
    + the unavoidable round trips + the fastest warm start."""
    info = d["images"][cell["image"]]
    warm, by = warm_of(d, cell["image"])
    rate = link_rate(d, cell["link"])
    if info.get("boot_bytes") is None or warm is None or not rate:
        return None, None
    return info["boot_bytes"] / rate + FLOOR_ROUND_TRIPS * rtt_of(cell) + warm, by


def byte_floor_of(d, cell):
    """Byte floor of a lazy start: the compressed bytes read before the start / link rate
    + the unavoidable round trips (FLOOR_ROUND_TRIPS x RTT) + the fastest warm start.
    (value, exact): exact is False when the boot layer stood in."""
    info = d["images"][cell["image"]]
    warm, _ = warm_of(d, cell["image"])
    rate = link_rate(d, cell["link"])
    n, exact = start_bytes(info)
    if n is None or warm is None or not rate:
        return None, exact
    return n / rate + FLOOR_ROUND_TRIPS * rtt_of(cell) + warm, exact


def contender_floor(d, cell, c):
    """The floor of contender c's start: a lazy start's byte floor; a full pull's
    compressed image / link rate + the same round trips + the fastest warm start."""
    # The lazy peers run the same traced start: its bytes are their floor too.
    if c in LAZY or c in ("nydus", "estargz"):
        return byte_floor_of(d, cell)[0]
    info = d["images"][cell["image"]]
    warm, _ = warm_of(d, cell["image"])
    rate = link_rate(d, cell["link"])
    if warm is None or not rate:
        return None
    return info["compressed"] / rate + FLOOR_ROUND_TRIPS * rtt_of(cell) + warm


def speedup(ccs):
    """podman median / lazylayer (optimized) median, time to ready."""
    pm = (ccs.get("podman") or {}).get("median")
    ll = (ccs.get("lazylayer") or {}).get("median")
    return pm / ll if (pm and ll) else None


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def cell_text(cc, base):
    if cc is None:
        return "-"
    if cc.get("na"):
        return f"n/a ({cc['na']})"
    n, bad = len(cc["runs"]), cc.get("failed", 0)
    if cc.get("median") is None:
        return f"failed ({bad}/{n})" if n else "-"
    t = secs(cc["median"])
    if base and cc is not base and base.get("median"):
        t += f" ({cc['median'] / base['median']:.2f}x)"
    if bad:
        t += f", {bad}/{n} failed"
    return t


def bytes_rows(d, cs, key, last, per_hop=False):
    """Table rows of a per-contender byte count `key` for every measured cell, with
    `last(image info)` as the final column; per_hop divides by the times each byte
    crossed the loopback (2 with the relay in the path)."""
    for cell in d["cells"]:
        if cell.get("skipped"):
            continue
        ccs, info = cell["contenders"], d["images"][cell["image"]]
        hops = cell.get("lo_hops", 1) if per_hop else 1
        row = []
        for c in cs:
            cc = ccs.get(c) or {}
            v = cc.get(key)
            row.append("n/a" if cc.get("na") else mb(None if v is None else v / hops))
        yield (f"| {cell['image']} | {LINK_NAMES.get(cell['link'], cell['link'])} | {rtt_text(cell)} | "
               + " | ".join(row) + f" | {last(info)} |")


def round_trip_table(d, cs, w):
    """Per relay cell and contender: requests and sequential rounds before ready, the
    bytes, the floor with its round trips and the ratio to it, the speedup vs podman."""
    cells = [c for c in d["cells"] if c.get("relay") and not c.get("skipped")]
    if not cells:
        return
    w("Requests and round trips before ready (cells through the delay relay, median): requests = HTTP "
      "requests whose first byte reached the relay between the clock's start and ready; rounds = the "
      "longest chain of them in which each one's first byte reached the relay after the previous one's "
      "response had left it whole, the first request of a connection counting its handshake as one more "
      "round; sent before ready = the body bytes of the responses that had left the relay whole by ready; "
      "registry sent = the registry's access log until the command ended (table below); floor = bytes / nominal rate + "
      f"{FLOOR_ROUND_TRIPS} x RTT + the fastest warm start, where bytes = `boot_start_bytes` for a lazy "
      "start and the compressed image for a full pull (bench/README.md); x floor = median / floor; "
      "vs podman = podman / this contender.")
    w("")
    w("| image | link | RTT | contender | ready | requests | rounds | connections | sent before ready "
      "| registry sent | floor | x floor | vs podman |")
    w("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    unparsed = []
    for cell in cells:
        ccs = cell["contenders"]
        pm = (ccs.get("podman") or {}).get("median")
        for c in cs:
            cc = ccs.get(c) or {}
            if cc.get("na") or not cc.get("runs"):
                continue
            t = cc.get("median")
            fl = contender_floor(d, cell, c)

            def num(k):
                v = cc.get(k)
                return "-" if v is None else f"{v:g}"
            w(f"| {cell['image']} | {LINK_NAMES.get(cell['link'], cell['link'])} | {cell['rtt_ms']} ms | {NAMES[c]} "
              f"| {secs(t) if t else 'failed'} | {num('median_requests_ready')} | {num('median_rounds_ready')} "
              f"| {num('median_connections_ready')} | {mb(cc.get('median_body_bytes_ready'))} "
              f"| {mb(cc.get('median_bytes'))} | {secs(fl)} "
              f"| {f'{t / fl:.2f}x' if (t and fl) else '-'} | {f'{pm / t:.1f}x' if (t and pm) else '-'} |")
            if cc.get("unparsed"):
                why = sorted({r for x in cc["runs"] for r in (x.get("relay") or {}).get("unparsed_reasons", [])})
                unparsed.append(f"{where(cell)}, {NAMES[c]}: {cc['unparsed']}"
                                + (f" (`{esc('`; `'.join(why[:3]))}`)" if why else ""))
    w("")
    if unparsed:
        w("- Connections the relay could not frame as HTTP/1.1 (relayed, their requests not counted; podman "
          "tries TLS first on a registry it may reach over plain HTTP): " + "; ".join(unparsed) + ".")
        w("")


def markdown(d, seconds):
    m = d["meta"]
    L = []
    w = L.append
    w("# lazylayer benchmark: time to ready, file-system overhead, optimize cost")
    w("")
    w(f"- Date: {m.get('date')}; mode: {'quick' if m.get('quick') else 'full'}; "
      f"{m.get('runs')} cold run(s) per cell and contender, median shown"
      + (f"; measurements took {seconds / 60:.1f} min" if seconds else ""))
    if m.get("known_link"):
        w("- Known link (LLBENCH_KNOWN_LINK=1): each cell's `lazylayer run` contenders made one untimed "
          "start first; their timed starts found the store empty but for what the last start noted of "
          "the registry's link (links/: distance and rate, no image bytes), as on a node that started "
          "from that registry before.")
    w(f"- Machine: {m.get('nproc')} cores ({m.get('cpu')}), {m.get('memory')}, kernel {m.get('kernel')}; "
      "shared with other work, so compare only numbers of the same run")
    w(f"- Versions: lazylayer {m.get('lazylayer_rev')}, podman {m.get('podman')} (runc, overlay driver), "
      f"containerd {m.get('containerd')} (overlayfs snapshotter, ctr), runc {m.get('runc')}, "
      f"fuse-overlayfs {m.get('fuse_overlayfs')}, docker-registry {m.get('docker_registry')}")
    w("- Registry and clients share a network namespace whose loopback is shaped with "
      "`tc tbf burst 256kb latency 400ms` (both directions go through it); every contender "
      "starts from an empty store with the page cache dropped; contender order rotates per run.")
    if m.get("rtts_ms"):
        w(f"- Round-trip times {', '.join(f'{x} ms' for x in m['rtts_ms'])} at "
          + ", ".join(LINK_NAMES.get(x, x) for x in m.get("rtt_links", []))
          + ": every contender of such a cell fetches through `bench/relay.py` in the namespace, in front "
          "of the registry, which holds each direction RTT/2 and a new connection's first bytes one RTT more "
          "(the handshake). The payload crosses the loopback twice: "
          + ("only the relay <-> client hop is shaped, at the nominal rate (the registry's port bypasses the tbf)"
             if m.get("relay_shaping") != "double" else
             "tbf runs at twice the nominal rate over both hops")
          + "; the payload rate measured through the relay is in the links table. Other links: no relay, "
          "no added round trip.")
    if "containerd-lazylayer" in m.get("contenders", []):
        w("- ctr + lazylayer snapshotter: containerd with `lazylayer snapshotter` as its `lazylayer` proxy "
          "snapshotter (both on empty roots, restarted per cold run, not timed); pull = `lazylayer "
          "containerd pull REF:optimized` (layers claimed, nothing downloaded), run = `ctr run --rm "
          "--snapshotter lazylayer` (the snapshotter fetches the boot layer and the rest lazily).")
    if any(c in SID for c in m.get("contenders", [])):
        sid = m.get("sid") or {}
        w(f"- sid stack: the (sid) contenders ran Debian sid's podman {sid.get('podman')}, containerd "
          f"{sid.get('containerd')} and runc {sid.get('runc')} from the chroot root of `scripts/stack.sh` "
          "(same namespace and commands as their host twins; containerd with a version 3 config, its "
          "snapshotter the same `lazylayer snapshotter` binary, stores in the stack's shared dir).")
    if "nydus" in m.get("contenders", []):
        pv = m.get("peers") or {}
        w(f"- nydus: nydusd and nydus-image {pv.get('nydus-rs', '?')} (crates.io `nydus-rs`, cargo install), "
          f"containerd-nydus-grpc from Debian sid's nydus-snapshotter {pv.get('nydus-snapshotter', '?')} and "
          f"ctr-remote from its stargz-snapshotter {pv.get('stargz-snapshotter', '?')} (`bench/peers.sh`), "
          "under the host's containerd (both on empty roots, restarted per cold run, not timed). Each image "
          "converted by `bench/peers.py` as nydus-snapshotter's converter does it (RAFS v6, a zstd blob "
          "per layer, a merged bootstrap layer), its prefetch list = the files lazylayer's traced start "
          "opened, in order. nydusd runs the snapshotter's shipped config (prefetch that list at mount, "
          "then every blob, 8 threads), with scheme http. Pull = `ctr-remote image rpull "
          "--use-containerd-labels --snapshotter nydus REF:nydus` (manifest, config, bootstrap layer), "
          "run = `ctr run --rm --snapshotter nydus`.")
    if "estargz" in m.get("contenders", []):
        pv = m.get("peers") or {}
        w(f"- eStargz: containerd-stargz-grpc {pv.get('containerd-stargz-grpc', '?')} (built offline by "
          "`bench/peers.sh` from Debian sid's Go packages and the daemon's main package from its source "
          "package; Debian ships only ctr-remote) with its defaults (prefetch up to the landmark at mount, "
          "then the rest in the background), under the host's containerd. Each image converted by "
          "ctr-remote `image convert --estargz --oci --estargz-record-in` with the same list of opened files "
          "(those files first in each layer, before the landmark). Pull = `ctr-remote image rpull "
          "REF:estargz` (manifest, config, each layer's footer and TOC), run = `ctr run --rm --snapshotter "
          "stargz`.")
    if "podman-sid-zstdchunked" in m.get("contenders", []):
        w("- podman 5.8 zstd:chunked (sid): each image pushed again by the sid stack's podman with "
          "`--compression-format zstd:chunked --force-compression` (tag :zstdchunked); pulled by the same "
          "podman with a storage.conf that turns partial pulls on (`enable_partial_images = \"true\"`; "
          "Debian ships no storage.conf, and without it the layers come whole). A partial pull fetches "
          "each layer's table of contents, then the chunks of every file the store does not already "
          "hold: on an empty store, all of them. Not lazy; no prefetch list to feed.")
    w("- Time to ready: from the start of the pull command (lazylayer: of `run`) to the "
      "workload's first byte on stdout (batch) or the first successful request (servers, "
      f"polled every {m.get('poll_ms', 20):.0f} ms from the same namespace).")
    if not m.get("run_available"):
        w("- **`lazylayer run` is not available in this build**: its columns read "
          "\"n/a (run not available)\"; optimize, the boot-layer sizes and the floor are measured.")
    nots = []
    if m.get("quick"):
        nots.append("quick mode: 1 run per cell, fewer links, file-system section on python3 with 1 repetition "
                    "(`bash bench/run.sh` without `--quick` runs all)")
    if m.get("links_not_run"):
        nots.append("links not run: " + ", ".join(LINK_NAMES.get(x, x) for x in m["links_not_run"]))
    if m.get("images_not_run"):
        nots.append("images not run: " + ", ".join(m["images_not_run"]))
    for c in d["cells"]:
        if c.get("skipped"):
            nots.append(f"{c['image']} @ {LINK_NAMES.get(c['link'], c['link'])}: {c['skipped']}")
    if nots:
        w("- Not measured here: " + "; ".join(nots) + ".")
    w("")

    # images ---------------------------------------------------------------------------
    w("## Images")
    w("")
    w("| image | ready when | layers | compressed | layer tars | boot layer | boot share | boot files "
      "| read before start | optimize |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for img, i in d["images"].items():
        rep = i.get("optimize_report") or {}
        share = f"{100 * i['boot_share']:.1f}%" if i.get("boot_share") is not None else "-"
        files = "-" if not rep else f"{rep['boot_entries']} / {rep['image_entries']}, {mb(rep['boot_file_bytes'])}"
        opt = secs(i.get("optimize_seconds")) if not i.get("optimize_error") else "failed"
        sb, exact = start_bytes(i)
        sbt = mb(sb) if exact else ("-" if sb is None else f"({mb(sb)})")
        w(f"| {img} | {esc(i['what'])} | {i['layers']} | {mb(i['compressed'])} | {mb(i.get('unpacked'))} | "
          f"{mb(i.get('boot_bytes'))} | {share} | {files} | {sbt} | {opt} |")
    w("")
    w("Layer tars = the image's layers uncompressed. Boot layer = the compressed boot layer "
      "(what an optimized start downloads before the workload runs, besides manifest, config "
      "and index); boot share = boot layer / compressed image. Boot files = paths in the boot "
      "layer / paths in the image, and their uncompressed content. Read before start = the optimize "
      "report's `boot_start_bytes`: the compressed bytes the traced start read (index region + the boot "
      "chunks it touched); in brackets when this lazylayer does not report it and the boot layer stands in.")
    pcs = [c for c in PEERS if any(c in (i.get("peers") or {}) for i in d["images"].values())]
    if pcs:
        w("")
        w("The peers' images, converted from the same source with their own tools (bench/peers.py), "
          "their prefetch lists from lazylayer's trace of the same start:")
        w("")
        w("| image | peer | data blobs | metadata layer | files to prefetch | conversion |")
        w("|---|---|---:|---:|---:|---:|")
        for img, i in d["images"].items():
            for c in pcs:
                pi = (i.get("peers") or {}).get(c)
                if pi is None:
                    continue
                if pi.get("error"):
                    w(f"| {img} | {c} | failed: {esc(pi['error'].splitlines()[-1][:120])} | | | |")
                    continue
                w(f"| {img} | {c} | {mb(pi['blob_bytes'])} | {mb(pi['bootstrap_bytes'])} | "
                  f"{'-' if pi['prefetch_files'] is None else pi['prefetch_files']} | {secs(pi['seconds'])} |")
    errs = [(img, i["optimize_error"]) for img, i in d["images"].items() if i.get("optimize_error")]
    for img, e in errs:
        w(f"\n- optimize of {img} failed: `{e.splitlines()[-1][:300] if e else ''}`")
    w("")

    # links ----------------------------------------------------------------------------
    w("| link | RTT | nominal | tbf rate | measured (one blob GET) | payload from its first byte | relay CPU |")
    w("|---|---:|---:|---:|---:|---:|---:|")

    def mbit(x):
        return "-" if not x else f"{x * 8 / 1e6:.0f} Mbit/s"
    for ln, li in d["links"].items():
        nom = "-" if not li.get("nominal_bps") else f"{li['nominal_bps'] / 1e6:.0f} Mbit/s"
        tbf = "-" if not li.get("tbf_bps") else f"{li['tbf_bps'] / 1e6:.0f} Mbit/s"
        for rtt, mm in (li.get("rtts") or {None: li}).items():
            cpu = (f"{100 * mm['relay_cpu_seconds'] / mm['seconds']:.0f}% of a core"
                   if mm.get("relay_cpu_seconds") is not None else "-")
            w(f"| {LINK_NAMES.get(ln, ln)} | {'-' if rtt is None else f'{rtt} ms'} | {nom} | {tbf} | "
              f"{mbit(mm.get('Bps'))} | {mbit(mm.get('body_Bps'))} | {cpu} |")
    w("")

    # section 1 ------------------------------------------------------------------------
    w("## 1. Time to ready, cold")
    w("")
    w("Median time; in brackets the ratio to podman (lower is better). RTT = the round-trip time the "
      "delay relay added (\"- (no relay)\": fetched straight from the registry). File floor = boot layer / "
      "link rate (nominal; unshaped: measured) + 4 x RTT + the fastest warm start of that container "
      "by any contender (table below): every file the workload touched, whole. Byte floor = the "
      "compressed bytes the traced start read (`boot_start_bytes`, images table) / link rate + 4 x RTT + the "
      "same warm start; in brackets where lazylayer does not report them and the boot layer stands "
      "in (then it equals the file floor). 4 x RTT: the round trips no start avoids (connect, manifest, "
      "config with the index region, the start set; bench/README.md). "
      "ll / byte floor = lazylayer (optimized) / byte floor. "
      "Speedup = podman / lazylayer (optimized), beside the paper's figure for that link "
      "(4.9x at 1 Gbit/s, 10x at 100 Mbit/s, 15x at 10 Mbit/s; docs/architecture.md).")
    w("")
    cs = m.get("contenders", list(NAMES))
    w("| image | link | RTT | " + " | ".join(NAMES[c] for c in cs)
      + " | file floor | byte floor | ll / byte floor | speedup | paper |")
    w("|---|---|---:|" + "---:|" * (len(cs) + 5))
    slower = []
    for cell in d["cells"]:
        img, ln = cell["image"], LINK_NAMES.get(cell["link"], cell["link"])
        paper = f"{PAPER[cell['link']]:g}x" if cell["link"] in PAPER else "-"
        if cell.get("skipped"):
            w(f"| {img} | {ln} | {rtt_text(cell)} | " + " | ".join(["skipped"] * len(cs)) + f" | | | | | {paper} |")
            continue
        ccs = cell["contenders"]
        base = ccs.get("podman")
        fl, _ = floor_of(d, cell)
        bf, exact = byte_floor_of(d, cell)
        llm = (ccs.get("lazylayer") or {}).get("median")
        close = f"{llm / bf:.2f}x" if (llm and bf) else "-"
        bft = secs(bf) if (exact or bf is None) else f"({secs(bf)})"
        sp = speedup(ccs)
        w(f"| {img} | {ln} | {rtt_text(cell)} | " + " | ".join(cell_text(ccs.get(c), base) for c in cs)
          + f" | {secs(fl)} | {bft} | {close} | {'-' if sp is None else f'{sp:.1f}x'} | {paper} |")
        for c in ("lazylayer", "lazylayer-attached", "lazylayer-unopt", "containerd-lazylayer",
                  "containerd-sid-lazylayer"):
            cm = (ccs.get(c) or {}).get("median")
            for other in ("podman", "containerd", "podman-sid", "containerd-sid") + PEERS:
                om = (ccs.get(other) or {}).get("median")
                if cm and om and cm > om:
                    slower.append(f"{where(cell)}: {NAMES[c]} {secs(cm)} vs {other} {secs(om)}")
    w("")
    if "lazylayer-base" in cs:
        w(f"Baseline: `{m.get('baseline')}` ({m.get('baseline_version', '?')}); this binary / baseline, "
          "median start (below 1 is faster):")
        w("")
        for cell in d["cells"]:
            cur = (cell.get("contenders", {}).get("lazylayer") or {}).get("median")
            old = (cell.get("contenders", {}).get("lazylayer-base") or {}).get("median")
            if cur and old:
                w(f"- {where(cell)}: {secs(cur)} vs {secs(old)} ({cur / old:.2f}x)")
        w("")
    paths = list(dict.fromkeys((c["link"], c.get("rtt_ms") if c.get("relay") else None) for c in d["cells"]))
    for link, rtt in paths:
        sps = [(c["image"], speedup(c["contenders"])) for c in d["cells"]
               if (c["link"], c.get("rtt_ms") if c.get("relay") else None) == (link, rtt) and not c.get("skipped")]
        sps = [(i, x) for i, x in sps if x]
        if not sps:
            continue
        lo, hi = min(sps, key=lambda t: t[1]), max(sps, key=lambda t: t[1])
        over = (f"geometric mean of {len(sps)} images; {lo[1]:.1f}x {lo[0]} to {hi[1]:.1f}x {hi[0]}"
                if len(sps) > 1 else sps[0][0])
        w(f"- {LINK_NAMES.get(link, link)}{'' if rtt is None else f', RTT {rtt} ms'}: podman / lazylayer "
          f"{geomean([x for _, x in sps]):.1f}x ({over})"
          + (f"; paper {PAPER[link]:g}x." if link in PAPER else "; the paper has no unshaped figure."))
    skipped = [c for c in d["cells"] if c.get("skipped")]
    for c in skipped:
        w(f"- Skipped {c['image']} @ {LINK_NAMES.get(c['link'], c['link'])}: {c['skipped']}.")
    if slower:
        w("- **Cells where a lazylayer contender is slower:** " + "; ".join(slower) + ".")
    elif m.get("run_available"):
        w("- No lazylayer contender was slower than podman, containerd"
          + (" or a peer" if any(c in PEERS for c in cs) else "") + " in any measured cell.")
    fails = [(where(c), k, r.get("error", "")) for c in d["cells"]
             for k, cc in c.get("contenders", {}).items() for r in cc.get("runs", []) if not r.get("ok")]
    for wh, k, e in fails[:10]:
        w(f"- Failed run: {wh}, {k}: `{e.splitlines()[0][:200] if e else ''}`")
    w("")
    round_trip_table(d, cs, w)

    w("Bytes the registry sent from the start of each cold start until its command ended (from the "
      "access log, median; for lazylayer this includes the background prefetch until the container "
      "exited or, for servers, was stopped once ready; for the snapshotter, whose prefetch outlives "
      "the container, what it fetched until 0.5 s after the container's end; for the peers, until the "
      "container's end, their background fetch cut when their daemon stops):")
    w("")
    w("| image | link | RTT | " + " | ".join(NAMES[c] for c in cs) + " | boot layer |")
    w("|---|---|---:|" + "---:|" * (len(cs) + 1))
    def boot_col(info):
        share = f" ({100 * info['boot_share']:.1f}%)" if info.get("boot_share") is not None else ""
        return f"{mb(info.get('boot_bytes'))}{share}"
    for line in bytes_rows(d, cs, "median_bytes", boot_col):
        w(line)
    w("")
    if any(cc.get("median_lo_bytes_ready") is not None for c in d["cells"]
           for cc in c.get("contenders", {}).values()):
        w("Bytes over the link before ready: what the namespace's loopback carried from the start of "
          "the clock to ready (its transmit counter in `/proc/self/net/dev`, read by the harness inside "
          "the namespace right before the clock starts and at ready; both directions, TCP/IP headers "
          "and retransmitted segments included; median; with the relay in the path every byte crosses the "
          "loopback twice, and the figure is halved). Read before start = the compressed bytes the traced start read "
          "(`boot_start_bytes`; in brackets the boot layer where it is not reported):")
        w("")
        w("| image | link | RTT | " + " | ".join(NAMES[c] for c in cs) + " | read before start |")
        w("|---|---|---:|" + "---:|" * (len(cs) + 1))
        def start_col(info):
            sb, exact = start_bytes(info)
            return mb(sb) if exact else ("-" if sb is None else f"({mb(sb)})")
        for line in bytes_rows(d, cs, "median_lo_bytes_ready", start_col, per_hop=True):
            w(line)
        w("")
        re = [f"{where(c)}, {NAMES.get(k, k)}: "
              f"{cc['max_tcp_retrans_ready']}"
              for c in d["cells"] for k, cc in c.get("contenders", {}).items()
              if cc.get("max_tcp_retrans_ready")]
        if re:
            w("- TCP retransmitted segments before ready (most in one run; each counts again above): "
              + "; ".join(re) + ".")
            w("")
    if d["warm"]:
        w("Warm start (image already local, page cache warm; measured on the run's first link and RTT, median):")
        w("")
        wc = [c for c in WARM if any(wd.get(c) for wd in d["warm"].values())]

        def warm_table(by_img):
            w("| image | " + " | ".join(NAMES[c].replace(" pull +", "") for c in wc) + " |")
            w("|---|" + "---:|" * len(wc))
            for img, wd in by_img.items():
                w(f"| {img} | " + " | ".join(secs(med(wd.get(c, []))) if wd.get(c) else "n/a" for c in wc) + " |")
            w("")

        warm_table(d["warm"])
        dropped = d.get("warm_cache_dropped") or {}
        if dropped:
            w("The same warm start right after it with the page cache dropped, as before every cold "
              "start: the image still local, but the runtime, the tools and the image's files read "
              "from disk again. Not part of any floor; the difference is what a cold start pays for "
              "the dropped cache besides fetching:")
            w("")
            warm_table(dropped)
        ws = []
        for img, wd in d["warm"].items():
            ll = med(wd.get("lazylayer", []))
            worse = [f"{c} {secs(med(wd.get(c, [])))}" for c in WARM
                     if c != "lazylayer" and ll is not None and med(wd.get(c, [])) is not None
                     and ll > med(wd.get(c, []))]
            if worse:
                ws.append(f"{img} ({secs(ll)} vs " + ", ".join(worse) + ")")
        if ws:
            w("- Warm starts where lazylayer is slower: " + "; ".join(ws) + ".")
            w("")

    # section 2 ------------------------------------------------------------------------
    fs = d.get("fs")
    w("## 2. Steady-state file-system overhead (every layer local)")
    w("")
    if not fs:
        w("Not run (`--no-fs`).")
        w("")
    else:
        w(f"Image {fs['image']}; the same extracted layers (a full `lazylayer pull`) under kernel "
          "overlayfs and fuse-overlayfs, each with an empty upper dir; the workload runs with "
          "the image's own binaries (`chroot MERGED /bin/sh -c ...`; lazylayer: as the command "
          "of `lazylayer run --prefetch off` after `lazylayer pull` of the optimized image, which "
          "then stacks the store's layers under kernel overlayfs without FUSE; lazylayer-lazy: the "
          "same with the image's record forgotten (`rmi`), so the root is opened lazily over local "
          "layers, the path a lazily started container keeps, as `run` serves it by default: "
          "overlayfs over a tmpfs tree of metadata stubs whose bytes come from the store's layers; "
          "lazylayer-fuse: that root as a FUSE mount, `--lazy-root fuse`). "
          "Cold = the page cache dropped once the root's start has settled (the workload starts 2 s "
          "into its shell, the cache dropped at 1 s, for every root alike), warm = the same "
          "workload again at once"
          + (f", {fs['warm_passes']} times (their median). " if fs.get("warm_passes", 1) > 1 else ". ")
          + ("The workload's shell is pinned to CPU 0 (taskset) in every root. "
             if fs.get("pinned") and all(fs["pinned"].values()) else "")
          + "Median seconds; in brackets the ratio to kernel overlayfs.")
        w("")
        fsn = [c for c in ["overlayfs", "fuse-overlayfs", "lazylayer", "lazylayer-lazy", "lazylayer-fuse",
                           "lazylayer-fuse-pt",
                           "lazylayer-fuse-base", "nydus", "estargz"] if c in fs["fs"]]
        w("| workload | " + " | ".join(f"{c} cold" for c in fsn) + " | "
          + " | ".join(f"{c} warm" for c in fsn) + " |")
        w("|---|" + "---:|" * (2 * len(fsn)))
        for k, desc in fs["workloads"].items():
            row = []
            for phase in ("cold", "warm"):
                base = fs["fs"]["overlayfs"][k].get(f"{phase}_median")
                for c in fsn:
                    v = fs["fs"][c][k].get(f"{phase}_median")
                    if v is None:
                        row.append("n/a" if c.startswith("lazylayer") else "failed")
                    elif c == "overlayfs" or not base:
                        row.append(secs(v))
                    else:
                        row.append(f"{secs(v)} ({v / base:.2f}x)")
            w(f"| {esc(desc)} | " + " | ".join(row) + " |")
        w("")
        if "lazylayer-fuse-pt" in fsn:
            w("lazylayer-fuse-pt: the lazy FUSE root with passthrough on (`run --lazy-root fuse "
              "--passthrough on`, the default before Part 17): the kernel reads local files from the "
              "store, every open is a round trip. lazylayer-fuse (`--lazy-root fuse`): reads through "
              "lazylayer into the page cache, and once every byte is local the kernel opens files alone.")
            w("")
        srv = fs.get("server")
        if srv and srv.get("median"):
            md = srv["median"]
            base = md.get("lazylayer")
            w(f"**Server case**: nginx (one worker, no open-file cache: every request opens its file) "
              f"serving {srv['files']} different small files of the image (from /usr/share), "
              f"{srv['requests']} requests by h2load over 8 keep-alive connections after one warm-up pass, "
              f"{srv.get('rounds', 1)} times per container"
              + ("; the containers serve side by side, each on a port of its own, and their rounds alternate"
                 if srv.get("side_by_side") else "")
              + "; median requests per second over every round of every repetition; in "
              "brackets the ratio to the same container on kernel overlayfs (lazylayer).")
            w("")
            w("| root | requests/s |")
            w("|---|---:|")
            for c, what in (("lazylayer", "kernel overlayfs (image recorded)"),
                            ("lazylayer-lazy", "lazy root, metadata stubs over the store's layers"),
                            ("lazylayer-fuse", "lazy FUSE root, the kernel opens files"),
                            ("lazylayer-fuse-pt", "lazy FUSE root, passthrough")):
                if c not in md:
                    continue  # not a contender of that run
                v = md.get(c)
                if v is None:
                    w(f"| {what} | failed |")
                else:
                    w(f"| {what} | {v:,.0f}" + (f" ({v / base:.2f}x)" if base and c != "lazylayer" else "")
                      + " |")
            w("")
        for n in (srv or {}).get("notes", []):
            w(f"- server case: {n}")
        for c, nt in (fs.get("peer_trees") or {}).items():
            w(f"- {c}: its root (the container's overlay over the peer's FUSE mount) checked against the "
              f"image's layers under overlayfs: {nt['entries']} entries, "
              + ("the same paths, types, modes and sizes." if not nt["differ"] else
                 f"**{nt['differ']} differ** (first: {esc(', '.join(nt['first'][:3]))}).")
              + " Its cache held the whole image (every file read once before each repetition).")
        if fs.get("peer_trees"):
            w("")
        worse, total = [], 0
        for k, desc in fs["workloads"].items():
            for phase in ("cold", "warm"):
                ll = fs["fs"]["lazylayer"][k].get(f"{phase}_median")
                fo = fs["fs"]["fuse-overlayfs"][k].get(f"{phase}_median")
                if ll is None or fo is None:
                    continue
                total += 1
                if ll > fo:
                    worse.append(f"{k} {phase} ({secs(ll)} vs {secs(fo)})")
        if total:
            w(f"- lazylayer slower than fuse-overlayfs in {len(worse)} of {total} measurements"
              + (": " + ", ".join(worse) if worse else "") + ".")
        if fs.get("lazylayer_registry_bytes") is not None:
            w(f"- Registry bytes during the lazylayer runs of this section: "
              f"{mb(fs['lazylayer_registry_bytes'])} (small or 0 when every layer came from the local store).")
        for n in fs.get("notes", []):
            w(f"- {n}")
        w("")

    # section 3 ------------------------------------------------------------------------
    w("## 3. Cost of `optimize`")
    w("")
    w("`lazylayer optimize SRC DST` from an empty store with the page cache dropped, on the "
      "unshaped link (pull, index, traced run, boot layer build, push), against one cold "
      "`podman pull` + `podman run` of SRC on the same link (from section 1).")
    w("")
    w("| image | optimize | pull | index | trace | build | push | podman pull + run | optimize / podman |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    pm = {c["image"]: c["contenders"].get("podman", {}).get("median") for c in d["cells"]
          if c["link"] == "loopback" and not c.get("skipped")}
    for img, i in d["images"].items():
        rep = i.get("optimize_report") or {}
        o = i.get("optimize_seconds")
        if i.get("optimize_error"):
            w(f"| {img} | failed | | | | | | {secs(pm.get(img))} | |")
            continue
        ratio = f"{o / pm[img]:.1f}x" if (o and pm.get(img)) else "-"
        w(f"| {img} | {secs(o)} | " + " | ".join(secs(rep.get(f"seconds_{k}")) for k in
                                               ("pull", "index", "trace", "build", "push"))
          + f" | {secs(pm.get(img))} | {ratio} |")
    w("")
    w("![time to ready](latest.png)")
    w("")
    return "\n".join(L)


def chart(d, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = [ln for ln in d["links"]]
    cs = d["meta"].get("contenders", list(NAMES))
    fig, axes = plt.subplots(1, len(links), figsize=(4.2 * len(links), 4.6), squeeze=False)
    for ax, ln in zip(axes[0], links):
        cells = [c for c in d["cells"] if c["link"] == ln]
        width = 0.8 / len(cs)
        for j, c in enumerate(cs):
            for x, cell in enumerate(cells):
                pos = x - 0.4 + width * (j + 0.5)
                cc = cell.get("contenders", {}).get(c) or {}
                v = cc.get("median")
                if v:
                    ax.bar(pos, v, width, color=COLORS[c], label=NAMES[c] if x == 0 else None)
                else:
                    why = "skip" if cell.get("skipped") else ("n/a" if cc.get("na") else "fail")
                    ax.text(pos, 0.12, why, rotation=90, ha="center", va="bottom", fontsize=6, color="#555")
            for x, cell in enumerate(cells):
                fl, _ = floor_of(d, cell)
                if fl:
                    ax.hlines(fl, x - 0.42, x + 0.42, colors="black", linestyles="dotted", linewidth=1)
                bf, exact = byte_floor_of(d, cell)
                if bf and exact:
                    ax.hlines(bf, x - 0.42, x + 0.42, colors="black", linestyles="dashed", linewidth=1)
        ax.set_yscale("log")
        vals = [c["contenders"][k]["median"] for c in cells for k in c.get("contenders", {})
                if c["contenders"][k].get("median")] + [f for f in (floor_of(d, c)[0] for c in cells) if f] \
            + [f for f in (byte_floor_of(d, c)[0] for c in cells) if f]
        ax.set_ylim(min([0.1] + [0.7 * v for v in vals]), None)
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels([c["image"] + (f"\n{c['rtt_ms']} ms" if c.get("relay") else "") for c in cells],
                           rotation=30)
        ax.set_title(LINK_NAMES.get(ln, ln))
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("time to ready, s (log)\ndotted = file floor, dashed = byte floor")
    handles, labels = [], []
    for ax in axes[0]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    # One row of legend entries needs ~2.6 in each; wrap onto more rows on narrow charts.
    ncol = max(1, min(len(labels), int(4.2 * len(links) / 2.6)))
    rows = -(-len(labels) // ncol) if labels else 1
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)
    m = d["meta"]
    fig.suptitle(f"Cold start, median of {m.get('runs')} run(s) - {m.get('date')}, "
                 f"{m.get('nproc')} cores, kernel {m.get('kernel')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07 * rows, 1, 0.95))
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--md", required=True)
    ap.add_argument("--png", required=True)
    ap.add_argument("--seconds", type=float, default=None)
    a = ap.parse_args()
    with open(a.json) as f:
        d = json.load(f)
    with open(a.md, "w") as f:
        f.write(markdown(d, a.seconds))
    chart(d, a.png)


if __name__ == "__main__":
    main()
