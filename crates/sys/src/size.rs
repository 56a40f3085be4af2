//! A byte count as people read it (decimal units, one digit), as the
//! registry client's messages and the CLI's tables print it: one formatter,
//! so a size in an error reads like the same size in `lazylayer df`.

use std::fmt;

/// `n` bytes, displayed as `999 B`, `1.0 kB`, `7.7 MB`, `25.0 GB`...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
        let mut v = self.0 as f64;
        let mut u = 0;
        while v >= 1000.0 && u < UNITS.len() - 1 {
            v /= 1000.0;
            u += 1;
        }
        if u == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.1} {}", UNITS[u])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_decimal_with_one_digit() {
        assert_eq!(ByteSize(0).to_string(), "0 B");
        assert_eq!(ByteSize(999).to_string(), "999 B");
        assert_eq!(ByteSize(1000).to_string(), "1.0 kB");
        assert_eq!(ByteSize(1024).to_string(), "1.0 kB");
        assert_eq!(ByteSize(7_700_000).to_string(), "7.7 MB");
        assert_eq!(ByteSize(12_345_678).to_string(), "12.3 MB");
        assert_eq!(ByteSize(25_000_000_000).to_string(), "25.0 GB");
        assert_eq!(ByteSize(5_200_000_000_000).to_string(), "5.2 TB");
        // No unit past TB: a large count stays in TB.
        assert_eq!(ByteSize(3_000_000_000_000_000).to_string(), "3000.0 TB");
    }
}
