//! Deterministic layer writer: the same tree appended in the same order gives
//! byte-identical blobs, so a rebuilt boot layer keeps its digest.

use lazylayer_index::xattr::read_sized;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use lazylayer_sys::sha256_digest;
use rustix::fs::{self as rfs, Mode, OFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::path::{normalize, OPAQUE_MARKER, WHITEOUT_PREFIX};
use crate::{Compression, LayerError, Xattrs};

/// Digests of a finished layer, as an OCI manifest and image config need them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDigests {
    /// `sha256:<hex>` of the blob as written (compressed): the manifest's
    /// layer digest.
    pub digest: String,
    /// `sha256:<hex>` of the uncompressed tar: the config's `rootfs.diff_ids`
    /// entry.
    pub diff_id: String,
    /// Size in bytes of the blob as written.
    pub size: u64,
}

/// Gzip level used for layers; zlib's default, the usual speed/size balance
/// and what Docker and containerd write.
const GZIP_LEVEL: u32 = 6;
const ZSTD_LEVEL: i32 = 3;
/// "Unknown" in the gzip header's OS byte, as Go's compress/gzip writes it,
/// so the blob does not depend on the building host.
const GZIP_OS_UNKNOWN: u8 = 255;

const BLOCK: usize = 512;
/// Largest value of an 8-byte octal header field (uid, gid).
const MAX_OCTAL_8: u64 = 0o7_777_777;
/// Largest value of a 12-byte octal header field (size).
const MAX_OCTAL_12: u64 = 0o77_777_777_777;

/// Writes a layer blob: a PAX/ustar tar stream, compressed as asked.
///
/// Headers are ustar with PAX records only where ustar cannot say it (long
/// names or link targets, large ids or sizes, negative mtimes, xattrs), with
/// empty user/group names and no atime/ctime, so the output depends only on
/// the entries' content and metadata and on the order they are appended.
///
/// After an `append_*` error the output may hold a partial entry; discard the
/// writer and its output.
pub struct LayerWriter<W: Write> {
    out: Hashed<Encoder<W>>,
    /// First path written for each multiply-linked inode, keyed by (dev, ino).
    links: HashMap<(u64, u64), Vec<u8>>,
    buf: Vec<u8>,
}

impl<W: Write> LayerWriter<W> {
    pub fn new(out: W, c: Compression) -> Self {
        let enc = match c {
            Compression::None => Encoder::Plain(out),
            Compression::Gzip => Encoder::Gzip(
                flate2::GzBuilder::new()
                    .mtime(0)
                    .operating_system(GZIP_OS_UNKNOWN)
                    .write(Hashed::new(out), flate2::Compression::new(GZIP_LEVEL)),
            ),
            Compression::Zstd => Encoder::Zstd(
                // Encoder::new only fails on an invalid level; 3 is valid.
                zstd::stream::write::Encoder::new(Hashed::new(out), ZSTD_LEVEL)
                    .expect("zstd level 3 is valid"),
            ),
        };
        LayerWriter {
            out: Hashed::new(enc),
            links: HashMap::new(),
            buf: vec![0; 256 << 10],
        }
    }

