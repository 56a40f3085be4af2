//! The byte format of the boot index, version 2 (`docs/index-format.md`).
//!
//! Layout: header, layer table, fixed-size entry records, name table, data
//! blob (file digests, symlink targets and xattrs), SHA-256 of everything
//! before it. Version 1 is the same layout without file digests; the
//! decoder reads both, the encoder writes version 2.
//! All integers little-endian. The decoder accepts only the layout the
//! encoder writes (sections contiguous and in order, blob data in entry
//! order), so every count is bounded by the input length before anything is
//! allocated and one index has one encoding.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::{BootIndex, FileKind, IndexEntry, IndexError, FORMAT_VERSION, MAX_NAME_LEN};
use crate::chunks::{BootContent, Chunk, ChunkCompression};
use crate::{
    ExternalDigests, CHUNKED_FORMAT_VERSION, EXTERNAL_DIGESTS_FORMAT_VERSION, MAX_PATH_LEN,
};

pub(crate) const MAGIC: [u8; 8] = *b"LLIDX\0\0\0";
pub(crate) const HEADER_LEN: usize = 88;
pub(crate) const RECORD_LEN: usize = 80;
pub(crate) const CHECKSUM_LEN: usize = 32;

/// Header field offsets.
pub(crate) mod hdr {
    pub const VERSION: usize = 8;
    pub const FLAGS: usize = 12;
    pub const LAYER_COUNT: usize = 16;
    pub const ENTRY_COUNT: usize = 20;
    pub const LAYERS_OFF: usize = 24;
    pub const LAYERS_LEN: usize = 32;
    pub const ENTRIES_OFF: usize = 40;
    pub const NAMES_OFF: usize = 48;
    pub const NAMES_LEN: usize = 56;
    pub const BLOB_OFF: usize = 64;
    pub const BLOB_LEN: usize = 72;
    pub const TOTAL_LEN: usize = 80;
}

/// Entry record field offsets.
pub(crate) mod rec {
    pub const PARENT: usize = 0;
    pub const NAME_OFF: usize = 4;
    pub const NAME_LEN: usize = 8;
    pub const KIND: usize = 12;
    pub const FLAGS: usize = 13;
    /// Version 3's link count; reserved (zero) in versions 1 and 2.
    pub const LINK_COUNT: usize = 14;
    pub const MODE: usize = 16;
    pub const UID: usize = 20;
    pub const GID: usize = 24;
    pub const MTIME_NSEC: usize = 28;
    pub const SIZE: usize = 32;
    pub const MTIME_SEC: usize = 40;
    pub const RDEV: usize = 48;
    pub const LAYER: usize = 56;
    pub const HARDLINK_GROUP: usize = 60;
    pub const DATA_OFF: usize = 64;
    pub const LINK_LEN: usize = 72;
    pub const XATTR_COUNT: usize = 76;
}

/// Entry flag: the boot layer holds this path.
const FLAG_IN_BOOT: u8 = 1;
/// Entry flag (version 2): the entry's blob data starts with the SHA-256 of
/// the file's content. Regular files only.
const FLAG_DIGEST: u8 = 2;
/// Length of a file digest in the blob.
const DIGEST_LEN: usize = 32;

/// Version 2's layout without [`FLAG_DIGEST`]. Still read, so images
/// optimised by an older release keep working.
const VERSION_1: u32 = 1;
/// Version 3's layout with the link count field reserved (zero).
const VERSION_2: u32 = 2;
/// Header flag (version 4): a boot content section (chunk table, boot file
/// offsets, start list) follows the blob.
const HDR_FLAG_BOOT_CONTENT: u32 = 1;
/// Header flag (version 5, with [`HDR_FLAG_BOOT_CONTENT`]): the entries
/// flagged [`FLAG_DIGEST`] carry no digest in the blob; a digests section
/// (where the digests file lies, and its SHA-256) follows the blob.
const HDR_FLAG_EXTERNAL_DIGESTS: u32 = 2;
/// The digests section: the content bytes the digests file's entries take,
/// and the file's SHA-256.
const DIGESTS_SECTION_LEN: usize = 40;
/// Fixed part of the boot content section.
const BOOT_HEADER_LEN: usize = 32;
const CHUNK_RECORD_LEN: usize = 36;
const FILE_RECORD_LEN: usize = 12;

