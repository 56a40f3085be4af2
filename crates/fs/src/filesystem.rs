//! The FUSE callbacks. Metadata comes from the index (immutable, so the
//! kernel may cache it for long); content from the [`ContentSource`].

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use lazylayer_index::{BootIndex, FileKind, IndexEntry};

use crate::meta_tree::DataView;
use crate::panics::panic_message;
use crate::pool::WaitPool;
use crate::source::{Content, ContentSource};
use crate::table::{OpenTable, FLAG_INITIALIZED, FLAG_PASSTHROUGH};
use crate::trace::{Access, Trace};

mod content_io;
mod data_names;
mod stats;
mod walk_ahead;

pub use stats::FsStats;
use stats::Waiting;

#[derive(Debug, Clone)]
pub struct FsOptions {
    /// How long the kernel may cache attributes and names. The image never
    /// changes under a mount, so this can be long.
    pub ttl: Duration,
    /// Let the kernel read opened files straight from their backing file
    /// (FUSE passthrough, Linux 6.9+), so reads cost what a native read
    /// costs. Falls back to reads through this daemon when the kernel
    /// refuses it, e.g. for backing files on an overlayfs. Note the mount
    /// then counts as one stacking level: an overlayfs on it is allowed,
    /// but nothing can stack on that overlay in turn.
    pub passthrough: bool,
    /// Largest readahead the kernel may do on files read through this
    /// daemon (not passthrough ones, which use their backing file's). None:
    /// the kernel's default (128 KiB). A trace limits it so that what it
    /// records is close to what the program reads; a lazy start from a
    /// chunked boot layer uses the same limit, so that it asks for the
    /// chunks the trace saw.
    pub max_readahead: Option<u32>,
    /// Threads that serve requests which must wait for content (an open
    /// or a read of bytes still on their way), so that the few FUSE worker
    /// threads never wait. Started as needed.
    pub waiting_threads: usize,
    /// Waiting requests queued for one of those threads; past this many,
    /// a further one is answered EIO at once (and counted in
    /// [`FsStats::refused_waits`]) rather than holding memory and a kernel
    /// request without bound.
    pub waiting_queue: usize,
    /// Serve the data-only namespace of a stub tree instead of the image's
    /// root ([`crate::meta_tree`]): `/<layer hex>/fs/<path>` names the file
    /// `<path>` when that layer holds it. Nothing lists it; overlayfs only
    /// looks names up in it, and reads what it finds.
    pub data_view: Option<Arc<DataView>>,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            ttl: Duration::from_secs(3600),
            passthrough: true,
            max_readahead: None,
            waiting_threads: 32,
            waiting_queue: 1024,
            data_view: None,
        }
    }
}

/// Content of the handles this process gave out or took over. How the
/// kernel does I/O on each inode (open count, backing file) is in the
/// [`OpenTable`], which outlives the process: the kernel fails (EIO) an open
/// whose mode conflicts with the inode's other open files (a second backing
/// file, or mixing passthrough and cached opens), so every open of an inode
/// follows the first one's mode until the last release.
#[derive(Default)]
struct OpenState {
    files: HashMap<u64, Content>,
    /// Content of inodes read without a handle of ours (cached opens).
    inodes: HashMap<u32, Content>,
}

/// Turns a mounted file system's opens over to the kernel: once on, the
/// next OPEN is answered so that the kernel opens every file alone from
/// then on (no round trip; reads then come by inode and stay in the page
/// cache). For a root whose every byte is local: an open no longer has a
/// backing file to hand over or a download to wait for. It cannot be turned
/// off: the kernel keeps the mode for the connection's life.
///
/// Turning it on also widens the mount's readahead to [`LOCAL_READ_AHEAD_KB`]:
/// while content arrives on demand a READ asks the network for what it
/// covers, so the kernel's default (128 KiB) is kept until then; once every
/// byte is local a wider one costs nothing but saves round trips.
#[derive(Clone, Default)]
pub struct OpensSwitch(Arc<SwitchState>);

#[derive(Default)]
struct SwitchState {
    on: AtomicBool,
    /// The mount's `read_ahead_kb` in sysfs, set by the mount.
    read_ahead: OnceLock<PathBuf>,
}

