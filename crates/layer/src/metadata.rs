//! Content carried by a *metadata entry*: a `.wh..wh.*` name other than the
//! opaque marker (lazylayer's boot index is one).
//!
//! OCI runtimes create nothing for such a name, which keeps the entry out of
//! every container. But containers-storage rebuilds a layer for `podman
//! save` and `podman push` from the headers it kept (tar-split) plus the
//! files it extracted, and needs a file for every entry with content: a
//! metadata entry with content cannot be rebuilt. So the content rides in
//! the headers of entries of size 0, in a [`PAX_DATA_KEY`] record, at most
//! [`PART_BYTES`] of it (encoded) per entry: Go's tar reader (containerd,
//! containers-storage) refuses an extended header over 1 MiB. Longer
//! content continues in entries that follow at once, named `NAME.1`,
//! `NAME.2`, …: not `NAME` again, since containers-storage turns every
//! `.wh.`-prefixed name into an overlay whiteout (a device node, hidden in
//! containers) and fails on a second one of the same name ("file exists",
//! seen with Podman 4.3.1).
//!
//! The value is the bytes themselves with only `%` and newline
//! percent-encoded (`%25`, `%0A`). A PAX record is length-prefixed, and Go's
//! readers take any value, but the Rust `tar` crate as released (0.4.46)
//! splits records at newlines (lazylayer's copy is patched, vendor/tar;
//! other tools built on it are not). Base64 would have done too, at a price measured on real
//! indexes: the compressed index region, the start's first fetch, 10%
//! larger for python3 and 14% for the 222 MB pydev image; the escape costs
//! 2% (zstd: 347 KB instead of 341, and 730 instead of 716).

/// The PAX record (vendor `LAZYLAYER`) holding a part of a metadata entry's
/// content, `%` and newline percent-encoded.
pub const PAX_DATA_KEY: &str = "LAZYLAYER.data";

/// Encoded bytes per entry at most: with the header's other records, well
/// under Go's 1 MiB limit on an extended header.
pub const PART_BYTES: usize = 512 << 10;

/// True for a name that may carry content in [`PAX_DATA_KEY`] records.
pub fn is_metadata_name(file_name: &[u8]) -> bool {
    file_name.starts_with(crate::WHITEOUT_META_PREFIX.as_bytes())
        && file_name != crate::OPAQUE_MARKER.as_bytes()
}

/// The name of part `k` of the metadata file `base`: `base` itself for the
/// first, then `base.1`, `base.2`, …
pub fn part_name(base: &[u8], k: u32) -> Vec<u8> {
    let mut name = base.to_vec();
    if k > 0 {
        name.extend_from_slice(format!(".{k}").as_bytes());
    }
    name
}

/// `data` as the record values of its entries, in order; one (empty) for
/// no data.
pub(crate) fn encode_parts(data: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = vec![Vec::new()];
    for &b in data {
        let part = parts.last_mut().expect("never empty");
        if part.len() + 3 > PART_BYTES {
            parts.push(Vec::with_capacity(PART_BYTES));
        }
        let part = parts.last_mut().expect("never empty");
        match b {
            b'%' => part.extend_from_slice(b"%25"),
            b'\n' => part.extend_from_slice(b"%0A"),
            b => part.push(b),
        }
    }
    parts
}

/// One record's value decoded; None for a `%` not followed by `25` or `0A`.
fn decode_part(value: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let mut rest = value;
    while let Some(at) = rest.iter().position(|&b| b == b'%') {
        out.extend_from_slice(&rest[..at]);
        match rest.get(at + 1..at + 3)? {
            b"25" => out.push(b'%'),
            b"0A" => out.push(b'\n'),
            _ => return None,
        }
        rest = &rest[at + 3..];
    }
    out.extend_from_slice(rest);
    Some(())
}

/// The content an entry carries in its [`PAX_DATA_KEY`] records (several
/// records concatenate); None when it has none. An error: extended headers
/// that do not parse, or a value with a stray `%`.
pub fn entry_data<R: std::io::Read>(
    entry: &mut tar::Entry<'_, R>,
) -> std::io::Result<Option<Vec<u8>>> {
    let Some(pax) = entry.pax_extensions()? else {
        return Ok(None);
    };
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut data: Option<Vec<u8>> = None;
    for rec in pax {
        let rec = rec.map_err(|e| bad(format!("a PAX record: {e}")))?;
        if rec.key_bytes() == PAX_DATA_KEY.as_bytes() {
            decode_part(rec.value_bytes(), data.get_or_insert_with(Vec::new))
                .ok_or_else(|| bad(format!("a {PAX_DATA_KEY} record has a stray '%'")))?;
        }
    }
    Ok(data)
}

