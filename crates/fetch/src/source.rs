//! The lazy file system's content: the boot layer's files (extracted in
//! the store, or fetched by chunks), untraced files by range, the rest from
//! the layer fetcher.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use lazylayer_fs::{ContentSource, RangedContent};
use lazylayer_index::{ExternalDigests, FileKind, IndexEntry};
use lazylayer_oci::{Reference, RegistryClient};
use lazylayer_sys::beneath::open_beneath;

use crate::boot::BootChunks;
use crate::digests::FileDigests;
use crate::fetcher::LayerFetcher;
use crate::span::{Quick, SeekIndexes, SpanReader};

/// Where the boot layer's file content is read from.
#[derive(Clone)]
pub enum BootContentSource {
    /// Extracted in the store (an older, unchunked boot layer, or one
    /// already stored whole).
    Dir(PathBuf),
    /// Fetched by chunks while the image runs.
    Chunks(BootChunks),
}

/// Content for the lazy file system: the boot layer's copy when it has one,
/// else the layer that holds the path, fetched on demand.
#[derive(Clone)]
pub struct LazySource {
    /// The image reference, for messages.
    image: Arc<str>,
    fetcher: LayerFetcher,
    boot: BootContentSource,
    /// Untraced files by range through the image's seek indexes, if any.
    spans: Option<Arc<SpanReader>>,
    /// Each untraced file's digest, from the index or the boot layer.
    digests: FileDigests,
    /// The boot layer is attached, not the image's own: a boot file whose
    /// chunk fails its digest is read from the image's own layer instead.
    attached: bool,
}

impl LazySource {
    /// The content of `reference`'s merged root, read through `fetcher`;
    /// untraced files by range through the seek indexes `seek` names, unless
    /// the image is all local (`offline`). `digests`: where the boot index
    /// keeps the files' digests, if not in its entries. `attached`: the boot
    /// layer is not the image's own (`optimize --attach`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        reference: &Reference,
        seek: SeekIndexes,
        client: Arc<RegistryClient>,
        fetcher: &LayerFetcher,
        boot: BootContentSource,
        digests: Option<ExternalDigests>,
        offline: bool,
        attached: bool,
    ) -> LazySource {
        // Everything local: nothing to read by range.
        let spans = (!offline).then(|| {
            Arc::new(SpanReader::new(
                client,
                reference.clone(),
                seek,
                fetcher.clone(),
            ))
        });
        let image: Arc<str> = reference.to_string().into();
        LazySource {
            digests: FileDigests::new(image.clone(), digests, &boot),
            image,
            fetcher: fetcher.clone(),
            boot,
            spans,
            attached,
        }
    }
}

