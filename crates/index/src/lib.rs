//! The boot index: every path of an image's *merged* root file system, with
//! its metadata and the layer that holds its content.
//!
//! The lazy file system answers `stat`, `readdir`, `readlink`, `getxattr` and
//! "no such file" from this index alone, and on a miss fetches exactly the one
//! layer named by [`IndexEntry::layer`]. The index travels inside the boot
//! layer as one root-level file named [`INDEX_FILE_NAME`]; its byte format is
//! specified in `docs/index-format.md` and implemented in [`BootIndex::encode`]
//! and [`BootIndex::decode`]. [`build_index`] computes it from extracted,
//! overlayfs-style layer directories.
//!
//! # Invariants
//!
//! A [`BootIndex`] is only ever built by [`BootIndex::new`], [`BootIndex::decode`]
//! or [`build_index`], which all check the same rules (listed on
//! [`BootIndex::new`]) and build the lookup tables. The fields are public so
//! callers can read them and flip per-entry data such as
//! [`IndexEntry::in_boot`]; changing an entry's `path`, `parent`, `kind` or
//! `hardlink_group`, or adding or removing entries, leaves the lookup tables
//! stale: rebuild with `BootIndex::new(index.layers, index.entries)`.

mod build;
pub mod chunks;
mod digests;
mod format;

pub use build::build_index;
pub use digests::{DigestTable, ExternalDigests, DIGESTS_FILE_NAME, DIGESTS_MAGIC};

pub mod xattr;

/// Longest relative path an image may hold. Linux resolves at most
/// `PATH_MAX` (4096 bytes including the NUL) per call, so a longer path could
/// not be opened beneath a layer root in one `openat2` anyway.
pub const MAX_PATH_LEN: usize = 4095;

/// Name of the index file at the root of the boot layer. Standard runtimes
/// treat `.wh..wh.*` tar members as metadata and never materialise a
/// root-level *file* so named, so the image stays runnable without lazylayer.
pub const INDEX_FILE_NAME: &str = ".wh..wh.lazylayer.index.v1";

/// Manifest annotation naming the boot layer's digest: how `run` (and the
/// snapshotter) recognise an optimized image.
pub const ANNOTATION_BOOT_LAYER: &str = "dev.lazylayer.boot-layer";
/// Manifest annotations of a chunked boot layer (index format 4): the
/// compressed length of the index region at the blob's start, and its
/// digest, so a reader fetches it with one Range GET and checks it before
/// decompressing anything.
pub const ANNOTATION_INDEX_REGION_SIZE: &str = "dev.lazylayer.index-region.size";
pub const ANNOTATION_INDEX_REGION_DIGEST: &str = "dev.lazylayer.index-region.digest";
/// `artifactType` of a boot artifact (`optimize --attach`): a boot layer,
/// and the seek indexes of the image's layers, attached to an unchanged
/// image through the artifact's `subject`. The artifact manifest carries the
/// annotations above (boot layer, index region) as an optimized image's
/// manifest does; found through the referrers API or its tag schema.
pub const BOOT_ARTIFACT_TYPE: &str = "application/vnd.lazylayer.boot.v1";
/// Boot artifact: the boot layer descriptor's diff_id (an artifact has no
/// image config to list it in).
pub const ANNOTATION_BOOT_DIFF_ID: &str = "dev.lazylayer.boot-layer.diff-id";
/// Boot artifact: the boot layer's size, among the manifest's annotations,
/// which a referrers listing repeats: with the boot layer's digest and index
/// region it lets a start fetch the region while it fetches the artifact.
pub const ANNOTATION_BOOT_SIZE: &str = "dev.lazylayer.boot-layer.size";
/// Boot layer descriptor annotation naming the index file inside it.
pub const ANNOTATION_INDEX: &str = "dev.lazylayer.index";
/// Boot layer descriptor annotation giving the index format version.
pub const ANNOTATION_VERSION: &str = "dev.lazylayer.version";

