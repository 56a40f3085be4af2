//! Seek indexes over real gzip tars built here with flate2 and tar.

use std::io::Write;

use lazylayer_seek::{head_len, SeekError, SeekHead, SeekIndex};

/// A deterministic xorshift stream: incompressible bytes without a rand crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

struct Layer {
    gz: Vec<u8>,
    /// (index path, content) of every regular file, hardlinks included.
    files: Vec<(String, Vec<u8>)>,
}

/// ~6 MB of tar: random and compressible files, a PAX long name, a GNU long
/// name, hardlinks, a replaced file, a whiteout, a directory.
fn layer() -> Layer {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..300 {
        let size = (rng.next() % 40_000) as usize;
        let data = if i % 3 == 0 {
            rng.bytes(size)
        } else {
            format!("line {i} of a compressible text file\n")
                .repeat(size / 30 + 1)
                .into_bytes()
        };
        files.push((format!("usr/lib/dir{}/file{i}", i % 7), data));
    }
    files.push(("big/random.bin".into(), rng.bytes(1_500_000)));
    files.push((
        "big/text.txt".into(),
        b"all work and no play ".repeat(80_000),
    ));
    files.push((
        format!("long/{}/name.txt", "x".repeat(150)),
        b"long".to_vec(),
    ));
    files.push(("empty".into(), Vec::new()));

    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    tar.append_data(&mut dir, "./usr/", &[][..]).unwrap();
    for (p, data) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        // "./" prefix on some: the index path drops it.
        let name = if p.len() % 2 == 0 {
            format!("./{p}")
        } else {
            p.clone()
        };
        tar.append_data(&mut h, name, &data[..]).unwrap();
    }
    // PAX path (the tar crate writes a PAX header for a long name with ustar).
    let pax_name = format!("pax/{}/file", "p".repeat(200));
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    let data = b"pax content".to_vec();
    h.set_size(data.len() as u64);
    tar.append_pax_extensions([("path", pax_name.as_bytes())])
        .unwrap();
    tar.append_data(&mut h, "pax/short", &data[..]).unwrap();
    files.push((pax_name, data));
    // Hardlinks to a file and to a long-named file.
    for (link, target) in [
        ("links/hard1", "usr/lib/dir1/file1".to_string()),
        ("links/hard2", format!("long/{}/name.txt", "x".repeat(150))),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        tar.append_link(&mut h, link, &target).unwrap();
        let content = files.iter().find(|(p, _)| *p == target).unwrap().1.clone();
        files.push((link.into(), content));
    }
    // A later entry of the same path replaces the earlier one.
    let newer = b"replaced content".to_vec();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(newer.len() as u64);
    tar.append_data(&mut h, "usr/lib/dir2/file2", &newer[..])
        .unwrap();
    files.retain(|(p, _)| p != "usr/lib/dir2/file2");
    files.push(("usr/lib/dir2/file2".into(), newer));
    // A whiteout is not a file.
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    tar.append_data(&mut h, "usr/.wh.gone", &[][..]).unwrap();
    let raw = tar.into_inner().unwrap();

    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&raw).unwrap();
    Layer {
        gz: enc.finish().unwrap(),
        files,
    }
}

const SPAN: u64 = 64 * 1024;

/// A change to a valid index that decode must refuse.
type Edit = Box<dyn Fn(&mut SeekIndex)>;

fn read(idx: &SeekIndex, gz: &[u8], path: &str) -> Vec<u8> {
    let f = idx
        .file(path.as_bytes())
        .unwrap_or_else(|| panic!("{path} not indexed"));
    let plan = idx.plan(f.offset, f.size);
    let span = &gz[plan.compressed_start as usize..plan.compressed_end as usize];
    idx.extract(&plan, span, f.offset, f.size).unwrap()
}

