//! Kubernetes' kubelet credential provider plugins as a source of registry
//! credentials: the same configuration file the kubelet reads
//! (`--image-credential-provider-config`, a `CredentialProviderConfig`, YAML
//! or JSON) and the same plugin directory (`--image-credential-provider-bin-dir`).
//! A node that pulls from ECR, GCR/Artifact Registry or ACR with such a
//! plugin then fetches lazily with the very credentials the kubelet uses.
//!
//! The exchange (`credentialprovider.kubelet.k8s.io/v1`): the plugin runs as
//! `<bin dir>/<name> <args>` with the configured environment added, reads a
//! `CredentialProviderRequest` (`{"image": "<registry>/<repository>"}`) on
//! stdin and answers a `CredentialProviderResponse` on stdout: credentials
//! by image pattern, how long they may be cached and for what (`Image`,
//! `Registry` or `Global`). The plugin's answer is untrusted input: bounded
//! in size and time, and what does not parse is a warning, never a secret
//! in a log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::auth::{block_aside, read_bounded, Credential};
use crate::reference::Repository;

/// The kubelet gives a plugin a minute.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// A response is a small JSON object.
const MAX_RESPONSE: usize = 1 << 20;
/// Bounds the cache against a plugin answering a new key for every image.
const MAX_CACHED: usize = 4096;
/// The kubelet runs a plugin once per pull; lazylayer asks for a credential
/// at every registry request of a lazy start. So an answer (or a failure)
/// is kept at least this long, even when the plugin says not to cache.
const MIN_KEEP: Duration = Duration::from_secs(10);

const CONFIG_API: &str = "kubelet.config.k8s.io/v1";
const PLUGIN_APIS: [&str; 3] = [
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
];

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    api_version: String,
    kind: String,
    #[serde(default)]
    providers: Vec<ProviderConfig>,
}

#[derive(serde::Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct ProviderConfig {
    name: String,
    match_images: Vec<String>,
    default_cache_duration: String,
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
}

#[derive(serde::Deserialize, Debug, Clone)]
struct EnvVar {
    name: String,
    value: String,
}

/// One configured plugin.
#[derive(Debug)]
struct Provider {
    config: ProviderConfig,
    default_cache: Duration,
}

/// A plugin's credentials by image pattern (most specific first).
type Answer = Vec<(String, Credential)>;

/// The configured plugins and what they answered (cached as they say).
#[derive(Debug)]
pub struct CredentialProviders {
    bin_dir: PathBuf,
    providers: Vec<Provider>,
    /// By provider name and cache key: the credentials by image pattern,
    /// and until when they hold.
    cache: Mutex<HashMap<(String, String), (Answer, Instant)>>,
}

