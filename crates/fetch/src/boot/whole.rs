//! Boot files whose every chunk is local, each as a file of its own, while
//! FUSE passthrough is in effect: an open of one is then an ordinary file
//! the file system hands to the kernel, so its reads never come to this
//! process again (without passthrough they come here either way, and such
//! a file is read by ranges, its bytes preloaded at open). A
//! file read through chunks costs a daemon round trip per page (the start's
//! readahead is one page, as the trace's was): python3's start made 1,717
//! of them.
//!
//! The copies live in a directory of this open's own inside the chunk cache
//! (removed with it), written from chunks already checked against the
//! index: never trusted across processes or restarts.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::state::ChunkState;
use super::BootChunks;

/// The copies made so far, by index entry.
#[derive(Default)]
pub(super) struct WholeFiles {
    dir: Mutex<Option<Arc<tempfile::TempDir>>>,
    made: Mutex<HashMap<u32, PathBuf>>,
}

/// Bytes copied at a time.
const PIECE: usize = 1 << 20;

impl BootChunks {
    /// True when every chunk of entry `idx` (`size` bytes) is local.
    pub(crate) fn file_complete(&self, idx: u32, size: u64) -> bool {
        let Some(start) = self.inner.content.file_offset(idx) else {
            return false;
        };
        let range = self.inner.content.chunks_covering(start, size);
        let s = self.inner.state.lock().unwrap();
        range
            .clone()
            .all(|c| s.chunks[c as usize] == ChunkState::Present)
    }

    /// Entry `idx` as a file of its own, if every chunk of it is local;
    /// None otherwise (it is then read by ranges).
    pub(crate) fn whole_file(&self, idx: u32, size: u64) -> Option<io::Result<File>> {
        if !self.file_complete(idx, size) {
            return None;
        }
        let start = self.inner.content.file_offset(idx)?;
        let whole = &self.inner.whole;
        if let Some(p) = whole.made.lock().unwrap().get(&idx) {
            return Some(File::open(p));
        }
        Some(self.copy_out(idx, start, size))
    }

    fn copy_out(&self, idx: u32, start: u64, size: u64) -> io::Result<File> {
        let whole = &self.inner.whole;
        let dir = {
            let mut d = whole.dir.lock().unwrap();
            match &*d {
                Some(d) => d.clone(),
                None => {
                    let made = Arc::new(
                        tempfile::Builder::new()
                            .prefix("files.")
                            .permissions(std::fs::Permissions::from_mode(0o700))
                            .tempdir_in(&self.inner.dir)?,
                    );
                    *d = Some(made.clone());
                    made
                }
            }
        };
        let path = dir.path().join(idx.to_string());
        // Written under a temporary name: an open racing this one never
        // sees a part of it.
        let mut tmp = tempfile::NamedTempFile::new_in(dir.path())?;
        let mut buf = vec![0u8; PIECE.min(size as usize)];
        let mut done = 0u64;
        while done < size {
            let n = PIECE.min((size - done) as usize);
            self.inner
                .cache
                .read_exact_at(&mut buf[..n], start + done)?;
            tmp.as_file_mut().write_all_at(&buf[..n], done)?;
            done += n as u64;
        }
        tmp.persist(&path).map_err(|e| e.error)?;
        whole.made.lock().unwrap().insert(idx, path.clone());
        File::open(&path)
    }
}
