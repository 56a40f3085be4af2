//! The `sha256:<hex>` text of a hash, as OCI descriptors and diff ids write
//! it. For crates below the registry client (whose `Digest` type parses and
//! checks such text); the hash itself is `sha2`'s.

use sha2::{Digest, Sha256};

/// `sha256:` and the lowercase hex of a finished SHA-256 (32 bytes, e.g.
/// `hasher.finalize()`).
pub fn sha256_digest(hash: impl AsRef<[u8]>) -> String {
    format!("sha256:{}", hex::encode(hash.as_ref()))
}

/// The `sha256:<hex>` digest of `data`.
pub fn sha256_digest_of(data: &[u8]) -> String {
    sha256_digest(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_of_nothing_is_the_well_known_one() {
        assert_eq!(
            sha256_digest_of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut h = Sha256::new();
        h.update(b"ab");
        h.update(b"c");
        assert_eq!(sha256_digest(h.finalize()), sha256_digest_of(b"abc"));
    }
}
