use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use lazylayer_index::chunks::{ChunkCompression, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use lazylayer_optimize::{optimize, BootLayout, CancelHandle, OptimizeOptions, Target};
use lazylayer_runtime::{NetworkMode, WaitCondition};
use lazylayer_store::PullOptions;

use crate::context::{human_bytes, GlobalArgs};
use crate::progress::PullBars;

/// Build an optimized image: run SRC's workload once under the tracing file
/// system, put what it read at start into a boot layer (with an index of every
/// path), and push DST = SRC's layers (never re-uploaded) + the boot layer.
/// Any registry stores DST and any runtime runs it unchanged.
///
/// With --attach (no DST), SRC itself is left as it is: the boot layer goes
/// into an artifact whose subject is SRC's manifest, found through the
/// referrers API or the `sha256-<digest>` tag, and `run SRC`, the containerd
/// snapshotter and the Podman store start SRC lazily from it.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["destination", "attach"])))]
pub struct Args {
    /// Source image
    pub source: String,
    /// Destination reference for the optimized image
    pub destination: Option<String>,
    /// Attach the boot layer to SRC as an artifact (referrers API and
    /// sha256-<digest> tag) instead of pushing a new image: SRC's tag,
    /// manifest and digest do not change
    #[arg(long)]
    pub attach: bool,
    /// When the workload counts as started: exit | port:N (accepts) | http:N[/PATH] (answers 2xx/3xx) | log:TEXT | time:SECS
    #[arg(long, default_value = "exit")]
    pub wait: WaitCondition,
    /// Give up (and fail) when the workload is not ready after this many seconds
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Extra environment for the workload (K=V, repeatable)
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Network: none (own empty namespace) or host
    #[arg(long, default_value = "none")]
    pub net: String,
    /// Save the recorded trace (JSON) to this file
    #[arg(long)]
    pub trace_out: Option<PathBuf>,
    /// Skip running the workload; build the boot layer from this trace file
    #[arg(long)]
    pub trace_in: Option<PathBuf>,
    /// Then run the workload again with content served only from the boot
    /// layer (metadata from its index) and fail if it needs anything else
    #[arg(long)]
    pub verify: bool,
    /// Do not push seek indexes of the source's layers (an extra artifact
    /// tagged sha256-<DST digest> that lets `run` fetch one untraced file
    /// by range instead of its whole layer)
    #[arg(long)]
    pub no_seek_index: bool,
    /// Uncompressed bytes per boot layer chunk: the unit a lazy start fetches
    /// (4 KiB to 16 MiB; suffixes K and M)
    #[arg(long, value_name = "BYTES", default_value = "8K", value_parser = parse_size)]
    pub chunk_size: u32,
    /// Compression of the boot layer's chunks: zstd or gzip (zstd needs an
    /// OCI manifest: Docker schema 2 images get gzip)
    #[arg(long, value_name = "ALG", default_value = "zstd")]
    pub boot_compression: String,
    /// Platform to pick from a multi-platform image (OS/ARCH[/VARIANT])
    #[arg(long)]
    pub platform: Option<String>,
    /// Print the report as JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// Command and arguments replacing the image's Cmd
    #[arg(last = true)]
    pub command: Vec<String>,
}

pub async fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let src = super::parse_reference(&a.source)?;
    let target = match &a.destination {
        Some(d) => Target::Image(super::parse_reference(d)?),
        None => Target::Attach,
    };
    let network = match a.net.as_str() {
        "none" => NetworkMode::None,
        "host" => NetworkMode::Host,
        other => anyhow::bail!("--net {other}: expected none or host"),
    };
    for e in &a.env {
        anyhow::ensure!(e.contains('='), "--env {e:?}: expected K=V");
    }
    let compression = match a.boot_compression.as_str() {
        "gzip" => ChunkCompression::Gzip,
        "zstd" => ChunkCompression::Zstd,
        other => anyhow::bail!("--boot-compression {other}: expected gzip or zstd"),
    };
    let opts = OptimizeOptions {
        boot_layout: BootLayout {
            chunk_size: a.chunk_size,
            compression,
        },
        wait: a.wait,
        timeout: Duration::from_secs_f64(a.timeout),
        env: a.env,
        args: (!a.command.is_empty()).then_some(a.command),
        network,
        trace_in: a.trace_in,
        trace_out: a.trace_out,
        verify: a.verify,
        seek_index: !a.no_seek_index,
        pull: PullOptions {
            platform: super::parse_platform(a.platform.as_deref())?,
            ..PullOptions::default()
        },
    };
    let store = g.store()?;
    let client = g.client()?;
    let cancel = CancelHandle::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: stopping the workload and cleaning up");
            c2.cancel();
        }
    });
    let quiet = a.json;
    let phase = move |s: &str| {
        if !quiet {
            eprintln!("==> {s}");
        }
    };
    let bars = Arc::new(PullBars::new(quiet));
    let rep = optimize(&store, &client, &src, &target, &opts, bars, &phase, cancel)
        .await
        .with_context(|| match &target {
            Target::Image(dst) => format!("optimizing {src} into {dst}"),
            Target::Attach => format!("optimizing {src} (attached boot layer)"),
        })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
        return Ok(());
    }
    match &rep.attached {
        Some(at) => println!(
            "Optimized {} ({}, unchanged): boot artifact {} (tag {})",
            rep.source, rep.manifest_digest, at.artifact_digest, at.referrers_tag
        ),
        None => println!(
            "Optimized {} -> {} ({})",
            rep.source, rep.destination, rep.manifest_digest
        ),
    }
    println!(
        "  image        {} in {} entries",
        human_bytes(rep.image_size),
        rep.image_entries
    );
    println!(
        "  boot layer   {} ({:.1}% of the image): {} entries, {} of file content, index {}",
        human_bytes(rep.boot_layer_size),
        rep.boot_share * 100.0,
        rep.boot_entries,
        human_bytes(rep.boot_file_bytes),
        human_bytes(rep.index_bytes)
    );
    if rep.file_digests > 0 {
        println!(
            "  digests      {} files outside the boot layer, {} after the index region",
            rep.file_digests,
            human_bytes(rep.file_digests_bytes)
        );
    }
    println!(
        "  chunks       {} of {} ({}), {} read at start: a lazy start fetches {} first",
        rep.boot_chunks,
        human_bytes(u64::from(rep.boot_chunk_size)),
        rep.boot_compression,
        rep.boot_start_chunks,
        human_bytes(rep.boot_start_bytes)
    );
    println!(
        "  traced       {} accesses, {} read ranges",
        rep.trace_events, rep.trace_reads
    );
    if rep.verify_missing.is_some() {
        println!("  verified     the workload runs with only the boot layer's content");
    }
    println!(
        "  time         pull {:.2}s, index {:.2}s, trace {:.2}s, build {:.2}s, push {:.2}s",
        rep.seconds_pull, rep.seconds_index, rep.seconds_trace, rep.seconds_build, rep.seconds_push
    );
    if rep.attached.is_some() {
        println!(
            "  push         boot artifact: {} sent; the source's layers and manifest untouched",
            human_bytes(rep.push.bytes_uploaded)
        );
        if rep.seek_index_bytes > 0 {
            println!(
                "  seek index   {} for the source layers, in the artifact",
                human_bytes(rep.seek_index_bytes)
            );
        }
        return Ok(());
    }
    println!(
        "  push         source layers: {} mounted, {} already there, {} uploaded; {} sent in all",
        rep.push.layers_mounted,
        rep.push.layers_existing,
        rep.push.layers_uploaded,
        human_bytes(rep.push.bytes_uploaded)
    );
    match (&rep.seek_manifest_digest, &rep.seek_index_error) {
        (Some(d), _) => println!(
            "  seek index   {} for the source layers ({d})",
            human_bytes(rep.seek_index_bytes)
        ),
        (None, Some(e)) => println!("  seek index   not pushed: {e}"),
        (None, None) => {}
    }
    Ok(())
}

/// `65536`, `64K`, `1M`, within the chunk size bounds.
fn parse_size(s: &str) -> Result<u32, String> {
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1u64 << 20),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 65536, 64K or 1M"))?;
    let n = n.saturating_mul(mul);
    if !(u64::from(MIN_CHUNK_SIZE)..=u64::from(MAX_CHUNK_SIZE)).contains(&n) {
        return Err(format!(
            "{s}: a chunk size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes"
        ));
    }
    Ok(n as u32)
}