/// The readahead of a root whose every byte is local: one READ of the
/// largest size FUSE allows (256 pages). A sequential read of gcc's 30
/// largest files (332 MB), cold: 0.39 s at 128 KiB, 0.34 s at 1 MiB, 0.36 s
/// at 4 MiB (median of 5); kernel overlayfs 0.31 s (its disk reads ahead
/// 8 MiB).
pub const LOCAL_READ_AHEAD_KB: u32 = 1024;

impl OpensSwitch {
    pub fn turn_on(&self) {
        if !self.0.on.swap(true, Ordering::Relaxed) {
            if let Some(p) = self.0.read_ahead.get() {
                widen_read_ahead(p, LOCAL_READ_AHEAD_KB);
            }
        }
    }
    pub fn is_on(&self) -> bool {
        self.0.on.load(Ordering::Relaxed)
    }

    /// Where the mount's readahead is set (by the mount, once mounted).
    pub(crate) fn set_read_ahead_path(&self, p: PathBuf) {
        let _ = self.0.read_ahead.set(p);
    }
}

/// Raise the readahead at `path` (a bdi's `read_ahead_kb`) to `kb`, never
/// lower it (an admin may have set more). Best effort: sysfs may be read-only
/// here (a daemon in a container); reads are as fast as before then.
fn widen_read_ahead(path: &Path, kb: u32) {
    let now = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if now.is_some_and(|n| n >= kb) {
        return;
    }
    if let Err(e) = std::fs::write(path, kb.to_string()) {
        tracing::debug!(path = %path.display(), error = %e, "cannot widen the lazy root's readahead");
    }
}

pub struct LazyFs<S: ContentSource> {
    /// Shared with the threads that serve opens which must wait.
    shared: Arc<Shared<S>>,
}

impl<S: ContentSource> std::ops::Deref for LazyFs<S> {
    type Target = Shared<S>;
    fn deref(&self) -> &Shared<S> {
        &self.shared
    }
}

/// The file system's state.
pub struct Shared<S: ContentSource> {
    index: Arc<BootIndex>,
    source: S,
    trace: Option<Arc<Trace>>,
    opts: FsOptions,
    /// Link count per entry (dirs: 2 + subdirs; hardlinks: group size).
    nlink: Vec<u32>,
    /// Canonical entry per entry: the first member of its hardlink group.
    canonical: Vec<u32>,
    open: Mutex<OpenState>,
    /// Set by the mount, before the first request: the connection's state
    /// that outlives this process, and a descriptor of the connection (to
    /// unregister backing files).
    table: OnceLock<Arc<OpenTable>>,
    device: OnceLock<OwnedFd>,
    /// Whether the kernel agreed to passthrough at init; cleared when it
    /// turns out not to allow backing files at all.
    passthrough: AtomicBool,
    /// Set once the fallback to daemon reads has been logged.
    fallback_logged: AtomicBool,
    /// No entry of the index has an extended attribute: the kernel is told
    /// at the first GETXATTR (ENOSYS) and asks no more. An overlayfs above
    /// asks for two on every lookup (`trusted.overlay.metacopy`,
    /// `security.capability`): ~6,100 round trips in a `find /usr` of python3.
    no_xattrs: bool,
    /// Set by the owner once every byte of the image is local: see `open`.
    cached_opens: OpensSwitch,
    stats: Arc<FsStats>,
    /// Serves the requests that must wait for content.
    waiting_pool: WaitPool,
    /// Opens of ranged content pass one at a time per shard of inodes, so
    /// no open replies while its inode's pages are being stored.
    store_gates: [Mutex<()>; STORE_GATES],
    /// Reads ahead of a tree walk (`tar`) once every byte is local.
    walk: walk_ahead::WalkAhead,
}

/// Shards of [`Shared::store_gates`].
const STORE_GATES: usize = 16;

