//! A lazy root: one optimized image mounted for its users (a `run`
//! container, containerd's containers, Podman's), with everything that goes
//! with it, in one place.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lazylayer_fetch::{FetchError, FetchOptions, LayerFetcher, LayerState, LayerStatus};
use lazylayer_fs::{DataView, FsMount, FsOptions, FsStats};
use lazylayer_oci::{Reference, RegistryClient};
use lazylayer_store::{LayerRef, Pin, Store};

use crate::lazy::{LazyImage, OpenError};
use crate::meta::MetaTree;
use crate::{PREFETCH_MAX_WAIT, PREFETCH_QUIET};

/// How much longer than its bound [`LazyRoot::finish_fetching`] lets the
/// extraction of layers whose every byte is kept go on: local work, a few
/// seconds for a big layer on a slow disk (51 MB in 0.5 s here, 5 s under
/// load), so rarely reached.
const EXTRACTION_AFTER_EXIT: Duration = Duration::from_secs(60);

/// Longest the prefetch waits for the chunks the trace read (a start that
/// never reads some of them must not hold the prefetch back for ever).
const START_LIST_MAX_WAIT: Duration = Duration::from_secs(60);

/// An optimized image, its content pinned in the store (`prune` keeps it
/// while no image record names it yet), its merged root mounted read-only
/// through the lazy file system once [`LazyRoot::mount`] is called, its other
/// layers fetched on first touch and, once the start has settled, by
/// background prefetch. The image is recorded in the store as soon as every
/// layer is local (so later starts need no network).
///
/// Dropped: unmounted, fetches still running cancelled (quietly; what they
/// received stays for the next fetch to resume), the image recorded if
/// complete, and the pin released.
pub struct LazyRoot {
    image: LazyImage,
    store: Store,
    fetcher: LayerFetcher,
    mount: Option<FsMount>,
    saved: Arc<AtomicBool>,
    /// Records the image when its last layer lands (aborted on drop).
    recorder: Option<tokio::task::AbortHandle>,
    /// Waits for the start's chunks before the prefetch (aborted on drop).
    prefetch_gate: Option<tokio::task::AbortHandle>,
    /// The mount prefetches the layers nobody asked for.
    prefetch: bool,
    /// The stub tree the container's overlay stacks, when the root is
    /// served that way (unmounted after the FUSE mount, which is its data).
    meta: Option<MetaTree>,
    /// Last: released only once the rest is undone.
    _pin: Pin,
}

/// What a container's overlay stacks for a root served as a stub tree.
#[derive(Debug, Clone)]
pub struct Stack {
    /// Lower directories, top first: the stub tree.
    pub lowers: Vec<PathBuf>,
    /// Data-only lowers, in the order overlayfs tries them: the store's
    /// extracted layers, then the FUSE data view.
    pub data: Vec<PathBuf>,
}

/// How [`LazyRoot::mount`] serves the root.
#[derive(Debug, Clone, Default)]
pub struct MountOptions {
    pub fs: FsOptions,
    /// Fetch the remaining layers in the background once the start has
    /// settled: file-system requests quiet for [`PREFETCH_QUIET`], or
    /// [`PREFETCH_MAX_WAIT`] after the mount.
    pub prefetch: bool,
    /// No descriptor holder keeps this root, and this process uses it
    /// itself (`lazylayer run`): if the process dies, the root is
    /// force-unmounted so that none of its own requests on it keeps it
    /// from exiting ([`FsMount::force_unmount_on_death`]).
    pub force_unmount_on_death: bool,
    /// Serve the root as a stub tree made at this directory (an empty one;
    /// a tmpfs is mounted there) over the store's layers and the FUSE
    /// mount as a data view ([`lazylayer_fs::meta_tree`]), for a container
    /// overlay to stack ([`LazyRoot::stack`]). The kernel then reads every
    /// local file and answers every stat and listing with no daemon in the
    /// way. Ignored on kernels without overlayfs data-only layers (6.5).
    pub meta_tree: Option<PathBuf>,
}

/// A cloneable view of a root's fetch progress (for a status thread).
#[derive(Clone)]
pub struct RootProgress {
    fetcher: LayerFetcher,
}

impl RootProgress {
    /// Per-layer progress of the layers below the boot layer.
    pub fn status(&self) -> Vec<LayerStatus> {
        self.fetcher.status()
    }
}