/// The format version [`BootIndex::encode`] writes. [`BootIndex::decode`]
/// reads it and versions 1 (no per-file digests) and 2 (no link counts), so
/// images optimised by an older release keep working.
pub const FORMAT_VERSION: u32 = 3;
/// The version written when the index carries a chunked boot layer's
/// content table ([`BootIndex::boot`]); otherwise [`FORMAT_VERSION`].
pub const CHUNKED_FORMAT_VERSION: u32 = 4;
/// The version written when, besides, the files' digests are kept in a
/// file of their own ([`BootIndex::external`]).
pub const EXTERNAL_DIGESTS_FORMAT_VERSION: u32 = 5;

/// Longest file name (one path component) an index may hold: Linux's
/// `NAME_MAX`, so no extracted layer can hold a longer one.
pub const MAX_NAME_LEN: usize = 255;

/// Longest xattr name Linux stores (`XATTR_NAME_MAX`).
pub const MAX_XATTR_NAME_LEN: usize = 255;
/// Longest xattr value Linux stores (`XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE_LEN: usize = 65536;

/// Longest layer identifier (diff_id) accepted; real ones are ~71 bytes.
pub const MAX_LAYER_ID_LEN: usize = 1024;

/// xattrs overlayfs keeps for itself; they describe the layer stacking, not
/// the image, and the kernel hides them from the merged view too.
pub(crate) const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";

/// What kind of file system object an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

impl FileKind {
    /// The `S_IFMT` bits of this kind, to combine with [`IndexEntry::mode`]
    /// into a `st_mode`.
    pub fn type_bits(self) -> u32 {
        match self {
            FileKind::File => 0o100000,
            FileKind::Dir => 0o040000,
            FileKind::Symlink => 0o120000,
            FileKind::CharDev => 0o020000,
            FileKind::BlockDev => 0o060000,
            FileKind::Fifo => 0o010000,
            FileKind::Socket => 0o140000,
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            FileKind::File => 1,
            FileKind::Dir => 2,
            FileKind::Symlink => 3,
            FileKind::CharDev => 4,
            FileKind::BlockDev => 5,
            FileKind::Fifo => 6,
            FileKind::Socket => 7,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => FileKind::File,
            2 => FileKind::Dir,
            3 => FileKind::Symlink,
            4 => FileKind::CharDev,
            5 => FileKind::BlockDev,
            6 => FileKind::Fifo,
            7 => FileKind::Socket,
            _ => return None,
        })
    }
}

/// One path of the merged image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Relative to the image root, no leading '/', components joined by '/';
    /// the root itself is the empty path. Not necessarily UTF-8.
    pub path: Vec<u8>,
    /// Index of the parent directory's entry (the root's parent is itself, 0).
    pub parent: u32,
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky, no type bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files: bytes; symlinks: target length; anything else 0.
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Device number of a char/block device in Linux's userspace `dev_t`
    /// encoding (as `stat` returns it); 0 for anything else.
    pub rdev: u64,
    /// Symlinks only.
    pub link_target: Option<Vec<u8>>,
    /// Sorted by name, names unique; never `trusted.overlay.*`.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// 0 = not hard-linked; entries sharing a non-zero group are one inode.
    pub hardlink_group: u32,
    /// The link count `stat` reports, when it is not the number of members
    /// of the entry's hardlink group (1 outside a group); 0 otherwise. It is
    /// the count of the names the file has in the layer holding it, some of
    /// which an upper layer removed: overlayfs reports that layer's count,
    /// and so does lazylayer. Never on a directory; at least 2, and at least
    /// the group's size. Format version 3 (earlier versions: always 0).
    pub link_count: u16,
    /// Index into [`BootIndex::layers`] of the topmost layer holding this path.
    pub layer: u32,
    /// Whether the boot layer holds this path.
    pub in_boot: bool,
    /// SHA-256 of a regular file's content, so a file read from a layer that
    /// is still streaming (its blob digest not checked yet) can be verified
    /// on its own. Always None for anything but a regular file; None for a
    /// file the boot layer holds (its blob digest covers it), for every
    /// file of an index of format version 1, and for every file of an index
    /// that keeps its digests apart ([`BootIndex::external`], format 5).
    pub digest: Option<[u8; 32]>,
}

