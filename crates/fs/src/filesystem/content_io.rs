//! Opening and reading file content for the FUSE callbacks: handles with
//! passthrough or daemon reads, ranged content, opens and reads that must
//! wait for content (served off the FUSE workers), and the errors a source
//! gives turned into replies.

use std::fs::File;
use std::io::IoSlice;
use std::num::NonZeroU64;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use rustix::buffer::spare_capacity;

use fuser::{Errno, FileHandle, FopenFlags, ReplyData, ReplyOpen};
use lazylayer_index::{FileKind, IndexEntry};

use super::{Shared, Waiting, STORE_GATES};
use crate::source::{Content, ContentSource, RangedContent};
use crate::table::{OpenTable, FLAG_PASSTHROUGH};

/// Files the kernel opened alone (cached opens) whose content stays open
/// here between READs, at most: a descriptor each, and `run` may live under
/// a soft limit of 1,024. One dropped costs an open at its next READ, which
/// the page cache makes rare.
const KEPT_INODES: usize = 256;

/// A file of at most this size whose first READ is not at its start is
/// read ahead whole from its local copy (see [`read_ahead_at_random`]).
const RANDOM_READ_AHEAD_MAX: u64 = 32 << 20;

/// Bytes of one file stored into the page cache at one open, at most.
const PRELOAD_MAX: u64 = 32 << 20;
/// Bytes per store notification (one write to /dev/fuse each).
const PRELOAD_PIECE: u64 = 64 << 10;

/// Flags of every file open. `FOPEN_NOFLUSH`: a read-only file system has
/// nothing to flush at close, and a FLUSH waits for its answer without end
/// (the kernel forces it): a process that has its own mount's files open
/// and is killed closes them after its server threads are gone, and never
/// exits. The kernel allows it beside passthrough.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// FUSE_NOTIFY_STORE: put `data` into the page cache of inode `ino` at
/// `offset`. The message is the reply header (error = the notify code,
/// unique = 0) and `fuse_notify_store_out`, then the bytes.
fn notify_store(dev: BorrowedFd<'_>, ino: u64, offset: u64, data: &[u8]) -> std::io::Result<()> {
    const FUSE_NOTIFY_STORE: i32 = 4;
    const HEAD: usize = 16 + 24;
    let total = HEAD + data.len();
    let too_big = || std::io::Error::other("page cache store too large");
    let mut head = [0u8; HEAD];
    head[0..4].copy_from_slice(&u32::try_from(total).map_err(|_| too_big())?.to_ne_bytes());
    head[4..8].copy_from_slice(&FUSE_NOTIFY_STORE.to_ne_bytes());
    // 8..16: unique, 0 for a notification.
    head[16..24].copy_from_slice(&ino.to_ne_bytes());
    head[24..32].copy_from_slice(&offset.to_ne_bytes());
    head[32..36].copy_from_slice(
        &u32::try_from(data.len())
            .map_err(|_| too_big())?
            .to_ne_bytes(),
    );
    let n = rustix::io::writev(dev, &[IoSlice::new(&head), IoSlice::new(data)])?;
    if n != total {
        return Err(std::io::Error::other(format!(
            "page cache store: {n} of {total} bytes written"
        )));
    }
    Ok(())
}

impl<S: ContentSource> Shared<S> {
    pub(super) fn table(&self) -> &OpenTable {
        self.table
            .get()
            .expect("FsMount attaches the table before serving")
    }