impl CredentialProviders {
    /// Read the kubelet's `CredentialProviderConfig` at `config` (YAML or
    /// JSON); plugins are run from `bin_dir`. Errors name what is wrong.
    pub fn load(config: &Path, bin_dir: &Path) -> Result<CredentialProviders, String> {
        let text = std::fs::read_to_string(config)
            .map_err(|e| format!("reading {}: {e}", config.display()))?;
        let file: ConfigFile = serde_yaml_ng::from_str(&text)
            .map_err(|e| format!("{}: not a CredentialProviderConfig: {e}", config.display()))?;
        if file.kind != "CredentialProviderConfig" || file.api_version != CONFIG_API {
            return Err(format!(
                "{}: kind {:?}, apiVersion {:?}; expected CredentialProviderConfig, {CONFIG_API}",
                config.display(),
                file.kind,
                file.api_version
            ));
        }
        let mut providers = Vec::new();
        for p in file.providers {
            let what = |why: String| format!("{}: provider {:?}: {why}", config.display(), p.name);
            if p.name.is_empty() || p.name.contains(['/', ' ']) || p.name == "." || p.name == ".." {
                return Err(what("not a plain file name".into()));
            }
            if providers.iter().any(|q: &Provider| q.config.name == p.name) {
                return Err(what("named twice".into()));
            }
            if p.match_images.is_empty() {
                return Err(what("no matchImages".into()));
            }
            if !PLUGIN_APIS.contains(&p.api_version.as_str()) {
                return Err(what(format!("unsupported apiVersion {:?}", p.api_version)));
            }
            let default_cache = parse_go_duration(&p.default_cache_duration).ok_or_else(|| {
                what(format!(
                    "defaultCacheDuration {:?}",
                    p.default_cache_duration
                ))
            })?;
            providers.push(Provider {
                config: p,
                default_cache,
            });
        }
        Ok(CredentialProviders {
            bin_dir: bin_dir.to_path_buf(),
            providers,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The credential the first plugin matching `repo` gives for it (the
    /// cached answer while it holds), if any.
    pub fn get(&self, repo: &Repository) -> Option<Credential> {
        let image = format!("{}/{}", repo.registry, repo.name);
        for p in &self.providers {
            if !p
                .config
                .match_images
                .iter()
                .any(|m| image_matches(m, &image))
            {
                continue;
            }
            let answer = self.cached(p, &image).or_else(|| self.ask(p, &image));
            if let Some(auth) = answer {
                if let Some(c) = best_match(&auth, &image) {
                    return Some(c);
                }
            }
        }
        None
    }

    fn cached(&self, p: &Provider, image: &str) -> Option<Answer> {
        let now = Instant::now();
        let cache = self.cache.lock().unwrap();
        // Whatever key type the plugin chose, one of these holds it.
        [image.to_string(), host_of(image).to_string(), String::new()]
            .into_iter()
            .find_map(|k| {
                cache
                    .get(&(p.config.name.clone(), k))
                    .filter(|(_, until)| *until > now)
                    .map(|(auth, _)| auth.clone())
            })
    }

    /// Keep `p`'s answer for `key` for `keep`.
    fn remember(&self, p: &Provider, key: String, auth: Answer, keep: Duration) {
        let Some(until) = Instant::now().checked_add(keep) else {
            return;
        };
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= MAX_CACHED {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert((p.config.name.clone(), key), (auth, until));
    }

    fn ask(&self, p: &Provider, image: &str) -> Option<Answer> {
        let program = self.bin_dir.join(&p.config.name);
        let answer = block_aside(run_plugin(&program, p, image));
        let r = match answer {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(plugin = %program.display(), %image, error = %e, "credential provider plugin failed");
                // Not run again for every request of this image meanwhile.
                self.remember(p, image.to_string(), Vec::new(), MIN_KEEP);
                return None;
            }
        };
        let keep = match r.cache_duration.as_deref() {
            None | Some("") => p.default_cache,
            Some(d) => parse_go_duration(d).unwrap_or(p.default_cache),
        };
        let key = match r.cache_key_type.as_str() {
            "Image" => image.to_string(),
            "Registry" => host_of(image).to_string(),
            "Global" => String::new(),
            other => {
                tracing::warn!(plugin = %program.display(), cache_key_type = other, "credential provider answered an unknown cacheKeyType; ignored");
                return None;
            }
        };
        let mut auth: Answer = r
            .auth
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    Credential {
                        username: v.username,
                        password: v.password,
                    },
                )
            })
            .collect();
        // Longer, more specific patterns first, as the kubelet tries them.
        auth.sort_by(|a, b| b.0.cmp(&a.0));
        self.remember(p, key, auth.clone(), keep.max(MIN_KEEP));
        Some(auth)
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    kind: String,
    api_version: String,
    cache_key_type: String,
    #[serde(default)]
    cache_duration: Option<String>,
    #[serde(default)]
    auth: HashMap<String, AuthEntry>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// Run one plugin for `image` and read its response.
async fn run_plugin(program: &Path, p: &Provider, image: &str) -> Result<Response, String> {
    use tokio::io::AsyncWriteExt;
    let shown = program.display();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&p.config.args)
        .envs(p.config.env.iter().map(|e| (&e.name, &e.value)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    let request = serde_json::json!({
        "kind": "CredentialProviderRequest",
        "apiVersion": p.config.api_version,
        "image": image,
    });
    let mut stdin = child.stdin.take().expect("piped");
    let _ = stdin.write_all(request.to_string().as_bytes()).await;
    drop(stdin);
    let (status, out, err) =
        tokio::time::timeout(PLUGIN_TIMEOUT, read_bounded(child, MAX_RESPONSE))
            .await
            .map_err(|_| format!("no answer within {PLUGIN_TIMEOUT:?}"))??;
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        return Err(format!(
            "{status}: {}",
            err.trim().chars().take(500).collect::<String>()
        ));
    }
    let r: Response = serde_json::from_slice(&out).map_err(|e| {
        format!(
            "unreadable response (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    if r.kind != "CredentialProviderResponse" || r.api_version != p.config.api_version {
        return Err(format!(
            "response of kind {:?}, apiVersion {:?}; expected CredentialProviderResponse, {}",
            r.kind, r.api_version, p.config.api_version
        ));
    }
    Ok(r)
}

/// The credential of the first pattern of `auth` (most specific first)
/// that matches `image`.
fn best_match(auth: &[(String, Credential)], image: &str) -> Option<Credential> {
    auth.iter()
        .find(|(pattern, c)| image_matches(pattern, image) && !c.username.is_empty())
        .map(|(_, c)| c.clone())
}

fn host_of(image: &str) -> &str {
    image.split('/').next().unwrap_or(image)
}

/// The kubelet's matching of an image against a `matchImages` pattern:
/// the same number of host labels, each matched as a glob (`*` within a
/// label, `?` one character), the same port (none matches none), and the
/// pattern's path a prefix of the image's.
pub fn image_matches(pattern: &str, image: &str) -> bool {
    let strip = |s: &str| {
        s.trim_start_matches("https://")
            .trim_start_matches("http://")
            .to_string()
    };
    let (pattern, image) = (strip(pattern), strip(image));
    let split = |s: &str| -> (String, Option<String>, String) {
        let (hostport, path) = s.split_once('/').unwrap_or((s, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.to_string())),
            None => (hostport.to_string(), None),
        };
        (host, port, path.to_string())
    };
    let (p_host, p_port, p_path) = split(&pattern);
    let (i_host, i_port, i_path) = split(&image);
    if p_port != i_port {
        return false;
    }
    let p_labels: Vec<&str> = p_host.split('.').collect();
    let i_labels: Vec<&str> = i_host.split('.').collect();
    if p_labels.len() != i_labels.len() {
        return false;
    }
    if !p_labels
        .iter()
        .zip(&i_labels)
        .all(|(p, i)| glob(p.as_bytes(), i.as_bytes()))
    {
        return false;
    }
    i_path.starts_with(&p_path)
}

/// `*` (any run, within the label) and `?` (one character); the rest
/// literally, case-insensitively as host names are.
fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// Go's time.Duration text ("12h", "1h30m", "90s", "0"); None if not one.
fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += n * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_images_as_the_kubelet_matches_them() {
        let yes = [
            (
                "123456789.dkr.ecr.us-east-1.amazonaws.com",
                "123456789.dkr.ecr.us-east-1.amazonaws.com/app",
            ),
            (
                "*.dkr.ecr.*.amazonaws.com",
                "123456789.dkr.ecr.us-east-1.amazonaws.com/app",
            ),
            ("*.azurecr.io", "team.azurecr.io/x/y"),
            ("gcr.io", "gcr.io/project/img"),
            ("registry.io/foo", "registry.io/foobar"),
            ("reg.example:5000", "reg.example:5000/a"),
            ("https://reg.example", "reg.example/a"),
            ("REG.example", "reg.EXAMPLE/a"),
            ("?cr.io", "gcr.io/p"),
        ];
        for (p, i) in yes {
            assert!(image_matches(p, i), "{p} should match {i}");
        }
        let no = [
            ("*.azurecr.io", "azurecr.io/x"),
            ("*.io", "team.azurecr.io/x"),
            ("reg.example", "reg.example:5000/a"),
            ("reg.example:5000", "reg.example/a"),
            ("reg.example/team", "reg.example/other"),
            ("gcr.io", "eu.gcr.io/p"),
        ];
        for (p, i) in no {
            assert!(!image_matches(p, i), "{p} should not match {i}");
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(
            parse_go_duration("12h"),
            Some(Duration::from_secs(12 * 3600))
        );
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
        for bad in ["", "12", "h", "5 minutes", "-1s", "1e400h"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    fn repo(s: &str) -> Repository {
        format!("{s}:latest")
            .parse::<crate::Reference>()
            .unwrap()
            .repository
    }

    /// A plugin script answering as `answer` (a shell `printf` format
    /// argument), recording each request in `<dir>/requests`.
    fn plugin(dir: &Path, name: &str, answer: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(
            &tmp,
            format!(
                "#!/bin/sh\ncat >> {dir}/requests\necho >> {dir}/requests\necho \"$@ $EXTRA\" >> {dir}/args\nprintf '%s' '{answer}'\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Renamed into place: an executable being written is "text file busy".
        std::fs::rename(&tmp, &path).unwrap();
    }

    fn config(dir: &Path, yaml: &str) -> PathBuf {
        let p = dir.join("config.yaml");
        std::fs::write(&p, yaml).unwrap();
        p
    }

    #[test]
    fn a_plugin_answers_and_its_answer_is_cached_as_it_says() {
        let d = tempfile::tempdir().unwrap();
        plugin(
            d.path(),
            "ecr-login",
            r#"{"kind":"CredentialProviderResponse","apiVersion":"credentialprovider.kubelet.k8s.io/v1","cacheKeyType":"Registry","cacheDuration":"1h","auth":{"*.dkr.ecr.*.amazonaws.com":{"username":"AWS","password":"tok-1"},"1.dkr.ecr.eu-west-1.amazonaws.com/special":{"username":"AWS","password":"tok-2"}}}"#,
        );
        let cfg = config(
            d.path(),
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: ecr-login\n    matchImages: [\"*.dkr.ecr.*.amazonaws.com\"]\n    defaultCacheDuration: \"12h\"\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n    args: [get-credentials]\n    env:\n      - name: EXTRA\n        value: from-config\n",
        );
        let p = CredentialProviders::load(&cfg, d.path()).unwrap();
        let c = p
            .get(&repo("1.dkr.ecr.eu-west-1.amazonaws.com/app"))
            .unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("AWS", "tok-1"));
        // The more specific pattern wins; the cached answer serves (Registry key).
        let c = p
            .get(&repo("1.dkr.ecr.eu-west-1.amazonaws.com/special/x"))
            .unwrap();
        assert_eq!(c.password, "tok-2");
        let requests = std::fs::read_to_string(d.path().join("requests")).unwrap();
        assert_eq!(requests.lines().count(), 1, "asked once: {requests}");
        let req: serde_json::Value =
            serde_json::from_str(requests.lines().next().unwrap()).unwrap();
        assert_eq!(req["kind"], "CredentialProviderRequest");
        assert_eq!(req["image"], "1.dkr.ecr.eu-west-1.amazonaws.com/app");
        let args = std::fs::read_to_string(d.path().join("args")).unwrap();
        assert_eq!(args.trim(), "get-credentials from-config");
        // Images no pattern matches never run it.
        assert!(p.get(&repo("reg.example/app")).is_none());
        assert_eq!(
            std::fs::read_to_string(d.path().join("requests"))
                .unwrap()
                .lines()
                .count(),
            1
        );
    }

    /// lazylayer asks at every request: a failing plugin, or one that says
    /// not to cache, still runs once per MIN_KEEP, not once per request.
    #[test]
    fn a_plugin_runs_once_per_short_while_even_failing_or_uncached() {
        let d = tempfile::tempdir().unwrap();
        let cfg = |name: &str| {
            config(
                d.path(),
                &format!("apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: {name}\n    matchImages: [reg.example]\n    defaultCacheDuration: 0s\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n"),
            )
        };
        // Answers what is not a response.
        plugin(d.path(), "failing", "not a response");
        let p = CredentialProviders::load(&cfg("failing"), d.path()).unwrap();
        for _ in 0..3 {
            assert!(p.get(&repo("reg.example/app")).is_none());
        }
        let runs = std::fs::read_to_string(d.path().join("requests")).unwrap();
        assert_eq!(runs.lines().count(), 1, "{runs}");
        std::fs::remove_file(d.path().join("requests")).unwrap();
        plugin(
            d.path(),
            "uncached",
            r#"{"kind":"CredentialProviderResponse","apiVersion":"credentialprovider.kubelet.k8s.io/v1","cacheKeyType":"Image","cacheDuration":"0s","auth":{"reg.example":{"username":"u","password":"p"}}}"#,
        );
        let p = CredentialProviders::load(&cfg("uncached"), d.path()).unwrap();
        for _ in 0..3 {
            assert_eq!(p.get(&repo("reg.example/app")).unwrap().password, "p");
        }
        let runs = std::fs::read_to_string(d.path().join("requests")).unwrap();
        assert_eq!(runs.lines().count(), 1, "{runs}");
    }

    #[test]
    fn bad_configs_and_answers_are_errors_not_credentials() {
        let d = tempfile::tempdir().unwrap();
        for (yaml, says) in [
            ("kind: Nope\napiVersion: x\n", "expected CredentialProviderConfig"),
            ("apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: ../x\n    matchImages: [a]\n    defaultCacheDuration: 1h\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n", "plain file name"),
            ("apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: x\n    matchImages: []\n    defaultCacheDuration: 1h\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n", "no matchImages"),
            ("apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: x\n    matchImages: [a]\n    defaultCacheDuration: soon\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n", "defaultCacheDuration"),
            ("{{{", "not a CredentialProviderConfig"),
        ] {
            let e = CredentialProviders::load(&config(d.path(), yaml), d.path()).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        // Garbage, a wrong kind, an unknown cacheKeyType: no credential.
        for answer in [
            "not json",
            r#"{"kind":"Other","apiVersion":"credentialprovider.kubelet.k8s.io/v1","cacheKeyType":"Image","auth":{"reg.example":{"username":"u","password":"p"}}}"#,
            r#"{"kind":"CredentialProviderResponse","apiVersion":"credentialprovider.kubelet.k8s.io/v1","cacheKeyType":"Forever","auth":{"reg.example":{"username":"u","password":"p"}}}"#,
        ] {
            plugin(d.path(), "bad", answer);
            let cfg = config(
                d.path(),
                "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: bad\n    matchImages: [reg.example]\n    defaultCacheDuration: 0s\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
            );
            let p = CredentialProviders::load(&cfg, d.path()).unwrap();
            assert!(p.get(&repo("reg.example/app")).is_none(), "{answer}");
        }
        // A plugin that is missing is a warning, not a panic.
        let cfg = config(
            d.path(),
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: absent\n    matchImages: [reg.example]\n    defaultCacheDuration: 1h\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
        );
        let p = CredentialProviders::load(&cfg, d.path()).unwrap();
        assert!(p.get(&repo("reg.example/app")).is_none());
    }
}