impl BootIndex {
    /// Serialise the index. Deterministic: the same index always gives the
    /// same bytes. Trusts the invariants [`BootIndex::new`] checked; an index
    /// whose entries were edited into an invalid state encodes into bytes
    /// that [`BootIndex::decode`] refuses.
    pub fn encode(&self) -> Vec<u8> {
        let mut layers = Vec::new();
        for id in &self.layers {
            put_u32(&mut layers, id.len() as u32);
            layers.extend_from_slice(id.as_bytes());
        }

        // Names are stored once each (many images repeat `__init__.py`,
        // `Makefile`, ...), in order of first use so the bytes are stable.
        let mut names = Vec::new();
        let mut name_at: HashMap<&[u8], u32> = HashMap::new();
        let mut records = Vec::with_capacity(self.entries.len() * RECORD_LEN);
        let mut blob = Vec::new();
        let external = self.external.as_ref();
        for (i, e) in self.entries.iter().enumerate() {
            let name = last_component(&e.path);
            let name_off = *name_at.entry(name).or_insert_with(|| {
                let off = names.len() as u32;
                names.extend_from_slice(name);
                off
            });
            let data_off = blob.len() as u64;
            if let Some(d) = &e.digest {
                blob.extend_from_slice(d);
            }
            let link: &[u8] = e.link_target.as_deref().unwrap_or_default();
            blob.extend_from_slice(link);
            for (n, v) in &e.xattrs {
                put_u32(&mut blob, n.len() as u32);
                put_u32(&mut blob, v.len() as u32);
                blob.extend_from_slice(n);
                blob.extend_from_slice(v);
            }

            let mut r = [0u8; RECORD_LEN];
            set_u32(&mut r, rec::PARENT, e.parent);
            set_u32(&mut r, rec::NAME_OFF, name_off);
            set_u32(&mut r, rec::NAME_LEN, name.len() as u32);
            r[rec::KIND] = e.kind.code();
            let mut flags = 0;
            if e.in_boot {
                flags |= FLAG_IN_BOOT;
            }
            if e.digest.is_some() || external.is_some_and(|x| x.holds(i as u32)) {
                flags |= FLAG_DIGEST;
            }
            r[rec::FLAGS] = flags;
            set_u32(&mut r, rec::MODE, e.mode);
            set_u32(&mut r, rec::UID, e.uid);
            set_u32(&mut r, rec::GID, e.gid);
            set_u32(&mut r, rec::MTIME_NSEC, e.mtime_nsec);
            set_u64(&mut r, rec::SIZE, e.size);
            set_u64(&mut r, rec::MTIME_SEC, e.mtime_sec as u64);
            set_u64(&mut r, rec::RDEV, e.rdev);
            set_u32(&mut r, rec::LAYER, e.layer);
            set_u32(&mut r, rec::HARDLINK_GROUP, e.hardlink_group);
            set_u16(&mut r, rec::LINK_COUNT, e.link_count);
            set_u64(&mut r, rec::DATA_OFF, data_off);
            set_u32(&mut r, rec::LINK_LEN, link.len() as u32);
            set_u32(&mut r, rec::XATTR_COUNT, e.xattrs.len() as u32);
            records.extend_from_slice(&r);
        }

        let layers_off = HEADER_LEN as u64;
        let entries_off = layers_off + layers.len() as u64;
        let names_off = entries_off + records.len() as u64;
        let blob_off = names_off + names.len() as u64;
        // After the blob: the digests section (version 5), then the boot
        // content section (versions 4 and 5).
        let mut sections = Vec::new();
        if let Some(x) = external {
            sections.extend_from_slice(&x.tar_len.to_le_bytes());
            sections.extend_from_slice(&x.sha256);
        }
        sections.extend_from_slice(&self.boot.as_ref().map(encode_boot).unwrap_or_default());
        let total = blob_off + blob.len() as u64 + sections.len() as u64 + CHECKSUM_LEN as u64;
        // The lowest version that holds the index, so indexes without boot
        // content (or with digests inline) stay readable by older releases.
        let (version, hflags) = match (&self.boot, external) {
            (Some(_), Some(_)) => (
                EXTERNAL_DIGESTS_FORMAT_VERSION,
                HDR_FLAG_BOOT_CONTENT | HDR_FLAG_EXTERNAL_DIGESTS,
            ),
            (Some(_), None) => (CHUNKED_FORMAT_VERSION, HDR_FLAG_BOOT_CONTENT),
            _ => (FORMAT_VERSION, 0),
        };

        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&MAGIC);
        set_u32(&mut h, hdr::VERSION, version);
        set_u32(&mut h, hdr::FLAGS, hflags);
        set_u32(&mut h, hdr::LAYER_COUNT, self.layers.len() as u32);
        set_u32(&mut h, hdr::ENTRY_COUNT, self.entries.len() as u32);
        set_u64(&mut h, hdr::LAYERS_OFF, layers_off);
        set_u64(&mut h, hdr::LAYERS_LEN, layers.len() as u64);
        set_u64(&mut h, hdr::ENTRIES_OFF, entries_off);
        set_u64(&mut h, hdr::NAMES_OFF, names_off);
        set_u64(&mut h, hdr::NAMES_LEN, names.len() as u64);
        set_u64(&mut h, hdr::BLOB_OFF, blob_off);
        set_u64(&mut h, hdr::BLOB_LEN, blob.len() as u64);
        set_u64(&mut h, hdr::TOTAL_LEN, total);

