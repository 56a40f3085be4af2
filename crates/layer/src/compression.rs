use std::io::Read;

use crate::LayerError;

/// How a layer blob's tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression named by an OCI or Docker layer media type, or `None`
    /// when the type is not a layer type this codec reads (for example an
    /// encrypted layer, or a config blob).
    ///
    /// Parameters (`; foo=bar`) and ASCII case are ignored. Non-distributable
    /// ("foreign") variants are the same format and map the same way.
    pub fn from_media_type(mt: &str) -> Option<Compression> {
        let base = mt
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let rest = base
            .strip_prefix("application/vnd.oci.image.layer.")
            .or_else(|| base.strip_prefix("application/vnd.docker.image.rootfs."))?;
        // What precedes the suffix is a version or variant (`v1.`,
        // `nondistributable.v1.`, `diff.`, `foreign.diff.`); only the
        // suffix decides the compression.
        let variant_ok = |prefix: &str| {
            matches!(
                prefix,
                "v1." | "nondistributable.v1." | "diff." | "foreign.diff."
            )
        };
        const SUFFIXES: [(&str, Compression); 5] = [
            ("tar", Compression::None),
            ("tar+gzip", Compression::Gzip),
            ("tar.gzip", Compression::Gzip),
            ("tar+zstd", Compression::Zstd),
            ("tar.zstd", Compression::Zstd),
        ];
        SUFFIXES.iter().find_map(|(suffix, c)| {
            rest.strip_suffix(suffix)
                .filter(|prefix| variant_ok(prefix))
                .map(|_| *c)
        })
    }

    /// Guess the compression from the first bytes of a blob. Anything that is
    /// neither gzip nor zstd is taken to be a plain tar.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Wrap a compressed layer stream in the matching decoder.
///
/// Gzip uses `MultiGzDecoder` because some tools write a layer as several
/// concatenated gzip members, and a single-member decoder would silently stop
/// after the first. The zstd decoder likewise reads concatenated frames; its
/// window is limited to zstd's default (128 MiB) so a hostile frame header
/// cannot demand gigabytes of memory.
pub fn decoder<'a, R: Read + 'a>(r: R, c: Compression) -> Result<Box<dyn Read + 'a>, LayerError> {
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Compression::Zstd => {
            Box::new(
                zstd::stream::read::Decoder::new(r).map_err(|source| LayerError::Decoder {
                    compression: c,
                    source,
                })?,
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn media_types_map_to_compression() {
        let cases = [
            (
                "application/vnd.oci.image.layer.v1.tar",
                Some(Compression::None),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Some(Compression::Zstd),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar",
                Some(Compression::None),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
                Some(Compression::Zstd),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar",
                Some(Compression::None),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.zstd",
                Some(Compression::Zstd),
            ),
            (
                "Application/VND.oci.image.layer.v1.tar+gzip; x=y",
                Some(Compression::Gzip),
            ),
            // Not layers, or layers this codec cannot read.
            (
                "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
                None,
            ),
            ("application/vnd.oci.image.config.v1+json", None),
            ("application/vnd.oci.image.layer.v1.tar+bzip2", None),
            ("application/vnd.oci.image.layer.v2.tar", None),
            ("application/vnd.oci.image.layer.v1.tartar", None),
            ("", None),
        ];
        for (mt, want) in cases {
            assert_eq!(Compression::from_media_type(mt), want, "media type {mt:?}");
        }
    }

    #[test]
    fn sniff_recognises_magic_bytes() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(b"etc/\0\0\0"), Compression::None);
        assert_eq!(Compression::sniff(&[0x1f]), Compression::None);
        assert_eq!(Compression::sniff(&[0x28, 0xb5, 0x2f]), Compression::None);
        assert_eq!(Compression::sniff(&[]), Compression::None);

        // And the real encoders' output.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"x").unwrap();
        assert_eq!(Compression::sniff(&gz.finish().unwrap()), Compression::Gzip);
        let zs = zstd::encode_all(&b"x"[..], 1).unwrap();
        assert_eq!(Compression::sniff(&zs), Compression::Zstd);
    }

    #[test]
    fn gzip_decoder_reads_concatenated_members() {
        let mut blob = Vec::new();
        for part in [&b"hello "[..], b"world"] {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(part).unwrap();
            blob.extend(gz.finish().unwrap());
        }
        let mut out = String::new();
        decoder(&blob[..], Compression::Gzip)
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello world");
    }

    #[test]
    fn zstd_decoder_reads_concatenated_frames() {
        let mut blob = zstd::encode_all(&b"hello "[..], 3).unwrap();
        blob.extend(zstd::encode_all(&b"world"[..], 3).unwrap());
        let mut out = String::new();
        decoder(&blob[..], Compression::Zstd)
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello world");
    }
}
