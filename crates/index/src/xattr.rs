//! Reading extended attributes (index building and the layer writer).

use rustix::io::Errno;

/// Call an xattr syscall with a growing buffer until the result fits. (rustix
/// caps the result at the buffer length, so a zero-length size probe reports 0.)
pub fn read_sized(
    mut call: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    // Linux caps both a value and a name list at 64 KiB.
    const MAX: usize = 1 << 16;
    let mut buf = vec![0u8; 1024];
    loop {
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) if buf.len() < MAX => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(e),
        }
    }
}