#[test]
fn every_file_reads_back_through_its_span() {
    let l = layer();
    let idx = SeekIndex::build(&l.gz[..], SPAN).unwrap();
    assert_eq!(idx.compressed_size, l.gz.len() as u64);
    assert!(
        idx.checkpoints.len() > 10,
        "{} checkpoints",
        idx.checkpoints.len()
    );
    assert!(
        idx.checkpoints.iter().any(|c| c.bits > 0),
        "no mid-byte boundary tested"
    );
    use sha2::Digest;
    assert_eq!(
        idx.layer_digest,
        <[u8; 32]>::from(sha2::Sha256::digest(&l.gz))
    );
    let mut names: Vec<&str> = idx
        .files
        .iter()
        .map(|(p, _)| std::str::from_utf8(p).unwrap())
        .collect();
    names.sort();
    let mut want: Vec<&str> = l.files.iter().map(|(p, _)| p.as_str()).collect();
    want.sort();
    assert_eq!(names, want, "whiteouts, directories are not files");
    for (path, content) in &l.files {
        assert_eq!(&read(&idx, &l.gz, path), content, "{path}");
    }
    // After encoding too.
    let back = SeekIndex::decode(&idx.encode()).unwrap();
    assert_eq!(back, idx);
    for (path, content) in l.files.iter().step_by(17) {
        assert_eq!(&read(&back, &l.gz, path), content, "{path}");
    }
}

/// A reader with the head alone, fetching one window per read, reads
/// every file; the head is a small part of the index.
#[test]
fn every_file_reads_back_through_the_head_and_one_window() {
    let l = layer();
    let idx = SeekIndex::build(&l.gz[..], SPAN).unwrap();
    let enc = idx.encode();
    let n = head_len(&enc).unwrap() as usize;
    let head = SeekHead::decode(&enc[..n]).unwrap();
    assert_eq!(head.head_len as usize, n);
    assert_eq!(head.files, idx.files);
    assert!(n * 5 < enc.len(), "head {n} of {} bytes", enc.len());
    for (path, content) in &l.files {
        let f = head.file(path.as_bytes()).unwrap();
        let plan = head.plan(f.offset, f.size);
        assert_eq!(plan, idx.plan(f.offset, f.size), "{path}");
        let w = head.window(plan.checkpoint).unwrap();
        let at = w.offset as usize;
        let window = head
            .inflate_window(plan.checkpoint, &enc[at..at + w.deflated_len as usize])
            .unwrap();
        let span = &l.gz[plan.compressed_start as usize..plan.compressed_end as usize];
        let got = head
            .extract(&plan, &window, span, f.offset, f.size)
            .unwrap();
        assert_eq!(&got, content, "{path}");
    }
    // A window of other bytes, or another checkpoint's, is refused.
    let w = *head.window(3).unwrap();
    let mut bad = enc[w.offset as usize..][..w.deflated_len as usize].to_vec();
    bad[0] ^= 1;
    assert!(head.inflate_window(3, &bad).is_err());
    let other = head.window(4).unwrap();
    let other = &enc[other.offset as usize..][..other.deflated_len as usize];
    assert!(head.inflate_window(3, other).is_err());
    // A head cut short, or a cut whole index, is refused.
    assert!(SeekHead::decode(&enc[..n - 1]).is_err());
    assert!(SeekIndex::decode(&enc[..enc.len() - 1]).is_err());
}

/// Version 1 as `optimize` wrote it until 2026-12: windows inline, raw
/// file table, one checksum at the end.
fn encode_v1(idx: &SeekIndex) -> Vec<u8> {
    use sha2::Digest;
    let mut out = b"LLSEEKIX".to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&idx.layer_digest);
    for v in [idx.compressed_size, idx.uncompressed_size, idx.span] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&(idx.checkpoints.len() as u32).to_le_bytes());
    out.extend_from_slice(&(idx.files.len() as u32).to_le_bytes());
    for c in &idx.checkpoints {
        out.extend_from_slice(&c.uncompressed.to_le_bytes());
        out.extend_from_slice(&c.compressed.to_le_bytes());
        out.push(c.bits);
        out.extend_from_slice(&(c.window.len() as u16).to_le_bytes());
        let mut d = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        d.write_all(&c.window).unwrap();
        let w = d.finish().unwrap();
        out.extend_from_slice(&(w.len() as u32).to_le_bytes());
        out.extend_from_slice(&w);
    }
    for (path, f) in &idx.files {
        out.extend_from_slice(&(path.len() as u16).to_le_bytes());
        out.extend_from_slice(path);
        out.extend_from_slice(&f.offset.to_le_bytes());
        out.extend_from_slice(&f.size.to_le_bytes());
    }
    let sum = sha2::Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// Artifacts pushed before version 2 keep working, fetched whole.