        let mut out = Vec::with_capacity(total as usize);
        out.extend_from_slice(&h);
        out.extend_from_slice(&layers);
        out.extend_from_slice(&records);
        out.extend_from_slice(&names);
        out.extend_from_slice(&blob);
        out.extend_from_slice(&sections);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Parse and validate an index. A corrupt, truncated, hostile or
    /// future-version index is an error, never a panic; memory allocated is
    /// bounded by a small multiple of `bytes.len()` (reconstructed paths are
    /// capped at `MAX_PATH_LEN` each).
    pub fn decode(bytes: &[u8]) -> Result<BootIndex, IndexError> {
        let len = bytes.len() as u64;
        let truncated = |expected: u64| IndexError::Truncated {
            expected,
            actual: len,
        };
        // Magic and version sit at fixed offsets in every version, and are
        // checked before anything else so that a future index gets a
        // "version not supported" error, not a checksum or layout one.
        if bytes.len() < MAGIC.len() {
            return Err(if MAGIC.starts_with(bytes) {
                truncated((HEADER_LEN + CHECKSUM_LEN) as u64)
            } else {
                IndexError::BadMagic
            });
        }
        if bytes[..MAGIC.len()] != MAGIC {
            return Err(IndexError::BadMagic);
        }
        if bytes.len() < hdr::VERSION + 4 {
            return Err(truncated((HEADER_LEN + CHECKSUM_LEN) as u64));
        }
        let version = get_u32(bytes, hdr::VERSION);
        if ![
            VERSION_1,
            VERSION_2,
            FORMAT_VERSION,
            CHUNKED_FORMAT_VERSION,
            EXTERNAL_DIGESTS_FORMAT_VERSION,
        ]
        .contains(&version)
        {
            return Err(IndexError::UnsupportedVersion { found: version });
        }
        if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(truncated((HEADER_LEN + CHECKSUM_LEN) as u64));
        }
        let total = get_u64(bytes, hdr::TOTAL_LEN);
        if total > len {
            return Err(truncated(total));
        }
        if total < len {
            return Err(malformed(
                hdr::TOTAL_LEN,
                format!("total length {total} but {len} bytes present"),
            ));
        }
        let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if Sha256::digest(body).as_slice() != sum {
            return Err(IndexError::ChecksumMismatch);
        }
        let flags = get_u32(bytes, hdr::FLAGS);
        let known = match version {
            CHUNKED_FORMAT_VERSION => HDR_FLAG_BOOT_CONTENT,
            EXTERNAL_DIGESTS_FORMAT_VERSION => HDR_FLAG_BOOT_CONTENT | HDR_FLAG_EXTERNAL_DIGESTS,
            _ => 0,
        };
        // Version 5 is version 4 with the digests apart: both flags, always
        // (one index, one encoding).
        let required = if version == EXTERNAL_DIGESTS_FORMAT_VERSION {
            known
        } else {
            0
        };
        if flags & !known != 0 || flags & required != required {
            return Err(IndexError::UnknownFlags { flags });
        }
        let has_boot = flags & HDR_FLAG_BOOT_CONTENT != 0;
        let apart = flags & HDR_FLAG_EXTERNAL_DIGESTS != 0;