    /// Give `file` a handle for inode `ino` and reply, with passthrough when
    /// the kernel allows it.
    pub(super) fn register_open(&self, ino: u64, file: File, reply: ReplyOpen) {
        let table = self.table();
        let fh = table.next_fh();
        let mut st = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let (opens, mut backing) = table.get(ino);
        // Only the first open of an inode picks its mode; later ones follow
        // it, because the kernel refuses a mix.
        if opens == 0 {
            backing = 0;
            if self.passthrough.load(Ordering::Relaxed) {
                match reply.open_backing(&file) {
                    // Ours to unregister at the last release (also by the
                    // next server: the id is in the table).
                    Ok(id) => backing = id.into_raw(),
                    Err(e) => {
                        // EPERM: the connection has no passthrough (or we
                        // lack CAP_SYS_ADMIN); later opens would fail the same way.
                        if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) {
                            self.passthrough.store(false, Ordering::Relaxed);
                            table.clear_flags(FLAG_PASSTHROUGH);
                        }
                        self.log_fallback(&e);
                    }
                }
            }
        }
        table.set(ino, opens + 1, backing);
        // Registered before replying, so a RELEASE always finds it.
        st.files.insert(fh, Content::File(Arc::new(file)));
        drop(st);
        if backing != 0 {
            self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            // SAFETY: a backing id registered on this connection, kept
            // open until the inode's last release (into_raw below keeps
            // the wrapper from closing it).
            let id = unsafe { reply.wrap_backing(backing) };
            // No FOPEN_KEEP_CACHE: the kernel fails (EIO) a passthrough
            // open with any flag outside FOPEN_PASSTHROUGH_MASK, and the
            // page cache used is the backing file's anyway.
            reply.opened_passthrough(FileHandle(fh), OPEN_FLAGS, &id);
            let _ = id.into_raw();
        } else {
            self.stats.daemon_opens.fetch_add(1, Ordering::Relaxed);
            // Content never changes: let the page cache keep it across opens.
            reply.opened(FileHandle(fh), OPEN_FLAGS | FopenFlags::FOPEN_KEEP_CACHE);
        }
    }

    /// Give ranged content a handle; read through this daemon, cached.
    pub(super) fn register_ranged(
        &self,
        ino: u64,
        content: Arc<dyn RangedContent>,
        reply: ReplyOpen,
    ) {
        let table = self.table();
        let fh = table.next_fh();
        // Pages are stored only while no file of the inode is open, and no
        // open of it replies meanwhile: a READ holds its pages locked until
        // answered, and a store into a locked page waits for that answer,
        // on a FUSE worker (with all workers waiting, nothing answers), and
        // beyond a SIGKILL (the lock wait is uninterruptible: the killed
        // server never exits). With no file open, no READ is pending: the
        // kernel sends RELEASE only after a file's last READ is answered.
        let gate = &self.store_gates[ino as usize % STORE_GATES];
        let _gate = gate.lock().unwrap_or_else(PoisonError::into_inner);
        let mut st = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let (opens, backing) = table.get(ino);
        table.set(ino, opens + 1, if opens == 0 { 0 } else { backing });
        st.files.insert(fh, Content::Ranged(content.clone()));
        drop(st);
        self.stats.daemon_opens.fetch_add(1, Ordering::Relaxed);
        if opens == 0 {
            self.preload(ino, &*content);
        }
        reply.opened(FileHandle(fh), OPEN_FLAGS | FopenFlags::FOPEN_KEEP_CACHE);
    }

    /// Hand the local bytes of ranged content to the kernel's page cache
    /// (FUSE_NOTIFY_STORE), up to [`PRELOAD_MAX`] per first open. A program maps
    /// its executable and libraries and faults them in a page at a time
    /// (readahead is one page while the boot layer arrives): python3 made
    /// ~1,400 READs of 4 KiB before its first output, each a round trip
    /// through this daemon. Only whole pages are sent (the kernel marks
    /// nothing else valid); the kernel keeps them (`FOPEN_KEEP_CACHE`).
    fn preload(&self, ino: u64, content: &dyn RangedContent) {
        let Some(dev) = self.device.get() else { return };
        let page = rustix::param::page_size() as u64;
        let size = self.entry((ino - 1) as u32).size;
        let mut left = PRELOAD_MAX;
        // One small buffer for the whole open: a large one per piece is kept
        // by the allocator of each worker thread (a snapshotter's resident
        // memory grew by 17 MB under load).
        let mut piece = Vec::new();
        for r in content.local_ranges() {
            let start = r.start.next_multiple_of(page);
            let end = if r.end >= size {
                size
            } else {
                r.end / page * page
            };
            let mut off = start;
            while off < end && left > 0 {
                let n = (end - off).min(PRELOAD_PIECE).min(left);
                piece.resize(n as usize, 0);
                let buf = &mut piece[..];
                if !matches!(content.try_read_at(buf, off), Some(Ok(()))) {
                    return;
                }
                if let Err(e) = notify_store(dev.as_fd(), ino, off, buf) {
                    // An old kernel or an inode it has dropped: reads still work.
                    tracing::debug!(ino, off, error = %e, "page cache store refused");
                    return;
                }
                self.stats.preloaded_bytes.fetch_add(n, Ordering::Relaxed);
                off += n;
                left -= n;
            }
        }
    }

    /// Open entry `i`'s content for reads without a handle of this
    /// server's: one an earlier server gave out (kept by the kernel across a
    /// takeover), or a file the kernel opened alone (cached opens). Checked
    /// as an open is: a regular file of the index's size, before any byte
    /// is served. `None` when it must be waited for and `wait` is false.
    pub(super) fn open_content(&self, i: u32, wait: bool) -> Option<std::io::Result<Content>> {
        let e = self.entry(i);
        if e.kind != FileKind::File {
            return Some(Err(std::io::Error::from_raw_os_error(
                rustix::io::Errno::BADF.raw_os_error(),
            )));
        }
        if let Some(c) = self
            .source
            .ranged(i, e, self.passthrough.load(Ordering::Relaxed))
        {
            return Some(Ok(Content::Ranged(c)));
        }
        let file = if wait {
            self.source.open(i, e)
        } else {
            self.source.try_open(i, e)?
        };
        Some(
            file.and_then(|f| matches_index(f, e))
                .map(|f| Content::File(Arc::new(f))),
        )
    }

    /// The content a READ of entry `i` through handle `fh` reads, if it is
    /// open here: under its handle, or under its inode for handle 0 (a file
    /// the kernel opened alone).
    pub(super) fn content_open(&self, i: u32, fh: u64) -> Option<Content> {
        let st = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        match fh {
            0 => st.inodes.get(&i).cloned(),
            fh => st.files.get(&fh).cloned(),
        }
    }

    /// Open the content of a READ that [`Self::content_open`] did not find
    /// (see [`Self::open_content`]) and keep it for the next READs.
    pub(super) fn reopen(&self, i: u32, fh: u64, wait: bool) -> Option<std::io::Result<Content>> {
        let content = match self.open_content(i, wait)? {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        let mut st = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = if fh != 0 {
            st.files.entry(fh).or_insert(content)
        } else {
            // Bounded: each kept file holds a descriptor. One dropped is
            // opened again at its next READ (the page cache answers most).
            if st.inodes.len() >= KEPT_INODES && !st.inodes.contains_key(&i) {
                if let Some(k) = st.inodes.keys().next().copied() {
                    st.inodes.remove(&k);
                }
            }
            st.inodes.entry(i).or_insert(content)
        };
        Some(Ok(kept.clone()))
    }

    /// Run `serve` (which owns a request's reply) on the waiting pool,
    /// counted as waiting meanwhile. Past the pool's bound it is dropped
    /// unrun, which answers the request EIO: counted before, so whoever
    /// sees the EIO sees the count.
    pub(super) fn wait_off_workers(
        &self,
        request: &str,
        i: u32,
        serve: impl FnOnce() + Send + 'static,
    ) {
        /// A job's parts in drop order (fields drop as declared): refused
        /// and dropped unrun, it stops counting as waiting before `serve`'s
        /// reply answers EIO, so whoever sees the EIO sees the counts final.
        struct WaitingJob<F> {
            waiting: Waiting,
            serve: F,
        }
        let job = WaitingJob {
            waiting: Waiting::new(&self.stats),
            serve,
        };
        let submitted = self.waiting_pool.submit(Box::new(move || {
            // Moved whole: the closure then holds the struct, not its fields.
            let job = job;
            let WaitingJob { waiting, serve } = job;
            serve();
            drop(waiting);
        }));
        if let Err(refused) = submitted {
            self.stats.refused_waits.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                request,
                path = %String::from_utf8_lossy(&self.entry(i).path),
                threads = self.opts.waiting_threads,
                queue = self.opts.waiting_queue,
                "too many requests waiting for content; answered EIO"
            );
            drop(refused);
        }
    }

    /// Serve a read of `content` (entry `i`): at once when its bytes are
    /// here, else on the waiting pool.
    pub(super) fn read_content(
        self: &Arc<Self>,
        i: u32,
        content: Content,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) {
        // Never past the end: a read there would only find it (one more
        // pread of a file, a clamp of ranged content).
        let size_left = self.entry(i).size.saturating_sub(offset);
        let want = (size as u64).min(size_left) as usize;
        let f = match content {
            Content::File(f) => f,
            Content::Ranged(c) => {
                let mut buf = vec![0u8; want];
                if let Some(r) = c.try_read_at(&mut buf, offset) {
                    return self.reply_ranged(i, r, &buf, offset, reply);
                }
                // Bytes still on their way: wait off the worker threads, as
                // a waiting open does.
                let shared = self.clone();
                self.wait_off_workers("read", i, move || {
                    let r = c.read_at(&mut buf, offset);
                    shared.reply_ranged(i, r, &buf, offset, reply);
                });
                return;
            }
        };
        // Read into spare capacity: zeroing the buffer first (up to 1 MiB
        // per READ, which the read then overwrites) is work for nothing.
        let mut buf = Vec::with_capacity(want);
        while buf.len() < want {
            let at = offset + buf.len() as u64;
            match rustix::io::pread(&*f, spare_capacity(&mut buf), at) {
                Ok(0) => break,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return reply.error(Errno::from(std::io::Error::from(e))),
            }
        }
        // The allocator may give more room than asked.
        buf.truncate(want);
        if let Some(t) = &self.trace {
            t.record_read(&self.entry(i).path, offset, buf.len() as u64);
        }
        reply.data(&buf);
    }

    /// Serve the first READ of content [`Self::reopen`] opened; when it is
    /// not at the file's start, read the local file ahead once replied
    /// ([`read_ahead_at_random`]), so that this READ does not wait for it;
    /// when it is, see whether a walk reads on ([`Self::walk_ahead`]).
    pub(super) fn read_reopened(
        self: &Arc<Self>,
        i: u32,
        content: Content,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) {
        let file = match &content {
            Content::File(f) => Some(f.clone()),
            Content::Ranged(_) => None,
        };
        self.read_content(i, content, offset, size, reply);
        match file {
            Some(f) if offset != 0 => read_ahead_at_random(&f, self.entry(i).size),
            Some(_) => self.walk_ahead(i),
            None => {}
        }
    }

    /// Unregister a backing file (its inode's last open is released).
    pub(super) fn close_backing(&self, id: u32) {
        let Some(dev) = self.device.get() else { return };
        // FUSE_DEV_IOC_BACKING_CLOSE = _IOW(229, 2, uint32_t).
        const CLOSE: rustix::ioctl::Opcode = rustix::ioctl::opcode::write::<u32>(229, 2);
        // SAFETY: the opcode takes a u32 backing id.
        let r = unsafe {
            rustix::ioctl::ioctl(dev.as_fd(), rustix::ioctl::Setter::<CLOSE, u32>::new(id))
        };
        if let Err(e) = r {
            tracing::debug!(id, error = %e, "unregistering a backing file");
        }
    }

    /// Reply to a read of ranged content at `offset` of entry `i`.
    pub(super) fn reply_ranged(
        &self,
        i: u32,
        r: std::io::Result<()>,
        buf: &[u8],
        offset: u64,
        reply: ReplyData,
    ) {
        match r {
            Ok(()) => {
                if let Some(t) = &self.trace {
                    t.record_read(&self.entry(i).path, offset, buf.len() as u64);
                }
                reply.data(buf)
            }
            Err(err) => self.content_error(i, Some(offset), &err, |e| reply.error(e)),
        }
    }

    /// Log why entry `i`'s content cannot be served (at `offset`, for a
    /// read) and answer EIO through `reply`.
    pub(super) fn content_error(
        &self,
        i: u32,
        offset: Option<u64>,
        err: &std::io::Error,
        reply: impl FnOnce(Errno),
    ) {
        use std::io::ErrorKind as K;
        let path = String::from_utf8_lossy(&self.entry(i).path);
        match err.kind() {
            // Bytes that do not match their digest, or the image's layer and
            // its own index disagree: hostile or corrupt content, never served.
            K::InvalidData => {
                tracing::error!(%path, offset, error = %err, "refused content that does not match its digest or the boot index")
            }
            // Not the content's fault: the registry could not be reached.
            K::HostUnreachable
            | K::NetworkUnreachable
            | K::NetworkDown
            | K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::NotConnected => {
                tracing::warn!(%path, offset, error = %err, "content unavailable: network failure, the registry cannot be reached")
            }
            _ => tracing::warn!(%path, offset, error = %err, "content unavailable"),
        }
        reply(Errno::EIO)
    }

    /// Reply to an open of entry `i` (inode `ino`) with what the source gave.
    pub(super) fn finish_open(&self, ino: u64, i: u32, r: std::io::Result<File>, reply: ReplyOpen) {
        let e = self.entry(i);
        match r.and_then(|f| matches_index(f, e)) {
            Ok(f) => self.register_open(ino, f, reply),
            Err(err) => self.content_error(i, None, &err, |e| reply.error(e)),
        }
    }
}

