//! The stub tree of [`crate::meta_tree`] as an EROFS image, made in memory
//! from the index and mounted from a file: what composefs does for a
//! composed root. The tmpfs tree costs a handful of system calls and a
//! kernel inode per entry before the container may start (python3's 7,572
//! entries: 52-86 ms on this 2-core node, the start's largest fixed cost
//! on a fast link); this image is a few milliseconds of CPU, one write to an
//! unnamed file and one mount, and the kernel instantiates an inode only when it
//! is looked up.
//!
//! Layout (Linux's `Documentation/filesystems/erofs.rst`, 4 KiB blocks): the
//! superblock at 1024; every inode *extended* (64 bytes, 32-bit owner,
//! mtime with nanoseconds), 32-byte aligned, from byte 1152 on, with its
//! xattrs inline; a regular file of some size is *chunk based* with one
//! null chunk (a hole of its size: a stub has no data), carrying overlayfs's
//! `metacopy` and `redirect`; a directory's entries and a symlink's target
//! follow their inode when they fit in its block (*flat inline*), else sit in
//! whole blocks after the inodes (*flat plain*). Nothing here is read from
//! outside the index, whose rules (`BootIndex::new`) already bound names,
//! paths and parents; what EROFS cannot say (an xattr outside the five
//! namespaces it indexes, a file beyond 8 TiB) is [`StubImageError::Unsupported`],
//! and the caller makes the tmpfs tree instead.

use lazylayer_index::{BootIndex, FileKind, IndexEntry};

use crate::meta_tree::{DataView, METACOPY, REDIRECT};

const BLOCK_BITS: u32 = 12;
const BLOCK: usize = 1 << BLOCK_BITS;
const SUPER_OFFSET: usize = 1024;
const SUPER_LEN: usize = 128;
const MAGIC: u32 = 0xE0F5_E1E2;
/// Chunk-based files (Linux 5.15).
const INCOMPAT_CHUNKED_FILE: u32 = 0x4;
const INODE_EXTENDED: u16 = 1;
const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_FLAT_INLINE: u16 = 4;
const LAYOUT_CHUNK_BASED: u16 = 8;
const INODE_LEN: usize = 64;
const XATTR_HEADER_LEN: usize = 12;
const DIRENT_LEN: usize = 12;
/// A chunk of 2^(12 + 31) bytes at most: one null block-map entry covers a
/// file up to 8 TiB.
const MAX_CHUNK_EXTRA_BITS: u32 = 31;
const NULL_ADDR: u32 = u32::MAX;

/// Why no image was made.
#[derive(Debug, thiserror::Error)]
pub enum StubImageError {
    /// The index holds something this writer does not encode; the tmpfs
    /// tree can hold it.
    #[error("not expressible as an EROFS stub image: {0}")]
    Unsupported(String),
}

/// What [`build`] made.
#[derive(Debug)]
pub struct StubImage {
    pub bytes: Vec<u8>,
    pub inodes: usize,
    /// Regular files whose data is elsewhere.
    pub stubs: usize,
}