        let s = Sections::read(body, has_boot, apart)?;
        let layers = decode_layers(body, &s)?;
        let (entries, flagged) = decode_entries(body, &s, version, apart)?;
        let mut index = BootIndex::new(layers, entries)?;
        if has_boot {
            let b = decode_boot(body, s.boot)?;
            b.validate(&index)?;
            index.boot = Some(b);
        }
        if apart {
            index.external = Some(decode_digests_section(body, &s, flagged, &index)?);
        }
        Ok(index)
    }
}

/// Section bounds, checked against the body length.
struct Sections {
    layer_count: usize,
    entry_count: usize,
    layers: (usize, usize),
    entries: (usize, usize),
    names: (usize, usize),
    blob: (usize, usize),
    /// The boot content section (version 4), empty when absent.
    boot: (usize, usize),
    /// The digests section (version 5), empty when absent.
    digests: (usize, usize),
}

impl Sections {
    fn read(body: &[u8], has_boot: bool, apart: bool) -> Result<Self, IndexError> {
        let layer_count = get_u32(body, hdr::LAYER_COUNT) as u64;
        let entry_count = get_u32(body, hdr::ENTRY_COUNT) as u64;
        let layers_off = get_u64(body, hdr::LAYERS_OFF);
        let layers_len = get_u64(body, hdr::LAYERS_LEN);
        let entries_off = get_u64(body, hdr::ENTRIES_OFF);
        let names_off = get_u64(body, hdr::NAMES_OFF);
        let names_len = get_u64(body, hdr::NAMES_LEN);
        let blob_off = get_u64(body, hdr::BLOB_OFF);
        let blob_len = get_u64(body, hdr::BLOB_LEN);
        // entry_count < 2^32, so this cannot overflow a u64.
        let entries_len = entry_count * RECORD_LEN as u64;
        let apart_len = if apart { DIGESTS_SECTION_LEN } else { 0 };

        let expect = |field: usize, found: u64, want: Option<u64>| match want {
            Some(w) if w == found => Ok(()),
            _ => Err(malformed(
                field,
                format!("section offset {found} does not follow the previous section"),
            )),
        };
        expect(hdr::LAYERS_OFF, layers_off, Some(HEADER_LEN as u64))?;
        expect(
            hdr::ENTRIES_OFF,
            entries_off,
            layers_off.checked_add(layers_len),
        )?;
        expect(
            hdr::NAMES_OFF,
            names_off,
            entries_off.checked_add(entries_len),
        )?;
        expect(hdr::BLOB_OFF, blob_off, names_off.checked_add(names_len))?;
        match blob_off.checked_add(blob_len) {
            Some(end) if end == body.len() as u64 && !has_boot => {}
            // Checked: a hostile blob length can put `end` next to u64::MAX
            // (issue #19), and a wrapped sum would pass this test.
            Some(end)
                if has_boot
                    && end
                        .checked_add((BOOT_HEADER_LEN + apart_len) as u64)
                        .is_some_and(|boot_end| boot_end <= body.len() as u64) => {}
            _ => {
                // Also what a count claiming more entries than there are
                // bytes ends up as: the sections no longer fit the input.
                return Err(malformed(
                    hdr::BLOB_LEN,
                    format!(
                        "sections ({entry_count} entries, {layers_len}+{names_len}+{blob_len} bytes) \
                         do not fit the {} bytes present",
                        body.len()
                    ),
                ));
            }
        }
        // Each layer needs at least its 4-byte length.
        if layer_count > layers_len / 4 {
            return Err(malformed(
                hdr::LAYER_COUNT,
                format!("{layer_count} layers cannot fit in {layers_len} bytes"),
            ));
        }
        // All offsets are now within `body`, so they fit a usize.
        let range = |off: u64, len: u64| (off as usize, (off + len) as usize);
        Ok(Sections {
            layer_count: layer_count as usize,
            entry_count: entry_count as usize,
            layers: range(layers_off, layers_len),
            entries: range(entries_off, entries_len),
            names: range(names_off, names_len),
            blob: range(blob_off, blob_len),
            digests: range(blob_off + blob_len, apart_len as u64),
            boot: ((blob_off + blob_len) as usize + apart_len, body.len()),
        })
    }
}