/// Start reading a local file whole into the page cache, without waiting,
/// when its first READ comes at a random place: the kernel reads a FUSE
/// file ahead only as far as the request, so each later random read would
/// wait for the disk and a round trip here; the local copy read ahead
/// leaves the round trip alone (python3's 20,000 random 4 KiB preads,
/// cold: 0.35-0.38 s -> 0.22-0.27 s; kernel overlayfs 0.28-0.33 s). A sequential
/// reader starts at 0 and is read ahead by the kernel as it goes; files
/// larger than [`RANDOM_READ_AHEAD_MAX`] are left to it too.
fn read_ahead_at_random(f: &File, size: u64) {
    if size <= RANDOM_READ_AHEAD_MAX {
        will_need(f, size);
    }
}

/// Start reading the first `len` bytes of local file `f` into the page
/// cache, without waiting. The kernel reads at most its device's request
/// size ahead per advice (8 MiB here), so the range is advised a piece at a
/// time. Advice only: a failure costs the speed-up, never a byte.
pub(super) fn will_need(f: &File, len: u64) {
    const PIECE: u64 = 2 << 20;
    for off in (0..len).step_by(PIECE as usize) {
        let n = NonZeroU64::new(PIECE.min(len - off));
        if rustix::fs::fadvise(f, off, n, rustix::fs::Advice::WillNeed).is_err() {
            return;
        }
    }
}

/// The opened content must be what the index announced: a regular file of
/// the size `stat` reported (sources refuse anything but regular files; the
/// size is checked here, once for every source).
fn matches_index(f: File, e: &IndexEntry) -> std::io::Result<File> {
    let len = f.metadata()?.len();
    if len != e.size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "the boot index says {} is a regular file of {} bytes, the layer holds one of {len} bytes",
                String::from_utf8_lossy(&e.path),
                e.size
            ),
        ));
    }
    Ok(f)
}