/// The metadata file `base` from `tar`, a tar stream (without its
/// end-of-archive blocks) that holds nothing but its parts, in order: each
/// a regular entry of size 0 named [`part_name`]`(base, k)`, its content in
/// its headers. Anything else in the stream is an error.
pub fn read_file(tar: &[u8], base: &[u8]) -> std::io::Result<Vec<u8>> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut a = tar::Archive::new(tar);
    let mut out: Option<Vec<u8>> = None;
    for (k, e) in a.entries()?.enumerate() {
        let mut e = e?;
        let want = part_name(base, u32::try_from(k).unwrap_or(u32::MAX));
        if *e.path_bytes() != want[..]
            || e.header().entry_type() != tar::EntryType::Regular
            || e.size() != 0
        {
            return Err(bad(format!(
                "{} holds {}, not its part {k}",
                String::from_utf8_lossy(base),
                String::from_utf8_lossy(&e.path_bytes())
            )));
        }
        let part = entry_data(&mut e)?.ok_or_else(|| {
            bad(format!(
                "part {k} of {} carries no data",
                String::from_utf8_lossy(base)
            ))
        })?;
        out.get_or_insert_with(Vec::new).extend_from_slice(&part);
    }
    out.ok_or_else(|| bad(format!("no {}", String::from_utf8_lossy(base))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn parts_escape_newlines_split_at_the_limit_and_join_back() {
        let data: Vec<u8> = (0..PART_BYTES * 2 + 7).map(|i| (i % 251) as u8).collect();
        let parts = encode_parts(&data);
        assert_eq!(parts.len(), 3);
        assert!(parts
            .iter()
            .all(|p| p.len() <= PART_BYTES && !p.contains(&b'\n')));
        // Full parts but the last.
        assert!(parts[..2].iter().all(|p| p.len() > PART_BYTES - 3));
        let mut joined = Vec::new();
        for p in &parts {
            decode_part(p, &mut joined).unwrap();
        }
        assert_eq!(joined, data);
        // Every byte needing the escape: three times the room, no part over.
        let parts = encode_parts(&vec![b'\n'; PART_BYTES]);
        assert_eq!(parts.len(), PART_BYTES.div_ceil(PART_BYTES / 3));
        assert!(parts.iter().all(|p| p.len() <= PART_BYTES));
        assert_eq!(encode_parts(b""), vec![Vec::<u8>::new()]);
        let mut out = Vec::new();
        assert_eq!(decode_part(b"a%25b%0Ac", &mut out), Some(()));
        assert_eq!(out, b"a%b\nc");
        for stray in [&b"%"[..], b"%2", b"%0a", b"%41", b"x%"] {
            assert_eq!(decode_part(stray, &mut Vec::new()), None, "{stray:?}");
        }
    }

    #[test]
    fn a_metadata_file_reads_back_from_its_parts_and_nothing_else() {
        let name = ".wh..wh.lazylayer.digests.v1";
        let data: Vec<u8> = (0..PART_BYTES + 100).map(|i| (i % 253) as u8).collect();
        let tar = crate::chunked::metadata_entry_tar(Path::new(name), 0o444, 0, &data).unwrap();
        assert_eq!(read_file(&tar, name.as_bytes()).unwrap(), data);
        // Another file's parts, or a part missing, are not it.
        let err = read_file(&tar, b".wh..wh.other").unwrap_err();
        assert!(err.to_string().contains("not its part 0"), "{err}");
        let one = crate::chunked::metadata_entry_tar(Path::new(name), 0o444, 0, b"x").unwrap();
        let mut twice = one.clone();
        twice.extend_from_slice(&one);
        let err = read_file(&twice, name.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("not its part 1"), "{err}");
        // Cut short: an error, never a shorter file.
        assert!(read_file(&tar[..tar.len() - 700], name.as_bytes()).is_err());
        assert!(read_file(b"", name.as_bytes()).is_err());
    }

    #[test]
    fn only_reserved_names_but_the_opaque_marker_carry_data() {
        assert!(is_metadata_name(b".wh..wh.lazylayer.index.v1"));
        assert!(!is_metadata_name(b".wh..wh..opq"));
        assert!(!is_metadata_name(b".wh.file"));
        assert!(!is_metadata_name(b"file"));
    }
}
