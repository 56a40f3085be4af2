//! The boot layer generator (`lazylayer optimize`).
//!
//! 1. pull SRC fully into the store;
//! 2. index its merged root file system ([`lazylayer_index`]);
//! 3. run its workload once, with that root served by the FUSE file system in
//!    trace mode under a writable overlayfs, until a readiness condition;
//! 4. copy what the workload touched, from the merged view, into a boot layer
//!    whose last entry is the index;
//! 5. push DST = SRC's layers (mounted, never re-uploaded) + the boot layer;
//! 6. push a seek index of each of SRC's gzip layers, as an artifact
//!    referring to DST (docs/seek-index.md).
//!
//! With [`Target::Attach`], steps 5 and 6 push one artifact instead, the
//! boot layer and the seek indexes, whose subject is SRC's own manifest
//! (SRC is left as it is: docs/boot-layer.md, "Attached boot layers").

mod attach;
mod bootlayer;
mod image;
mod push;
mod seek;
mod select;
mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use lazylayer_fs::{LayerDirSource, Trace, TraceEvent, TraceFile, TraceRead};
use lazylayer_index::chunks::ChunkCompression;
use lazylayer_index::{build_index, BootIndex, INDEX_FILE_NAME};
use lazylayer_oci::{Digest, Reference, RegistryClient};
use lazylayer_runtime::{NetworkMode, WaitCondition};
use lazylayer_store::{PullOptions, PullProgress, Store};
use lazylayer_sys::error_chain;

pub use attach::{boot_artifact, push_attached, AttachReport, AttachedBoot, ANNOTATION_CREATED};
pub use bootlayer::{write_boot_layer, BootLayer, BootLayout, DEFAULT_CHUNK_SIZE};
pub use image::{
    optimized_image, BootDescriptor, OptimizedImage, ANNOTATION_BOOT_LAYER, ANNOTATION_INDEX,
    ANNOTATION_VERSION,
};
pub use push::{push_optimized, BootBlob, PushReport};
pub use seek::{push_seek_indexes, SeekReport};
pub use select::select_boot_entries;
pub use workload::{run_workload, CancelHandle, Workload, WorkloadOutcome};