impl ContentSource for LazySource {
    fn open(&self, idx: u32, entry: &IndexEntry) -> io::Result<File> {
        if entry.in_boot {
            return match &self.boot {
                BootContentSource::Dir(d) => open_beneath(d, &entry.path),
                // Served by ranges (`ranged`): never opened as a file.
                // Whole once every chunk is local; before, served by
                // ranges (`ranged`), never opened as a file.
                BootContentSource::Chunks(c) => {
                    c.whole_file(idx, entry.size).unwrap_or_else(|| {
                        Err(io::Error::other(format!(
                            "{} is in the chunked boot layer, not all local yet",
                            String::from_utf8_lossy(&entry.path)
                        )))
                    })
                }
            };
        }
        let layer = entry.layer as usize;
        let opened = match self.digests.get(idx, entry) {
            Ok(digest) => {
                if let Some(f) = self.spans.as_ref().and_then(|s| s.open(entry, digest)) {
                    return Ok(f);
                }
                self.fetcher.open_file(layer, &entry.path, digest.as_ref())
            }
            // Without its digest, a file is served only from its verified layer.
            Err(e) => {
                tracing::info!(image = %self.image, error = %e, path = %String::from_utf8_lossy(&entry.path), "no digest at hand: waiting for the verified layer");
                self.fetcher.open_file_verified(layer, &entry.path)
            }
        };
        // The fetcher knows layers, not images: say which image.
        opened.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.image)))
    }

    /// Boot layer files and layers already stored answer at once; a file
    /// still to be fetched is waited for off the FUSE worker threads.
    fn ranged(
        &self,
        idx: u32,
        entry: &IndexEntry,
        passthrough: bool,
    ) -> Option<Arc<dyn RangedContent>> {
        match &self.boot {
            // A file whose chunks are all local is opened whole (`open`)
            // for passthrough. Without passthrough its reads come here
            // either way, and a copy of its own would only cost the copy and
            // lose the preload at open: the container then faulted it in a
            // page at a time (the start's readahead is one page), python3
            // 156 READs of 4 KiB with every chunk local.
            BootContentSource::Chunks(c)
                if entry.in_boot
                    && entry.kind == FileKind::File
                    && !(passthrough && c.file_complete(idx, entry.size)) =>
            {
                let boot = c.file(idx, entry.size)?;
                if !self.attached {
                    return Some(boot);
                }
                Some(Arc::new(OwnLayerFallback {
                    boot,
                    fetcher: self.fetcher.clone(),
                    layer: entry.layer as usize,
                    path: entry.path.clone(),
                    image: self.image.clone(),
                    own: std::sync::Mutex::new(None),
                }))
            }
            _ => None,
        }
    }

    fn try_open(&self, idx: u32, entry: &IndexEntry) -> Option<io::Result<File>> {
        if entry.in_boot {
            return Some(self.open(idx, entry));
        }
        let Some(digest) = self.digests.try_get(idx, entry) else {
            // The digests file is on its way: what is stored needs none,
            // the rest waits for it on the open's thread.
            return self
                .fetcher
                .try_open_stored(entry.layer as usize, &entry.path);
        };
        if let Some(spans) = &self.spans {
            match spans.try_open(entry, digest) {
                Quick::Ready(r) => return Some(r),
                // Not the layer's fetch: the range may make it needless.
                Quick::NeedsFetch => {
                    return self
                        .fetcher
                        .try_open_stored(entry.layer as usize, &entry.path)
                }
                Quick::NotMine => {}
            }
        }
        self.fetcher
            .try_open_file(entry.layer as usize, &entry.path)
    }
}

/// A boot file of an attached boot layer (`optimize --attach`): its bytes
/// come from the boot layer's chunks, each checked against its SHA-256 in
/// the index. A chunk that fails its check is never served, and the file is
/// then read from the image's own layer that holds it (verified whole
/// against its digest first): a damaged artifact costs that layer's
/// download, not the reader an EIO. The boot file is a copy of that layer's
/// file, so the bytes are the same.
struct OwnLayerFallback {
    boot: Arc<dyn RangedContent>,
    fetcher: LayerFetcher,
    layer: usize,
    path: Vec<u8>,
    image: Arc<str>,
    /// The file from the image's own layer, once opened. Locked only to
    /// look or to store: the open itself (which waits for the layer) runs
    /// without it.
    own: std::sync::Mutex<Option<Arc<File>>>,
}

impl OwnLayerFallback {
    fn own(&self) -> Option<Arc<File>> {
        self.own.lock().unwrap().clone()
    }

    fn read_own_layer(&self, buf: &mut [u8], offset: u64, why: &io::Error) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = match self.own() {
            Some(f) => f,
            None => {
                tracing::warn!(image = %self.image, path = %String::from_utf8_lossy(&self.path), error = %why, "the attached boot layer is damaged here: this file comes from the image's own layer");
                let f = Arc::new(self.fetcher.open_file_verified(self.layer, &self.path)?);
                self.own.lock().unwrap().get_or_insert(f).clone()
            }
        };
        file.read_exact_at(buf, offset)
    }
}

impl RangedContent for OwnLayerFallback {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        if let Some(f) = self.own() {
            use std::os::unix::fs::FileExt;
            return Some(f.read_exact_at(buf, offset));
        }
        match self.boot.try_read_at(buf, offset) {
            // Bad bytes: the own layer's file, which may take a download,
            // is opened off the worker threads (`read_at`).
            Some(Err(e)) if e.kind() == io::ErrorKind::InvalidData => None,
            r => r,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(f) = self.own() {
            use std::os::unix::fs::FileExt;
            return f.read_exact_at(buf, offset);
        }
        match self.boot.read_at(buf, offset) {
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                self.read_own_layer(buf, offset, &e)
            }
            r => r,
        }
    }

    fn local_ranges(&self) -> Vec<std::ops::Range<u64>> {
        self.boot.local_ranges()
    }
}