impl IndexEntry {
    /// An entry of `kind` at `path` (a child of the root), owned by root,
    /// mode 0755 for a directory and 0644 otherwise, of `size` bytes, in
    /// layer 0, with no target, xattrs, links or digest: a base to build
    /// entries from (tests, tools).
    pub fn plain(path: &[u8], kind: FileKind, size: u64) -> IndexEntry {
        IndexEntry {
            path: path.to_vec(),
            parent: 0,
            kind,
            mode: if kind == FileKind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            size,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 0,
            rdev: 0,
            link_target: None,
            xattrs: Vec::new(),
            hardlink_group: 0,
            link_count: 0,
            layer: 0,
            in_boot: false,
            digest: None,
        }
    }
}

/// The merged view of an image: its layers and every path, with lookup
/// tables built once (at [`BootIndex::new`] / [`BootIndex::decode`]) so that
/// the per-`lookup` calls of a FUSE file system are binary searches.
#[derive(Debug, Clone)]
pub struct BootIndex {
    /// diff_ids (`sha256:…`) of the image's layers, bottom first.
    pub layers: Vec<String>,
    /// `entries[0]` is the root directory; every directory precedes its children.
    pub entries: Vec<IndexEntry>,
    /// Where the boot files' bytes lie in a chunked boot layer (format 4);
    /// None for a boot layer read whole.
    pub boot: Option<chunks::BootContent>,
    /// Where the files' digests are when the entries do not carry them
    /// (format 5): a file of their own at the start of the boot content.
    /// Then no entry's `digest` is set.
    pub external: Option<ExternalDigests>,
    tables: Tables,
}

/// Derived entirely from `entries`, so equality ignores it.
impl PartialEq for BootIndex {
    fn eq(&self, other: &Self) -> bool {
        self.layers == other.layers
            && self.entries == other.entries
            && self.boot == other.boot
            && self.external == other.external
    }
}
impl Eq for BootIndex {}

/// Lookup tables in compressed-row form (a flat list plus start offsets), so
/// they are five allocations however many directories the index has.
#[derive(Debug, Clone, Default)]
struct Tables {
    /// Where each entry's last component starts in its path.
    name_start: Vec<u32>,
    /// `children(d)` = `child_list[child_start[d]..child_start[d + 1]]`.
    child_start: Vec<u32>,
    child_list: Vec<u32>,
    /// Members of group `g` (1-based) = `link_list[link_start[g - 1]..link_start[g]]`.
    link_start: Vec<u32>,
    link_list: Vec<u32>,
}

/// What can go wrong reading, validating or building a boot index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("not a lazylayer boot index (bad magic)")]
    BadMagic,

    #[error(
        "boot index format version {found} is not supported: this lazylayer reads \
         versions 1 to 5; the image was optimised by a different lazylayer release"
    )]
    UnsupportedVersion { found: u32 },

    #[error(
        "boot index sets unknown flags {flags:#x}: version 4 defines 0x1, version 5 0x1 and 0x2 (both required)"
    )]
    UnknownFlags { flags: u32 },

    #[error("boot index truncated: {expected} bytes expected, {actual} present")]
    Truncated { expected: u64, actual: u64 },

    #[error("boot index checksum mismatch: the index is corrupt")]
    ChecksumMismatch,

    /// The byte layout is wrong; `offset` is where in the index.
    #[error("boot index malformed at byte {offset}: {what}")]
    Malformed { offset: u64, what: String },

    /// An entry breaks a rule of [`BootIndex::new`].
    #[error("boot index entry {index} ({}): {what}", String::from_utf8_lossy(path))]
    InvalidEntry {
        index: u64,
        path: Vec<u8>,
        what: String,
    },

    /// The index as a whole breaks a rule (no layers, no root, ...).
    #[error("boot index invalid: {what}")]
    Invalid { what: String },

    #[error("build_index: no layers given")]
    NoLayers,

    /// A file-system operation on an extracted layer failed.
    #[error("layer {diff_id}: {}: {op}: {source}", path.display())]
    LayerIo {
        diff_id: String,
        path: std::path::PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("layer {diff_id}: {}: xattr {name}: {source}", path.display())]
    LayerXattr {
        diff_id: String,
        path: std::path::PathBuf,
        name: String,
        #[source]
        source: std::io::Error,
    },

    #[error("layer {diff_id}: {}: path longer than {limit} bytes", path.display())]
    PathTooLong {
        diff_id: String,
        path: std::path::PathBuf,
        limit: usize,
    },

    #[error("merged image has more than {limit} entries")]
    TooManyEntries { limit: u64 },
}