#[test]
fn version_1_indexes_still_decode_whole() {
    let l = layer();
    let idx = SeekIndex::build(&l.gz[..], SPAN).unwrap();
    let v1 = encode_v1(&idx);
    assert_eq!(SeekIndex::decode(&v1).unwrap(), idx);
    assert!(head_len(&v1).is_none(), "version 1 has no head");
    assert!(SeekHead::decode(&v1).is_err());
    let mut bad = v1.clone();
    bad[100] ^= 1;
    assert!(matches!(SeekIndex::decode(&bad), Err(SeekError::Checksum)));
}

#[test]
fn spans_of_middle_files_are_small() {
    let l = layer();
    let idx = SeekIndex::build(&l.gz[..], SPAN).unwrap();
    let f = idx.file(b"usr/lib/dir3/file150").unwrap();
    let plan = idx.plan(f.offset, f.size);
    assert!(plan.compressed_start > 0);
    assert!(plan.compressed_end < l.gz.len() as u64);
    assert!(
        plan.compressed_len() < 3 * SPAN,
        "{} bytes for a {}-byte file",
        plan.compressed_len(),
        f.size
    );
    // A range inside one file too: partial reads work.
    let big = idx.file(b"big/text.txt").unwrap();
    let plan = idx.plan(big.offset + 1_000_000, 10);
    let span = &l.gz[plan.compressed_start as usize..plan.compressed_end as usize];
    let got = idx
        .extract(&plan, span, big.offset + 1_000_000, 10)
        .unwrap();
    assert_eq!(
        &got,
        &b"all work and no play ".repeat(80_000)[1_000_000..1_000_010]
    );
}

#[test]
fn wrong_spans_fail_or_differ_without_panic() {
    let l = layer();
    let idx = SeekIndex::build(&l.gz[..], SPAN).unwrap();
    let f = idx.file(b"big/random.bin").unwrap();
    let plan = idx.plan(f.offset, f.size);
    let good = &l.gz[plan.compressed_start as usize..plan.compressed_end as usize];
    // Truncated.
    let r = idx.extract(&plan, &good[..good.len() / 2], f.offset, f.size);
    assert!(matches!(r, Err(SeekError::Extract { .. })), "{r:?}");
    let mut short_plan = plan;
    short_plan.compressed_end = plan.compressed_start + (good.len() / 2) as u64;
    assert!(idx
        .extract(&short_plan, &good[..good.len() / 2], f.offset, f.size)
        .is_err());
    // Flipped bytes, shifted bytes, zeros.
    let content = &l
        .files
        .iter()
        .find(|(p, _)| p == "big/random.bin")
        .unwrap()
        .1;
    for damage in 0..3 {
        let mut bad = good.to_vec();
        match damage {
            0 => (0..bad.len()).step_by(997).for_each(|i| bad[i] ^= 0x5a),
            1 => bad.rotate_left(1),
            _ => bad.iter_mut().for_each(|b| *b = 0),
        }
        match idx.extract(&plan, &bad, f.offset, f.size) {
            Err(_) => {}
            Ok(got) => assert_ne!(&got, content, "damage {damage}"),
        }
    }
    // A span of another place of the blob.
    let other = &l.gz[..good.len()];
    if let Ok(got) = idx.extract(&plan, other, f.offset, f.size) {
        assert_ne!(&got, content);
    }
    // Out of range asks.
    assert!(idx.extract(&plan, good, idx.uncompressed_size, 1).is_err());
    assert!(idx.extract(&plan, good, f.offset, u64::MAX).is_err());
}