fn ino_of(idx: u32) -> INodeNo {
    INodeNo(idx as u64 + 1)
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

/// The kernel's "new" dev_t encoding used in FUSE attributes.
fn fuse_rdev(rdev: u64) -> u32 {
    let major = rustix::fs::major(rdev);
    let minor = rustix::fs::minor(rdev);
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

impl<S: ContentSource> LazyFs<S> {
    pub fn new(
        index: Arc<BootIndex>,
        source: S,
        trace: Option<Arc<Trace>>,
        opts: FsOptions,
    ) -> Self {
        let n = index.len();
        let mut nlink = vec![1u32; n];
        let mut canonical: Vec<u32> = (0..n as u32).collect();
        for i in 0..n as u32 {
            let e = &index.entries[i as usize];
            match e.kind {
                FileKind::Dir => {
                    let subdirs = index
                        .children(i)
                        .iter()
                        .filter(|c| index.entries[**c as usize].kind == FileKind::Dir)
                        .count();
                    nlink[i as usize] = 2 + subdirs as u32;
                }
                _ if e.hardlink_group != 0 => {
                    let members = index.hardlink_members(e.hardlink_group);
                    nlink[i as usize] = members.len().max(1) as u32;
                    canonical[i as usize] = members.iter().copied().min().unwrap_or(i);
                }
                _ => {}
            }
            // A group an upper layer split: the holding layer's count, as
            // overlayfs reports it. Not for a copy in the boot layer, which
            // holds only the visible names (a standard runtime reports those).
            if e.link_count != 0 && !e.in_boot {
                nlink[i as usize] = u32::from(e.link_count);
            }
        }
        LazyFs {
            shared: Arc::new(Shared {
                no_xattrs: index.entries.iter().all(|e| e.xattrs.is_empty()),
                index,
                source,
                trace,
                nlink,
                canonical,
                open: Mutex::new(OpenState::default()),
                table: OnceLock::new(),
                device: OnceLock::new(),
                passthrough: AtomicBool::new(false),
                fallback_logged: AtomicBool::new(false),
                cached_opens: OpensSwitch::default(),
                stats: Arc::new(FsStats::default()),
                waiting_pool: WaitPool::new(
                    "lazylayer-wait",
                    opts.waiting_threads,
                    opts.waiting_queue,
                ),
                store_gates: std::array::from_fn(|_| Mutex::new(())),
                walk: walk_ahead::WalkAhead::new(),
                opts,
            }),
        }
    }

    /// The switch to opens the kernel answers alone (see [`OpensSwitch`]).
    pub fn opens_switch(&self) -> OpensSwitch {
        self.cached_opens.clone()
    }

    /// Counters of this file system, readable while it is mounted.
    pub fn stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }

    /// Inodes it serves (the index's entries).
    pub fn inodes(&self) -> usize {
        self.index.len()
    }

    /// Give the file system its connection's state and a descriptor of the
    /// connection, before it serves (done by [`crate::FsMount`]). A table
    /// handed over by an earlier server also says what INIT negotiated.
    pub(crate) fn attach(&self, table: Arc<OpenTable>, device: OwnedFd) {
        if table.flags() & FLAG_INITIALIZED != 0 {
            self.passthrough
                .store(table.flags() & FLAG_PASSTHROUGH != 0, Ordering::Relaxed);
        }
        let _ = self.table.set(table);
        let _ = self.device.set(device);
    }
}

impl<S: ContentSource> Shared<S> {
    fn log_fallback(&self, why: &dyn std::fmt::Display) {
        if !self.fallback_logged.swap(true, Ordering::Relaxed) {
            tracing::debug!(reason = %why, "FUSE passthrough unavailable; reads go through the daemon");
        }
    }

    /// Ask the kernel at INIT for what this file system uses.
    fn negotiate(&self, config: &mut KernelConfig) {
        // Listings with attributes, every time (not "auto", where only a
        // listing's first request has them): a `find`/`ls -l` over the image
        // then costs two requests per directory instead of one per entry past
        // the first reply (a cold `find /usr` of python3: 261 LOOKUPs -> 43).
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        // Symlink targets never change: the kernel keeps them in its page
        // cache after the first READLINK (`tar c` reads every one).
        let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS);
        if let Some(n) = self.opts.max_readahead {
            let _ = config.set_max_readahead(n.max(4096));
        }
        if !self.opts.passthrough {
            return;
        }
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
            self.log_fallback(&format_args!("kernel lacks {missing:?}"));
            return;
        }
        // Backing files live on the host file system (depth 0), so depth 1
        // suffices, and it leaves room for the overlayfs the container root
        // stacks on this mount (kernel maximum 2). Depth 2 would let backing
        // files sit on an overlayfs but make that overlay mount fail.
        if let Err(max) = config.set_max_stack_depth(1) {
            self.log_fallback(&format_args!("kernel stack depth limit {max}"));
            return;
        }
        self.passthrough.store(true, Ordering::Relaxed);
    }

    fn idx(&self, ino: INodeNo) -> Option<u32> {
        let i = ino.0.checked_sub(1)?;
        (i < self.index.len() as u64).then_some(i as u32)
    }

    fn entry(&self, idx: u32) -> &IndexEntry {
        &self.index.entries[idx as usize]
    }

    fn attr(&self, idx: u32) -> FileAttr {
        let c = self.canonical[idx as usize];
        let e = self.entry(c);
        let mtime = if e.mtime_sec >= 0 {
            UNIX_EPOCH + Duration::new(e.mtime_sec as u64, e.mtime_nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(e.mtime_sec.unsigned_abs())
        };
        FileAttr {
            ino: ino_of(c),
            size: e.size,
            blocks: e.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: file_type(e.kind),
            perm: (e.mode & 0o7777) as u16,
            nlink: self.nlink[c as usize],
            uid: e.uid,
            gid: e.gid,
            rdev: fuse_rdev(e.rdev),
            blksize: 4096,
            flags: 0,
        }
    }

    fn record(&self, path: &[u8], access: Access) {
        if let Some(t) = &self.trace {
            t.record(path.to_vec(), access);
        }
    }

    /// Answer a LOOKUP of a name `dir` lacks with a negative entry (inode
    /// 0) and a TTL, so the kernel caches the miss: programs probe many
    /// absent paths (python's module search), and the image never changes
    /// under the mount.
    fn reply_missing(&self, dir: u32, reply: ReplyEntry) {
        let mut attr = self.attr(dir);
        attr.ino = INodeNo(0);
        reply.entry(&self.opts.ttl, &attr, Generation(0));
    }

    fn child_path(&self, parent: u32, name: &[u8]) -> Vec<u8> {
        let p = &self.entry(parent).path;
        if p.is_empty() {
            name.to_vec()
        } else {
            let mut v = p.clone();
            v.push(b'/');
            v.extend_from_slice(name);
            v
        }
    }
}

