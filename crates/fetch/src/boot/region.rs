//! The index region at the head of a chunked boot layer: the index file's
//! tar entries (`NAME`, `NAME.1`, …), compressed as one piece. The index
//! rides in the headers of entries of size 0 (`lazylayer_layer::metadata`);
//! boot layers made before that hold it as one entry's content, and still
//! open.

use std::io::Read;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use lazylayer_index::chunks::{BootContent, ChunkCompression};
use lazylayer_index::{BootIndex, INDEX_FILE_NAME};
use lazylayer_oci::{BodyStream, Digest};

use super::plan::LinkEstimate;
use super::remote::ChunkRemote;
use super::{bad, MAX_REGION};
use crate::FetchError;

/// The head of a boot layer as the first request brought it.
pub(super) struct RegionHead {
    /// False when the registry ignored Range: `body` is the whole blob.
    pub ranged: bool,
    /// The rest of the response (None for a region kept by an earlier start).
    pub body: Option<BodyStream>,
    pub region: Vec<u8>,
    /// Bytes past the region that came with its last piece.
    pub leftover: Bytes,
    /// The link as this response measured it (the start set's plan).
    pub link: Option<LinkEstimate>,
    /// The link's rate is the one the last start set from this registry
    /// measured, kept in the store: a rate to trust, unlike one assumed or
    /// timed on a small response.
    pub rate_kept: bool,
}

/// The index region's `region_len` bytes, with one Range GET (or the start
/// of the whole blob, if the registry ignores Range).
pub(super) async fn fetch_region(
    remote: &dyn ChunkRemote,
    image: &str,
    region_len: u64,
) -> Result<RegionHead, FetchError> {
    let sent = Instant::now();
    let (ranged, mut body) = remote.range_stream(0, region_len).await?;
    let mut got = Vec::with_capacity(region_len as usize);
    let mut first = None;
    while (got.len() as u64) < region_len {
        match body.next().await {
            Some(c) => {
                let c = c?;
                first.get_or_insert_with(Instant::now);
                got.extend_from_slice(&c);
            }
            None => {
                return Err(bad(
                    image,
                    format!(
                        "the registry sent {} of the index region's {} bytes",
                        got.len(),
                        region_len
                    ),
                ))
            }
        }
    }
    let link = first.map(|first| LinkEstimate::measure(region_len, first - sent, first.elapsed()));
    let leftover = Bytes::from(got.split_off(region_len as usize));
    Ok(RegionHead {
        ranged,
        body: Some(body),
        region: got,
        leftover,
        link,
        rate_kept: false,
    })
}

/// The index a region holds and its chunk table, once the region is the
/// one the manifest names (`digest`) and the table fits the layer: its
/// compression, and with the region its `layer_size`.
pub(super) fn check_region(
    image: &str,
    region: &[u8],
    digest: &Digest,
    compression: ChunkCompression,
    layer_size: u64,
) -> Result<(BootIndex, BootContent), FetchError> {
    let actual = Digest::sha256_of(region);
    if actual != *digest {
        return Err(bad(
            image,
            format!(
                "the boot index region is {actual}, the manifest says {}: refusing it",
                digest
            ),
        ));
    }
    let index = decode_region(image, region, compression)?;
    let content = index
        .boot
        .clone()
        .ok_or_else(|| bad(image, "the boot index has no chunk table"))?;
    if content.compression != compression {
        return Err(bad(
            image,
            "the chunk table and the layer's media type disagree on compression",
        ));
    }
    if region.len() as u64 + content.compressed_len() != layer_size {
        return Err(bad(
            image,
            format!(
                "index region ({}) and chunks ({}) do not add up to the boot layer's {} bytes",
                region.len(),
                content.compressed_len(),
                layer_size
            ),
        ));
    }
    Ok((index, content))
}

/// The index region: the index file's entries, compressed as one piece.
pub(super) fn decode_region(
    image: &str,
    region: &[u8],
    c: ChunkCompression,
) -> Result<BootIndex, FetchError> {
    let tar = lazylayer_layer::chunked::decompress_bounded(region, c, MAX_REGION)
        .map_err(|e| bad(image, format!("the boot index region: {e}")))?;
    let broken = |e: std::io::Error| bad(image, format!("the boot index region: {e}"));
    let mut a = tar::Archive::new(&tar[..]);
    let mut bytes: Option<Vec<u8>> = None;
    for (k, e) in a.entries().map_err(broken)?.enumerate() {
        let mut e = e.map_err(broken)?;
        let k = u32::try_from(k).unwrap_or(u32::MAX);
        let name = lazylayer_layer::metadata::part_name(INDEX_FILE_NAME.as_bytes(), k);
        if *e.path_bytes() != name[..] || e.header().entry_type() != tar::EntryType::Regular {
            return Err(bad(
                image,
                format!(
                    "the boot index region holds {}, not the index",
                    String::from_utf8_lossy(&e.path_bytes())
                ),
            ));
        }
        let carried = lazylayer_layer::metadata::entry_data(&mut e).map_err(broken)?;
        match (carried, e.size(), &mut bytes) {
            // The index (or its next part) in the entry's headers.
            (Some(part), 0, Some(b)) => b.extend_from_slice(&part),
            (Some(part), 0, None) => bytes = Some(part),
            // A boot layer made before the index moved to the headers: one
            // entry, the index as its content.
            (None, _, None) => {
                let mut b = Vec::new();
                e.read_to_end(&mut b).map_err(broken)?;
                bytes = Some(b);
            }
            _ => {
                return Err(bad(
                    image,
                    "the boot index region holds the index twice, or in two forms",
                ))
            }
        }
    }
    let bytes = bytes.ok_or_else(|| bad(image, "the boot index region holds no entry"))?;
    BootIndex::decode(&bytes).map_err(|source| FetchError::Index {
        image: image.to_string(),
        source,
    })
}