fn decode_layers(body: &[u8], s: &Sections) -> Result<Vec<String>, IndexError> {
    let mut cur = Cursor {
        bytes: &body[s.layers.0..s.layers.1],
        pos: 0,
        base: s.layers.0,
    };
    let mut layers = Vec::with_capacity(s.layer_count);
    for i in 0..s.layer_count {
        let at = cur.offset();
        let n = cur.u32()? as usize;
        let id = cur.take(n)?;
        let id = std::str::from_utf8(id)
            .map_err(|_| malformed(at, format!("layer {i}: id is not UTF-8")))?;
        layers.push(id.to_owned());
    }
    if cur.pos != cur.bytes.len() {
        return Err(malformed(
            cur.offset(),
            "unused bytes after the layer table".into(),
        ));
    }
    Ok(layers)
}

/// The entries, and (for digests kept apart) those flagged as having one.
fn decode_entries(
    body: &[u8],
    s: &Sections,
    version: u32,
    apart: bool,
) -> Result<(Vec<IndexEntry>, Vec<u32>), IndexError> {
    // Version 1 defines no digest: its bit is an unknown flag there.
    let known_flags = if version == VERSION_1 {
        FLAG_IN_BOOT
    } else {
        FLAG_IN_BOOT | FLAG_DIGEST
    };
    let records = &body[s.entries.0..s.entries.1];
    let names = &body[s.names.0..s.names.1];
    let mut blob = Cursor {
        bytes: &body[s.blob.0..s.blob.1],
        pos: 0,
        base: s.blob.0,
    };
    // Bounded: entry_count * RECORD_LEN bytes are present.
    let mut entries: Vec<IndexEntry> = Vec::with_capacity(s.entry_count);
    let mut flagged = Vec::new();
    for (i, r) in records.chunks_exact(RECORD_LEN).enumerate() {
        let at = s.entries.0 + i * RECORD_LEN;
        let field = |off: usize, what: String| malformed(at + off, format!("entry {i}: {what}"));

        let parent = get_u32(r, rec::PARENT);
        if (i == 0 && parent != 0) || (i > 0 && parent as usize >= i) {
            return Err(field(
                rec::PARENT,
                format!("parent {parent} does not precede the entry"),
            ));
        }
        let name_off = get_u32(r, rec::NAME_OFF) as usize;
        let name_len = get_u32(r, rec::NAME_LEN) as usize;
        if i == 0 && name_len != 0 {
            return Err(field(rec::NAME_LEN, "the root has a name".into()));
        }
        if name_len > MAX_NAME_LEN {
            return Err(field(rec::NAME_LEN, format!("name of {name_len} bytes")));
        }
        let name = name_off
            .checked_add(name_len)
            .and_then(|end| names.get(name_off..end))
            .ok_or_else(|| field(rec::NAME_OFF, "name outside the name table".into()))?;
        let kind = FileKind::from_code(r[rec::KIND])
            .ok_or_else(|| field(rec::KIND, format!("unknown kind {}", r[rec::KIND])))?;
        let flags = r[rec::FLAGS];
        if flags & !known_flags != 0 {
            return Err(field(
                rec::FLAGS,
                format!("unknown entry flags {flags:#x} for format version {version}"),
            ));
        }
        if flags & FLAG_DIGEST != 0 && kind != FileKind::File {
            return Err(field(
                rec::FLAGS,
                "content digest on an entry that is not a regular file".into(),
            ));
        }
        let link_count = get_u16(r, rec::LINK_COUNT);
        if version < FORMAT_VERSION && link_count != 0 {
            return Err(field(
                rec::LINK_COUNT,
                format!("reserved bytes not zero in format version {version}"),
            ));
        }

        // Built from the parent's path before allocating; the length is
        // checked first so a deep chain of long names cannot blow up memory.
        let path = if i == 0 {
            Vec::new()
        } else {
            let pp = &entries[parent as usize].path;
            let sep = usize::from(!pp.is_empty());
            let plen = pp.len() + sep + name.len();
            if plen > MAX_PATH_LEN {
                return Err(field(rec::NAME_LEN, format!("path of {plen} bytes")));
            }
            let mut p = Vec::with_capacity(plen);
            p.extend_from_slice(pp);
            if sep == 1 {
                p.push(b'/');
            }
            p.extend_from_slice(name);
            p
        };

        // Blob data must follow entry order exactly: no gaps, no sharing, so
        // the decoded xattrs and targets never exceed the blob's size.
        let data_off = get_u64(r, rec::DATA_OFF);
        if data_off != blob.pos as u64 {
            return Err(field(
                rec::DATA_OFF,
                format!("data offset {data_off}, expected {}", blob.pos),
            ));
        }
        // Taken before the xattr count is checked against what is left, so
        // the bound accounts for these 32 bytes.
        let digest = if flags & FLAG_DIGEST != 0 && apart {
            flagged.push(i as u32);
            None
        } else if flags & FLAG_DIGEST != 0 {
            let mut d = [0u8; DIGEST_LEN];
            d.copy_from_slice(blob.take(DIGEST_LEN)?);
            Some(d)
        } else {
            None
        };
        let link_len = get_u32(r, rec::LINK_LEN) as usize;
        let link_target = match kind {
            FileKind::Symlink => Some(blob.take(link_len)?.to_vec()),
            _ if link_len != 0 => {
                return Err(field(rec::LINK_LEN, "target on a non-symlink".into()))
            }
            _ => None,
        };
        let xattr_count = get_u32(r, rec::XATTR_COUNT) as usize;
        if xattr_count > blob.remaining() / 8 {
            return Err(field(
                rec::XATTR_COUNT,
                format!("{xattr_count} xattrs cannot fit"),
            ));
        }
        let mut xattrs = Vec::with_capacity(xattr_count);
        for _ in 0..xattr_count {
            let nl = blob.u32()? as usize;
            let vl = blob.u32()? as usize;
            let n = blob.take(nl)?.to_vec();
            let v = blob.take(vl)?.to_vec();
            xattrs.push((n, v));
        }

        entries.push(IndexEntry {
            path,
            parent,
            kind,
            mode: get_u32(r, rec::MODE),
            uid: get_u32(r, rec::UID),
            gid: get_u32(r, rec::GID),
            size: get_u64(r, rec::SIZE),
            mtime_sec: get_u64(r, rec::MTIME_SEC) as i64,
            mtime_nsec: get_u32(r, rec::MTIME_NSEC),
            rdev: get_u64(r, rec::RDEV),
            link_target,
            xattrs,
            hardlink_group: get_u32(r, rec::HARDLINK_GROUP),
            link_count,
            layer: get_u32(r, rec::LAYER),
            in_boot: flags & FLAG_IN_BOOT != 0,
            digest,
        });
    }
    if blob.remaining() != 0 {
        return Err(malformed(
            blob.offset(),
            "unused bytes after the last entry's data".into(),
        ));
    }
    Ok((entries, flagged))
}