/// Most entries an index may hold: entry numbers are `u32`.
pub const MAX_ENTRIES: usize = u32::MAX as usize;

impl BootIndex {
    /// Check every rule of the format and build the lookup tables.
    ///
    /// Rules: at least one layer, each id 1..=[`MAX_LAYER_ID_LEN`] bytes;
    /// 1..=[`MAX_ENTRIES`] entries; entry 0 is a directory with the empty
    /// path and parent 0; every other entry's parent is an earlier directory
    /// and its path is the parent's path plus `/` plus one valid name
    /// (1..=[`MAX_NAME_LEN`] bytes, no `/` or NUL, not `.` or `..`), unique in
    /// that directory, paths at most [`MAX_PATH_LEN`] bytes; mode has only
    /// `0o7777` bits; `mtime_nsec` < 10⁹; `layer` names a layer; a symlink has
    /// a target (no NUL, at most [`MAX_PATH_LEN`] bytes) and `size` equal to
    /// its length, nothing else has a target; directories, devices, fifos and
    /// sockets have size 0; only devices have an `rdev`, and a char device is
    /// never 0:0 (that is a whiteout, which the merged view never shows);
    /// xattr names are valid, strictly sorted and never `trusted.overlay.*`;
    /// only regular files have a content `digest`;
    /// hardlink groups are numbered 1, 2, ... in order of their first member,
    /// have at least two members, all non-directories of one kind and layer;
    /// a `link_count` is 0, or at least 2 and the entry's group size, and
    /// never on a directory.
    pub fn new(layers: Vec<String>, entries: Vec<IndexEntry>) -> Result<Self, IndexError> {
        let tables = Tables::build(&layers, &entries)?;
        Ok(BootIndex {
            layers,
            entries,
            boot: None,
            external: None,
            tables,
        })
    }

    /// Number of entries (the root included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Never true for a valid index (the root is always there); present for
    /// the usual `len`/`is_empty` pair.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entry index of `path`, relative to the image root. Empty components
    /// are ignored, so `""`, `"/"`, `"a/b"` and `"/a//b/"` all work; `.` and
    /// `..` are not resolved (they are never names in an index).
    pub fn lookup(&self, path: &[u8]) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        let mut cur = 0u32;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            cur = self.lookup_child(cur, comp)?;
        }
        Some(cur)
    }

    /// Entry index of `name` inside directory `dir`: a binary search.
    pub fn lookup_child(&self, dir: u32, name: &[u8]) -> Option<u32> {
        let kids = self.children(dir);
        kids.binary_search_by(|&c| self.name(c).cmp(name))
            .ok()
            .map(|i| kids[i])
    }

    /// Children of `dir`, sorted by name (bytewise). Empty for a
    /// non-directory or an index out of range.
    pub fn children(&self, dir: u32) -> &[u32] {
        let t = &self.tables;
        let d = dir as usize;
        match (t.child_start.get(d), t.child_start.get(d + 1)) {
            (Some(&a), Some(&b)) => &t.child_list[a as usize..b as usize],
            _ => &[],
        }
    }

    /// Last path component of entry `idx` (empty for the root, and for an
    /// index out of range so that a stale inode number cannot panic a FUSE
    /// daemon).
    pub fn name(&self, idx: u32) -> &[u8] {
        match (
            self.entries.get(idx as usize),
            self.tables.name_start.get(idx as usize),
        ) {
            // `get`: entries are public, a caller may have edited a path.
            (Some(e), Some(&s)) => e.path.get(s as usize..).unwrap_or_default(),
            _ => &[],
        }
    }

    /// Entries of hardlink group `group`, in index order. Empty for group 0
    /// ("not hard-linked") and for unknown groups.
    pub fn hardlink_members(&self, group: u32) -> &[u32] {
        let t = &self.tables;
        if group == 0 {
            return &[];
        }
        let g = group as usize;
        match (t.link_start.get(g - 1), t.link_start.get(g)) {
            (Some(&a), Some(&b)) => &t.link_list[a as usize..b as usize],
            _ => &[],
        }
    }

    /// Number of hardlink groups (groups are numbered 1..=count).
    pub fn hardlink_group_count(&self) -> u32 {
        self.tables.link_start.len().saturating_sub(1) as u32
    }
}