/// The EROFS image of `index`'s stubs pointing into `view`.
pub fn build(index: &BootIndex, view: &DataView) -> Result<StubImage, StubImageError> {
    let n = index.len();
    // The entry holding each inode: a hard-link group's first member.
    let owner = |i: usize| -> usize {
        let e = &index.entries[i];
        if e.hardlink_group == 0 || e.kind == FileKind::Dir {
            return i;
        }
        index
            .hardlink_members(e.hardlink_group)
            .first()
            .map_or(i, |&f| f as usize)
    };
    // Per inode: its xattrs' body, its data (directory entries, a symlink's
    // target) and how it is laid out. Directory data needs the children's
    // nids, so the inodes are placed first and the entries written after.
    let mut plans: Vec<Option<Plan<'_>>> = (0..n).map(|_| None).collect();
    let mut stubs = 0;
    for (i, e) in index.entries.iter().enumerate() {
        if owner(i) != i {
            continue;
        }
        let mut xattrs: Vec<(&[u8], &[u8])> = Vec::with_capacity(e.xattrs.len() + 2);
        let redirect;
        if e.kind == FileKind::File && e.size > 0 {
            redirect = view.redirect(e).ok_or_else(|| {
                StubImageError::Unsupported(format!("no data layer for entry {i}"))
            })?;
            xattrs.push((METACOPY.as_bytes(), b""));
            xattrs.push((REDIRECT.as_bytes(), &redirect));
            stubs += 1;
        }
        xattrs.extend(e.xattrs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        let xattr_body = encode_xattrs(&xattrs)?;
        let dir = (e.kind == FileKind::Dir).then(|| DirLayout::new(index, i as u32));
        let data_len = match (&dir, e.kind) {
            (Some(d), _) => d.len(),
            (None, FileKind::Symlink) => e.link_target.as_deref().unwrap_or_default().len(),
            _ => 0,
        };
        let chunks = match e.kind {
            FileKind::File if e.size > 0 => Some(chunk_bits(e.size)?),
            _ => None,
        };
        plans[i] = Some(Plan {
            xattr_body,
            dir,
            data_len,
            chunks,
            offset: 0,
            inline: false,
            block: 0,
        });
    }
    // Place the inodes, then the data blocks of what does not fit inline.
    let mut at = SUPER_OFFSET + SUPER_LEN;
    for p in plans.iter_mut().flatten() {
        at = at.next_multiple_of(32);
        let head = INODE_LEN + p.xattr_body.len();
        // A chunk map's one entry is 4-byte aligned and cannot cross a
        // block; a directory's entries or a symlink's target follow the
        // inode only when they fit in its block (the kernel refuses inline
        // data across blocks), the inode moving to the next block if that
        // is what it takes, else they get blocks of their own.
        p.inline = p.chunks.is_some() || p.data_len == 0 || head + p.data_len <= BLOCK;
        let tail = if p.chunks.is_some() { 4 } else { p.data_len };
        if p.inline && p.chunks.is_none() && tail > 0 {
            let start = at + head;
            if start / BLOCK != (start + tail - 1) / BLOCK {
                at = at.next_multiple_of(BLOCK);
            }
        }
        p.offset = at;
        at += head + if p.inline { tail } else { 0 };
    }
    let mut next_block = at.div_ceil(BLOCK);
    for p in plans.iter_mut().flatten() {
        if !p.inline {
            p.block = next_block;
            next_block += p.data_len.div_ceil(BLOCK);
        }
    }
    let total = next_block * BLOCK;
    if next_block > u32::MAX as usize {
        return Err(StubImageError::Unsupported("image over 16 TiB".into()));
    }
    let nid = |i: usize| -> u64 {
        plans[owner(i)]
            .as_ref()
            .map_or(0, |p| (p.offset / 32) as u64)
    };
    let mut img = vec![0u8; total];
    let mut inodes = 0;
    for (i, (p, e)) in plans.iter().zip(&index.entries).enumerate() {
        let Some(p) = p.as_ref() else { continue };
        inodes += 1;
        let data: Vec<u8> = match (&p.dir, e.kind) {
            (Some(d), _) => d.write(index, i as u32, &nid),
            (None, FileKind::Symlink) => e.link_target.clone().unwrap_or_default(),
            _ => Vec::new(),
        };
        debug_assert_eq!(data.len(), p.data_len);
        let (layout, u, size) = match e.kind {
            FileKind::File if e.size > 0 => {
                let bits = p.chunks.unwrap_or(0);
                (LAYOUT_CHUNK_BASED, bits, e.size)
            }
            FileKind::Dir | FileKind::Symlink if p.inline => {
                (LAYOUT_FLAT_INLINE, 0, data.len() as u64)
            }
            FileKind::Dir | FileKind::Symlink => {
                (LAYOUT_FLAT_PLAIN, p.block as u32, data.len() as u64)
            }
            FileKind::CharDev | FileKind::BlockDev => (LAYOUT_FLAT_PLAIN, encode_dev(e.rdev), 0),
            _ => (LAYOUT_FLAT_PLAIN, 0, 0),
        };
        let nlink = match e.kind {
            FileKind::Dir => {
                2 + index
                    .children(i as u32)
                    .iter()
                    .filter(|&&c| index.entries[c as usize].kind == FileKind::Dir)
                    .count() as u32
            }
            _ if e.link_count > 0 => e.link_count.into(),
            _ if e.hardlink_group != 0 => {
                (index.hardlink_members(e.hardlink_group).len() as u32).max(1)
            }
            _ => 1,
        };
        let o = p.offset;
        let ino = &mut img[o..o + INODE_LEN];
        put16(ino, 0, INODE_EXTENDED | layout);
        let icount = if p.xattr_body.is_empty() {
            0
        } else {
            (p.xattr_body.len() - XATTR_HEADER_LEN) / 4 + 1
        };
        put16(ino, 2, icount as u16);
        put16(ino, 4, (e.kind.type_bits() | (e.mode & 0o7777)) as u16);
        put64(ino, 8, size);
        put32(ino, 16, u);
        put32(ino, 20, i as u32 + 1);
        put32(ino, 24, e.uid);
        put32(ino, 28, e.gid);
        put64(ino, 32, e.mtime_sec as u64);
        put32(ino, 40, e.mtime_nsec);
        put32(ino, 44, nlink);
        let x = o + INODE_LEN;
        img[x..x + p.xattr_body.len()].copy_from_slice(&p.xattr_body);
        let after = x + p.xattr_body.len();
        if p.chunks.is_some() {
            img[after..after + 4].copy_from_slice(&NULL_ADDR.to_le_bytes());
        } else if p.inline {
            img[after..after + data.len()].copy_from_slice(&data);
        } else {
            let b = p.block * BLOCK;
            img[b..b + data.len()].copy_from_slice(&data);
        }
    }
    let root = nid(0);
    let sb = &mut img[SUPER_OFFSET..SUPER_OFFSET + SUPER_LEN];
    put32(sb, 0, MAGIC);
    sb[12] = BLOCK_BITS as u8;
    put16(
        sb,
        14,
        u16::try_from(root).map_err(|_| StubImageError::Unsupported("root nid".into()))?,
    );
    put64(sb, 16, inodes as u64);
    put32(sb, 36, next_block as u32);
    sb[64..73].copy_from_slice(b"lazylayer");
    put32(sb, 80, INCOMPAT_CHUNKED_FILE);
    Ok(StubImage {
        bytes: img,
        inodes,
        stubs,
    })
}

struct Plan<'a> {
    xattr_body: Vec<u8>,
    /// A directory's entries, sorted and packed into blocks.
    dir: Option<DirLayout<'a>>,
    data_len: usize,
    /// A regular file's chunk format (its chunk bits past the block's).
    chunks: Option<u32>,
    offset: usize,
    inline: bool,
    block: usize,
}