/// The digests section: where the digests file lies in the boot content
/// (whole 512-byte tar blocks from the content's start, before any boot
/// file's data) and its SHA-256, for at least one flagged entry.
fn decode_digests_section(
    body: &[u8],
    s: &Sections,
    flagged: Vec<u32>,
    index: &BootIndex,
) -> Result<ExternalDigests, IndexError> {
    let sec = &body[s.digests.0..s.digests.1];
    let at = |what: String| malformed(s.digests.0, format!("digests section: {what}"));
    if flagged.is_empty() {
        return Err(at("no entry has a digest to keep apart".into()));
    }
    let tar_len = get_u64(sec, 0);
    let first_file = index
        .boot
        .as_ref()
        .map(|b| {
            b.files
                .iter()
                .map(|&(_, off)| off)
                .min()
                .unwrap_or(b.content_len)
        })
        .unwrap_or(0);
    if tar_len == 0 || !tar_len.is_multiple_of(512) || tar_len > first_file {
        return Err(at(format!(
            "the digests file's entries take {tar_len} bytes, not whole tar blocks before the first boot file ({first_file})"
        )));
    }
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(&sec[8..40]);
    let x = ExternalDigests {
        tar_len,
        sha256,
        entries: flagged,
    };
    if tar_len > x.max_tar_len() {
        return Err(at(format!(
            "{tar_len} bytes of entries for a digests file of {}",
            x.file_len()
        )));
    }
    Ok(x)
}