impl LazyRoot {
    /// Open `reference` lazily ([`LazyImage::open`]: from the store when it
    /// holds the whole image, else manifest, config and boot layer from the
    /// registry) and pin its content under `pin_name`.
    pub async fn open(
        store: &Store,
        client: Arc<RegistryClient>,
        reference: &Reference,
        opts: FetchOptions,
        pin_name: &str,
    ) -> Result<LazyRoot, OpenError> {
        let image = LazyImage::open(store, client, reference, opts).await?;
        Ok(LazyRoot::new(store, image, pin_name)?)
    }

    /// A root of an image opened earlier (the snapshotter keeps the opened
    /// images, and mounts and unmounts their roots as containers come and go).
    pub fn new(store: &Store, image: LazyImage, pin_name: &str) -> Result<LazyRoot, FetchError> {
        let pin = store.pin_guard(pin_name, &image.record.digests())?;
        store.touch_image(&image.record.reference);
        let fetcher = image.fetcher(store);
        Ok(LazyRoot {
            image,
            store: store.clone(),
            fetcher,
            mount: None,
            saved: Arc::new(AtomicBool::new(false)),
            recorder: None,
            prefetch_gate: None,
            prefetch: false,
            meta: None,
            _pin: pin,
        })
    }

    /// Mount the image's merged root, read-only, at `target` (once).
    pub fn mount(&mut self, target: &Path, opts: MountOptions) -> Result<(), FetchError> {
        self.serve(target, opts, None)
    }

    /// Serve the root an earlier server left mounted at `target` and handed
    /// over (its /dev/fuse connection and state, [`LazyRoot::handover_fds`]):
    /// the same image, so the kernel's inode numbers and handles stay valid.
    pub fn resume(
        &mut self,
        target: &Path,
        opts: MountOptions,
        device: OwnedFd,
        table: OwnedFd,
    ) -> Result<(), FetchError> {
        self.serve(target, opts, Some((device, table)))
    }

