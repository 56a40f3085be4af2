//! Credentials handed over while running, not read from a file: a CRI
//! `PullImage`'s (the kubelet's pull secrets, seen by the image-service
//! proxy) or Podman's (through its additional-layer-store auth helper).
//!
//! Each is kept in memory only, for one registry host *and repository*
//! (a pod's secret opens the image it pulled, not its neighbours on the same
//! registry), and forgotten after a bounded time, so that a secret revoked or
//! rotated in the cluster stops being used here too. Never written, never
//! logged ([`Credential`]'s `Debug` redacts it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::auth::Credential;
use crate::reference::Repository;

/// How long a handed-over credential is kept when nothing says otherwise:
/// long enough for a container's whole lazy start and its prefetch, short
/// enough that a revoked pull secret does not linger for a day. Every new
/// pull of the image renews it.
pub const DEFAULT_KEEP: Duration = Duration::from_secs(60 * 60);

/// Bounds the memory a flood of pulls with distinct repositories can take;
/// the entry closest to expiry goes first.
const MAX_ENTRIES: usize = 4096;

#[derive(Debug)]
pub struct Keychain {
    keep: Duration,
    entries: Mutex<HashMap<(String, String), Entry>>,
    next_attempt: std::sync::atomic::AtomicU64,
}

/// What is known for one repository.
#[derive(Debug, Default)]
struct Entry {
    /// A credential that worked, and until when it is kept.
    kept: Option<(Credential, Instant)>,
    /// Credentials of pulls under way (newest last): containerd asks the
    /// snapshotter for the image's layers *during* the pull, after it
    /// fetched the manifest with the newest of them.
    trying: Vec<(u64, Credential)>,
}

impl Entry {
    fn current(&self, now: Instant) -> Option<&Credential> {
        self.trying.last().map(|(_, c)| c).or(self
            .kept
            .as_ref()
            .filter(|(_, until)| *until > now)
            .map(|(c, _)| c))
    }

    fn is_empty(&self, now: Instant) -> bool {
        self.current(now).is_none()
    }
}

/// A credential in use by a pull under way ([`Keychain::attempt`]): kept
/// if the pull succeeds ([`Attempt::succeeded`]), forgotten if it fails or
/// is abandoned (dropped).
pub struct Attempt<'a> {
    keychain: &'a Keychain,
    key: (String, String),
    id: u64,
}

impl Default for Keychain {
    fn default() -> Self {
        Keychain::new(DEFAULT_KEEP)
    }
}

impl Keychain {
    /// A keychain that forgets each credential `keep` after it was put.
    pub fn new(keep: Duration) -> Keychain {
        Keychain {
            keep,
            entries: Mutex::new(HashMap::new()),
            next_attempt: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn key(repo: &Repository) -> (String, String) {
        (repo.registry.to_ascii_lowercase(), repo.name.clone())
    }

    /// The entries, with the expired dropped and room made for `key`:
    /// past the bound, the entry closest to expiry goes.
    fn entries_with_room(
        &self,
        key: &(String, String),
    ) -> std::sync::MutexGuard<'_, HashMap<(String, String), Entry>> {
        let now = Instant::now();
        let mut e = self.entries.lock().unwrap();
        e.retain(|_, entry| !entry.is_empty(now));
        if e.len() >= MAX_ENTRIES && !e.contains_key(key) {
            if let Some(oldest) = e
                .iter()
                .filter(|(_, entry)| entry.trying.is_empty())
                .min_by_key(|(_, entry)| entry.kept.as_ref().map(|(_, until)| *until))
                .map(|(k, _)| k.clone())
            {
                e.remove(&oldest);
            }
        }
        e
    }

    /// Keep `cred` for `repo` (replacing what was kept for it), until
    /// [`Keychain::new`]'s bound from now.
    pub fn put(&self, repo: &Repository, cred: Credential) {
        let key = Self::key(repo);
        let until = Instant::now() + self.keep;
        let mut e = self.entries_with_room(&key);
        e.entry(key).or_default().kept = Some((cred, until));
    }

    /// `cred` is being tried for `repo` by a pull under way: it serves
    /// `repo` (before what was kept) until the pull ends.
    pub fn attempt(&self, repo: &Repository, cred: Credential) -> Attempt<'_> {
        let key = Self::key(repo);
        let id = (self.next_attempt).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut e = self.entries_with_room(&key);
        e.entry(key.clone()).or_default().trying.push((id, cred));
        Attempt {
            keychain: self,
            key,
            id,
        }
    }

