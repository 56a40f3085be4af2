//! Sizes as people write them: `200MB`, `1.5GiB`, `500000000`.

/// Why a size could not be read. The text is quoted in every message, so a
/// caller only has to say where it came from (a flag, a variable, a file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?}: empty size")]
    Empty(String),
    #[error("{0:?}: a size cannot be negative")]
    Negative(String),
    #[error("{0:?}: not a number of bytes (expected e.g. 500000000, 200MB, 1.5GiB)")]
    NotANumber(String),
    #[error("{text:?}: unknown unit {unit:?} (use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB)")]
    UnknownUnit { text: String, unit: String },
    #[error("{0:?}: too large (more than 2^64 bytes)")]
    Overflow(String),
}

/// Parse a byte count: a decimal number (a fraction allowed, e.g. `1.5`), an
/// optional space, and an optional unit: `B`; `k`/`kB`, `M`/`MB`, `G`/`GB`,
/// `T`/`TB` (powers of 1000); `Ki`/`KiB`, `Mi`/`MiB`, `Gi`/`GiB`, `Ti`/`TiB`
/// (powers of 1024). Units are case-insensitive except that a bare `b` is not
/// a bit. Fractions of a byte are dropped.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(SizeError::Empty(text.into()));
    }
    if t.starts_with('-') {
        return Err(SizeError::Negative(text.into()));
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let num_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(num_end);
    let unit = unit.trim_start();
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(SizeError::NotANumber(text.into()));
    }
    let mult: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000u128.pow(2),
        "g" | "gb" => 1000u128.pow(3),
        "t" | "tb" => 1000u128.pow(4),
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => {
            return Err(SizeError::UnknownUnit {
                text: text.into(),
                unit: unit.into(),
            })
        }
    };
    let overflow = || SizeError::Overflow(text.into());
    // Integer arithmetic, so that 1.1GB is exactly 1100000000.
    let mut whole: u128 = 0;
    for d in int.bytes() {
        whole = whole
            .checked_mul(10)
            .and_then(|w| w.checked_add(u128::from(d - b'0')))
            .filter(|w| *w <= u128::from(u64::MAX))
            .ok_or_else(overflow)?;
    }
    let mut bytes = whole.checked_mul(mult).ok_or_else(overflow)?;
    // Digits past the 12th cannot matter at a TiB multiplier: ignored.
    let frac = &frac[..frac.len().min(12)];
    if !frac.is_empty() {
        let f: u128 = frac
            .parse()
            .map_err(|_| SizeError::NotANumber(text.into()))?;
        bytes += f * mult / 10u128.pow(frac.len() as u32);
    }
    u64::try_from(bytes).map_err(|_| overflow())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_people_write() {
        for (s, want) in [
            ("500000000", 500_000_000),
            ("200MB", 200_000_000),
            ("200 MB", 200_000_000),
            ("200mb", 200_000_000),
            ("200M", 200_000_000),
            ("1.5GiB", 3 << 29),
            ("1.1GB", 1_100_000_000),
            ("2KiB", 2048),
            ("0", 0),
            ("0.5k", 500),
            ("7B", 7),
            (" 3 TB ", 3_000_000_000_000),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_size(s), Ok(want), "{s:?}");
        }
    }

    #[test]
    fn hostile_sizes_are_clear_errors() {
        assert!(matches!(parse_size(""), Err(SizeError::Empty(_))));
        assert!(matches!(parse_size("  "), Err(SizeError::Empty(_))));
        assert!(matches!(parse_size("-5MB"), Err(SizeError::Negative(_))));
        assert!(matches!(
            parse_size("18446744073709551616"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999999999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("20000000TiB"),
            Err(SizeError::Overflow(_))
        ));
        let e = parse_size("200 parsecs").unwrap_err();
        assert!(matches!(e, SizeError::UnknownUnit { .. }));
        assert!(e.to_string().contains("parsecs"), "{e}");
        for bad in ["MB", ".", "1.2.3GB", "0x10", "1e9", "nan", "∞"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }
}