    fn serve(
        &mut self,
        target: &Path,
        opts: MountOptions,
        handed_over: Option<(OwnedFd, OwnedFd)>,
    ) -> Result<(), FetchError> {
        if self.mount.is_some() {
            return Err(FetchError::BadImage {
                image: self.image.reference.to_string(),
                reason: "its lazy root is mounted already".into(),
            });
        }
        let mut fs_opts = opts.fs;
        let fs_passthrough = fs_opts.passthrough;
        if self.image.boot_chunks().is_some() {
            // Read ahead as the trace did: it then asks for the chunks the
            // trace saw, which are the ones on their way.
            fs_opts
                .max_readahead
                .get_or_insert(lazylayer_fs::BOOT_READAHEAD);
        }
        if let Some(b) = self.image.boot_chunks() {
            // An earlier root of this image stopped them when it went.
            b.resume_background();
        }
        // A server taking a mount over keeps its namespace: the root view.
        let view = match (&opts.meta_tree, &handed_over) {
            (Some(_), None) if crate::meta::kernel_has_data_only_layers() => {
                self.data_view()?.map(Arc::new)
            }
            _ => None,
        };
        fs_opts.data_view = view.clone();
        let fs = self.image.file_system(&self.fetcher, fs_opts);
        let mut m = match handed_over {
            None => FsMount::mount(fs, target, 8)?,
            Some((device, table)) => FsMount::resume(fs, target, 8, device, table)?,
        };
        if opts.force_unmount_on_death {
            m.force_unmount_on_death()?;
        }
        self.prefetch = opts.prefetch;
        if opts.prefetch {
            // The start reads from the boot layer; prefetching earlier takes
            // the CPU it needs (decompression, extraction) and the link. On
            // a slow link a start waiting for its chunks looks idle: the
            // prefetch also waits for the chunks the trace read.
            let stats = m.stats();
            let boot = self.image.boot_chunks().cloned();
            let fetcher = self.fetcher.clone();
            self.prefetch_gate = Some(
                tokio::runtime::Handle::current()
                    .spawn(async move {
                        if let Some(b) = &boot {
                            let t0 = std::time::Instant::now();
                            while !b.start_list_done() && t0.elapsed() < START_LIST_MAX_WAIT {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                        fetcher.start_prefetch_when_idle(
                            move || stats.requests(),
                            PREFETCH_QUIET,
                            PREFETCH_MAX_WAIT,
                            move || {
                                if let Some(b) = boot {
                                    b.start_rest();
                                }
                            },
                        );
                    })
                    .abort_handle(),
            );
        }
        if let (Some(view), Some(dir), Some(first)) =
            (&view, &opts.meta_tree, self.image.lower.first())
        {
            let layers = self.store.layers_root(&first.digest);
            self.meta = Some(MetaTree::mount(dir, &self.image.index, view, &layers)?);
        }
        self.mount = Some(m);
        self.recorder = Some(self.spawn_recorder(!fs_passthrough));
        Ok(())
    }

    /// The data view's names: each layer's blob digest, and the boot
    /// layer's when it is extracted in the store. None when the layers are
    /// not all in one directory of the store (digests of another algorithm
    /// than the first's): the root is then a FUSE root.
    fn data_view(&self) -> Result<Option<DataView>, FetchError> {
        let lower = &self.image.lower;
        let Some(first) = lower.first() else {
            return Ok(None);
        };
        if lower
            .iter()
            .any(|l| l.digest.algorithm() != first.digest.algorithm())
        {
            return Ok(None);
        }
        let layers: Vec<String> = lower.iter().map(|l| l.digest.hex().to_owned()).collect();
        // The extracted boot layer, when it sits beside the others.
        let root = self.store.layers_root(&first.digest);
        let boot = match &self.image.boot {
            lazylayer_fetch::BootContentSource::Dir(d) => d
                .parent()
                .filter(|p| p.parent() == Some(root.as_path()))
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned()),
            _ => None,
        };
        DataView::new(&layers, boot.as_deref())
            .map(Some)
            .map_err(|e| FetchError::BadImage {
                image: self.image.reference.to_string(),
                reason: e.to_string(),
            })
    }

    /// What a container's overlay stacks when the root is served as a stub
    /// tree ([`MountOptions::meta_tree`]); None when it is served as a
    /// FUSE root (stack [`LazyRoot::path`] alone).
    pub fn stack(&self) -> Option<Stack> {
        let meta = self.meta.as_ref()?;
        let layers = self.store.layers_root(&self.image.lower.first()?.digest);
        Some(Stack {
            lowers: vec![meta.dir().to_path_buf()],
            data: vec![layers, self.path()?.to_path_buf()],
        })
    }

    /// Records the image once every layer is local; gives up when one failed.
    ///
    /// With `kernel_opens`, the kernel then opens the root's files alone
    /// (`OpensSwitch`): not beside passthrough, whose open files would make
    /// the kernel fail cached reads of their inodes.
    fn spawn_recorder(&self, kernel_opens: bool) -> tokio::task::AbortHandle {
        let (fetcher, store, saved) =
            (self.fetcher.clone(), self.store.clone(), self.saved.clone());
        let record = self.image.record.clone();
        let reference = self.image.reference.to_string();
        let image = self.image.clone();
        let opens = self
            .mount
            .as_ref()
            .filter(|_| kernel_opens)
            .map(|m| m.opens_switch().clone());
        let pins = self.meta.as_ref().map(|m| m.pins.clone());
        tokio::runtime::Handle::current()
            .spawn(async move {
                loop {
                    if fetcher.all_done() && image.boot_stored() {
                        // Every byte is local: from now on the kernel opens
                        // files alone (no round trip per open for the rest
                        // of the container's life).
                        if let Some(o) = &opens {
                            o.turn_on();
                            tracing::info!(image = %reference, "every byte is local: the kernel opens the lazy root's files alone from now on");
                        }
                        // The layers extracted since the stub tree was made.
                        if let Some(p) = &pins {
                            p.hold_present();
                        }
                        save(&store, &record, &saved, &reference);
                        return;
                    }
                    // Failures for want of the network may heal (the next
                    // reader fetches again): only others end the wait.
                    if image.boot_chunks().is_some_and(|b| b.failed()) || fetcher.failed_for_good()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
            .abort_handle()
    }

    /// What a descriptor holder keeps so that the mount outlives this
    /// process ([`lazylayer_fs::Holder`]).
    pub fn handover_fds(&self) -> Option<[BorrowedFd<'_>; 2]> {
        self.mount.as_ref().map(|m| m.handover_fds())
    }

    /// Stop serving here but keep the root mounted, for the next server to
    /// take over (a holder keeps its connection): fetches are cancelled
    /// (what they received stays for the next fetch to resume).
    pub fn leave(mut self) {
        if let Some(m) = self.mount.take() {
            m.leave();
        }
    }

    /// Opens and reads of this root waiting for content now.
    pub fn waiting(&self) -> u64 {
        self.mount.as_ref().map_or(0, |m| m.stats().waiting())
    }

    /// Where the root is mounted.
    pub fn path(&self) -> Option<&Path> {
        self.mount.as_ref().map(|m| m.target())
    }

    /// How the mounted file system served requests so far.
    pub fn stats(&self) -> Option<Arc<FsStats>> {
        self.mount.as_ref().map(|m| m.stats())
    }

    /// Per-layer fetch progress of the layers below the boot layer.
    pub fn status(&self) -> Vec<LayerStatus> {
        self.fetcher.status()
    }

    pub fn progress(&self) -> RootProgress {
        RootProgress {
            fetcher: self.fetcher.clone(),
        }
    }

    /// Bytes downloaded for this root (layers found in the store count 0),
    /// the chunked boot layer's included.
    pub fn bytes_fetched(&self) -> u64 {
        self.fetcher.bytes_fetched() + self.image.boot_chunks().map_or(0, |b| b.bytes_fetched())
    }

    /// Give the fetches of this root up to `bound` to finish, its user
    /// being gone (a `run` container exited): the prefetch goes on
    /// meanwhile, so that a short run still completes the image when the
    /// rest takes less than `bound` (the next run is then all local), and
    /// otherwise keeps more of it. Without a prefetch only the fetches
    /// under way are waited for. True when nothing was left to wait for.
    pub async fn finish_fetching(&self, bound: Duration) -> bool {
        let t0 = std::time::Instant::now();
        let mut extending = false;
        loop {
            let boot = !self.prefetch || self.image.boot_stored();
            if boot && self.fetcher.settled(self.prefetch) {
                tracing::debug!(waited = ?t0.elapsed(), "the image's fetches ended");
                return true;
            }
            if self.image.boot_chunks().is_some_and(|b| b.failed()) {
                return false;
            }
            if t0.elapsed() >= bound {
                // A layer whose bytes are all kept has only its extraction
                // left, and an extraction cut short starts over at the next
                // fetch (deflate cannot resume mid-stream): cut at the same
                // point by every short run on a slow machine, the image
                // would never complete. That work is local and bounded by
                // the layer's size, so it is let finish.
                let local = boot && self.only_extraction_left();
                if !local || t0.elapsed() >= bound + EXTRACTION_AFTER_EXIT {
                    tracing::info!(
                        ?bound,
                        "stopping with fetches still under way (what arrived is kept)"
                    );
                    return false;
                }
                if !extending {
                    extending = true;
                    tracing::info!("every byte is here: letting the extraction finish");
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether every layer still to come has all its bytes kept and is
    /// being extracted (layers not asked for count only with the prefetch on).
    fn only_extraction_left(&self) -> bool {
        let status = self.fetcher.status();
        let mut left = status
            .iter()
            .filter(|l| !matches!(l.state, LayerState::Done))
            .filter(|l| self.prefetch || !matches!(l.state, LayerState::Pending))
            .peekable();
        left.peek().is_some()
            && left.all(|l| matches!(l.state, LayerState::Fetching) && l.kept >= l.size)
    }

    /// True when every layer is local.
    pub fn complete(&self) -> bool {
        self.fetcher.all_done() && self.image.boot_stored()
    }

    /// True when the image came from the store, without any network.
    pub fn offline(&self) -> bool {
        self.image.offline
    }

    pub fn config_bytes(&self) -> &[u8] {
        &self.image.config_bytes
    }

    pub fn reference(&self) -> &Reference {
        &self.image.reference
    }

    /// The image's layers, bottom first (the boot layer last).
    pub fn layers(&self) -> &[LayerRef] {
        &self.image.record.layers
    }
}

fn save(store: &Store, record: &lazylayer_store::ImageRecord, saved: &AtomicBool, image: &str) {
    if saved.swap(true, Ordering::SeqCst) {
        return;
    }
    match store.save_image(record) {
        Ok(()) => tracing::info!(image, "every layer is local: image recorded in the store"),
        Err(e) => {
            saved.store(false, Ordering::SeqCst);
            tracing::warn!(image, error = %e, "recording the fully fetched image");
        }
    }
}

impl Drop for LazyRoot {
    fn drop(&mut self) {
        let image = self.image.reference.to_string();
        if let Some(m) = self.mount.take() {
            match m.unmount() {
                Ok(()) => tracing::debug!(image, "lazy root unmounted"),
                Err(e) => tracing::warn!(image, error = %e, "unmounting the lazy root"),
            }
        }
        if let Some(r) = self.recorder.take() {
            r.abort();
        }
        if let Some(g) = self.prefetch_gate.take() {
            g.abort();
        }
        if self.complete() {
            save(&self.store, &self.image.record, &self.saved, &image);
        }
        self.fetcher.cancel();
        // The boot layer's chunks too: its last user is gone. (The image
        // may be opened again, as the snapshotter does: a later root
        // resumes them.)
        if let Some(b) = self.image.boot_chunks() {
            b.stop_background();
        }
    }
}