impl Tables {
    fn build(layers: &[String], entries: &[IndexEntry]) -> Result<Self, IndexError> {
        let invalid = |what: String| IndexError::Invalid { what };
        if layers.is_empty() {
            return Err(invalid("no layers".into()));
        }
        for (i, id) in layers.iter().enumerate() {
            if id.is_empty() || id.len() > MAX_LAYER_ID_LEN {
                return Err(invalid(format!(
                    "layer {i}: id must be 1..={MAX_LAYER_ID_LEN} bytes"
                )));
            }
        }
        if entries.is_empty() {
            return Err(invalid("no root entry".into()));
        }
        if entries.len() > MAX_ENTRIES {
            return Err(invalid(format!("more than {MAX_ENTRIES} entries")));
        }
        let n = entries.len();
        let bad = |i: usize, what: &str| IndexError::InvalidEntry {
            index: i as u64,
            path: entries[i].path.clone(),
            what: what.to_owned(),
        };

        let root = &entries[0];
        if !root.path.is_empty() || root.parent != 0 || root.kind != FileKind::Dir {
            return Err(bad(
                0,
                "entry 0 must be the root directory (empty path, parent 0)",
            ));
        }

        let mut name_start = Vec::with_capacity(n);
        // child_start[p + 1] counts p's children first, then becomes offsets.
        let mut child_start = vec![0u32; n + 1];
        for (i, e) in entries.iter().enumerate() {
            check_fields(e, layers.len()).map_err(|what| bad(i, what))?;
            if i == 0 {
                name_start.push(0);
                continue;
            }
            let p = e.parent as usize;
            if p >= i {
                return Err(bad(i, "parent must precede its child"));
            }
            let parent = &entries[p];
            if parent.kind != FileKind::Dir {
                return Err(bad(i, "parent is not a directory"));
            }
            let start = if p == 0 { 0 } else { parent.path.len() + 1 };
            let extends = e.path.len() > start
                && e.path.starts_with(&parent.path)
                && (p == 0 || e.path[parent.path.len()] == b'/');
            if !extends {
                return Err(bad(i, "path is not the parent's path plus one name"));
            }
            check_name(&e.path[start..]).map_err(|what| bad(i, what))?;
            if e.path.len() > MAX_PATH_LEN {
                return Err(bad(i, "path too long"));
            }
            name_start.push(start as u32);
            child_start[p + 1] += 1;
        }
        for d in 0..n {
            child_start[d + 1] += child_start[d];
        }
        let mut child_list = vec![0u32; n - 1];
        let mut fill = child_start.clone();
        for (i, e) in entries.iter().enumerate().skip(1) {
            let slot = &mut fill[e.parent as usize];
            child_list[*slot as usize] = i as u32;
            *slot += 1;
        }
        let name = |i: u32| &entries[i as usize].path[name_start[i as usize] as usize..];
        for d in 0..n {
            let kids = &mut child_list[child_start[d] as usize..child_start[d + 1] as usize];
            // Usually already in order (the builder emits sorted children),
            // which the sort detects in linear time.
            kids.sort_unstable_by(|&a, &b| name(a).cmp(name(b)));
            if let Some(w) = kids.windows(2).find(|w| name(w[0]) == name(w[1])) {
                return Err(bad(w[1] as usize, "duplicate name in its directory"));
            }
        }

        let (link_start, link_list) = hardlink_tables(entries).map_err(|(i, what)| bad(i, what))?;
        Ok(Tables {
            name_start,
            child_start,
            child_list,
            link_start,
            link_list,
        })
    }
}

/// Start offsets and flat member list, as in [`Tables`].
type Csr = (Vec<u32>, Vec<u32>);

