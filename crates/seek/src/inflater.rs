//! A raw-deflate inflater over zlib's C API (libz-rs-sys, on the same
//! zlib-rs flate2 builds): the one stable surface that offers `Z_BLOCK`
//! stops, `data_type`, `inflatePrime` and `inflateSetDictionary` on a raw
//! stream, which zran-style access needs.

use std::ffi::{c_int, c_uint};

use libz_rs_sys::{
    inflate, inflateEnd, inflateInit2_, inflatePrime, inflateSetDictionary, z_stream, zlibVersion,
};
use zlib_rs::{InflateFlush, ReturnCode};

/// `data_type` bit set when inflate stopped at the end of a block header
/// position (mode TYPE): a deflate block boundary.
pub(crate) const AT_BLOCK_BOUNDARY: i32 = 128;
/// `data_type` bit set when the block just finished was the last one.
pub(crate) const LAST_BLOCK: i32 = 64;
/// `data_type` bits holding the unused bits in inflate's bit buffer.
pub(crate) const BUFFERED_BITS: i32 = 63;

/// What one [`RawInflater::inflate`] call did.
pub(crate) struct Step {
    pub consumed: usize,
    pub produced: usize,
    pub code: ReturnCode,
    pub data_type: i32,
}

pub(crate) struct RawInflater {
    // Boxed: the stream's state is set up for this address and must not move.
    strm: Box<z_stream>,
}

// SAFETY: the stream owns its state exclusively; nothing is shared.
unsafe impl Send for RawInflater {}

/// A zlib return code as zlib-rs names it; zlib returns no other codes.
fn return_code(rc: c_int) -> ReturnCode {
    ReturnCode::try_from_c_int(rc).unwrap_or(ReturnCode::StreamError)
}

impl RawInflater {
    /// A raw deflate stream (windowBits -15: no zlib or gzip wrapper).
    pub fn new() -> RawInflater {
        let mut strm = Box::new(z_stream::default());
        // SAFETY: `strm` is a zeroed z_stream (null zalloc/zfree: the default
        // allocator) at a heap address that stays put until `inflateEnd` in
        // drop; the version and size are those of the library called.
        let rc = unsafe {
            inflateInit2_(
                &mut *strm,
                -15,
                zlibVersion(),
                size_of::<z_stream>() as c_int,
            )
        };
        assert_eq!(
            return_code(rc),
            ReturnCode::Ok,
            "inflateInit2(-15) cannot fail"
        );
        RawInflater { strm }
    }

    /// Feed the low `bits` bits of `value` before any input (zlib's inflatePrime).
    pub fn prime(&mut self, bits: u8, value: u8) -> Result<(), ReturnCode> {
        // SAFETY: the stream was initialised in `new` and is ended only in drop.
        let rc = unsafe { inflatePrime(&mut *self.strm, c_int::from(bits), c_int::from(value)) };
        match return_code(rc) {
            ReturnCode::Ok => Ok(()),
            rc => Err(rc),
        }
    }

    /// The 32 KiB of output that preceded the resume point.
    pub fn set_dictionary(&mut self, window: &[u8]) -> Result<(), ReturnCode> {
        let len = c_uint::try_from(window.len()).map_err(|_| ReturnCode::BufError)?;
        // SAFETY: the stream was initialised in `new`; `window` is a live
        // slice of `len` bytes, which zlib copies before returning.
        let rc = unsafe { inflateSetDictionary(&mut *self.strm, window.as_ptr(), len) };
        match return_code(rc) {
            ReturnCode::Ok => Ok(()),
            rc => Err(rc),
        }
    }

    pub fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: InflateFlush) -> Step {
        let avail_in = input.len().min(u32::MAX as usize) as u32;
        let avail_out = output.len().min(u32::MAX as usize) as u32;
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out;
        // SAFETY: the stream was initialised in `new`; next_in/next_out point
        // to live slices of the given lengths for the duration of the call.
        let rc = unsafe { inflate(&mut *self.strm, flush as c_int) };
        let step = Step {
            consumed: (avail_in - self.strm.avail_in) as usize,
            produced: (avail_out - self.strm.avail_out) as usize,
            code: return_code(rc),
            data_type: self.strm.data_type,
        };
        // Dangling otherwise once the slices go.
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        step
    }
}

impl Drop for RawInflater {
    fn drop(&mut self) {
        // SAFETY: initialised in `new` and not ended before; nothing uses the
        // stream after this.
        unsafe { inflateEnd(&mut *self.strm) };
    }
}