/// The chunk format that covers `size` bytes with one chunk.
fn chunk_bits(size: u64) -> Result<u32, StubImageError> {
    let bits = 64 - (size - 1).leading_zeros();
    let extra = bits.saturating_sub(BLOCK_BITS);
    if extra > MAX_CHUNK_EXTRA_BITS {
        return Err(StubImageError::Unsupported(format!(
            "a file of {size} bytes"
        )));
    }
    Ok(extra)
}

/// The namespaces EROFS indexes, longest first where one extends another.
const PREFIXES: [(&[u8], u8); 5] = [
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"user.", 1),
    (b"trusted.", 4),
    (b"security.", 6),
];

/// An inode's inline xattr body: the 12-byte header, then each entry (name
/// index, the name past its prefix, the value) padded to 4 bytes. Empty
/// when there are none.
fn encode_xattrs(xattrs: &[(&[u8], &[u8])]) -> Result<Vec<u8>, StubImageError> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut body = vec![0u8; XATTR_HEADER_LEN];
    for (name, value) in xattrs {
        let (prefix, index) = PREFIXES
            .iter()
            .find(|(p, _)| name.starts_with(p) && (p.ends_with(b".") || name.len() == p.len()))
            .ok_or_else(|| {
                StubImageError::Unsupported(format!("xattr {:?}", String::from_utf8_lossy(name)))
            })?;
        let suffix = &name[prefix.len()..];
        let (Ok(name_len), Ok(value_len)) =
            (u8::try_from(suffix.len()), u16::try_from(value.len()))
        else {
            return Err(StubImageError::Unsupported("an xattr too long".into()));
        };
        body.push(name_len);
        body.push(*index);
        body.extend_from_slice(&value_len.to_le_bytes());
        body.extend_from_slice(suffix);
        body.extend_from_slice(value);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    if (body.len() - XATTR_HEADER_LEN) / 4 + 1 > u16::MAX as usize {
        return Err(StubImageError::Unsupported("xattrs too large".into()));
    }
    Ok(body)
}

