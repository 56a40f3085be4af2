//! Reading ahead of a tree walk. `tar`, `cp -r` or `rsync` read every file
//! of a tree once, in the order READDIR lists it (depth first, names
//! sorted). Each first READ of a file is a round trip here plus a wait for
//! the disk, one after the other; kernel overlayfs pays only the disk. Once
//! two first READs follow each other in that order, the next files' local
//! copies are advised into the page cache by a thread of their own, so the
//! disk works while the round trips go on.
//!
//! Only once every byte of the image is local (the switch of cached opens
//! is on): speculative reads never compete with a lazy start's fetches, and
//! opening a local file never starts one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use lazylayer_index::FileKind;

use super::content_io::will_need;
use super::Shared;
use crate::pool::WaitPool;
use crate::source::{Content, ContentSource};

/// Files kept advised ahead of a walk.
const AHEAD_FILES: usize = 16;
/// Files guessed to come next after a first READ that continues no walk;
/// a first READ of one of them starts one. More than one: a walker skips
/// what it does not read (directories' own entries are not files here,
/// but a file it fails to open, or one it links instead of reading).
const GUESS_FILES: usize = 4;
/// Bytes advised from the start of one file, at most: a larger file is
/// then read on by the kernel's readahead, which a sequential reader wakes.
const AHEAD_BYTES: u64 = 512 << 10;
/// Entries stepped over (directories, symlinks, empty files) looking for
/// the next files, at most per look: a look runs on a FUSE worker.
const MAX_STEPS: usize = 512;

/// Walks followed at once, at most: two `tar`s, or a backup beside a
/// server reading its own files, each keep theirs. A first READ that
/// continues none starts a guess in place of the one longest unused.
const WALKS: usize = 4;

pub(super) struct WalkAhead {
    state: Mutex<[Window; WALKS]>,
    /// One thread: opening the next files waits for the disk (their
    /// directory and inode blocks), which is work to take off the workers,
    /// and a walk reads one file at a time.
    pool: WaitPool,
}

#[derive(Default)]
struct Window {
    /// Files expected next, in walk order.
    next: VecDeque<u32>,
    /// Whether `next` was advised (a walk is on) or only guessed.
    advised: bool,
    /// When this window last matched or began (a count of first READs).
    used: u64,
}

impl WalkAhead {
    pub(super) fn new() -> WalkAhead {
        WalkAhead {
            state: Mutex::default(),
            // A queue of a few batches: a walk's batches are small, and
            // advice refused costs only the speed-up.
            pool: WaitPool::new("lazylayer-ahead", 1, 8),
        }
    }
}

impl<S: ContentSource> Shared<S> {
    /// Note the first READ, at its start, of local file `i`; when it
    /// continues a walk, advise the files that come next.
    pub(super) fn walk_ahead(self: &Arc<Self>, i: u32) {
        if !self.cached_opens.is_on() {
            return;
        }
        let advise = {
            let mut walks = self
                .walk
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let now = walks.iter().map(|w| w.used).max().unwrap_or(0) + 1;
            let found = walks
                .iter()
                .enumerate()
                .find_map(|(k, w)| Some((k, w.next.iter().position(|&j| j == i)?)));
            let (k, at) = match found {
                Some((k, at)) => (k, Some(at)),
                None => {
                    let oldest = (0..WALKS).min_by_key(|&k| walks[k].used).unwrap_or(0);
                    (oldest, None)
                }
            };
            let w = &mut walks[k];
            w.used = now;
            match at {
                Some(at) => {
                    w.next.drain(..=at);
                    let mut advise = Vec::new();
                    if !w.advised {
                        advise.extend(w.next.iter().copied());
                        w.advised = true;
                    }
                    let from = w.next.back().copied().unwrap_or(i);
                    let more = self.files_after(from, AHEAD_FILES.saturating_sub(w.next.len()));
                    w.next.extend(more.iter().copied());
                    advise.extend(more);
                    advise
                }
                None => {
                    w.next = self.files_after(i, GUESS_FILES).into();
                    w.advised = false;
                    Vec::new()
                }
            }
        };
        if advise.is_empty() {
            return;
        }
        let shared = self.clone();
        // Refused when the thread is behind: the walk then reads those
        // files as it would have without this.
        let _ = self.walk.pool.submit(Box::new(move || {
            for j in advise {
                shared.advise_file(j);
            }
        }));
    }

    /// Start reading the local copy of file `j` into the page cache, opened
    /// as a READ opens it (never waiting, never ranged content). Advice
    /// only: any failure costs the speed-up, never a byte.
    fn advise_file(&self, j: u32) {
        if let Some(Ok(Content::File(f))) = self.open_content(j, false) {
            will_need(&f, self.entry(j).size.min(AHEAD_BYTES));
        }
    }

    /// Up to `n` files a walk reads after entry `i`: regular files with
    /// bytes, each inode once (a walker reads a hardlink group's first
    /// member and links the others), in depth-first READDIR order.
    fn files_after(&self, mut i: u32, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        // `i` itself is not descended into: it is a file when called from
        // a READ, and a directory only on later steps.
        let mut descend = false;
        for _ in 0..MAX_STEPS {
            if out.len() >= n {
                break;
            }
            let Some(next) = self.walk_next(i, descend) else {
                break;
            };
            let e = self.entry(next);
            if e.kind == FileKind::File && e.size > 0 && self.canonical[next as usize] == next {
                out.push(next);
            }
            descend = e.kind == FileKind::Dir;
            i = next;
        }
        out
    }

    /// The entry after `i` in a depth-first walk listing each directory's
    /// children by name (the READDIR order); `descend`: into `i`'s own
    /// children first.
    fn walk_next(&self, mut i: u32, descend: bool) -> Option<u32> {
        if descend {
            if let Some(&first) = self.index.children(i).first() {
                return Some(first);
            }
        }
        // Up until a directory has a next child; the root has none.
        while i != 0 {
            let parent = self.entry(i).parent;
            let kids = self.index.children(parent);
            let name = self.index.name(i);
            // A valid index names each child once, so the search finds `i`.
            let at = kids
                .binary_search_by(|&c| self.index.name(c).cmp(name))
                .ok()?;
            if let Some(&sibling) = kids.get(at + 1) {
                return Some(sibling);
            }
            i = parent;
        }
        None
    }
}