#[derive(Debug, thiserror::Error)]
pub enum OptimizeError {
    #[error("{what} ({path})")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] lazylayer_store::StoreError),
    #[error(transparent)]
    Oci(#[from] lazylayer_oci::OciError),
    #[error(transparent)]
    Runtime(#[from] lazylayer_runtime::RuntimeError),
    #[error(transparent)]
    Fs(#[from] lazylayer_fs::FsError),
    #[error("{what}")]
    Layer {
        what: String,
        #[source]
        source: lazylayer_layer::LayerError,
    },
    #[error("building the seek index of layer {layer}")]
    Seek {
        layer: String,
        #[source]
        source: lazylayer_seek::SeekError,
    },
    #[error("indexing the image")]
    Index(#[from] lazylayer_index::IndexError),
    #[error("{0}")]
    BadImage(String),
    #[error("the workload exited with code {code}{detail}")]
    WorkloadFailed { code: i32, detail: String },
    #[error("the boot layer lacks content the workload read: {}", missing.join(", "))]
    BootIncomplete { missing: Vec<String> },
    #[error("interrupted")]
    Interrupted,
}

impl OptimizeError {
    pub(crate) fn io(what: &str, path: &Path, source: std::io::Error) -> Self {
        OptimizeError::Io {
            what: what.into(),
            path: path.to_path_buf(),
            source,
        }
    }
}

#[derive(Debug, Clone)]
pub struct OptimizeOptions {
    pub wait: WaitCondition,
    /// Upper bound for the workload to become ready.
    pub timeout: Duration,
    pub env: Vec<String>,
    /// Replaces the image's Cmd (Entrypoint kept), like `podman run IMAGE ARGS`.
    pub args: Option<Vec<String>>,
    pub network: NetworkMode,
    pub trace_in: Option<PathBuf>,
    pub trace_out: Option<PathBuf>,
    /// After building, run the workload again with content served only from
    /// the boot layer, and fail if it needed anything else.
    pub verify: bool,
    /// After DST, push seek indexes of SRC's gzip layers (an artifact
    /// referring to DST) so that `run` reads untraced files by range.
    pub seek_index: bool,
    pub pull: PullOptions,
    /// Chunk size and compression of the boot layer.
    pub boot_layout: BootLayout,
}

/// Where the boot layer goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// A new image DST = SRC's layers + the boot layer.
    Image(Reference),
    /// An artifact attached to SRC's manifest (`--attach`): SRC unchanged.
    Attach,
}

/// What `optimize` did, for the summary and `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OptimizeReport {
    pub source: String,
    /// DST, or SRC again when the boot layer was attached to it.
    pub destination: String,
    /// DST's manifest; with `--attach`, SRC's (unchanged).
    pub manifest_digest: String,
    /// With `--attach`: the boot artifact pushed beside SRC.
    pub attached: Option<AttachReport>,
    pub boot_layer_digest: String,
    /// Compressed bytes of SRC's layers.
    pub image_size: u64,
    pub boot_layer_size: u64,
    /// boot_layer_size / image_size.
    pub boot_share: f64,
    pub image_entries: usize,
    pub boot_entries: usize,
    pub boot_file_bytes: u64,
    pub index_bytes: u64,
    /// "gzip" or "zstd".
    pub boot_compression: String,
    pub boot_chunk_size: u32,
    pub boot_chunks: usize,
    /// Chunks the trace read, fetched first at a lazy start.
    pub boot_start_chunks: usize,
    /// Compressed bytes a lazy start fetches before anything else: the
    /// index region and the chunks the trace read.
    pub boot_start_bytes: u64,
    /// Compressed length of the index region at the boot layer's start.
    pub index_region_bytes: u64,
    /// Files outside the boot layer whose SHA-256 the boot layer keeps, in
    /// a file of their own after the index region (not in it).
    pub file_digests: usize,
    /// Bytes of that file's entries at the start of the boot content (0:
    /// no digests to keep).
    pub file_digests_bytes: u64,
    pub trace_events: usize,
    /// Byte ranges the trace recorded (merged where contiguous).
    pub trace_reads: usize,
    pub workload_exit_code: Option<i32>,
    /// With `verify`: paths whose content the boot-only run needed but the boot layer lacks (empty = complete).
    pub verify_missing: Option<Vec<String>>,
    pub seconds_pull: f64,
    pub seconds_index: f64,
    pub seconds_trace: f64,
    pub seconds_build: f64,
    pub seconds_push: f64,
    pub push: PushReport,
    /// Encoded bytes of the seek indexes pushed (0 without them).
    pub seek_index_bytes: u64,
    /// The seek-index artifact's manifest, when pushed.
    pub seek_manifest_digest: Option<String>,
    /// Why the seek indexes are missing, when building or pushing them
    /// failed (DST is pushed and fine: runs fetch whole layers).
    pub seek_index_error: Option<String>,
}

/// Called with a short line at each phase, for progress output.
pub type PhaseSink<'a> = &'a (dyn Fn(&str) + Sync);

/// The whole `optimize`: pull, index, trace, build, push.
#[allow(clippy::too_many_arguments)]
pub async fn optimize(
    store: &Store,
    client: &RegistryClient,
    src: &Reference,
    target: &Target,
    opts: &OptimizeOptions,
    pull_progress: Arc<dyn PullProgress>,
    phase: PhaseSink<'_>,
    cancel: Arc<CancelHandle>,
) -> Result<OptimizeReport, OptimizeError> {
    let t = Instant::now();
    phase(&format!("pulling {src}"));
    let rec = store.pull(client, src, &opts.pull, pull_progress).await?;
    let seconds_pull = t.elapsed().as_secs_f64();

    let t = Instant::now();
    phase("indexing the image's file system");
    let layer_dirs: Vec<PathBuf> = rec
        .layers
        .iter()
        .map(|l| {
            store.layer_dir(&l.digest).ok_or_else(|| {
                OptimizeError::BadImage(format!("layer {} missing from the store", l.digest))
            })
        })
        .collect::<Result<_, _>>()?;
    let layers: Vec<(String, PathBuf)> = rec
        .layers
        .iter()
        .map(|l| l.diff_id.to_string())
        .zip(layer_dirs.clone())
        .collect();
    let index = tokio::task::spawn_blocking(move || build_index(&layers))
        .await
        .map_err(|e| OptimizeError::BadImage(format!("index worker: {e}")))??;
    let seconds_index = t.elapsed().as_secs_f64();

    let config_bytes = store.read_blob(&rec.config_digest)?;
    let manifest_bytes = store.read_blob(&rec.manifest_digest)?;

    let workload = Workload {
        work_root: store.root().join("work"),
        runc: lazylayer_runtime::Runc::for_store(store.root()),
        config_bytes: config_bytes.clone(),
        args: opts.args.clone(),
        env: opts.env.clone(),
        network: opts.network,
        wait: opts.wait.clone(),
        timeout: opts.timeout,
    };
    let t = Instant::now();
    let (events, reads, exit_code): (Vec<TraceEvent>, Vec<TraceRead>, _) = match &opts.trace_in {
        Some(p) => {
            phase(&format!("using the trace in {}", p.display()));
            let (events, reads) = TraceFile::read_all(p)?;
            (events, reads, None)
        }
        None => {
            phase("running the workload under the tracing file system");
            let workload = workload.clone();
            let index2 = Arc::new(index.clone());
            let dirs = layer_dirs.clone();
            let cancel2 = cancel.clone();
            let out = tokio::task::spawn_blocking(move || {
                let trace = Arc::new(Trace::new());
                let outcome = run_workload(
                    &workload,
                    index2,
                    LayerDirSource { layer_dirs: dirs },
                    Some(trace.clone()),
                    &cancel2,
                )?;
                Ok::<_, OptimizeError>((trace.events(), trace.reads(), outcome))
            })
            .await
            .map_err(|e| OptimizeError::BadImage(format!("workload worker: {e}")))??;
            let (events, reads, outcome) = out;
            if cancel.is_cancelled() {
                return Err(OptimizeError::Interrupted);
            }
            check_outcome(&opts.wait, &outcome)?;
            (events, reads, outcome.exit_code)
        }
    };
    if let Some(p) = &opts.trace_out {
        TraceFile::from_events(&events)
            .with_reads(&reads)
            .write(p)?;
    }
    let seconds_trace = t.elapsed().as_secs_f64();

    let t = Instant::now();
    phase(&format!(
        "building the boot layer from {} traced accesses",
        events.len()
    ));
    let work = tempfile::Builder::new()
        .prefix("boot-")
        .tempdir_in(store.root().join("tmp"))
        .map_err(|e| OptimizeError::io("creating work dir", store.root(), e))?;
    let boot_path = work.path().join("boot.tar.gz");
    let mut index = index;
    let (boot, index) = {
        let merged = work.path().join("merged");
        let boot_path = boot_path.clone();
        let dirs = layer_dirs.clone();
        let events = events.clone();
        let reads = reads.clone();
        let mut layout = opts.boot_layout;
        // A Docker schema 2 manifest has no zstd layer type.
        let docker = serde_json::from_slice::<serde_json::Value>(&manifest_bytes)
            .ok()
            .and_then(|m| {
                m.get("mediaType")
                    .and_then(|t| t.as_str())
                    .map(str::to_owned)
            })
            .is_some_and(|t| t == lazylayer_oci::manifest::DOCKER_MANIFEST);
        if docker && layout.compression == ChunkCompression::Zstd {
            tracing::info!("Docker schema 2 manifest: the boot layer is gzip, not zstd");
            layout.compression = ChunkCompression::Gzip;
        }
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir(&merged)
                .map_err(|e| OptimizeError::io("creating merged view", &merged, e))?;
            let lowers: Vec<PathBuf> = dirs.iter().rev().cloned().collect();
            let _view = lazylayer_runtime::OverlayMount::readonly(&lowers, &merged)?;
            let selection = select_boot_entries(&index, &events);
            let boot =
                write_boot_layer(&mut index, &selection, &reads, &merged, &boot_path, layout)?;
            Ok::<_, OptimizeError>((boot, index))
        })
        .await
        .map_err(|e| OptimizeError::BadImage(format!("boot layer worker: {e}")))??
    };
    let image = optimized_image(
        &manifest_bytes,
        &config_bytes,
        &BootDescriptor {
            digests: &boot.digests,
            index_name: INDEX_FILE_NAME,
            index_version: lazylayer_index::CHUNKED_FORMAT_VERSION,
            compression: boot.layout.compression,
            region: Some(boot.region.clone()),
        },
        &rfc3339_now(),
    )?;
    let seconds_build = t.elapsed().as_secs_f64();