/// A directory's entries with `.` and `..`, sorted by name (bytewise), as
/// EROFS looks them up (a binary search over blocks, then within one).
fn sorted_dirents(index: &BootIndex, dir: u32) -> Vec<(&[u8], Option<u32>)> {
    // None: `.` or `..` (their nids are the caller's).
    let mut all: Vec<(&[u8], Option<u32>)> = vec![(b".", None), (b"..", None)];
    all.extend(
        index
            .children(dir)
            .iter()
            .map(|&c| (index.name(c), Some(c))),
    );
    all.sort_by(|a, b| a.0.cmp(b.0));
    all
}

/// Directory blocks: each block a run of 12-byte entries, then their names;
/// an entry never crosses a block. Returns each block's entries.
fn pack(ents: &[(&[u8], Option<u32>)]) -> Vec<std::ops::Range<usize>> {
    let mut blocks = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (k, (name, _)) in ents.iter().enumerate() {
        let need = DIRENT_LEN + name.len();
        if used + need > BLOCK {
            blocks.push(start..k);
            start = k;
            used = 0;
        }
        used += need;
    }
    blocks.push(start..ents.len());
    blocks
}

/// A directory's entries (with `.` and `..`) sorted, and the entries
/// each of its blocks holds: made once, to size the directory before the
/// inodes are placed and to write it after.
struct DirLayout<'a> {
    ents: Vec<(&'a [u8], Option<u32>)>,
    blocks: Vec<std::ops::Range<usize>>,
}

impl<'a> DirLayout<'a> {
    fn new(index: &'a BootIndex, dir: u32) -> DirLayout<'a> {
        let ents = sorted_dirents(index, dir);
        let blocks = pack(&ents);
        DirLayout { ents, blocks }
    }

    /// Whole blocks, then the last one's entries and names.
    fn len(&self) -> usize {
        let last = self.blocks.last().cloned().unwrap_or_default();
        let tail: usize = self.ents[last]
            .iter()
            .map(|(n, _)| DIRENT_LEN + n.len())
            .sum();
        (self.blocks.len() - 1) * BLOCK + tail
    }

    /// The directory's data, `nid` giving each entry's inode.
    fn write(&self, index: &BootIndex, dir: u32, nid: &dyn Fn(usize) -> u64) -> Vec<u8> {
        let parent = index.entries[dir as usize].parent;
        let mut out = Vec::with_capacity(self.blocks.len() * BLOCK);
        for (b, range) in self.blocks.iter().enumerate() {
            out.resize(b * BLOCK, 0);
            let mut nameoff = DIRENT_LEN * range.len();
            let mut names = Vec::new();
            for (name, child) in &self.ents[range.clone()] {
                let (id, ft) = match child {
                    Some(c) => (nid(*c as usize), file_type(&index.entries[*c as usize])),
                    None if *name == b"." => (nid(dir as usize), 2),
                    None => (nid(parent as usize), 2),
                };
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&(nameoff as u16).to_le_bytes());
                out.push(ft);
                out.push(0);
                nameoff += name.len();
                names.extend_from_slice(name);
            }
            out.extend_from_slice(&names);
        }
        out
    }
}

