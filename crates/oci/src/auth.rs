//! Registry credentials from the auth files Docker and Podman write, and the
//! `WWW-Authenticate` challenge grammar. Secrets are never logged or shown:
//! [`Credential`]'s `Debug` redacts them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;

#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}:***)", self.username)
    }
}

impl Credential {
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// Credentials by registry host, loaded from auth files.
#[derive(Debug, Clone, Default)]
pub struct AuthStore {
    by_host: HashMap<String, Credential>,
    /// Files read, for `--help`-style diagnostics.
    pub sources: Vec<PathBuf>,
}

impl AuthStore {
    /// Files in the order Podman consults them; the first file naming a host wins.
    pub fn default_paths() -> Vec<PathBuf> {
        let mut v = Vec::new();
        if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
            v.push(PathBuf::from(p));
        }
        if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
            v.push(Path::new(&d).join("containers/auth.json"));
        }
        if let Some(h) = std::env::var_os("HOME") {
            v.push(Path::new(&h).join(".config/containers/auth.json"));
        }
        match std::env::var_os("DOCKER_CONFIG") {
            Some(d) => v.push(Path::new(&d).join("config.json")),
            None => {
                if let Some(h) = std::env::var_os("HOME") {
                    v.push(Path::new(&h).join(".docker/config.json"));
                }
            }
        }
        v
    }

    /// Load every readable file among `paths`; a missing file is skipped, a
    /// malformed one is reported (without its contents) and skipped.
    pub fn load(paths: &[PathBuf]) -> AuthStore {
        let mut store = AuthStore::default();
        for p in paths {
            let Ok(text) = std::fs::read_to_string(p) else {
                continue;
            };
            match parse_auth_file(&text) {
                Ok(entries) => {
                    store.sources.push(p.clone());
                    for (host, cred) in entries {
                        store.by_host.entry(host).or_insert(cred);
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "ignoring malformed auth file")
                }
            }
        }
        store
    }

    pub fn insert(&mut self, host: &str, cred: Credential) {
        self.by_host.insert(normalize_host(host), cred);
    }

    pub fn get(&self, host: &str) -> Option<&Credential> {
        self.by_host.get(&normalize_host(host)).or_else(|| {
            // Docker Hub credentials are filed under its legacy index address.
            (host == "docker.io" || host == "registry-1.docker.io")
                .then(|| self.by_host.get("index.docker.io"))
                .flatten()
        })
    }
}

/// `https://index.docker.io/v1/` → `index.docker.io`; `host:5000` stays.
fn normalize_host(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    k.split('/').next().unwrap_or(k).to_string()
}

fn parse_auth_file(text: &str) -> Result<Vec<(String, Credential)>, String> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let f: File = serde_json::from_str(text).map_err(|e| format!("not an auth file: {e}"))?;
    let mut out = Vec::new();
    for (host, e) in f.auths {
        let cred = if let Some(a) = e.auth.filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|_| format!("entry for {host}: auth is not base64"))?;
            let raw = String::from_utf8(raw).map_err(|_| format!("entry for {host}: not UTF-8"))?;
            let (u, p) = raw
                .split_once(':')
                .ok_or_else(|| format!("entry for {host}: auth is not user:password"))?;
            Credential {
                username: u.to_string(),
                password: p.to_string(),
            }
        } else if let (Some(u), Some(p)) = (e.username, e.password) {
            Credential {
                username: u,
                password: p,
            }
        } else {
            continue; // e.g. an entry served by a credential helper
        };
        out.push((normalize_host(&host), cred));
    }
    Ok(out)
}

/// One parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parse `Bearer realm="…",service="…",scope="a,b"`. Quoted values may hold
/// commas and escaped quotes.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.find(' ') {
        Some(i) => (&header[..i], header[i + 1..].trim()),
        None => (header, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    let b = rest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i] == b' ') {
            i += 1;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let key = rest[ks..i].trim().to_ascii_lowercase();
        i += 1;
        let mut val = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                let ch_len = utf8_len(b[i]);
                val.push_str(&rest[i..i + ch_len]);
                i += ch_len;
            }
            i += 1;
        } else {
            let vs = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            val = rest[vs..i].trim().to_string();
        }
        params.insert(key, val);
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_with_commas_in_scope() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.example/token");
        assert_eq!(c.params["scope"], "repository:a/b:pull,push");
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry Realm");
    }

    #[test]
    fn auth_file_forms_and_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.json");
        let b = dir.path().join("b.json");
        // "alice:s3cret" and a docker-style URL key
        std::fs::write(
            &a,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"YWxpY2U6czNjcmV0"},"127.0.0.1:5000":{"username":"u","password":"p"}}}"#,
        )
        .unwrap();
        std::fs::write(&b, r#"{"auths":{"127.0.0.1:5000":{"auth":"eDp5"}}}"#).unwrap();
        let s = AuthStore::load(&[a, b, dir.path().join("missing.json")]);
        assert_eq!(s.get("docker.io").unwrap().username, "alice");
        assert_eq!(
            s.get("127.0.0.1:5000").unwrap().username,
            "u",
            "first file wins"
        );
        assert!(s.get("other:1").is_none());
        let dbg = format!("{:?}", s.get("docker.io").unwrap());
        assert!(!dbg.contains("s3cret"), "secret leaked in Debug: {dbg}");
        assert_eq!(
            s.get("docker.io").unwrap().basic_header(),
            "Basic YWxpY2U6czNjcmV0"
        );
    }

    #[test]
    fn malformed_auth_file_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.json");
        std::fs::write(&a, "{ not json").unwrap();
        let s = AuthStore::load(&[a]);
        assert!(s.sources.is_empty());
    }
}
