//! The lazy file system's content: the boot layer's files (extracted in
//! the store, or fetched by chunks), untraced files by range, the rest from
//! the layer fetcher.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use lazylayer_fs::{ContentSource, RangedContent};
use lazylayer_index::{FileKind, IndexEntry};
use lazylayer_oci::{Digest, Reference, RegistryClient};
use lazylayer_sys::beneath::open_beneath;

use crate::boot::BootChunks;
use crate::fetcher::LayerFetcher;
use crate::span::{Quick, SpanReader};

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
}

impl LazySource {
    /// The content of `reference`'s merged root, read through `fetcher`;
    /// untraced files by range through the seek indexes the manifest
    /// `manifest_digest` refers to, unless the image is all local (`offline`).
    pub fn new(
        reference: &Reference,
        manifest_digest: &Digest,
        client: Arc<RegistryClient>,
        fetcher: &LayerFetcher,
        boot: BootContentSource,
        offline: bool,
    ) -> LazySource {
        // Everything local: nothing to read by range.
        let spans = (!offline).then(|| {
            Arc::new(SpanReader::new(
                client,
                reference.clone(),
                manifest_digest.clone(),
                fetcher.clone(),
            ))
        });
        LazySource {
            image: reference.to_string().into(),
            fetcher: fetcher.clone(),
            boot,
            spans,
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
        if let Some(f) = self.spans.as_ref().and_then(|s| s.open(entry)) {
            return Ok(f);
        }
        self.fetcher
            .open_file(entry.layer as usize, &entry.path, entry.digest.as_ref())
            // The fetcher knows layers, not images: say which image.
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.image)))
    }

    /// Boot layer files and layers already stored answer at once; a file
    /// still to be fetched is waited for off the FUSE worker threads.
    fn ranged(&self, idx: u32, entry: &IndexEntry) -> Option<Arc<dyn RangedContent>> {
        match &self.boot {
            // A file whose chunks are all local is opened whole (`open`),
            // for passthrough.
            BootContentSource::Chunks(c)
                if entry.in_boot
                    && entry.kind == FileKind::File
                    && !c.file_complete(idx, entry.size) =>
            {
                c.file(idx, entry.size)
            }
            _ => None,
        }
    }

    fn try_open(&self, idx: u32, entry: &IndexEntry) -> Option<io::Result<File>> {
        if entry.in_boot {
            return Some(self.open(idx, entry));
        }
        if let Some(spans) = &self.spans {
            match spans.try_open(entry) {
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
