//! Image references: `[host[:port]/]repo[:tag][@digest]`, following the grammar
//! of the distribution project (`docker.io` and `library/` are implied for short
//! names, as every container tool does).

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;
use crate::error::OciError;

pub const DEFAULT_REGISTRY: &str = "docker.io";
pub const DEFAULT_TAG: &str = "latest";

/// A repository on a registry: where blobs and manifests live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repository {
    /// `host` or `host:port`, as written (docker.io for the default).
    pub registry: String,
    /// Path components joined by `/`, e.g. `library/busybox`.
    pub name: String,
}

impl Repository {
    /// The host the HTTP API is served from (Docker Hub's API host differs from its name).
    pub fn api_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    pub repository: Repository,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            repository: self.repository.clone(),
            tag: self.tag.clone(),
            digest: Some(digest),
        }
    }
    /// The same repository under another tag or digest.
    pub fn with_tag(&self, tag: &str) -> Reference {
        Reference {
            repository: self.repository.clone(),
            tag: Some(tag.to_string()),
            digest: None,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

fn valid_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        // An IPv6 literal is bracketed; its colons are not a port separator.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (h, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    if host.starts_with('[') {
        return host.ends_with(']') && host.len() > 2;
    }
    !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl FromStr for Reference {
    type Err = OciError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| OciError::InvalidReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > 4096 {
            return Err(bad("too long"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(d.parse::<Digest>().map_err(|e| bad(&e.to_string()))?),
            ),
            None => (s, None),
        };
        // A tag follows the last ':' that comes after the last '/', so that a
        // registry port (`host:5000/repo`) is not taken for a tag.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name_part, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let t = &rest[last_slash + i + 1..];
                if !valid_tag(t) {
                    return Err(bad(&format!("invalid tag {t:?}")));
                }
                (&rest[..last_slash + i], Some(t.to_string()))
            }
            None => (rest, None),
        };
        let (registry, path) = match name_part.split_once('/') {
            Some((first, remainder))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !valid_host(first) {
                    return Err(bad(&format!("invalid registry host {first:?}")));
                }
                (first.to_string(), remainder.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name_part.to_string()),
        };
        if path.is_empty() {
            return Err(bad("missing repository name"));
        }
        if let Some(c) = path.split('/').find(|c| !valid_component(c)) {
            return Err(bad(&format!(
                "invalid repository path component {c:?} (lowercase letters, digits and . _ - separators)"
            )));
        }
        let name = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if name.len() > 255 {
            return Err(bad("repository name longer than 255 characters"));
        }
        Ok(Reference {
            repository: Repository { registry, name },
            tag: if tag.is_none() && digest.is_none() {
                Some(DEFAULT_TAG.to_string())
            } else {
                tag
            },
            digest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_common_forms() {
        let x = r("busybox");
        assert_eq!(x.repository.registry, "docker.io");
        assert_eq!(x.repository.name, "library/busybox");
        assert_eq!(x.tag.as_deref(), Some("latest"));

        let x = r("127.0.0.1:5000/lazylayer/python3:v1");
        assert_eq!(x.repository.registry, "127.0.0.1:5000");
        assert_eq!(x.repository.name, "lazylayer/python3");
        assert_eq!(x.tag.as_deref(), Some("v1"));

        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let x = r(&format!("localhost/a/b@{d}"));
        assert_eq!(x.repository.registry, "localhost");
        assert_eq!(x.tag, None);
        assert_eq!(x.manifest_ref(), d);

        let x = r(&format!("quay.io/a/b:t@{d}"));
        assert_eq!(x.tag.as_deref(), Some("t"));
        assert_eq!(x.manifest_ref(), d, "digest wins over tag");

        let x = r("[::1]:5000/repo");
        assert_eq!(x.repository.registry, "[::1]:5000");
    }

    #[test]
    fn rejects_bad_forms() {
        for s in [
            "",
            "UPPER/case",
            "host:5000/",
            "repo:",
            "repo:bad/tag",
            "a//b",
            "-a",
            "a@sha256:123",
            "host:99999999/x",
            "repo:.tag",
            "a/../b",
        ] {
            assert!(s.parse::<Reference>().is_err(), "{s:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn display_roundtrips(
            host in prop::option::of("[a-z]{1,8}(\\.[a-z]{1,5})?(:[0-9]{1,5})?"),
            comps in prop::collection::vec("[a-z0-9]{1,6}([._-][a-z0-9]{1,4})?", 1..4),
            tag in prop::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"),
        ) {
            let host = host.filter(|h| h.contains('.') || h.contains(':'));
            let mut s = String::new();
            if let Some(h) = &host { s.push_str(h); s.push('/'); }
            s.push_str(&comps.join("/"));
            if let Some(t) = &tag { s.push(':'); s.push_str(t); }
            let parsed: Reference = s.parse().unwrap();
            let again: Reference = parsed.to_string().parse().unwrap();
            prop_assert_eq!(&parsed, &again);
            if let Some(t) = &tag { prop_assert_eq!(parsed.tag.as_deref(), Some(t.as_str())); }
        }

        #[test]
        fn anything_parsed_roundtrips(s in "\\PC{0,100}") {
            if let Ok(r) = s.parse::<Reference>() {
                prop_assert_eq!(r.to_string().parse::<Reference>().unwrap(), r);
            }
        }
    }
}