fn encode_boot(b: &BootContent) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        BOOT_HEADER_LEN
            + b.chunks.len() * CHUNK_RECORD_LEN
            + b.files.len() * FILE_RECORD_LEN
            + b.start.len() * 4,
    );
    out.extend_from_slice(&[b.compression.code(), 0, 0, 0]);
    put_u32(&mut out, b.chunk_size);
    out.extend_from_slice(&b.content_len.to_le_bytes());
    put_u32(&mut out, b.chunks.len() as u32);
    put_u32(&mut out, b.files.len() as u32);
    put_u32(&mut out, b.start.len() as u32);
    put_u32(&mut out, 0);
    for c in &b.chunks {
        put_u32(&mut out, c.compressed_len);
        out.extend_from_slice(&c.sha256);
    }
    for &(idx, off) in &b.files {
        put_u32(&mut out, idx);
        out.extend_from_slice(&off.to_le_bytes());
    }
    for &s in &b.start {
        put_u32(&mut out, s);
    }
    out
}

/// The boot content section; its counts must account for every byte, so
/// nothing is allocated beyond what the input holds.
fn decode_boot(body: &[u8], (from, to): (usize, usize)) -> Result<BootContent, IndexError> {
    let sec = &body[from..to];
    let at = |off: usize, what: String| malformed(from + off, format!("boot content: {what}"));
    let compression = ChunkCompression::from_code(sec[0])
        .ok_or_else(|| at(0, format!("unknown compression {}", sec[0])))?;
    if sec[1..4] != [0, 0, 0] || get_u32(sec, 28) != 0 {
        return Err(at(1, "reserved bytes not zero".into()));
    }
    let chunk_size = get_u32(sec, 4);
    let content_len = get_u64(sec, 8);
    let (nc, nf, ns) = (
        get_u32(sec, 16) as u64,
        get_u32(sec, 20) as u64,
        get_u32(sec, 24) as u64,
    );
    let need = BOOT_HEADER_LEN as u64
        + nc * CHUNK_RECORD_LEN as u64
        + nf * FILE_RECORD_LEN as u64
        + ns * 4;
    if need != sec.len() as u64 {
        return Err(at(
            16,
            format!(
                "{nc} chunks, {nf} files and {ns} start chunks need {need} bytes, {} present",
                sec.len()
            ),
        ));
    }
    let mut p = BOOT_HEADER_LEN;
    let mut chunks = Vec::with_capacity(nc as usize);
    for _ in 0..nc {
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&sec[p + 4..p + CHUNK_RECORD_LEN]);
        chunks.push(Chunk {
            compressed_len: get_u32(sec, p),
            sha256,
        });
        p += CHUNK_RECORD_LEN;
    }
    let mut files = Vec::with_capacity(nf as usize);
    for _ in 0..nf {
        files.push((get_u32(sec, p), get_u64(sec, p + 4)));
        p += FILE_RECORD_LEN;
    }
    let mut start = Vec::with_capacity(ns as usize);
    for _ in 0..ns {
        start.push(get_u32(sec, p));
        p += 4;
    }
    Ok(BootContent {
        compression,
        chunk_size,
        content_len,
        chunks,
        files,
        start,
    })
}

/// Bounds-checked sequential reads; `base` turns positions into offsets in
/// the whole index for error messages.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> usize {
        self.base + self.pos
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], IndexError> {
        if n > self.remaining() {
            return Err(malformed(
                self.offset(),
                format!("{n} bytes needed, {} left in the section", self.remaining()),
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, IndexError> {
        Ok(get_u32(self.take(4)?, 0))
    }
}

fn malformed(offset: usize, what: String) -> IndexError {
    IndexError::Malformed {
        offset: offset as u64,
        what,
    }
}

fn last_component(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

// Fixed-offset accessors. Callers pass offsets inside a slice whose length
// was checked (the header, a whole record), so the indexing cannot fail.
fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
pub(crate) fn set_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn set_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn set_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Recompute the trailing checksum after a test edited the bytes, so the
/// edit reaches the checks behind the checksum.
#[cfg(test)]
pub(crate) fn reseal(bytes: &mut [u8]) {
    let n = bytes.len() - CHECKSUM_LEN;
    let sum = Sha256::digest(&bytes[..n]);
    bytes[n..].copy_from_slice(&sum);
}
