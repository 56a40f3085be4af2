//! Bearer tokens kept on disk between processes, so that a new process
//! (each `lazylayer run` or `pull`, a restarted snapshotter) sends a valid
//! token with its first request instead of paying a 401, a token request
//! and the retried request before its first byte.
//!
//! One file per host and scope set, `<dir>/<sha256 of host and scopes>.json`,
//! holding a token per credential it was obtained with (anonymous, or which
//! Basic user and secret: a token is never sent on behalf of other
//! credentials). The directory is 0700 and the files 0600; a file is
//! replaced whole (temp file and rename). A file that is unreadable,
//! oversized, not ours, too open or not what we wrote is ignored with a
//! warning: the cache only ever saves round trips, it never fails a request.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use crate::auth::Credential;

/// A token file is a few tokens of a few KiB; anything larger is not ours.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// Tokens kept per host and scope set (one per credential seen).
const MAX_TOKENS_PER_FILE: usize = 8;
/// Files looked at when expired ones are pruned.
const MAX_FILES_PRUNED: usize = 4096;
/// The token spec's default when a response has no `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
/// However long a token server says, a token is not kept longer.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A token is dropped this much before its end (or a tenth of its
/// lifetime, if longer): a request sent just before the end could arrive
/// after it, or the registry's clock may run ahead.
const MIN_SAFETY_MARGIN: Duration = Duration::from_secs(5);
const FORMAT_VERSION: u32 = 1;

/// Which credentials a token was obtained with, as a digest (the files
/// never hold a secret other than the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CredentialId(String);

impl CredentialId {
    pub(crate) fn of(cred: Option<&Credential>) -> CredentialId {
        let mut h = Sha256::new();
        h.update(b"lazylayer token cache credential\0");
        match cred {
            None => h.update(b"anonymous"),
            Some(c) => {
                h.update(b"basic\0");
                h.update(c.username.as_bytes());
                h.update(b"\0");
                h.update(c.password.as_bytes());
            }
        }
        CredentialId(hex::encode(h.finalize()))
    }
}