    let verify_missing = if opts.verify {
        phase("verifying: running the workload with only the boot layer's content");
        let boot_dir = work.path().join("bootdir");
        let boot_path = boot_path.clone();
        let workload = workload.clone();
        let cancel2 = cancel.clone();
        let layout = boot.layout;
        let (missing, outcome) = tokio::task::spawn_blocking(move || {
            std::fs::create_dir(&boot_dir)
                .map_err(|e| OptimizeError::io("creating boot dir", &boot_dir, e))?;
            let f = std::fs::File::open(&boot_path)
                .map_err(|e| OptimizeError::io("opening boot layer", &boot_path, e))?;
            let layer = |source| OptimizeError::Layer {
                what: "extracting the boot layer".into(),
                source,
            };
            let dec =
                lazylayer_layer::decoder(std::io::BufReader::new(f), layout.compression.into())
                    .map_err(layer)?;
            lazylayer_layer::extract(dec, &boot_dir, &Default::default(), &mut |_| {})
                .map_err(layer)?;
            verify_boot_layer(&boot_dir, &workload, &cancel2)
        })
        .await
        .map_err(|e| OptimizeError::BadImage(format!("verify worker: {e}")))??;
        if cancel.is_cancelled() {
            return Err(OptimizeError::Interrupted);
        }
        check_outcome(&opts.wait, &outcome)?;
        let missing: Vec<String> = missing
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        if !missing.is_empty() {
            return Err(OptimizeError::BootIncomplete { missing });
        }
        Some(missing)
    } else {
        None
    };

