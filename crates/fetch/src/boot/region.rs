//! The index region at the head of a chunked boot layer: one tar entry,
//! the index file, compressed as one piece.

use std::io::Read;

use lazylayer_layer::index::chunks::ChunkCompression;
use lazylayer_layer::index::{BootIndex, INDEX_FILE_NAME};

use super::{bad, MAX_REGION};
use crate::FetchError;

/// The index region: one tar entry, the index file, compressed as one piece.
pub(super) fn decode_region(
    image: &str,
    region: &[u8],
    c: ChunkCompression,
) -> Result<BootIndex, FetchError> {
    let tar = lazylayer_layer::chunked::decompress_bounded(region, c, MAX_REGION)
        .map_err(|e| bad(image, format!("the boot index region: {e}")))?;
    let mut a = tar::Archive::new(&tar[..]);
    let mut entries = a
        .entries()
        .map_err(|e| bad(image, format!("the boot index region: {e}")))?;
    let mut e = entries
        .next()
        .ok_or_else(|| bad(image, "the boot index region holds no entry"))?
        .map_err(|e| bad(image, format!("the boot index region: {e}")))?;
    if &*e.path_bytes() != INDEX_FILE_NAME.as_bytes()
        || e.header().entry_type() != tar::EntryType::Regular
    {
        return Err(bad(
            image,
            format!(
                "the boot index region holds {}, not the index",
                String::from_utf8_lossy(&e.path_bytes())
            ),
        ));
    }
    let mut bytes = Vec::new();
    e.read_to_end(&mut bytes)
        .map_err(|e| bad(image, format!("the boot index region: {e}")))?;
    BootIndex::decode(&bytes).map_err(|source| FetchError::Index {
        image: image.to_string(),
        source,
    })
}