/// Deflate `data` raw (for windows in the encoded index).
pub(crate) fn deflate_raw(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; zlib_rs::compress_bound(data.len()) + 64];
    let cfg = zlib_rs::DeflateConfig {
        window_bits: -15,
        level: 9,
        ..Default::default()
    };
    let (done, rc) = zlib_rs::compress_slice(&mut out, data, cfg);
    assert_eq!(rc, ReturnCode::Ok, "compress_bound leaves room");
    let n = done.len();
    out.truncate(n);
    out
}

/// Inflate raw `data` that must expand to at most `limit` bytes.
pub(crate) fn inflate_raw_bounded(data: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut inf = RawInflater::new();
    // One byte more than allowed: output that fills it is too long.
    let mut out = vec![0u8; limit + 1];
    let step = inf.inflate(data, &mut out, InflateFlush::Finish);
    if step.code != ReturnCode::StreamEnd || step.produced > limit || step.consumed != data.len() {
        return None;
    }
    out.truncate(step.produced);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that compress somewhat but not to nothing.
    fn sample(len: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_u32;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if i % 3 == 0 {
                    b'a' + (x % 4) as u8
                } else {
                    (x >> 8) as u8 % 16
                }
            })
            .collect()
    }

    #[test]
    fn raw_deflate_round_trips_within_its_bound() {
        let data = sample(100_000);
        let packed = deflate_raw(&data);
        assert!(packed.len() < data.len());
        assert_eq!(inflate_raw_bounded(&packed, data.len()).unwrap(), data);
        // One byte short of the size: refused, not truncated.
        assert!(inflate_raw_bounded(&packed, data.len() - 1).is_none());
        // Input past the stream's end, or a stream cut short: refused.
        let mut trailing = packed.clone();
        trailing.push(0);
        assert!(inflate_raw_bounded(&trailing, data.len()).is_none());
        assert!(inflate_raw_bounded(&packed[..packed.len() / 2], data.len()).is_none());
    }

    /// The zran resume: stop at a block boundary with Z_BLOCK, then a new
    /// inflater primed with the boundary byte's leftover bits and given the
    /// 32 KiB window before it inflates the rest exactly.
    #[test]
    fn a_new_inflater_resumes_at_a_block_boundary_with_prime_and_dictionary() {
        let data = sample(400_000);
        let packed = deflate_raw(&data);
        let mut inf = RawInflater::new();
        let (mut consumed, mut produced) = (0usize, 0usize);
        let mut out = vec![0u8; data.len()];
        let mut resume = None;
        loop {
            let step = inf.inflate(
                &packed[consumed..],
                &mut out[produced..],
                InflateFlush::Block,
            );
            consumed += step.consumed;
            produced += step.produced;
            assert!(
                matches!(step.code, ReturnCode::Ok | ReturnCode::StreamEnd),
                "{:?}",
                step.code
            );
            let at_boundary =
                step.data_type & AT_BLOCK_BOUNDARY != 0 && step.data_type & LAST_BLOCK == 0;
            if at_boundary && produced > 100_000 {
                // Bits inflate holds but has not used belong to the next block;
                // zlib-rs may hold more than 7.
                let pos = consumed * 8 - (step.data_type & BUFFERED_BITS) as usize;
                let next_byte = pos.div_ceil(8);
                resume = Some((next_byte, (next_byte * 8 - pos) as u8, produced));
                break;
            }
            if step.code == ReturnCode::StreamEnd {
                break;
            }
        }
        let (next_byte, bits, produced) = resume.expect("a block boundary past 100 kB");
        assert!(bits < 8);
        let mut again = RawInflater::new();
        let mut input = &packed[next_byte..];
        if bits > 0 {
            let before = packed[next_byte - 1];
            again.prime(bits, before >> (8 - bits)).unwrap();
        }
        again
            .set_dictionary(&data[produced - crate::WINDOW_SIZE..produced])
            .unwrap();
        let mut rest = vec![0u8; data.len() - produced];
        let mut got = 0;
        while got < rest.len() {
            let step = again.inflate(input, &mut rest[got..], InflateFlush::NoFlush);
            input = &input[step.consumed..];
            got += step.produced;
            if step.code == ReturnCode::StreamEnd {
                break;
            }
            assert_eq!(step.code, ReturnCode::Ok);
            assert!(step.consumed > 0 || step.produced > 0, "no progress");
        }
        assert_eq!(got, rest.len());
        assert!(rest == data[produced..], "resumed bytes differ");
    }
}