    let t = Instant::now();
    let boot_digest: Digest = boot.digests.digest.parse()?;
    let blob = BootBlob {
        path: &boot_path,
        digest: &boot_digest,
        size: boot.digests.size,
    };
    // What every report says, however the boot layer was pushed.
    let report = |destination: &Reference, manifest_digest: String, seconds_push: f64| {
        Report {
            src,
            destination,
            manifest_digest,
            rec: &rec,
            boot: &boot,
            index: &index,
            events: events.len(),
            reads: reads.len(),
            exit_code,
            verify_missing: verify_missing.clone(),
            seconds: [
                seconds_pull,
                seconds_index,
                seconds_trace,
                seconds_build,
                seconds_push,
            ],
        }
        .build()
    };
    let dst = match target {
        Target::Image(dst) => dst,
        Target::Attach => {
            let attached = attach::attach(
                client,
                store,
                src,
                &rec,
                &manifest_bytes,
                &blob,
                &boot,
                opts,
                phase,
            )
            .await?;
            let mut r = report(
                src,
                rec.manifest_digest.to_string(),
                t.elapsed().as_secs_f64(),
            );
            r.push.bytes_uploaded = attached.bytes_uploaded;
            r.seek_index_bytes = attached.seek_index_bytes;
            r.attached = Some(attached);
            return Ok(r);
        }
    };
    phase(&format!("pushing {dst}"));
    let push = push_optimized(client, store, src, &rec, dst, &blob, &image).await?;
    // DST is complete and pushed: a failure from here on costs only the
    // ranged reads, so it is reported, not fatal.
    let (mut seek_index_bytes, mut seek_manifest_digest, mut seek_index_error) = (0, None, None);
    if opts.seek_index {
        phase("pushing seek indexes of the source layers");
        match push_seek_indexes(
            client,
            store,
            &rec.layers,
            dst,
            &image.manifest,
            &image.media_type,
        )
        .await
        {
            Ok(r) => {
                seek_index_bytes = r.index_bytes;
                seek_manifest_digest = (!r.manifest_digest.is_empty()).then_some(r.manifest_digest);
            }
            Err(e) => {
                let msg = error_chain(&e);
                tracing::warn!(image = %dst, error = %msg, "seek indexes not pushed: runs of this image will fetch whole layers for untraced files");
                seek_index_error = Some(msg);
            }
        }
    }
    let seconds_push = t.elapsed().as_secs_f64();

