//! Layer path rules shared by the extractor and the writer.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::LayerError;

/// Prefix of an OCI whiteout file: `DIR/.wh.NAME` deletes `DIR/NAME` from the
/// layers below.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Names starting with this prefix are reserved by the OCI spec; only
/// [`OPAQUE_MARKER`] has a meaning, every other such name is a plain entry
/// (lazylayer keeps its boot index in a root-level file so named).
pub const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
/// `DIR/.wh..wh..opq` hides everything the layers below have in `DIR`.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Longest relative path accepted: the index's limit, so that every path a
/// layer can hold fits the boot index.
use lazylayer_index::MAX_PATH_LEN;

/// Normalise a path from a tar header into a relative path inside the layer.
///
/// Refuses empty paths, NUL bytes, absolute paths and any `..` component (even
/// one that would stay inside the root, such as `a/../b`: no legitimate layer
/// writer emits it, and refusing it keeps the rule simple to audit). Drops `.`
/// components, duplicate and trailing slashes. A path naming the root itself
/// (`.`, `./`) normalises to the empty path.
pub fn normalize(raw: &[u8]) -> Result<PathBuf, LayerError> {
    let shown = || PathBuf::from(OsStr::from_bytes(raw));
    if raw.is_empty() {
        return Err(LayerError::EmptyPath { path: shown() });
    }
    if raw.contains(&0) {
        return Err(LayerError::NulInPath { path: shown() });
    }
    if raw[0] == b'/' {
        return Err(LayerError::AbsolutePath { path: shown() });
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(LayerError::ParentComponent { path: shown() }),
            name => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(name);
            }
        }
    }
    if out.len() > MAX_PATH_LEN {
        return Err(LayerError::PathTooLong {
            path: shown(),
            limit: MAX_PATH_LEN,
        });
    }
    Ok(PathBuf::from(OsStr::from_bytes(&out)))
}

/// What an entry's file name means to overlayfs-style layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpecialName<'a> {
    /// An ordinary name (this includes reserved `.wh..wh.*` names other than
    /// the opaque marker).
    Plain,
    /// `.wh..wh..opq`: the parent directory is opaque.
    Opaque,
    /// `.wh.NAME`: `NAME` is deleted.
    Whiteout(&'a [u8]),
}

pub(crate) fn classify(file_name: &[u8]) -> SpecialName<'_> {
    if file_name == OPAQUE_MARKER.as_bytes() {
        SpecialName::Opaque
    } else if file_name.starts_with(WHITEOUT_META_PREFIX.as_bytes()) {
        SpecialName::Plain
    } else if let Some(name) = file_name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
        SpecialName::Whiteout(name)
    } else {
        SpecialName::Plain
    }
}

/// Split a normalised, non-empty path into its parent (possibly empty) and
/// final component.
pub(crate) fn split_parent(path: &Path) -> (&Path, &OsStr) {
    let parent = path.parent().unwrap_or(Path::new(""));
    let name = path.file_name().unwrap_or(path.as_os_str());
    (parent, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        normalize(raw.as_bytes())
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn normalises_dots_and_slashes() {
        assert_eq!(ok("a/b"), "a/b");
        assert_eq!(ok("./a//b/"), "a/b");
        assert_eq!(ok("a/./b/."), "a/b");
        assert_eq!(ok("./"), "");
        assert_eq!(ok("."), "");
        assert_eq!(ok("..."), "...");
        assert_eq!(ok(".wh..wh..opq"), ".wh..wh..opq");
    }

    #[test]
    fn refuses_hostile_paths() {
        assert!(matches!(normalize(b""), Err(LayerError::EmptyPath { .. })));
        assert!(matches!(
            normalize(b"/etc"),
            Err(LayerError::AbsolutePath { .. })
        ));
        assert!(matches!(
            normalize(b"//etc"),
            Err(LayerError::AbsolutePath { .. })
        ));
        assert!(matches!(
            normalize(b".."),
            Err(LayerError::ParentComponent { .. })
        ));
        assert!(matches!(
            normalize(b"a/../b"),
            Err(LayerError::ParentComponent { .. })
        ));
        assert!(matches!(
            normalize(b"a/.."),
            Err(LayerError::ParentComponent { .. })
        ));
        assert!(matches!(
            normalize(b"a\0b"),
            Err(LayerError::NulInPath { .. })
        ));
        // 2048 components of one byte: 4095 bytes once normalised, the limit.
        let at_limit = "a/".repeat(2048);
        assert_eq!(
            normalize(at_limit.as_bytes()).unwrap().as_os_str().len(),
            MAX_PATH_LEN
        );
        let over = format!("b/{at_limit}");
        assert!(matches!(
            normalize(over.as_bytes()),
            Err(LayerError::PathTooLong { .. })
        ));
    }

    #[test]
    fn classifies_whiteout_names() {
        assert_eq!(classify(b".wh..wh..opq"), SpecialName::Opaque);
        assert_eq!(classify(b".wh.foo"), SpecialName::Whiteout(b"foo"));
        assert_eq!(classify(b".wh..wh.index"), SpecialName::Plain);
        assert_eq!(classify(b".wh..wh..opqx"), SpecialName::Plain);
        assert_eq!(classify(b"foo.wh.bar"), SpecialName::Plain);
        assert_eq!(classify(b".wh."), SpecialName::Whiteout(b""));
    }
}
