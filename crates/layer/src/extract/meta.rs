//! An entry's metadata (mode, owner, mtime, xattrs) as its tar header and
//! PAX records give it, checked before anything is written.

use std::io::{self, Read};
use std::path::Path;

use rustix::fs::Timespec;

use crate::{LayerError, Xattrs};

/// Metadata of one entry, resolved from the header and its PAX records.
pub(super) struct Meta {
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mtime: Timespec,
    pub(super) xattrs: Xattrs,
}

/// The metadata of `entry` (at `path`); `read_error` wraps a failure to
/// read the archive itself.
pub(super) fn read_meta<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    path: &Path,
    read_error: impl Fn(io::Error) -> LayerError,
) -> Result<Meta, LayerError> {
    let h = entry.header();
    let field = |key: &str| LayerError::BadPaxRecord {
        path: path.to_owned(),
        key: key.to_owned(),
    };
    let old = h.as_old();
    let mode = numeric(h.mode(), &old.mode).ok_or_else(|| field("mode"))? & 0o7777;
    // The tar crate has already applied PAX uid/gid records to the header.
    let uid = numeric(h.uid(), &old.uid).ok_or_else(|| field("uid"))?;
    let gid = numeric(h.gid(), &old.gid).ok_or_else(|| field("gid"))?;
    let uid = u32::try_from(uid).map_err(|_| field("uid"))?;
    let gid = u32::try_from(gid).map_err(|_| field("gid"))?;
    let mtime = numeric(h.mtime(), &old.mtime).ok_or_else(|| field("mtime"))?;
    let mut mtime = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(read_error)? {
        for rec in pax {
            let rec = rec.map_err(|_| field("(unparsable record)"))?;
            let key = rec.key_bytes();
            if key == b"mtime" {
                mtime = parse_pax_time(rec.value_bytes()).ok_or_else(|| field("mtime"))?;
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.push((name.to_vec(), rec.value_bytes().to_vec()));
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

/// A numeric header field; one left blank (all NUL or spaces, as some writers
/// leave unused fields) reads as 0, anything else unparsable is an error.
fn numeric<T: Default>(parsed: io::Result<T>, raw: &[u8]) -> Option<T> {
    match parsed {
        Ok(v) => Some(v),
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Some(T::default()),
        Err(_) => None,
    }
}

/// Parse a PAX time (`[-]SECONDS[.FRACTION]`).
fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = int.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(d - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(if !neg {
        Timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        }
    } else if nanos == 0 {
        Timespec {
            tv_sec: -secs,
            tv_nsec: 0,
        }
    } else {
        Timespec {
            tv_sec: -secs - 1,
            tv_nsec: 1_000_000_000 - nanos,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse() {
        let t = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(t("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(t("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(t("1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(t("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(t("-3"), Some((-3, 0)));
        assert_eq!(t(""), None);
        assert_eq!(t("1e9"), None);
        assert_eq!(t(".5"), None);
    }

    /// Some writers leave unused fields blank: NULs or spaces read as 0,
    /// anything else that does not parse is refused.
    #[test]
    fn blank_numeric_fields_read_as_zero() {
        let bad = || Err::<u64, _>(io::Error::other("unparsable"));
        assert_eq!(numeric(Ok(7u64), b"0000007\0"), Some(7));
        assert_eq!(numeric(bad(), b"\0\0\0\0"), Some(0));
        assert_eq!(numeric(bad(), b"    \0"), Some(0));
        assert_eq!(numeric(bad(), b"12x4"), None);
    }
}