/// Serve one request with `serve`: a panic in it answers that request EIO
/// (its reply, dropped unanswered, says so) and leaves the worker thread
/// serving the rest; the locks it may have held tolerate poisoning.
fn isolate(request: &str, serve: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(serve)) {
        tracing::error!(
            request,
            panic = %panic_message(&*panic),
            "serving a FUSE request panicked; answered EIO"
        );
    }
}

impl<S: ContentSource> Filesystem for LazyFs<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.negotiate(config);
        // What a server taking this connection over must know.
        let mut flags = FLAG_INITIALIZED;
        if self.passthrough.load(Ordering::Relaxed) {
            flags |= FLAG_PASSTHROUGH;
        }
        if let Some(t) = self.table.get() {
            t.set_flags(flags);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        isolate("lookup", || {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            if let Some(view) = &self.opts.data_view {
                return self.lookup_data(view, parent, name.as_bytes(), reply);
            }
            let Some(p) = self.idx(parent) else {
                return reply.error(Errno::ENOENT);
            };
            match self.index.lookup_child(p, name.as_bytes()) {
                Some(c) => {
                    self.record(&self.entry(c).path, Access::Lookup);
                    reply.entry(&self.opts.ttl, &self.attr(c), Generation(0));
                }
                None => {
                    self.record(&self.child_path(p, name.as_bytes()), Access::Missing);
                    self.reply_missing(p, reply);
                }
            }
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        isolate("getattr", || {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            match self.idx(ino) {
                Some(i) => reply.attr(&self.opts.ttl, &self.attr(i)),
                None => match self.data_dir_attr(ino) {
                    Some(a) => reply.attr(&self.opts.ttl, &a),
                    None => reply.error(Errno::ENOENT),
                },
            }
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        isolate("readlink", || {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let Some(i) = self.idx(ino) else {
                return reply.error(Errno::ENOENT);
            };
            let e = self.entry(i);
            match &e.link_target {
                Some(t) => {
                    self.record(&e.path, Access::Readlink);
                    reply.data(t)
                }
                None => reply.error(Errno::EINVAL),
            }
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        isolate("open", || {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let Some(i) = self.idx(ino) else {
                return reply.error(Errno::ENOENT);
            };
            if flags.0 & libc_accmode() != rustix::fs::OFlags::RDONLY.bits() as i32 {
                return reply.error(Errno::EROFS);
            }
            let e = self.entry(i);
            if e.kind != FileKind::File {
                return reply.error(Errno::EINVAL);
            }
            if self.trace.is_none()
                && self.cached_opens.is_on()
                && !self.passthrough.load(Ordering::Relaxed)
            {
                // Opens the kernel answers alone (FUSE's "no open" mode, for
                // the connection's life): no OPEN, FLUSH or RELEASE comes
                // here any more, and reads find the page cache
                // (FOPEN_KEEP_CACHE is the kernel's default then). A warm
                // open cost a round trip (60-85 µs in a `tar c /usr`); now it
                // costs what a native one does. Reads come by inode with
                // handle 0 (see `read`), which checks the content before its
                // first byte. Not beside passthrough: the kernel fails (EIO,
                // without asking) a cached read of an inode that has a
                // passthrough file open, e.g. a library a running process
                // maps. Still refused above: writes and non-files.
                self.stats.kernel_opens.store(true, Ordering::Relaxed);
                return reply.error(Errno::ENOSYS);
            }
            self.record(&e.path, Access::Open);
            let passthrough = self.passthrough.load(Ordering::Relaxed);
            if let Some(c) = self.source.ranged(i, e, passthrough) {
                return self.register_ranged(ino.0, c, reply);
            }
            if let Some(r) = self.source.try_open(i, e) {
                return self.finish_open(ino.0, i, r, reply);
            }
            // The content is on its way: wait on the pool, not on one of the
            // few FUSE worker threads (with all of them waiting, even a stat
            // of a present file would stall). The wait is bounded by the
            // source.
            let shared = self.shared.clone();
            self.shared.wait_off_workers("open", i, move || {
                let r = shared.source.open(i, shared.entry(i));
                shared.finish_open(ino.0, i, r, reply);
            });
        })
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        isolate("read", || {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.stats.read_requests.fetch_add(1, Ordering::Relaxed);
            let Some(i) = self.idx(ino) else {
                return reply.error(Errno::EBADF);
            };
            if let Some(c) = self.content_open(i, fh.0) {
                return self.shared.read_content(i, c, offset, size, reply);
            }
            // A file the kernel opened alone (cached opens), or a handle the
            // server before this one gave out (the kernel kept it across the
            // takeover): open the content now, off the workers if it must wait.
            if let Some(r) = self.reopen(i, fh.0, false) {
                return match r {
                    Ok(c) => self.shared.read_reopened(i, c, offset, size, reply),
                    Err(err) => self.content_error(i, Some(offset), &err, |e| reply.error(e)),
                };
            }
            let shared = self.shared.clone();
            self.shared.wait_off_workers("read", i, move || {
                let waited = shared.reopen(i, fh.0, true);
                match waited.unwrap_or_else(|| Err(std::io::Error::other("no content"))) {
                    Ok(c) => shared.read_reopened(i, c, offset, size, reply),
                    Err(err) => shared.content_error(i, Some(offset), &err, |e| reply.error(e)),
                }
            });
        })
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        isolate("release", || {
            // By inode, not by handle: the handle may be an earlier server's.
            let table = self.table();
            let mut st = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            st.files.remove(&fh.0);
            let (opens, backing) = table.get(ino.0);
            if opens <= 1 {
                // The kernel has dropped this file's hold on the inode's I/O
                // mode before sending RELEASE, so the last release may
                // unregister the backing file.
                table.set(ino.0, 0, 0);
                if backing != 0 {
                    self.close_backing(backing);
                }
            } else {
                table.set(ino.0, opens - 1, backing);
            }
            drop(st);
            reply.ok();
        })
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        isolate("flush", || {
            // For files the kernel opened alone (cached opens) and handles
            // opened without FOPEN_NOFLUSH (by an older server). Read-only:
            // nothing to write back, so the kernel is told (ENOSYS) never
            // to send one again; every close would wait for it.
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            reply.error(Errno::ENOSYS);
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        isolate("opendir", || {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            if self.trace.is_none() {
                // Zero-message opendir (Linux 5.1): the kernel stops sending
                // OPENDIR and RELEASEDIR, and keeps every listing cached
                // (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR is its default then): a
                // walk over directories seen before costs no round trip. A trace
                // needs the opens, to record listings.
                return reply.error(Errno::ENOSYS);
            }
            match self.idx(ino) {
                Some(i) if self.entry(i).kind == FileKind::Dir => {
                    self.record(&self.entry(i).path, Access::Readdir);
                    reply.opened(
                        FileHandle(0),
                        FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                    )
                }
                Some(_) => reply.error(Errno::ENOTDIR),
                None => reply.error(Errno::ENOENT),
            }
        })
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        isolate("readdirplus", || {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let Some(i) = self.idx(ino) else {
                return reply.error(Errno::ENOENT);
            };
            let children = self.index.children(i);
            let total = children.len() as u64 + 2;
            let ttl = self.opts.ttl;
            for off in offset..total {
                let full = match off {
                    0 => reply.add(ino_of(i), 1, ".", &ttl, &self.attr(i), Generation(0)),
                    1 => {
                        let p = self.entry(i).parent;
                        reply.add(ino_of(p), 2, "..", &ttl, &self.attr(p), Generation(0))
                    }
                    n => {
                        let c = children[(n - 2) as usize];
                        reply.add(
                            ino_of(self.canonical[c as usize]),
                            n + 1,
                            OsStr::from_bytes(self.index.name(c)),
                            &ttl,
                            &self.attr(c),
                            Generation(0),
                        )
                    }
                };
                if full {
                    break;
                }
            }
            reply.ok();
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        isolate("readdir", || {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let Some(i) = self.idx(ino) else {
                return reply.error(Errno::ENOENT);
            };
            let children = self.index.children(i);
            let total = children.len() as u64 + 2;
            for off in offset..total {
                let full = match off {
                    0 => reply.add(ino_of(i), 1, FileType::Directory, "."),
                    1 => reply.add(ino_of(self.entry(i).parent), 2, FileType::Directory, ".."),
                    n => {
                        let c = children[(n - 2) as usize];
                        let e = self.entry(c);
                        reply.add(
                            ino_of(self.canonical[c as usize]),
                            n + 1,
                            file_type(e.kind),
                            OsStr::from_bytes(self.index.name(c)),
                        )
                    }
                };
                if full {
                    break;
                }
            }
            reply.ok();
        })
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        isolate("statfs", || {
            let used: u64 = self
                .index
                .entries
                .iter()
                .map(|e| e.size.div_ceil(4096))
                .sum();
            reply.statfs(used, 0, 0, self.index.len() as u64, 0, 4096, 255, 4096);
        })
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        isolate("getxattr", || {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            if self.no_xattrs {
                return reply.error(Errno::ENOSYS);
            }
            let Some(i) = self.idx(ino) else {
                return reply.error(Errno::ENOENT);
            };
            let e = self.entry(self.canonical[i as usize]);
            match e
                .xattrs
                .iter()
                .find(|(n, _)| n.as_slice() == name.as_bytes())
            {
                None => reply.error(Errno::ENODATA),
                Some((_, v)) if size == 0 => reply.size(v.len() as u32),
                Some((_, v)) if v.len() > size as usize => reply.error(Errno::ERANGE),
                Some((_, v)) => reply.data(v),
            }
        })
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        isolate("listxattr", || {
            let Some(i) = self.idx(ino) else {
                return reply.error(Errno::ENOENT);
            };
            let e = self.entry(self.canonical[i as usize]);
            let mut buf = Vec::new();
            for (n, _) in &e.xattrs {
                buf.extend_from_slice(n);
                buf.push(0);
            }
            if size == 0 {
                reply.size(buf.len() as u32)
            } else if buf.len() > size as usize {
                reply.error(Errno::ERANGE)
            } else {
                reply.data(&buf)
            }
        })
    }
}

fn libc_accmode() -> i32 {
    (rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::RDWR).bits()
        as i32
}