/// An entry number and the rule it breaks.
type EntryFault = (usize, &'static str);

fn hardlink_tables(entries: &[IndexEntry]) -> Result<Csr, EntryFault> {
    // first[g - 1] = first member of group g; count[g - 1] = its size.
    let mut first: Vec<u32> = Vec::new();
    let mut count: Vec<u32> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let g = e.hardlink_group as usize;
        if g == 0 {
            continue;
        }
        if e.kind == FileKind::Dir {
            return Err((i, "a directory cannot be hard-linked"));
        }
        if g == first.len() + 1 {
            first.push(i as u32);
            count.push(0);
        } else if g > first.len() {
            // Dense numbering in order of appearance keeps the encoding
            // canonical and lets readers index groups by number.
            return Err((
                i,
                "hardlink groups must be numbered 1, 2, ... in order of first member",
            ));
        }
        let head = &entries[first[g - 1] as usize];
        if head.kind != e.kind || head.layer != e.layer {
            return Err((i, "hardlink group members differ in kind or layer"));
        }
        count[g - 1] += 1;
    }
    if let Some(g) = count.iter().position(|&c| c < 2) {
        return Err((first[g] as usize, "hardlink group with a single member"));
    }
    for (i, e) in entries.iter().enumerate() {
        let members = match e.hardlink_group {
            0 => 1,
            g => count[g as usize - 1],
        };
        if e.link_count != 0 && (u32::from(e.link_count) < members.max(2)) {
            return Err((i, "link count below 2 or below its hardlink group's size"));
        }
    }
    let mut start = Vec::with_capacity(count.len() + 1);
    start.push(0u32);
    for c in &count {
        start.push(start[start.len() - 1] + c);
    }
    let mut list = vec![0u32; start[start.len() - 1] as usize];
    let mut fill = start.clone();
    for (i, e) in entries.iter().enumerate() {
        if e.hardlink_group != 0 {
            let slot = &mut fill[e.hardlink_group as usize - 1];
            list[*slot as usize] = i as u32;
            *slot += 1;
        }
    }
    Ok((start, list))
}

fn check_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err("name must be 1..=255 bytes");
    }
    if name == b"." || name == b".." || name.iter().any(|&b| b == b'/' || b == 0) {
        return Err("name is `.`, `..` or contains `/` or NUL");
    }
    Ok(())
}

fn check_fields(e: &IndexEntry, layer_count: usize) -> Result<(), &'static str> {
    if e.mode & !0o7777 != 0 {
        return Err("mode has bits outside 0o7777");
    }
    if e.mtime_nsec >= 1_000_000_000 {
        return Err("mtime_nsec out of range");
    }
    if e.layer as usize >= layer_count {
        return Err("layer out of range");
    }
    if e.link_count != 0 && e.kind == FileKind::Dir {
        return Err("a link count on a directory");
    }
    match (e.kind, &e.link_target) {
        (FileKind::Symlink, Some(t)) => {
            if t.len() > MAX_PATH_LEN || t.contains(&0) {
                return Err("symlink target too long or contains NUL");
            }
            if e.size != t.len() as u64 {
                return Err("symlink size differs from its target length");
            }
        }
        (FileKind::Symlink, None) => return Err("symlink without a target"),
        (_, Some(_)) => return Err("only symlinks have a target"),
        (FileKind::File, None) => {}
        (_, None) => {
            if e.size != 0 {
                return Err("only regular files and symlinks have a size");
            }
        }
    }
    if e.digest.is_some() && e.kind != FileKind::File {
        return Err("only regular files have a content digest");
    }
    match e.kind {
        FileKind::CharDev if e.rdev == 0 => return Err("char device 0:0 is a whiteout"),
        FileKind::CharDev | FileKind::BlockDev => {}
        _ if e.rdev != 0 => return Err("only devices have an rdev"),
        _ => {}
    }
    for (i, (name, value)) in e.xattrs.iter().enumerate() {
        if name.is_empty() || name.len() > MAX_XATTR_NAME_LEN || name.contains(&0) {
            return Err("xattr name must be 1..=255 bytes without NUL");
        }
        if name.starts_with(OVERLAY_XATTR_PREFIX) {
            return Err("trusted.overlay.* xattrs are not part of the image");
        }
        if value.len() > MAX_XATTR_VALUE_LEN {
            return Err("xattr value longer than 65536 bytes");
        }
        if i > 0 && e.xattrs[i - 1].0 >= *name {
            return Err("xattrs not strictly sorted by name");
        }
    }
    Ok(())
}

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
pub(crate) mod tests;