    /// Append `src_root/rel` as described by `lstat`, stored at `rel`. `rel`
    /// of `.` appends the root directory itself (as `./`).
    ///
    /// A second path with the same (dev, ino) as one already written becomes a
    /// hardlink entry. xattrs are copied except `trusted.overlay.*`, which
    /// describe the source's own overlay mount, not the file.
    pub fn append_path(&mut self, src_root: &Path, rel: &Path) -> Result<(), LayerError> {
        let rel = normalize(rel.as_os_str().as_bytes())?;
        let full = if rel.as_os_str().is_empty() {
            src_root.to_path_buf()
        } else {
            src_root.join(&rel)
        };
        let st = rfs::lstat(&full).map_err(|e| LayerError::io(&full, "lstat", e))?;
        let ftype = rfs::FileType::from_raw_mode(st.st_mode);
        let mut e = EntryHeader {
            name: rel.as_os_str().as_bytes().to_vec(),
            etype: EntryType::Regular,
            mode: st.st_mode & 0o7777,
            uid: u64::from(st.st_uid),
            gid: u64::from(st.st_gid),
            mtime: st.st_mtime,
            size: 0,
            link: Vec::new(),
            dev: None,
            xattrs: Vec::new(),
            records: Vec::new(),
        };

        if ftype != rfs::FileType::Directory && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                e.etype = EntryType::Link;
                e.link = first.clone();
                // Metadata belongs to the inode, already described by the
                // first name; readers apply none of it to a link.
                return self.write_entry(&e, None, &rel);
            }
            self.links.insert(key, e.name.clone());
        }

        e.xattrs = read_xattrs(&full)?;
        match ftype {
            rfs::FileType::RegularFile => {
                e.size = st.st_size as u64;
                let fd = rfs::open(
                    &full,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|err| LayerError::io(&full, "open", err))?;
                let file = File::from(fd);
                let now = rfs::fstat(&file).map_err(|err| LayerError::io(&full, "fstat", err))?;
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
                    return Err(LayerError::FileChanged { path: full });
                }
                self.write_entry(&e, Some((&mut &file, &full)), &rel)
            }
            rfs::FileType::Directory => {
                e.etype = EntryType::Directory;
                if e.name.is_empty() {
                    e.name.push(b'.');
                }
                // Trailing slash: the directory convention of every common tar
                // writer, and what v7 readers rely on.
                e.name.push(b'/');
                self.write_entry(&e, None, &rel)
            }
            rfs::FileType::Symlink => {
                e.etype = EntryType::Symlink;
                e.link = rfs::readlink(&full, Vec::new())
                    .map_err(|err| LayerError::io(&full, "readlink", err))?
                    .into_bytes();
                self.write_entry(&e, None, &rel)
            }
            rfs::FileType::CharacterDevice | rfs::FileType::BlockDevice => {
                e.etype = if ftype == rfs::FileType::CharacterDevice {
                    EntryType::Char
                } else {
                    EntryType::Block
                };
                e.dev = Some((rfs::major(st.st_rdev), rfs::minor(st.st_rdev)));
                self.write_entry(&e, None, &rel)
            }
            rfs::FileType::Fifo => {
                e.etype = EntryType::Fifo;
                self.write_entry(&e, None, &rel)
            }
            rfs::FileType::Socket => Err(LayerError::UnsupportedFileType {
                path: full,
                kind: "socket",
            }),
            _ => Err(LayerError::UnsupportedFileType {
                path: full,
                kind: "unknown",
            }),
        }
    }

    /// Append a regular file with the given content, owned by root (how boot
    /// layers held their index before [`Self::append_metadata`]).
    pub fn append_bytes(
        &mut self,
        rel: &Path,
        mode: u32,
        mtime: u64,
        data: &[u8],
    ) -> Result<(), LayerError> {
        let rel = normalize(rel.as_os_str().as_bytes())?;
        if rel.as_os_str().is_empty() {
            return Err(LayerError::RootEntry {
                path: rel,
                kind: "file",
            });
        }
        let e = EntryHeader::root_file(
            rel.as_os_str().as_bytes().to_vec(),
            mode,
            mtime,
            data.len() as u64,
        );
        self.write_entry(&e, Some((&mut &*data, &rel)), &rel)
    }

    /// Append a metadata entry (a `.wh..wh.*` name other than the opaque
    /// marker) carrying `data` in PAX records rather than as content, owned
    /// by root: one empty entry per [`crate::metadata::PART_BYTES`] of it,
    /// `rel`, then `rel.1`, `rel.2`, … (see [`crate::metadata`] for why).
    pub fn append_metadata(
        &mut self,
        rel: &Path,
        mode: u32,
        mtime: u64,
        data: &[u8],
    ) -> Result<(), LayerError> {
        let rel = normalize(rel.as_os_str().as_bytes())?;
        let named = rel
            .file_name()
            .is_some_and(|n| crate::metadata::is_metadata_name(n.as_bytes()));
        if !named {
            return Err(LayerError::NotMetadataName { path: rel });
        }
        for (k, part) in crate::metadata::encode_parts(data).into_iter().enumerate() {
            let k = u32::try_from(k).expect("fewer parts than u32::MAX");
            let name = crate::metadata::part_name(rel.as_os_str().as_bytes(), k);
            let mut e = EntryHeader::root_file(name, mode, mtime, 0);
            e.records = vec![(crate::metadata::PAX_DATA_KEY.as_bytes().to_vec(), part)];
            self.write_entry(&e, None, &rel)?;
        }
        Ok(())
    }

    /// Append an OCI whiteout deleting `rel` from the layers below: an empty
    /// file `DIR/.wh.NAME`.
    pub fn append_whiteout(&mut self, rel: &Path) -> Result<(), LayerError> {
        let rel = normalize(rel.as_os_str().as_bytes())?;
        let Some(name) = rel.file_name() else {
            return Err(LayerError::RootEntry {
                path: rel,
                kind: "whiteout",
            });
        };
        let mut wh = OsStr::new(WHITEOUT_PREFIX).to_os_string();
        wh.push(name);
        let path = rel.with_file_name(wh);
        self.append_marker(&path)
    }

    /// Append an OCI opaque marker `DIR/.wh..wh..opq`: the layers below
    /// contribute nothing to `dir` (which may be `.`, the root).
    pub fn append_opaque(&mut self, dir: &Path) -> Result<(), LayerError> {
        let dir = normalize(dir.as_os_str().as_bytes())?;
        self.append_marker(&dir.join(OPAQUE_MARKER))
    }

    fn append_marker(&mut self, path: &Path) -> Result<(), LayerError> {
        let e = EntryHeader {
            name: path.as_os_str().as_bytes().to_vec(),
            etype: EntryType::Regular,
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            link: Vec::new(),
            dev: None,
            xattrs: Vec::new(),
            records: Vec::new(),
        };
        self.write_entry(&e, None, path)
    }

    /// End the archive, flush the compressor and return the digests.
    pub fn finish(self) -> Result<LayerDigests, LayerError> {
        self.finish_into_inner().map(|(d, _)| d)
    }

    /// Like [`finish`](Self::finish), and also give back the output (for
    /// example to fsync and rename a temporary file).
    pub fn finish_into_inner(mut self) -> Result<(LayerDigests, W), LayerError> {
        let out_err = |e: io::Error| LayerError::io("<layer output>", "finish layer", e);
        // End of archive: two zero blocks.
        self.out.write_all(&[0; 2 * BLOCK]).map_err(out_err)?;
        let Hashed {
            inner: enc,
            hasher,
            count,
        } = self.out;
        let diff_id = sha256_digest(hasher.finalize());
        let (digest, size, mut w) = match enc {
            Encoder::Plain(w) => (diff_id.clone(), count, w),
            Encoder::Gzip(gz) => gz.finish().map_err(out_err)?.into_parts(),
            Encoder::Zstd(zs) => zs.finish().map_err(out_err)?.into_parts(),
        };
        w.flush().map_err(out_err)?;
        Ok((
            LayerDigests {
                digest,
                diff_id,
                size,
            },
            w,
        ))
    }

    fn write_entry(
        &mut self,
        e: &EntryHeader,
        data: Option<(&mut dyn Read, &Path)>,
        rel: &Path,
    ) -> Result<(), LayerError> {
        let out_err = |err: io::Error| LayerError::io(rel, "write layer", err);
        let mut h = Header::new_ustar();
        let mut pax: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();

        if !set_ustar_name(&mut h, &e.name) {
            pax.insert(b"path".to_vec(), e.name.clone());
            set_truncated(&mut h.as_old_mut().name, &e.name);
        }
        if e.link.len() > h.as_old().linkname.len() {
            pax.insert(b"linkpath".to_vec(), e.link.clone());
        }
        set_truncated(&mut h.as_old_mut().linkname, &e.link);
        for (key, v) in [(&b"uid"[..], e.uid), (b"gid", e.gid)] {
            if v > MAX_OCTAL_8 {
                pax.insert(key.to_vec(), v.to_string().into_bytes());
            }
        }
        if e.size > MAX_OCTAL_12 {
            pax.insert(b"size".to_vec(), e.size.to_string().into_bytes());
        }
        if e.mtime < 0 {
            pax.insert(b"mtime".to_vec(), e.mtime.to_string().into_bytes());
        }
        for (name, value) in &e.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(name);
            pax.insert(key, value.clone());
        }
        for (key, value) in &e.records {
            pax.insert(key.clone(), value.clone());
        }

        h.set_entry_type(e.etype);
        h.set_mode(e.mode);
        h.set_uid(e.uid.min(MAX_OCTAL_8));
        h.set_gid(e.gid.min(MAX_OCTAL_8));
        h.set_size(e.size);
        h.set_mtime(u64::try_from(e.mtime).unwrap_or(0));
        if let Some((major, minor)) = e.dev {
            h.set_device_major(major)
                .map_err(|err| LayerError::io(rel, "encode device", err))?;
            h.set_device_minor(minor)
                .map_err(|err| LayerError::io(rel, "encode device", err))?;
        }
        h.set_cksum();

        if !pax.is_empty() {
            let body = pax_body(&pax);
            let mut ph = Header::new_ustar();
            let base = e.name.strip_suffix(b"/").unwrap_or(&e.name);
            let base = base.rsplit(|&b| b == b'/').next().unwrap_or(base);
            let mut pname = b"PaxHeaders/".to_vec();
            pname.extend_from_slice(base);
            set_truncated(&mut ph.as_old_mut().name, &pname);
            ph.set_entry_type(EntryType::XHeader);
            ph.set_mode(0o644);
            ph.set_uid(0);
            ph.set_gid(0);
            ph.set_mtime(0);
            ph.set_size(body.len() as u64);
            ph.set_cksum();
            self.out.write_all(ph.as_bytes()).map_err(out_err)?;
            self.out.write_all(&body).map_err(out_err)?;
            self.pad(body.len() as u64).map_err(out_err)?;
        }

        self.out.write_all(h.as_bytes()).map_err(out_err)?;
        if let Some((src, src_path)) = data {
            let mut left = e.size;
            while left > 0 {
                let want = self
                    .buf
                    .len()
                    .min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = match src.read(&mut self.buf[..want]) {
                    Ok(0) => {
                        return Err(LayerError::FileChanged {
                            path: src_path.to_owned(),
                        })
                    }
                    Ok(n) => n,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => return Err(LayerError::io(src_path, "read", err)),
                };
                self.out.write_all(&self.buf[..n]).map_err(out_err)?;
                left -= n as u64;
            }
            // A file that grew since lstat would be archived cut short.
            let mut probe = [0u8; 1];
            if matches!(src.read(&mut probe), Ok(n) if n > 0) {
                return Err(LayerError::FileChanged {
                    path: src_path.to_owned(),
                });
            }
            self.pad(e.size).map_err(out_err)?;
        }
        Ok(())
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = (len % BLOCK as u64) as usize;
        if rem != 0 {
            self.out.write_all(&[0; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }
}

/// One tar member before encoding.
struct EntryHeader {
    name: Vec<u8>,
    etype: EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
    size: u64,
    link: Vec<u8>,
    dev: Option<(u32, u32)>,
    xattrs: Xattrs,
    /// PAX records beside those the fields above call for.
    records: Vec<(Vec<u8>, Vec<u8>)>,
}

impl EntryHeader {
    /// A regular file owned by root, of `size` bytes.
    fn root_file(name: Vec<u8>, mode: u32, mtime: u64, size: u64) -> EntryHeader {
        EntryHeader {
            name,
            etype: EntryType::Regular,
            mode: mode & 0o7777,
            uid: 0,
            gid: 0,
            mtime: i64::try_from(mtime).unwrap_or(i64::MAX),
            size,
            link: Vec::new(),
            dev: None,
            xattrs: Vec::new(),
            records: Vec::new(),
        }
    }
}

/// Store `name` in the ustar name/prefix fields if it fits (splitting at the
/// leftmost `/` that works); false if it needs a PAX `path` record.
fn set_ustar_name(h: &mut Header, name: &[u8]) -> bool {
    let ustar = h.as_ustar_mut().expect("header is ustar");
    if name.len() <= ustar.name.len() {
        ustar.name[..name.len()].copy_from_slice(name);
        return true;
    }
    for (i, _) in name.iter().enumerate().filter(|(_, &b)| b == b'/') {
        let (prefix, rest) = (&name[..i], &name[i + 1..]);
        if prefix.len() > ustar.prefix.len() {
            break;
        }
        if !rest.is_empty() && rest != b"/" && rest.len() <= ustar.name.len() {
            ustar.prefix[..prefix.len()].copy_from_slice(prefix);
            ustar.name[..rest.len()].copy_from_slice(rest);
            return true;
        }
    }
    false
}

fn set_truncated(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// PAX records `"<len> <key>=<value>\n"`, in key order.
fn pax_body(records: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<u8> {
    let mut body = Vec::new();
    for (key, value) in records {
        // The length counts its own digits; find the fixed point.
        let rest = 3 + key.len() + value.len(); // ' ', '=', '\n'
        let mut len = rest + 1;
        while rest + len.to_string().len() != len {
            len = rest + len.to_string().len();
        }
        body.extend_from_slice(len.to_string().as_bytes());
        body.push(b' ');
        body.extend_from_slice(key);
        body.push(b'=');
        body.extend_from_slice(value);
        body.push(b'\n');
    }
    body
}

/// The xattrs of `path` (not following a final symlink), sorted by name,
/// without overlayfs' own `trusted.overlay.*`.
fn read_xattrs(path: &Path) -> Result<Xattrs, LayerError> {
    let names = match read_sized(|buf| rfs::llistxattr(path, buf)) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(LayerError::io(path, "list xattrs", e)),
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(b"trusted.overlay.") {
            continue;
        }
        let os = OsStr::from_bytes(name);
        match read_sized(|buf| rfs::lgetxattr(path, os, buf)) {
            Ok(value) => out.push((name.to_vec(), value)),
            // Removed between list and get: it is not part of the file now.
            Err(Errno::NODATA) => {}
            Err(e) => {
                return Err(LayerError::Xattr {
                    path: path.to_owned(),
                    name: String::from_utf8_lossy(name).into_owned(),
                    source: e.into(),
                })
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A writer that hashes and counts what passes through.
struct Hashed<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W> Hashed<W> {
    fn new(inner: W) -> Self {
        Hashed {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn into_parts(self) -> (String, u64, W) {
        (
            sha256_digest(self.hasher.finalize()),
            self.count,
            self.inner,
        )
    }
}

impl<W: Write> Write for Hashed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Encoder<W: Write> {
    /// Uncompressed: the blob is the tar, so its digest is the diff_id and it
    /// is hashed once.
    Plain(W),
    Gzip(flate2::write::GzEncoder<Hashed<W>>),
    Zstd(zstd::stream::write::Encoder<'static, Hashed<W>>),
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Plain(w) => w.write(buf),
            Encoder::Gzip(w) => w.write(buf),
            Encoder::Zstd(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Plain(w) => w.flush(),
            Encoder::Gzip(w) => w.flush(),
            Encoder::Zstd(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        let mut m = BTreeMap::new();
        m.insert(b"path".to_vec(), vec![b'a'; 5]);
        // "14 path=aaaaa\n" is 14 bytes.
        assert_eq!(pax_body(&m), b"14 path=aaaaa\n");
        m.clear();
        // Crossing a digit boundary: 99 bytes plus a 2-digit length would be
        // 101, which has 3 digits, so the record is 102 long.
        m.insert(b"path".to_vec(), vec![b'a'; 92]);
        let body = pax_body(&m);
        assert_eq!(body.len(), 102);
        assert!(body.starts_with(b"102 path="));
    }

    #[test]
    fn ustar_name_splits_into_prefix() {
        let mut h = Header::new_ustar();
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(90));
        assert!(set_ustar_name(&mut h, long.as_bytes()));
        assert_eq!(&*h.path_bytes(), long.as_bytes());
        let mut h = Header::new_ustar();
        assert!(!set_ustar_name(&mut h, "f".repeat(101).as_bytes()));
    }
}