/// When a token granted at `now` stops being sent: `expires_in` seconds
/// (60 when absent) from when it was issued (`issued_at`, RFC 3339, when
/// given and not in the future), less a safety margin. None: it is not
/// worth keeping.
pub(crate) fn token_expiry(
    now: SystemTime,
    expires_in: Option<u64>,
    issued_at: Option<&str>,
) -> Option<SystemTime> {
    let lifetime = expires_in
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LIFETIME)
        .min(MAX_LIFETIME);
    let margin = (lifetime / 10).max(MIN_SAFETY_MARGIN);
    let issued = issued_at
        .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
        .filter(|t| *t <= now)
        .unwrap_or(now);
    let end = issued + lifetime.checked_sub(margin)?;
    (end > now).then_some(end)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TokenFile {
    version: u32,
    host: String,
    scopes: Vec<String>,
    tokens: Vec<StoredToken>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredToken {
    credential: String,
    token: String,
    /// Seconds since the epoch after which it is never sent.
    expires_at: u64,
}

impl StoredToken {
    fn valid_at(&self, now: SystemTime) -> bool {
        unix_secs(now) < self.expires_at
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A token as it can go in an Authorization header (a token server or a
/// file may hold anything).
fn sendable(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

/// The token directory of one client (shared by its clones).
pub(crate) struct TokenCache {
    dir: PathBuf,
    /// Host and scope keys with no file, so that requests to a registry
    /// without token auth look at the disk once per process, not each time.
    absent: Mutex<HashSet<String>>,
}

impl TokenCache {
    pub(crate) fn new(dir: PathBuf) -> TokenCache {
        TokenCache {
            dir,
            absent: Mutex::new(HashSet::new()),
        }
    }

    fn key(host: &str, scopes: &[String]) -> String {
        format!("{host}\0{}", scopes.join(" "))
    }

    fn path(&self, host: &str, scopes: &[String]) -> PathBuf {
        let name = hex::encode(Sha256::digest(Self::key(host, scopes).as_bytes()));
        self.dir.join(format!("{name}.json"))
    }

    /// The token kept for `host` (`scheme://host[:port]`) and exactly
    /// `scopes`, obtained with the credentials `credential` names, if it is
    /// still valid at `now`. `credential` is asked only when the host has a
    /// file (it may run a credential helper).
    pub(crate) fn load(
        &self,
        host: &str,
        scopes: &[String],
        now: SystemTime,
        credential: impl FnOnce() -> CredentialId,
    ) -> Option<(String, SystemTime)> {
        let key = Self::key(host, scopes);
        if self.absent.lock().unwrap().contains(&key) {
            return None;
        }
        let path = self.path(host, scopes);
        let Some(file) = read_token_file(&path) else {
            self.absent.lock().unwrap().insert(key);
            return None;
        };
        if file.host != host || file.scopes != scopes {
            tracing::warn!(path = %path.display(), "ignoring a token file for another host or scope");
            return None;
        }
        let cred = credential();
        let t = file
            .tokens
            .iter()
            .find(|t| t.credential == cred.0 && t.valid_at(now) && sendable(&t.token))?;
        tracing::debug!(%host, ?scopes, "sending a bearer token kept from an earlier process");
        // A file may say any time: no later than a token could be kept.
        let latest = now + MAX_LIFETIME;
        let expires = UNIX_EPOCH
            .checked_add(Duration::from_secs(t.expires_at))
            .map_or(latest, |e| e.min(latest));
        Some((t.token.clone(), expires))
    }

    /// Keep `token` for `host`, `scopes` and `credential` until `expires`;
    /// tokens that have expired are dropped from the directory meanwhile.
    /// A failure is logged: the token is then merely not kept.
    pub(crate) fn store(
        &self,
        host: &str,
        scopes: &[String],
        credential: &CredentialId,
        token: &str,
        expires: SystemTime,
    ) {
        let now = SystemTime::now();
        if !sendable(token) || expires <= now {
            return;
        }
        let stored = StoredToken {
            credential: credential.0.clone(),
            token: token.to_string(),
            expires_at: unix_secs(expires),
        };
        self.rewrite(host, scopes, credential, Some(stored), now);
        self.prune(now);
    }

    /// Drop the token kept for `host`, `scopes` and `credential` (the
    /// registry refused it).
    pub(crate) fn forget(&self, host: &str, scopes: &[String], credential: &CredentialId) {
        self.rewrite(host, scopes, credential, None, SystemTime::now());
    }

    /// Replace the file of `host` and `scopes` with its valid tokens of
    /// other credentials, plus `new`; remove it when none is left.
    fn rewrite(
        &self,
        host: &str,
        scopes: &[String],
        credential: &CredentialId,
        new: Option<StoredToken>,
        now: SystemTime,
    ) {
        let path = self.path(host, scopes);
        let mut tokens: Vec<StoredToken> = read_token_file(&path)
            .filter(|f| f.host == host && f.scopes == scopes)
            .map(|f| f.tokens)
            .unwrap_or_default();
        tokens.retain(|t| t.credential != credential.0 && t.valid_at(now));
        tokens.extend(new);
        // The newest last: when too many, the oldest go.
        let excess = tokens.len().saturating_sub(MAX_TOKENS_PER_FILE);
        tokens.drain(..excess);
        if tokens.is_empty() {
            remove_quietly(&path);
            return;
        }
        let mut file = TokenFile {
            version: FORMAT_VERSION,
            host: host.to_string(),
            scopes: scopes.to_vec(),
            tokens,
        };
        let mut bytes = serde_json::to_vec(&file).expect("serializable");
        while bytes.len() as u64 > MAX_FILE_BYTES && file.tokens.len() > 1 {
            file.tokens.remove(0);
            bytes = serde_json::to_vec(&file).expect("serializable");
        }
        if bytes.len() as u64 > MAX_FILE_BYTES {
            tracing::debug!(%host, "bearer token too large to keep");
            return;
        }
        if let Err(e) = self.write(&path, &bytes) {
            // A user running a read-only command against a store it may not
            // write (`inspect` as non-root) is not told at every token.
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                tracing::debug!(path = %path.display(), error = %e, "could not keep the bearer token");
            } else {
                tracing::warn!(path = %path.display(), error = %e, "could not keep the bearer token");
            }
            return;
        }
        self.absent.lock().unwrap().remove(&Self::key(host, scopes));
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        // An existing directory may have been made looser by hand.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        // Not synced: a token lost to a power loss costs one token request,
        // an fsync would cost every token request a disk flush. The temp
        // file is created 0600.
        lazylayer_sys::durable::write_atomically_unsynced(path, bytes)
    }

    /// Remove the token files (ours by name) whose every token has expired,
    /// and those that cannot be read.
    fn prune(&self, now: SystemTime) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten().take(MAX_FILES_PRUNED) {
            let name = e.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if stem.len() != 64 || !stem.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let path = e.path();
            let live =
                read_token_file(&path).is_some_and(|f| f.tokens.iter().any(|t| t.valid_at(now)));
            if !live {
                remove_quietly(&path);
            }
        }
    }
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a token file");
        }
    }
}

/// A token file, if it is one: a regular file of ours, not readable by
/// others, within the size bound, in the format we write. Anything else is
/// ignored with a warning (a missing file silently).
fn read_token_file(path: &Path) -> Option<TokenFile> {
    let ignore = |why: &str| {
        tracing::warn!(path = %path.display(), reason = why, "ignoring bearer token file");
    };
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        // Another user's store: not ours to read, nothing to warn about.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::debug!(path = %path.display(), error = %e, "token file not readable");
            return None;
        }
        Err(e) => {
            ignore(&e.to_string());
            return None;
        }
    };
    let meta = f.metadata().ok()?;
    if !meta.is_file() {
        ignore("not a regular file");
        return None;
    }
    if meta.uid() != rustix::process::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        ignore("owned by another user or open to others");
        return None;
    }
    if meta.len() > MAX_FILE_BYTES {
        ignore("too large");
        return None;
    }
    let mut bytes = Vec::new();
    // Bounded even if the file grows meanwhile.
    if let Err(e) = f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes) {
        ignore(&e.to_string());
        return None;
    }
    if bytes.len() as u64 > MAX_FILE_BYTES {
        ignore("too large");
        return None;
    }
    match serde_json::from_slice::<TokenFile>(&bytes) {
        Ok(t) if t.version == FORMAT_VERSION => Some(t),
        Ok(_) => {
            ignore("unknown version");
            None
        }
        Err(_) => {
            ignore("not a token file");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "https://registry.example";

    fn scopes(s: &str) -> Vec<String> {
        vec![s.to_string()]
    }

    fn alice() -> Credential {
        Credential {
            username: "alice".into(),
            password: "s3cret".into(),
        }
    }

    fn in_a_minute() -> SystemTime {
        SystemTime::now() + Duration::from_secs(60)
    }

    fn the_file(dir: &Path) -> PathBuf {
        let files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files[0].clone()
    }

    #[test]
    fn a_token_is_found_by_a_new_cache_on_the_same_directory() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("tokens");
        let pull = scopes("repository:team/app:pull");
        let anon = CredentialId::of(None);
        TokenCache::new(dir.clone()).store(HOST, &pull, &anon, "tok1", in_a_minute());
        let got = TokenCache::new(dir).load(HOST, &pull, SystemTime::now(), || anon.clone());
        assert_eq!(got.map(|(t, _)| t).as_deref(), Some("tok1"));
    }

    #[test]
    fn files_are_private() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("tokens");
        let pull = scopes("repository:team/app:pull");
        TokenCache::new(dir.clone()).store(
            HOST,
            &pull,
            &CredentialId::of(None),
            "t",
            in_a_minute(),
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&the_file(&dir)), 0o600);
        // A directory loosened by hand is tightened on the next write.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        TokenCache::new(dir.clone()).store(
            HOST,
            &pull,
            &CredentialId::of(None),
            "t2",
            in_a_minute(),
        );
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn a_token_serves_only_the_credentials_it_was_obtained_with() {
        let d = tempfile::tempdir().unwrap();
        let pull = scopes("repository:team/app:pull");
        let cache = TokenCache::new(d.path().to_path_buf());
        let alice_id = CredentialId::of(Some(&alice()));
        cache.store(HOST, &pull, &alice_id, "alices", in_a_minute());
        let now = SystemTime::now();
        let load = |id: CredentialId| {
            TokenCache::new(d.path().to_path_buf())
                .load(HOST, &pull, now, || id)
                .map(|(t, _)| t)
        };
        assert_eq!(load(alice_id.clone()).as_deref(), Some("alices"));
        assert_eq!(load(CredentialId::of(None)), None);
        let other_secret = Credential {
            password: "another".into(),
            ..alice()
        };
        assert_eq!(load(CredentialId::of(Some(&other_secret))), None);
        let bob = Credential {
            username: "bob".into(),
            ..alice()
        };
        assert_eq!(load(CredentialId::of(Some(&bob))), None);
        // Anonymous gets a token of its own beside Alice's.
        cache.store(HOST, &pull, &CredentialId::of(None), "anons", in_a_minute());
        assert_eq!(load(CredentialId::of(None)).as_deref(), Some("anons"));
        assert_eq!(load(alice_id).as_deref(), Some("alices"));
        // The secret is not in the file.
        let text = std::fs::read_to_string(the_file(d.path())).unwrap();
        assert!(!text.contains("s3cret"), "{text}");
    }

    #[test]
    fn a_token_serves_only_its_host_and_exact_scopes() {
        let d = tempfile::tempdir().unwrap();
        let pull = scopes("repository:team/app:pull");
        let anon = CredentialId::of(None);
        TokenCache::new(d.path().to_path_buf()).store(HOST, &pull, &anon, "t", in_a_minute());
        let now = SystemTime::now();
        let load = |host: &str, s: &[String]| {
            TokenCache::new(d.path().to_path_buf()).load(host, s, now, || anon.clone())
        };
        assert!(load(HOST, &pull).is_some());
        assert!(load(HOST, &scopes("repository:team/app:pull,push")).is_none());
        assert!(load(HOST, &scopes("repository:team/other:pull")).is_none());
        assert!(load("http://registry.example", &pull).is_none());
        assert!(load("https://mirror.example", &pull).is_none());
    }

    #[test]
    fn expired_tokens_are_never_sent_and_pruned_on_write() {
        let d = tempfile::tempdir().unwrap();
        let cache = TokenCache::new(d.path().to_path_buf());
        let anon = CredentialId::of(None);
        let (a, b) = (scopes("repository:a:pull"), scopes("repository:b:pull"));
        let end = SystemTime::now() + Duration::from_secs(30);
        cache.store(HOST, &a, &anon, "ta", end);
        let before = end - Duration::from_secs(1);
        assert!(cache.load(HOST, &a, before, || anon.clone()).is_some());
        assert!(cache.load(HOST, &a, end, || anon.clone()).is_none());
        assert!(cache
            .load(HOST, &a, end + Duration::from_secs(1), || anon.clone())
            .is_none());
        // A token that has already expired is not kept at all.
        cache.store(
            HOST,
            &b,
            &anon,
            "tb",
            SystemTime::now() - Duration::from_secs(1),
        );
        assert!(the_file(d.path()).exists());
        // Make A's file expired, then write B: A's file goes.
        let a_path = cache.path(HOST, &a);
        let mut f: TokenFile = serde_json::from_slice(&std::fs::read(&a_path).unwrap()).unwrap();
        f.tokens[0].expires_at = unix_secs(SystemTime::now()) - 1;
        std::fs::write(&a_path, serde_json::to_vec(&f).unwrap()).unwrap();
        cache.store(HOST, &b, &anon, "tb", in_a_minute());
        assert_eq!(the_file(d.path()), cache.path(HOST, &b));
    }

    #[test]
    fn a_forgotten_token_is_gone_and_others_stay() {
        let d = tempfile::tempdir().unwrap();
        let cache = TokenCache::new(d.path().to_path_buf());
        let pull = scopes("repository:team/app:pull");
        let (anon, alice_id) = (CredentialId::of(None), CredentialId::of(Some(&alice())));
        cache.store(HOST, &pull, &anon, "anons", in_a_minute());
        cache.store(HOST, &pull, &alice_id, "alices", in_a_minute());
        cache.forget(HOST, &pull, &anon);
        let fresh = TokenCache::new(d.path().to_path_buf());
        let now = SystemTime::now();
        assert!(fresh.load(HOST, &pull, now, || anon.clone()).is_none());
        assert!(fresh.load(HOST, &pull, now, || alice_id.clone()).is_some());
        cache.forget(HOST, &pull, &alice_id);
        assert!(std::fs::read_dir(d.path()).unwrap().next().is_none());
    }

    /// Whatever a file holds, loading it gives nothing (and does not panic)
    /// unless it is a valid token file of ours.
    #[test]
    fn corrupt_oversized_or_foreign_files_are_ignored() {
        let d = tempfile::tempdir().unwrap();
        let pull = scopes("repository:team/app:pull");
        let anon = CredentialId::of(None);
        let cache = TokenCache::new(d.path().to_path_buf());
        cache.store(HOST, &pull, &anon, "good", in_a_minute());
        let path = cache.path(HOST, &pull);
        let good = std::fs::read(&path).unwrap();
        let load = || {
            TokenCache::new(d.path().to_path_buf())
                .load(HOST, &pull, SystemTime::now(), || anon.clone())
                .map(|(t, _)| t)
        };
        assert_eq!(load().as_deref(), Some("good"));
        let valid_json = |token: &str, host: &str| {
            serde_json::json!({"version": 1, "host": host, "scopes": pull,
                "tokens": [{"credential": anon.0, "token": token, "expires_at": u64::MAX}]})
            .to_string()
            .into_bytes()
        };
        let mut huge = b"{\"version\":1,\"host\":\"".to_vec();
        huge.resize(2 << 20, b'a');
        let hostile: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("truncated", good[..good.len() / 2].to_vec()),
            ("garbage", vec![0xff; 100]),
            ("huge", huge),
            (
                "wrong version",
                String::from_utf8(good.clone())
                    .unwrap()
                    .replacen("\"version\":1", "\"version\":9", 1)
                    .into_bytes(),
            ),
            ("header injection", valid_json("a\r\nX-Evil: 1", HOST)),
            ("empty token", valid_json("", HOST)),
            ("another host's", valid_json("t", "https://evil.example")),
            (
                "negative expiry",
                String::from_utf8(valid_json("t", HOST))
                    .unwrap()
                    .replace(&u64::MAX.to_string(), "-1")
                    .into_bytes(),
            ),
        ];
        for (what, bytes) in hostile {
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(load(), None, "{what}");
        }
        // A valid file others may read (or not ours) is not trusted either.
        std::fs::write(&path, valid_json("t", HOST)).unwrap();
        assert_eq!(load().as_deref(), Some("t"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load(), None);
        // A directory in its place.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert_eq!(load(), None);
        // Storing over a bad file replaces it.
        std::fs::remove_dir(&path).unwrap();
        std::fs::write(&path, b"garbage").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        cache.store(HOST, &pull, &anon, "again", in_a_minute());
        assert_eq!(load().as_deref(), Some("again"));
    }

    #[test]
    fn expiry_follows_the_token_response_less_a_margin() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let secs = |t: Option<SystemTime>| t.map(|t| t.duration_since(now).unwrap().as_secs());
        // The spec's default of 60 s, less 6 s.
        assert_eq!(secs(token_expiry(now, None, None)), Some(54));
        assert_eq!(secs(token_expiry(now, Some(300), None)), Some(270));
        // At least 5 s early.
        assert_eq!(secs(token_expiry(now, Some(20), None)), Some(15));
        // Too short to be worth keeping.
        assert_eq!(token_expiry(now, Some(5), None), None);
        assert_eq!(token_expiry(now, Some(0), None), None);
        // Capped at a day, whatever the server says.
        assert_eq!(
            secs(token_expiry(now, Some(u64::MAX), None)),
            Some(24 * 3600 * 9 / 10)
        );
        // Issued 100 s ago for 300 s: 170 s left.
        let issued = humantime::format_rfc3339(now - Duration::from_secs(100)).to_string();
        assert_eq!(secs(token_expiry(now, Some(300), Some(&issued))), Some(170));
        // Issued long ago: already over.
        let old = humantime::format_rfc3339(now - Duration::from_secs(3600)).to_string();
        assert_eq!(token_expiry(now, Some(300), Some(&old)), None);
        // A date in the future (a clock ahead of ours) or garbage: from now.
        let ahead = humantime::format_rfc3339(now + Duration::from_secs(100)).to_string();
        assert_eq!(secs(token_expiry(now, Some(300), Some(&ahead))), Some(270));
        assert_eq!(
            secs(token_expiry(now, Some(300), Some("yesterday"))),
            Some(270)
        );
    }

    /// A token file may have been edited by anything: whatever it holds,
    /// loading never panics, and what it gives is a sendable token expiring
    /// within a day. The same for `expires_in`/`issued_at` of a token server.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn file_bytes() -> impl Strategy<Value = Vec<u8>> {
            let token = prop_oneof![
                Just("good".to_string()),
                any::<String>(),
                "[ -~\\r\\n\\t]{0,40}",
            ];
            let expires = prop_oneof![Just(u64::MAX), Just(0u64), any::<u64>()];
            let crafted = (token, expires, any::<bool>(), any::<u32>()).prop_map(
                |(token, expires_at, same_host, version)| {
                    serde_json::json!({
                        "version": if version % 2 == 0 { 1 } else { version },
                        "host": if same_host { HOST } else { "https://x" },
                        "scopes": ["repository:team/app:pull"],
                        "tokens": [{"credential": CredentialId::of(None).0,
                                    "token": token, "expires_at": expires_at}],
                    })
                    .to_string()
                    .into_bytes()
                },
            );
            prop_oneof![proptest::collection::vec(any::<u8>(), 0..512), crafted]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            #[test]
            fn fuzz_token_file(bytes in file_bytes()) {
                let d = tempfile::tempdir().unwrap();
                let pull = scopes("repository:team/app:pull");
                let cache = TokenCache::new(d.path().to_path_buf());
                let path = cache.path(HOST, &pull);
                std::fs::write(&path, &bytes).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
                let now = SystemTime::now();
                if let Some((token, expires)) = cache.load(HOST, &pull, now, || CredentialId::of(None)) {
                    prop_assert!(sendable(&token));
                    prop_assert!(reqwest::header::HeaderValue::from_str(&(String::from("Bearer ") + &token)).is_ok());
                    prop_assert!(expires > now && expires <= now + MAX_LIFETIME);
                }
                // Writing over it works whatever it held.
                cache.store(HOST, &pull, &CredentialId::of(None), "next", in_a_minute());
                let again = TokenCache::new(d.path().to_path_buf()).load(HOST, &pull, SystemTime::now(), || CredentialId::of(None));
                prop_assert_eq!(again.map(|(t, _)| t), Some("next".to_string()));
            }

            #[test]
            fn fuzz_token_lifetime(expires_in in proptest::option::of(any::<u64>()),
                                   issued_at in proptest::option::of(prop_oneof![any::<String>(), "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z"])) {
                let now = SystemTime::now();
                if let Some(end) = token_expiry(now, expires_in, issued_at.as_deref()) {
                    prop_assert!(end > now && end <= now + MAX_LIFETIME);
                }
            }
        }
    }
}
