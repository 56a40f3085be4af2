//! A raw-deflate inflater over zlib-rs' internal API: the one zlib-rs
//! surface that offers `Z_BLOCK` stops, `data_type`, `prime` and
//! `set_dictionary` on a raw stream, which zran-style access needs.

use zlib_rs::c_api::z_stream;
use zlib_rs::inflate::{self, InflateConfig, InflateStream};
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

impl RawInflater {
    /// A raw deflate stream (windowBits -15: no zlib or gzip wrapper).
    pub fn new() -> RawInflater {
        let mut strm = Box::new(z_stream::default());
        let rc = inflate::init(&mut strm, InflateConfig { window_bits: -15 });
        assert_eq!(rc, ReturnCode::Ok, "inflateInit2(-15) cannot fail");
        RawInflater { strm }
    }

    fn stream(&mut self) -> &mut InflateStream<'static> {
        // SAFETY: initialised by `inflate::init` in `new` and never ended
        // before drop.
        unsafe { InflateStream::from_stream_mut(&mut *self.strm) }.expect("initialised stream")
    }

    /// Feed the low `bits` bits of `value` before any input (zlib's inflatePrime).
    pub fn prime(&mut self, bits: u8, value: u8) -> Result<(), ReturnCode> {
        match inflate::prime(self.stream(), i32::from(bits), i32::from(value)) {
            ReturnCode::Ok => Ok(()),
            rc => Err(rc),
        }
    }

    /// The 32 KiB of output that preceded the resume point.
    pub fn set_dictionary(&mut self, window: &[u8]) -> Result<(), ReturnCode> {
        match inflate::set_dictionary(self.stream(), window) {
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
        // SAFETY: next_in/next_out point to live slices of the given lengths
        // for the duration of the call.
        let code = unsafe { inflate::inflate(self.stream(), flush) };
        let step = Step {
            consumed: (avail_in - self.strm.avail_in) as usize,
            produced: (avail_out - self.strm.avail_out) as usize,
            code,
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
        let _ = inflate::end(self.stream());
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