    let mut r = report(dst, push.manifest_digest.clone(), seconds_push);
    r.push = push;
    r.seek_index_bytes = seek_index_bytes;
    r.seek_manifest_digest = seek_manifest_digest;
    r.seek_index_error = seek_index_error;
    Ok(r)
}

/// What every report says, however the boot layer was pushed.
struct Report<'a> {
    src: &'a Reference,
    destination: &'a Reference,
    manifest_digest: String,
    rec: &'a lazylayer_store::ImageRecord,
    boot: &'a BootLayer,
    index: &'a BootIndex,
    events: usize,
    reads: usize,
    exit_code: Option<i32>,
    verify_missing: Option<Vec<String>>,
    /// pull, index, trace, build, push.
    seconds: [f64; 5],
}

impl Report<'_> {
    fn build(self) -> OptimizeReport {
        let Report { boot, .. } = self;
        let image_size = self.rec.total_size();
        OptimizeReport {
            source: self.src.to_string(),
            destination: self.destination.to_string(),
            manifest_digest: self.manifest_digest,
            attached: None,
            boot_layer_digest: boot.digests.digest.clone(),
            image_size,
            boot_layer_size: boot.digests.size,
            boot_share: boot.digests.size as f64 / image_size.max(1) as f64,
            image_entries: self.index.len(),
            boot_entries: boot.entries,
            boot_file_bytes: boot.file_bytes,
            index_bytes: boot.index_bytes,
            boot_compression: match boot.layout.compression {
                ChunkCompression::Gzip => "gzip".into(),
                ChunkCompression::Zstd => "zstd".into(),
            },
            boot_chunk_size: boot.layout.chunk_size,
            boot_chunks: boot.chunks,
            boot_start_chunks: boot.start_chunks,
            boot_start_bytes: boot.start_bytes,
            index_region_bytes: boot.region.0,
            file_digests: boot.file_digests.0,
            file_digests_bytes: boot.file_digests.1,
            trace_events: self.events,
            trace_reads: self.reads,
            workload_exit_code: self.exit_code,
            verify_missing: self.verify_missing,
            seconds_pull: self.seconds[0],
            seconds_index: self.seconds[1],
            seconds_trace: self.seconds[2],
            seconds_build: self.seconds[3],
            seconds_push: self.seconds[4],
            push: PushReport::default(),
            seek_index_bytes: 0,
            seek_manifest_digest: None,
            seek_index_error: None,
        }
    }
}

/// A workload that fails is not a basis for a boot layer: say so clearly.
fn check_outcome(wait: &WaitCondition, o: &WorkloadOutcome) -> Result<(), OptimizeError> {
    match (wait, o.exit_code, o.ready) {
        (_, _, true) => Ok(()),
        (WaitCondition::Exit, Some(0), _) => Ok(()),
        (WaitCondition::Exit, Some(code), _) => Err(OptimizeError::WorkloadFailed {
            code,
            detail: String::new(),
        }),
        (_, Some(code), _) => Err(OptimizeError::WorkloadFailed {
            code,
            detail: format!(" before it became ready ({wait:?})"),
        }),
        (_, None, false) => Err(OptimizeError::WorkloadFailed {
            code: -1,
            detail: " (never became ready)".into(),
        }),
    }
}

/// Verify a boot layer the strict way: run the workload again with content
/// served *only* from the extracted boot layer (metadata from its index).
/// Returns the paths whose content was needed but missing.
pub fn verify_boot_layer(
    boot_dir: &Path,
    workload: &Workload,
    cancel: &CancelHandle,
) -> Result<(Vec<Vec<u8>>, WorkloadOutcome), OptimizeError> {
    let idx_path = boot_dir.join(INDEX_FILE_NAME);
    let bytes = std::fs::read(&idx_path)
        .map_err(|e| OptimizeError::io("reading the boot index", &idx_path, e))?;
    let index = Arc::new(BootIndex::decode(&bytes)?);
    let source = Arc::new(lazylayer_fs::BootOnlySource::new(boot_dir.to_path_buf()));
    let outcome = run_workload(workload, index, source.clone(), None, cancel)?;
    Ok((source.violations(), outcome))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for now (history entries want RFC 3339).
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[allow(dead_code)]
fn _assert_send(_: &TraceEvent) {}