fn file_type(e: &IndexEntry) -> u8 {
    match e.kind {
        FileKind::File => 1,
        FileKind::Dir => 2,
        FileKind::CharDev => 3,
        FileKind::BlockDev => 4,
        FileKind::Fifo => 5,
        FileKind::Socket => 6,
        FileKind::Symlink => 7,
    }
}

/// Linux's `new_encode_dev` of a userspace `dev_t`.
fn encode_dev(rdev: u64) -> u32 {
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Mount `image` read-only at `at`, nosuid and nodev. The bytes go to an
/// unnamed file (`O_TMPFILE`, mode 0600) in `scratch`, a directory on a
/// disk file system (Linux 6.12's file-backed EROFS reads through the
/// file's page cache; tmpfs has no such path), which the mount opens
/// through `/proc/self/fd` and keeps: no name is ever on disk, not even
/// after a `kill -9`, and its blocks are freed with the mount.
pub fn mount(image: &[u8], at: &std::path::Path, scratch: &std::path::Path) -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    use rustix::mount::MountFlags;
    let fd = rustix::fs::open(
        scratch,
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, image)?;
    let source = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    rustix::mount::mount(
        source.as_str(),
        at,
        "erofs",
        MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        c"",
    )
    .map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_null_chunk_covers_a_file_up_to_8_tib() {
        assert_eq!(chunk_bits(1).unwrap(), 0);
        assert_eq!(chunk_bits(4096).unwrap(), 0);
        assert_eq!(chunk_bits(4097).unwrap(), 1);
        assert_eq!(chunk_bits(1 << 43).unwrap(), 31);
        assert!(matches!(
            chunk_bits((1 << 43) + 1),
            Err(StubImageError::Unsupported(_))
        ));
    }

    #[test]
    fn xattrs_are_indexed_by_namespace_and_padded() {
        let body = encode_xattrs(&[
            (b"user.a", b"xyz"),
            (b"system.posix_acl_access", b"\x02\0\0\0"),
            (b"security.capability", b""),
        ])
        .unwrap();
        let mut want = vec![0u8; XATTR_HEADER_LEN];
        want.extend_from_slice(&[1, 1, 3, 0, b'a', b'x', b'y', b'z']);
        want.extend_from_slice(&[0, 2, 4, 0, 2, 0, 0, 0]);
        want.extend_from_slice(&[10, 6, 0, 0]);
        want.extend_from_slice(b"capability");
        want.extend_from_slice(&[0, 0]);
        assert_eq!(body, want);
        assert!(encode_xattrs(&[]).unwrap().is_empty());
        // A name EROFS has no namespace for, and one that only looks like
        // an ACL's, are left to the tmpfs tree.
        for name in [
            &b"system.nfs4_acl"[..],
            b"system.posix_acl_accessX",
            b"lustre.x",
        ] {
            assert!(
                matches!(
                    encode_xattrs(&[(name, b"v")]),
                    Err(StubImageError::Unsupported(_))
                ),
                "{name:?} encoded"
            );
        }
    }

    #[test]
    fn device_numbers_are_encoded_as_the_kernel_decodes_them() {
        // new_encode_dev: minor's low byte, major, then the minor's rest.
        assert_eq!(encode_dev(rustix::fs::makedev(1, 3)), 0x103);
        assert_eq!(encode_dev(rustix::fs::makedev(259, 300)), 0x0011_032c);
    }

    #[test]
    fn directory_entries_never_cross_a_block() {
        let names: Vec<Vec<u8>> = (0..400)
            .map(|k| vec![b'a' + (k % 26) as u8; 1 + k % 200])
            .collect();
        let ents: Vec<(&[u8], Option<u32>)> =
            names.iter().map(|n| (n.as_slice(), Some(0))).collect();
        let blocks = pack(&ents);
        assert!(blocks.len() > 1);
        let mut next = 0;
        for b in &blocks {
            assert_eq!(b.start, next, "entries in order, none left out");
            next = b.end;
            let used: usize = ents[b.clone()]
                .iter()
                .map(|(n, _)| DIRENT_LEN + n.len())
                .sum();
            assert!(used <= BLOCK, "a block of {used} bytes");
        }
        assert_eq!(next, ents.len());
    }
}