    /// The credential for exactly this host and repository: a pull's under
    /// way, else one kept that has not expired.
    pub fn get(&self, repo: &Repository) -> Option<Credential> {
        let now = Instant::now();
        let e = self.entries.lock().unwrap();
        e.get(&Self::key(repo))?.current(now).cloned()
    }

    /// Repositories with a credential now (for status output; the
    /// credentials themselves are not shown).
    pub fn len(&self) -> usize {
        let now = Instant::now();
        let e = self.entries.lock().unwrap();
        e.values().filter(|entry| !entry.is_empty(now)).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Attempt<'_> {
    /// The pull succeeded: its credential is kept for the repository.
    pub fn succeeded(self) {
        let mut e = self.keychain.entries.lock().unwrap();
        let entry = e.entry(self.key.clone()).or_default();
        if let Some(i) = entry.trying.iter().position(|(id, _)| *id == self.id) {
            let (_, cred) = entry.trying.remove(i);
            entry.kept = Some((cred, Instant::now() + self.keychain.keep));
        }
        // Dropped below: already removed, nothing more to do.
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let mut e = self.keychain.entries.lock().unwrap();
        if let Some(entry) = e.get_mut(&self.key) {
            entry.trying.retain(|(id, _)| *id != self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(r: &str) -> Repository {
        format!("{r}:latest")
            .parse::<crate::Reference>()
            .unwrap()
            .repository
    }

    fn cred(u: &str) -> Credential {
        Credential {
            username: u.into(),
            password: format!("{u}-pw"),
        }
    }

    #[test]
    fn a_credential_opens_its_own_repository_only() {
        let k = Keychain::default();
        k.put(&repo("reg.example:5000/team/app"), cred("alice"));
        assert_eq!(
            k.get(&repo("reg.example:5000/team/app")),
            Some(cred("alice"))
        );
        assert_eq!(k.get(&repo("reg.example:5000/team/other")), None);
        assert_eq!(k.get(&repo("reg.example:5000/team/app/sub")), None);
        assert_eq!(k.get(&repo("reg.example/team/app")), None, "other port");
        assert_eq!(k.get(&repo("other.example:5000/team/app")), None);
        // Host names are case-insensitive; repository names are not.
        assert_eq!(
            k.get(&repo("REG.example:5000/team/app")),
            Some(cred("alice"))
        );
        // The last pull's credential replaces the one before.
        k.put(&repo("reg.example:5000/team/app"), cred("bob"));
        assert_eq!(k.get(&repo("reg.example:5000/team/app")), Some(cred("bob")));
        assert_eq!(k.len(), 1);
    }

    /// A pull's credential serves its repository while the pull is under
    /// way (containerd asks for the layers then); kept if the pull
    /// succeeds, forgotten if it fails, and what was kept before comes back.
    #[test]
    fn a_pulls_credential_is_kept_only_if_the_pull_succeeds() {
        let k = Keychain::default();
        let app = repo("reg.example/app");
        let failing = k.attempt(&app, cred("mallory"));
        assert_eq!(k.get(&app), Some(cred("mallory")), "during the pull");
        drop(failing);
        assert_eq!(k.get(&app), None, "a failed pull keeps nothing");

        k.attempt(&app, cred("alice")).succeeded();
        assert_eq!(k.get(&app), Some(cred("alice")));
        let failing = k.attempt(&app, cred("mallory"));
        let second = k.attempt(&app, cred("bob"));
        assert_eq!(k.get(&app), Some(cred("bob")), "the newest pull's");
        drop(failing);
        assert_eq!(k.get(&app), Some(cred("bob")));
        drop(second);
        assert_eq!(k.get(&app), Some(cred("alice")), "the kept one is back");
        assert_eq!(k.get(&repo("reg.example/other")), None);
    }

    #[test]
    fn a_credential_is_forgotten_after_its_time() {
        let k = Keychain::new(Duration::from_millis(50));
        k.put(&repo("reg.example/app"), cred("alice"));
        assert!(k.get(&repo("reg.example/app")).is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(k.get(&repo("reg.example/app")), None);
        assert!(k.is_empty());
    }

    #[test]
    fn a_flood_of_repositories_stays_bounded() {
        let k = Keychain::default();
        for i in 0..MAX_ENTRIES + 10 {
            k.put(&repo(&format!("reg.example/app{i}")), cred("alice"));
        }
        assert_eq!(k.len(), MAX_ENTRIES);
        // The newest is kept.
        assert!(k
            .get(&repo(&format!("reg.example/app{}", MAX_ENTRIES + 9)))
            .is_some());
    }
}
