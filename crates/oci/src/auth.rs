//! Registry credentials from the auth files Docker and Podman write (inline
//! `auths` entries and `credHelpers`/`credsStore` credential helpers), and the
//! `WWW-Authenticate` challenge grammar. Secrets are never logged or shown:
//! [`Credential`]'s `Debug` redacts them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// Where a host's credentials come from.
#[derive(Debug, Clone)]
enum Entry {
    Inline(Credential),
    /// `docker-credential-<name>` answers for the host.
    Helper(String),
}

/// A helper that has not answered by then is killed: a prompt nobody sees
/// must not hang a pull.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// A helper's answer is a small JSON object.
const MAX_HELPER_OUTPUT: usize = 1 << 20;

/// Credentials by registry host, loaded from auth files.
#[derive(Debug, Clone, Default)]
pub struct AuthStore {
    by_host: HashMap<String, Entry>,
    /// The first `credsStore` named: asked for hosts no file names.
    default_helper: Option<String>,
    /// Helper answers by host, so a helper runs once per host and process.
    asked: Arc<Mutex<HashMap<String, Option<Credential>>>>,
    /// Files read, for `--help`-style diagnostics.
    pub sources: Vec<PathBuf>,
    /// Where `docker-credential-NAME` helpers are; None: found on PATH.
    pub helper_dir: Option<PathBuf>,
    /// Credentials handed over while running (a CRI pull's, Podman's auth
    /// helper's), by repository; they win over the files for their
    /// repository.
    pub keychain: Option<Arc<crate::keychain::Keychain>>,
    /// The kubelet's credential provider plugins, asked for the
    /// repositories their patterns match.
    pub providers: Option<Arc<crate::credential_provider::CredentialProviders>>,
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
                Ok(file) => {
                    store.sources.push(p.clone());
                    for (host, entry) in file.entries {
                        store.by_host.entry(host).or_insert(entry);
                    }
                    if store.default_helper.is_none() {
                        store.default_helper = file.creds_store;
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
        self.by_host
            .insert(normalize_host(host), Entry::Inline(cred));
    }

    /// The credential for `repo`: one handed over for exactly this
    /// repository (the keychain), else a credential provider plugin's,
    /// else its host's from the files.
    pub fn get_for(&self, repo: &crate::reference::Repository) -> Option<Credential> {
        self.keychain
            .as_ref()
            .and_then(|k| k.get(repo))
            .or_else(|| self.providers.as_ref().and_then(|p| p.get(repo)))
            .or_else(|| self.get(&repo.registry))
    }

    /// The credential for `host`, asking a credential helper if a file
    /// routes the host (or every host, `credsStore`) to one.
    pub fn get(&self, host: &str) -> Option<Credential> {
        let entry = self.by_host.get(&normalize_host(host)).or_else(|| {
            // Docker Hub credentials are filed under its legacy index address.
            is_docker_hub(host)
                .then(|| self.by_host.get("index.docker.io"))
                .flatten()
        });
        match (entry, &self.default_helper) {
            (Some(Entry::Inline(c)), _) => Some(c.clone()),
            (Some(Entry::Helper(name)), _) | (None, Some(name)) => self.ask_helper(name, host),
            (None, None) => None,
        }
    }

    fn ask_helper(&self, name: &str, host: &str) -> Option<Credential> {
        let key = format!("{name}\0{host}");
        if let Some(known) = self.asked.lock().unwrap().get(&key) {
            return known.clone();
        }
        // Docker files Hub credentials under its v1 index URL; helpers expect that key.
        let server = if is_docker_hub(host) {
            "https://index.docker.io/v1/"
        } else {
            host
        };
        let program = format!("docker-credential-{name}");
        let found = if name.is_empty() || name.contains('/') {
            tracing::warn!(%name, "ignoring credential helper with a bad name");
            None
        } else {
            let program = match &self.helper_dir {
                Some(d) => d.join(&program),
                None => PathBuf::from(&program),
            };
            run_helper(&program, server).unwrap_or_else(|e| {
                tracing::warn!(helper = %program.display(), %host, error = %e, "credential helper failed");
                None
            })
        };
        self.asked.lock().unwrap().insert(key, found.clone());
        found
    }
}

fn is_docker_hub(host: &str) -> bool {
    host == "docker.io" || host == "registry-1.docker.io"
}

/// `docker-credential-NAME get` with the server on stdin (the protocol Docker
/// and Podman share). Ok(None): the helper has nothing for this server.
/// Synchronous for its callers, through [`block_aside`].
fn run_helper(program: &Path, server: &str) -> Result<Option<Credential>, String> {
    block_aside(helper_answer(program, server))
}

/// Wait for `fut` (a helper or plugin run) from synchronous code called in
/// async code: on a multi-threaded runtime in place of the worker, whose
/// other tasks move to another thread meanwhile; elsewhere on a runtime of
/// its own.
pub(crate) fn block_aside<T: Send>(
    fut: impl std::future::Future<Output = Result<T, String>> + Send,
) -> Result<T, String> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(fut))
        }
        // A current-thread runtime cannot wait in place: a thread of its own.
        Ok(_) => std::thread::scope(|s| {
            s.spawn(|| helper_runtime()?.block_on(fut))
                .join()
                .unwrap_or_else(|_| Err("the credential helper's thread panicked".into()))
        }),
        Err(_) => helper_runtime()?.block_on(fut),
    }
}

