//! Reading uncompressed bytes from a compressed span.

use zlib_rs::{InflateFlush, ReturnCode};

use crate::inflater::RawInflater;
use crate::{extract_error, Plan, Result, Resume};

/// Uncompressed bytes `off..off+len` of a layer of `uncompressed_size`
/// bytes from `compressed`, the blob bytes `plan` names, resuming at `cp`
/// with its `window`.
pub(crate) fn extract(
    cp: &impl Resume,
    window: &[u8],
    uncompressed_size: u64,
    plan: &Plan,
    compressed: &[u8],
    off: u64,
    len: u64,
) -> Result<Vec<u8>> {
    let fail = |reason: &str| extract_error(off, len, reason);
    if plan.compressed_start != cp.first_byte()
        || plan.compressed_end < plan.compressed_start
        || compressed.len() as u64 != plan.compressed_len()
    {
        return Err(fail("the compressed bytes do not match the plan"));
    }
    if off < cp.uncompressed()
        || off
            .checked_add(len)
            .is_none_or(|end| end > uncompressed_size)
    {
        return Err(fail("outside the plan's checkpoint or the layer"));
    }
    let want = usize::try_from(len).map_err(|_| fail("too large for memory"))?;
    let mut inf = RawInflater::new();
    let mut input = compressed;
    let bits = cp.bits();
    if bits > 0 {
        let (&first, rest) = input
            .split_first()
            .ok_or_else(|| fail("empty compressed span"))?;
        inf.prime(bits, first >> (8 - bits))
            .map_err(|rc| fail(&format!("inflatePrime: {rc:?}")))?;
        input = rest;
    }
    if !window.is_empty() {
        inf.set_dictionary(window)
            .map_err(|rc| fail(&format!("inflateSetDictionary: {rc:?}")))?;
    }
    let mut skip = off - cp.uncompressed();
    // Grown as bytes come, not reserved from `len`: a wrong span must not
    // make a large allocation before failing.
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while out.len() < want {
        let step = inf.inflate(input, &mut buf, InflateFlush::NoFlush);
        input = &input[step.consumed..];
        let mut produced = &buf[..step.produced];
        let dropped = (skip.min(produced.len() as u64)) as usize;
        skip -= dropped as u64;
        produced = &produced[dropped..];
        let take = produced.len().min(want - out.len());
        out.extend_from_slice(&produced[..take]);
        if out.len() == want {
            break;
        }
        match step.code {
            ReturnCode::Ok if step.consumed > 0 || step.produced > 0 => {}
            ReturnCode::Ok | ReturnCode::BufError => {
                return Err(fail("the compressed span ends before the wanted bytes"))
            }
            ReturnCode::StreamEnd => {
                return Err(fail("the deflate stream ends before the wanted bytes"))
            }
            rc => return Err(fail(&format!("corrupt deflate data ({rc:?})"))),
        }
    }
    Ok(out)
}