#[test]
fn hostile_encodings_are_refused() {
    let l = layer();
    let idx = SeekIndex::build(&l.gz[..], SPAN).unwrap();
    let good = idx.encode();
    // Truncations at every length of the header and a few beyond.
    for n in (0..200).chain((200..good.len()).step_by(4099)) {
        assert!(SeekIndex::decode(&good[..n]).is_err(), "truncated to {n}");
    }
    // Any flipped byte: the checksum (or the magic) refuses it.
    for i in (0..good.len()).step_by(811) {
        let mut bad = good.clone();
        bad[i] ^= 1;
        assert!(SeekIndex::decode(&bad).is_err(), "flip at {i}");
    }
    // Hostile but well-checksummed: re-seal the head after editing.
    let n = head_len(&good).unwrap() as usize;
    let reseal = |mut index: Vec<u8>| {
        use sha2::Digest;
        let sum = sha2::Sha256::digest(&index[..n - 32]);
        index[n - 32..n].copy_from_slice(&sum);
        index
    };
    const COUNTS: usize = 8 + 2 + 2 + 32 + 24;
    let mut huge = good.clone();
    huge[COUNTS..COUNTS + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        SeekIndex::decode(&reseal(huge)),
        Err(SeekError::Decode(_))
    ));
    let mut huge = good.clone();
    huge[COUNTS + 4..COUNTS + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        SeekIndex::decode(&reseal(huge)),
        Err(SeekError::Decode(_))
    ));
    // Semantic checks, through edited indexes.
    let edits: Vec<Edit> = vec![
        Box::new(|i| i.checkpoints[2].compressed = i.checkpoints[1].compressed),
        Box::new(|i| i.checkpoints[1].uncompressed = 0),
        Box::new(|i| i.checkpoints[3].bits = 8),
        Box::new(|i| i.checkpoints.last_mut().unwrap().compressed = i.compressed_size),
        Box::new(|i| i.checkpoints[1].window = vec![0; 40_000]),
        Box::new(|i| i.checkpoints.clear()),
        Box::new(|i| i.files[0].0 = b"../etc/passwd".to_vec()),
        Box::new(|i| i.files[0].0 = b"/abs".to_vec()),
        Box::new(|i| i.files[0].0 = b"a\0b".to_vec()),
        Box::new(|i| i.files[0].0 = b"./a".to_vec()),
        Box::new(|i| i.files.swap(0, 1)),
        Box::new(|i| i.files[3].1.size = u64::MAX),
        Box::new(|i| i.files[3].1.offset = i.uncompressed_size),
    ];
    for (n, edit) in edits.iter().enumerate() {
        let mut i = idx.clone();
        edit(&mut i);
        let r = SeekIndex::decode(&i.encode());
        assert!(matches!(r, Err(SeekError::Decode(_))), "edit {n}: {r:?}");
    }
    assert!(matches!(SeekIndex::decode(b"not an index at all, just some bytes of text here.........................................................................."), Err(SeekError::Decode(_))));
}

#[test]
fn non_gzip_and_multi_member_blobs_are_refused() {
    assert!(matches!(
        SeekIndex::build(&b"plain tar"[..], SPAN),
        Err(SeekError::NotGzip(_))
    ));
    let l = layer();
    let mut two = l.gz.clone();
    two.extend_from_slice(&l.gz);
    assert!(matches!(
        SeekIndex::build(&two[..], SPAN),
        Err(SeekError::MultiMember { .. })
    ));
    let cut = &l.gz[..l.gz.len() - 100];
    assert!(SeekIndex::build(cut, SPAN).is_err());
    // Zero padding after the member is fine.
    let mut padded = l.gz.clone();
    padded.extend_from_slice(&[0; 1024]);
    assert!(SeekIndex::build(&padded[..], SPAN).is_ok());
}