/// A child's exit status, stdout and stderr, each read up to `max` bytes
/// (a program's output is untrusted: more is an error, not memory).
pub(crate) async fn read_bounded(
    mut child: tokio::process::Child,
    max: usize,
) -> Result<(std::process::ExitStatus, Vec<u8>, Vec<u8>), String> {
    use tokio::io::AsyncReadExt;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let limit = max as u64 + 1;
    let (mut stdout, mut stderr) = (stdout.take(limit), stderr.take(limit));
    let (a, b) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
    a.and(b).map_err(|e| format!("reading its output: {e}"))?;
    if out.len() > max || err.len() > max {
        return Err(format!("more than {max} bytes of output"));
    }
    let status = child
        .wait()
        .await
        .map_err(|e| format!("waiting for it: {e}"))?;
    Ok((status, out, err))
}

fn helper_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime for the credential helper: {e}"))
}

/// Run the helper (killed when it has not answered within
/// [`HELPER_TIMEOUT`], or when this future is dropped) and read its answer.
async fn helper_answer(program: &Path, server: &str) -> Result<Option<Credential>, String> {
    use tokio::io::AsyncWriteExt;
    let shown = program.display();
    let mut child = tokio::process::Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    // The request is one line; the pipe cannot fill before the helper reads.
    let _ = stdin.write_all(server.as_bytes()).await;
    drop(stdin);
    let (status, out, err) =
        match tokio::time::timeout(HELPER_TIMEOUT, read_bounded(child, MAX_HELPER_OUTPUT)).await {
            Ok(r) => r.map_err(|e| format!("{shown}: {e}"))?,
            // Dropping the wait dropped the child: killed (and reaped by tokio).
            Err(_) => return Err(format!("no answer within {HELPER_TIMEOUT:?}")),
        };
    let err = String::from_utf8_lossy(&err).into_owned();
    if !status.success() {
        // The protocol's "nothing stored" answer, from every helper Docker ships.
        if err.contains("credentials not found")
            || String::from_utf8_lossy(&out).contains("credentials not found")
        {
            tracing::debug!(helper = %shown, %server, "helper has no credentials");
            return Ok(None);
        }
        return Err(format!("{status}: {}", err.trim()));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let a: Answer = serde_json::from_slice(&out).map_err(|e| format!("unreadable answer: {e}"))?;
    if a.username == "<token>" {
        // An identity token is an OAuth2 refresh token, not a password.
        return Err("the helper holds an identity token, which lazylayer does not support".into());
    }
    Ok(Some(Credential {
        username: a.username,
        password: a.secret,
    }))
}

/// `https://index.docker.io/v1/` → `index.docker.io`; `host:5000` stays.
fn normalize_host(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    k.split('/').next().unwrap_or(k).to_string()
}

struct AuthFile {
    entries: Vec<(String, Entry)>,
    creds_store: Option<String>,
}

fn parse_auth_file(text: &str) -> Result<AuthFile, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Inline>,
        #[serde(default)]
        cred_helpers: HashMap<String, String>,
        creds_store: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Inline {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let f: File = serde_json::from_str(text).map_err(|e| format!("not an auth file: {e}"))?;
    // A host's helper wins over an inline entry in the same file, as in Docker.
    let mut entries: Vec<(String, Entry)> = f
        .cred_helpers
        .into_iter()
        .map(|(host, name)| (normalize_host(&host), Entry::Helper(name)))
        .collect();
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
            continue; // an empty placeholder beside a credsStore
        };
        let host = normalize_host(&host);
        if !entries.iter().any(|(h, _)| *h == host) {
            entries.push((host, Entry::Inline(cred)));
        }
    }
    Ok(AuthFile {
        entries,
        creds_store: f.creds_store.filter(|s| !s.is_empty()),
    })
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
    fn helpers_route_hosts_before_inline_entries() {
        let f = parse_auth_file(
            r#"{"auths":{"a:1":{"auth":"eDp5"},"b:2":{"auth":"eDp5"},"c:3":{}},
                "credHelpers":{"a:1":"secretservice"},"credsStore":"pass"}"#,
        )
        .unwrap();
        let find = |h: &str| f.entries.iter().find(|(k, _)| k == h).map(|(_, e)| e);
        assert!(matches!(find("a:1"), Some(Entry::Helper(n)) if n == "secretservice"));
        assert!(matches!(find("b:2"), Some(Entry::Inline(c)) if c.username == "x"));
        assert!(find("c:3").is_none(), "empty placeholder");
        assert_eq!(f.creds_store.as_deref(), Some("pass"));
    }

    /// A helper speaking the docker-credential protocol: server on stdin,
    /// JSON on stdout, "credentials not found" for unknown servers.
    fn fake_helper(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("docker-credential-fake");
        std::fs::write(
            &p,
            "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread -r server\necho \"$server\" >> \"$0.asked\"\n\
             case \"$server\" in\n  reg:5000) echo '{\"ServerURL\":\"reg:5000\",\"Username\":\"bob\",\"Secret\":\"hunter2\"}' ;;\n\
             \x20 tok:1) echo '{\"Username\":\"<token>\",\"Secret\":\"refresh\"}' ;;\n\
             \x20 *) echo 'credentials not found in native keychain' >&2; exit 1 ;;\nesac\n",
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn credential_helper_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let h = fake_helper(dir.path());
        let c = run_helper(&h, "reg:5000").unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("bob", "hunter2")
        );
        assert_eq!(run_helper(&h, "other:1").unwrap(), None);
        let e = run_helper(&h, "tok:1").unwrap_err();
        assert!(
            e.contains("identity token") && !e.contains("refresh"),
            "{e}"
        );
        // From any kind of caller: a runtime's own thread, a worker of a
        // multi-threaded one, a current-thread one.
        let multi = tokio::runtime::Runtime::new().unwrap();
        let single = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ask = || run_helper(&h, "reg:5000").unwrap().unwrap().username;
        assert_eq!(multi.block_on(async { ask() }), "bob");
        let h2 = h.clone();
        let on_worker = multi.spawn(async move { run_helper(&h2, "reg:5000").unwrap().unwrap() });
        assert_eq!(multi.block_on(on_worker).unwrap().username, "bob");
        assert_eq!(single.block_on(async { ask() }), "bob");
        let e = run_helper(&dir.path().join("missing"), "reg:5000").unwrap_err();
        assert!(e.contains("cannot start"), "{e}");
        let asked =
            std::fs::read_to_string(dir.path().join("docker-credential-fake.asked")).unwrap();
        assert_eq!(
            asked,
            "reg:5000\nother:1\ntok:1\nreg:5000\nreg:5000\nreg:5000\n"
        );
    }

    /// A helper runs off the async workers: on a runtime with one worker,
    /// a helper that answers only once another task has run (it waits for
    /// the file that task writes) still answers, and no later than that.
    #[test]
    fn a_credential_helper_leaves_the_async_workers_free() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("other-task-ran");
        let helper = dir.path().join("docker-credential-waits");
        std::fs::write(
            &helper,
            format!(
                "#!/bin/sh
read -r server
n=0
while [ ! -e '{}' ]; do
  n=$((n+1)); [ $n -gt 2000 ] && exit 3
  sleep 0.01
done
                 echo '{{\"Username\":\"ann\",\"Secret\":\"pw\"}}'
",
                marker.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut store = AuthStore::default();
        store
            .by_host
            .insert("reg:5000".into(), Entry::Helper("waits".into()));
        store.helper_dir = Some(dir.path().to_path_buf());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let got = rt.block_on(async {
            let (asking, asked_now) = tokio::sync::oneshot::channel();
            let m = marker.clone();
            // Runs only once the helper was asked, on the one worker.
            let other = tokio::spawn(async move {
                asked_now.await.unwrap();
                std::fs::write(m, b"").unwrap()
            });
            let asked = tokio::spawn(async move {
                asking.send(()).unwrap();
                store.get("reg:5000")
            });
            let got = asked.await.unwrap();
            other.await.unwrap();
            got
        });
        let c = got.expect("the helper answered once the other task ran");
        assert_eq!(c.username, "ann");
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
