//! Registry mirrors, configured the way containerd and Podman configure them:
//! containerd's `certs.d` directory (`<dir>/<host[:port]>/hosts.toml`, also
//! `_default/hosts.toml`) and containers' `registries.conf` (v2 format).
//!
//! [`Hosts::endpoints`] turns that into the ordered list of hosts one request
//! tries: mirrors first (in file order), the upstream registry last. Every
//! value comes from a file an admin wrote, but is still checked like hostile
//! input: a malformed file is an error naming it, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use crate::error::{OciError, Result};
use crate::reference::{Repository, DEFAULT_REGISTRY};

/// What a request does, which decides the hosts that may answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A manifest by tag: only hosts with the `resolve` capability (a mirror
    /// may hold a stale tag, so it must be trusted with tags explicitly).
    Resolve,
    /// Content by digest (manifests, configs, layers): hosts with `pull`.
    Pull,
    /// Uploads: never mirrors, only the upstream registry.
    Push,
}

/// containerd's host capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub pull: bool,
    pub resolve: bool,
    pub push: bool,
}

impl Capabilities {
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
    /// What a mirror may do unless told otherwise.
    pub const MIRROR: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: false,
    };

    fn allows(&self, p: Purpose) -> bool {
        match p {
            Purpose::Resolve => self.resolve,
            Purpose::Pull => self.pull,
            Purpose::Push => self.push,
        }
    }
}

/// One host a request may go to, with everything needed to build its URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `http` or `https`.
    pub scheme: String,
    /// `host` or `host:port`.
    pub host: String,
    /// The API root: `/v2` unless `override_path` gave another.
    pub path: String,
    /// The repository's name on this host (registries.conf may map a prefix
    /// to another path on a mirror).
    pub name: String,
    pub capabilities: Capabilities,
    /// Accept any server certificate (TLS without verification).
    pub skip_verify: bool,
    /// Extra root certificates (PEM files) for this host.
    pub ca_files: Vec<PathBuf>,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// The registry the image belongs to (`docker.io`, `host:port`).
    pub registry: String,
    /// A mirror, not the registry itself: requests carry `?ns=<registry>`
    /// (as containerd's do) and a failure moves on to the next host.
    pub mirror: bool,
    /// Where this host was configured (a file, or `added`), for messages.
    pub source: String,
}

impl Endpoint {
    /// The URL of `tail` (`manifests/latest`, `blobs/<digest>`…) of this
    /// endpoint's repository.
    pub fn url(&self, tail: &str) -> url::Url {
        let raw = format!(
            "{}://{}{}/{}/{}",
            self.scheme,
            self.host,
            self.path.trim_end_matches('/'),
            self.name,
            tail
        );
        let mut u = url::Url::parse(&raw).expect("endpoint parts were checked when loaded");
        if self.mirror {
            u.query_pairs_mut().append_pair("ns", &self.registry);
        }
        u
    }

    /// The host's root (`scheme://host/`), against which upload `Location`s resolve.
    pub fn base(&self) -> url::Url {
        url::Url::parse(&format!("{}://{}/", self.scheme, self.host)).expect("checked when loaded")
    }

    /// How messages name this host: the mirror's address, or the registry.
    pub fn label(&self) -> &str {
        if self.mirror {
            &self.host
        } else {
            &self.registry
        }
    }
}

/// A host as a configuration file describes it, before a repository is known.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostSpec {
    scheme: String,
    host: String,
    /// API root (`/v2`, or the override path).
    path: String,
    capabilities: Capabilities,
    skip_verify: bool,
    ca_files: Vec<PathBuf>,
    headers: Vec<(String, String)>,
    source: String,
}

/// One `hosts.toml`.
#[derive(Debug, Clone, Default)]
struct HostsFile {
    /// `[host."…"]` tables in file order.
    hosts: Vec<HostSpec>,
    /// `server = …` with the top-level settings; `None`: the default upstream
    /// (with the top-level settings in `server_settings`).
    server: Option<HostSpec>,
    server_settings: Option<HostSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PullFrom {
    All,
    DigestOnly,
    TagOnly,
}

#[derive(Debug, Clone)]
struct ConfMirror {
    location: String,
    insecure: bool,
    pull_from: PullFrom,
}

/// One `[[registry]]` of registries.conf.
#[derive(Debug, Clone)]
struct ConfRegistry {
    file: PathBuf,
    prefix: String,
    location: String,
    insecure: bool,
    blocked: bool,
    mirrors: Vec<ConfMirror>,
}

/// Mirrors and per-host settings for every registry.
#[derive(Debug, Clone, Default)]
pub struct Hosts {
    /// From `certs.d`, by directory name (`host:port`, `host_port_` and `_default`).
    certs_d: HashMap<String, HostsFile>,
    registries: Vec<ConfRegistry>,
    /// From [`Hosts::add_mirror`], by registry; tried before the files' mirrors.
    added: HashMap<String, Vec<HostSpec>>,
}

fn config_err(path: &Path, reason: impl Into<String>) -> OciError {
    OciError::Config {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Loopback hosts speak plain HTTP without being named insecure.
pub(crate) fn is_loopback(host: &str) -> bool {
    let h = match host.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => h,
        _ => host,
    };
    h == "localhost" || h.starts_with("127.") || h == "[::1]"
}

/// Check a host URL from a file (or the API): http(s) only, a host, no
/// credentials (they belong in the auth files), no query or fragment.
/// Returns (scheme, host[:port], path).
fn parse_host_url(raw: &str) -> std::result::Result<(String, String, String), String> {
    let with_scheme = if raw.contains("://") {
        raw.to_string()
    } else {
        // containerd's rule: a host without a scheme is HTTPS.
        format!("https://{raw}")
    };
    let u = url::Url::parse(&with_scheme).map_err(|e| format!("bad host URL {raw:?}: {e}"))?;
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err(format!(
            "host URL {raw:?}: scheme {:?} is not http or https",
            u.scheme()
        ));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(format!(
            "host URL {:?} holds credentials; put them in an auth file (auth.json) instead",
            redact_userinfo(raw)
        ));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(format!("host URL {raw:?} has a query or fragment"));
    }
    let host = match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) if !h.is_empty() => h.to_string(),
        _ => return Err(format!("host URL {raw:?} names no host")),
    };
    Ok((u.scheme().to_string(), host, u.path().to_string()))
}

/// `user:secret@` removed from a URL written into a message.
fn redact_userinfo(raw: &str) -> String {
    match (raw.find("://"), raw.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &raw[..s + 3], &raw[at..]),
        (None, Some(at)) => format!("***{}", &raw[at..]),
        _ => raw.to_string(),
    }
}

/// containerd's API root: the URL's path with `/v2` appended unless it ends
/// so already, or as written with `override_path`.
fn api_path(url_path: &str, override_path: bool) -> String {
    let p = url_path.trim_end_matches('/');
    if override_path {
        p.to_string()
    } else if p.is_empty() || p.ends_with("/v2") {
        if p.is_empty() {
            "/v2".into()
        } else {
            p.into()
        }
    } else {
        format!("{p}/v2")
    }
}

/// A whole file as a TOML table. The parser bounds its nesting (a deeply
/// nested value is an error, not a stack overflow) and says where a
/// mistake is (line and column).
fn parse_toml(file: &Path, text: &str) -> Result<Table> {
    text.parse::<Table>()
        .map_err(|e| config_err(file, format!("not valid TOML: {e}")))
}

/// The tables of an array of tables (`[[name]]`, or an inline array of
/// inline tables, which is the same value to TOML).
fn tables(item: &Value) -> Option<Vec<&Table>> {
    item.as_array()?.iter().map(Value::as_table).collect()
}

fn item_str<'a>(file: &Path, key: &str, item: &'a Value) -> Result<&'a str> {
    item.as_str()
        .ok_or_else(|| config_err(file, format!("{key} must be a string")))
}

fn item_bool(file: &Path, key: &str, item: &Value) -> Result<bool> {
    item.as_bool()
        .ok_or_else(|| config_err(file, format!("{key} must be true or false")))
}

/// A string or an array of strings.
fn item_strings(file: &Path, key: &str, item: &Value) -> Result<Vec<String>> {
    if let Some(s) = item.as_str() {
        return Ok(vec![s.to_string()]);
    }
    let arr = item
        .as_array()
        .ok_or_else(|| config_err(file, format!("{key} must be a string or a list of strings")))?;
    arr.iter()
        .map(|v: &Value| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| config_err(file, format!("{key} must hold only strings")))
        })
        .collect()
}

/// The settings shared by a `[host."…"]` table and the file's top level.
struct HostSettings {
    capabilities: Option<Capabilities>,
    skip_verify: bool,
    ca_files: Vec<PathBuf>,
    headers: Vec<(String, String)>,
    override_path: bool,
}

fn parse_host_settings(
    file: &Path,
    dir: &Path,
    table: &Table,
    context: &str,
    top_level: bool,
) -> Result<HostSettings> {
    let mut s = HostSettings {
        capabilities: None,
        skip_verify: false,
        ca_files: Vec::new(),
        headers: Vec::new(),
        override_path: false,
    };
    for (key, item) in table {
        let name = format!("{context}{key}");
        match key.as_str() {
            "capabilities" => {
                let mut caps = Capabilities {
                    pull: false,
                    resolve: false,
                    push: false,
                };
                for c in item_strings(file, &name, item)? {
                    match c.to_ascii_lowercase().as_str() {
                        "pull" => caps.pull = true,
                        "resolve" => caps.resolve = true,
                        "push" => caps.push = true,
                        other => {
                            return Err(config_err(
                                file,
                                format!(
                                    "{name}: unknown capability {other:?} (pull, resolve, push)"
                                ),
                            ))
                        }
                    }
                }
                s.capabilities = Some(caps);
            }
            "skip_verify" => s.skip_verify = item_bool(file, &name, item)?,
            "override_path" => s.override_path = item_bool(file, &name, item)?,
            "ca" => {
                for p in item_strings(file, &name, item)? {
                    if p.is_empty() {
                        return Err(config_err(file, format!("{name}: empty path")));
                    }
                    // containerd: relative paths are relative to the host's directory.
                    s.ca_files.push(dir.join(p));
                }
            }
            "header" => {
                let t = item
                    .as_table()
                    .ok_or_else(|| config_err(file, format!("{name} must be a table")))?;
                for (h, v) in t {
                    let hname = reqwest::header::HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| config_err(file, format!("{name}: bad header name {h:?}")))?;
                    for value in item_strings(file, &format!("{name}.{h}"), v)? {
                        reqwest::header::HeaderValue::from_str(&value).map_err(|_| {
                            config_err(file, format!("{name}.{h}: bad header value"))
                        })?;
                        s.headers.push((hname.to_string(), value));
                    }
                }
            }
            "client" | "dial_timeout" => {
                tracing::warn!(file = %file.display(), key = %name, "not supported by lazylayer; ignored");
            }
            "server" | "host" if top_level => {}
            other => {
                // containerd ignores keys it does not know; say so, since a typo
                // would otherwise silently change where images come from.
                tracing::warn!(file = %file.display(), key = %format!("{context}{other}"), "unknown key in hosts.toml; ignored");
            }
        }
    }
    Ok(s)
}

fn host_spec(
    file: &Path,
    url: &str,
    s: &HostSettings,
    default_caps: Capabilities,
) -> Result<HostSpec> {
    let (scheme, host, path) = parse_host_url(url).map_err(|e| config_err(file, e))?;
    Ok(HostSpec {
        scheme,
        host,
        path: api_path(&path, s.override_path),
        capabilities: s.capabilities.unwrap_or(default_caps),
        skip_verify: s.skip_verify,
        ca_files: s.ca_files.clone(),
        headers: s.headers.clone(),
        source: file.display().to_string(),
    })
}

/// Parse one `hosts.toml` (at `file`, in host directory `dir`).
fn parse_hosts_toml(file: &Path, dir: &Path, text: &str) -> Result<HostsFile> {
    let root = parse_toml(file, text)?;
    let root = &root;
    let mut out = HostsFile::default();
    let top = parse_host_settings(file, dir, root, "", true)?;
    if let Some(item) = root.get("host") {
        let t = item
            .as_table()
            .ok_or_else(|| config_err(file, "host must be a table of [host.\"URL\"] tables"))?;
        for (url, h) in t {
            let ht = h
                .as_table()
                .ok_or_else(|| config_err(file, format!("host.{url:?} must be a table")))?;
            let s = parse_host_settings(file, dir, ht, &format!("host.\"{url}\"."), false)?;
            // containerd gives a host without `capabilities` all of them; push
            // is never sent to a mirror here, whatever it says.
            out.hosts.push(host_spec(file, url, &s, Capabilities::ALL)?);
        }
    }
    match root.get("server") {
        Some(item) => {
            let url = item_str(file, "server", item)?;
            out.server = Some(host_spec(file, url, &top, Capabilities::ALL)?);
        }
        None => {
            out.server_settings = Some(HostSpec {
                scheme: String::new(),
                host: String::new(),
                path: api_path("", top.override_path),
                capabilities: top.capabilities.unwrap_or(Capabilities::ALL),
                skip_verify: top.skip_verify,
                ca_files: top.ca_files,
                headers: top.headers,
                source: file.display().to_string(),
            })
        }
    }
    Ok(out)
}

fn parse_pull_from(file: &Path, key: &str, item: &Value) -> Result<PullFrom> {
    match item_str(file, key, item)? {
        "all" => Ok(PullFrom::All),
        "digest-only" => Ok(PullFrom::DigestOnly),
        "tag-only" => Ok(PullFrom::TagOnly),
        other => Err(config_err(
            file,
            format!("{key}: {other:?} is not all, digest-only or tag-only"),
        )),
    }
}

/// A registries.conf `location`/`prefix`: `host[:port][/path]`, no scheme.
fn check_location(file: &Path, key: &str, loc: &str) -> Result<()> {
    if loc.contains("://") {
        return Err(config_err(
            file,
            format!("{key} {loc:?}: write host[:port][/path], without a scheme"),
        ));
    }
    let host = loc.split('/').next().unwrap_or("");
    let host = host.strip_prefix("*.").unwrap_or(host);
    parse_host_url(host).map_err(|e| config_err(file, format!("{key}: {e}")))?;
    if loc
        .split('/')
        .skip(1)
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(config_err(file, format!("{key} {loc:?}: bad path")));
    }
    Ok(())
}

/// Parse containers' registries.conf (v2: `[[registry]]` tables).
fn parse_registries_conf(file: &Path, text: &str) -> Result<Vec<ConfRegistry>> {
    let doc = parse_toml(file, text)?;
    let mut out = Vec::new();
    for (key, item) in &doc {
        match key.as_str() {
            "registry" => {
                let arr = tables(item).ok_or_else(|| {
                    config_err(file, "registry must be a list of [[registry]] tables")
                })?;
                for (i, t) in arr.into_iter().enumerate() {
                    out.push(parse_conf_registry(file, i, t)?);
                }
            }
            // Podman's, not about where images come from.
            "unqualified-search-registries"
            | "short-name-mode"
            | "credential-helpers"
            | "aliases"
            | "additional-layer-store-auth-helper" => {}
            "registries" => {
                tracing::warn!(file = %file.display(), "registries.conf v1 tables ([registries.*]) are not read; use [[registry]]");
            }
            other => {
                tracing::warn!(file = %file.display(), key = %other, "unknown key in registries.conf; ignored")
            }
        }
    }
    // Two entries with the same prefix are refused by containers too.
    for (i, a) in out.iter().enumerate() {
        if out[..i].iter().any(|b| b.prefix == a.prefix) {
            return Err(config_err(
                file,
                format!("two [[registry]] entries for prefix {:?}", a.prefix),
            ));
        }
    }
    Ok(out)
}

fn parse_conf_registry(file: &Path, i: usize, t: &Table) -> Result<ConfRegistry> {
    let ctx = format!("[[registry]] #{}", i + 1);
    let mut prefix = None;
    let mut location = None;
    let mut insecure = false;
    let mut blocked = false;
    let mut pull_from = PullFrom::All;
    let mut mirror_tables = Vec::new();
    for (key, item) in t {
        let name = format!("{ctx} {key}");
        match key.as_str() {
            "prefix" => prefix = Some(item_str(file, &name, item)?.to_string()),
            "location" => location = Some(item_str(file, &name, item)?.to_string()),
            "insecure" => insecure = item_bool(file, &name, item)?,
            "blocked" => blocked = item_bool(file, &name, item)?,
            "mirror-by-digest-only" => {
                if item_bool(file, &name, item)? {
                    pull_from = PullFrom::DigestOnly;
                }
            }
            "mirror" => {
                let arr = tables(item).ok_or_else(|| {
                    config_err(file, format!("{name} must be [[registry.mirror]] tables"))
                })?;
                mirror_tables.extend(arr);
            }
            other => {
                tracing::warn!(file = %file.display(), key = %format!("{ctx} {other}"), "unknown key in registries.conf; ignored")
            }
        }
    }
    let location = location.unwrap_or_default();
    let prefix = prefix.unwrap_or_else(|| location.clone());
    if prefix.is_empty() {
        return Err(config_err(
            file,
            format!("{ctx}: neither prefix nor location"),
        ));
    }
    check_location(file, &format!("{ctx} prefix"), &prefix)?;
    if !location.is_empty() {
        if prefix.starts_with("*.") {
            return Err(config_err(
                file,
                format!("{ctx}: a wildcard prefix {prefix:?} cannot have a location"),
            ));
        }
        check_location(file, &format!("{ctx} location"), &location)?;
    }
    let mut mirrors = Vec::new();
    for (j, m) in mirror_tables.into_iter().enumerate() {
        let mctx = format!("{ctx} mirror #{}", j + 1);
        let mut loc = None;
        let mut m_insecure = false;
        let mut m_pull = pull_from;
        for (key, item) in m {
            let name = format!("{mctx} {key}");
            match key.as_str() {
                "location" => loc = Some(item_str(file, &name, item)?.to_string()),
                "insecure" => m_insecure = item_bool(file, &name, item)?,
                "pull-from-mirror" => m_pull = parse_pull_from(file, &name, item)?,
                other => {
                    tracing::warn!(file = %file.display(), key = %format!("{mctx} {other}"), "unknown key in registries.conf; ignored")
                }
            }
        }
        let loc = loc.ok_or_else(|| config_err(file, format!("{mctx}: no location")))?;
        check_location(file, &format!("{mctx} location"), &loc)?;
        mirrors.push(ConfMirror {
            location: loc,
            insecure: m_insecure,
            pull_from: m_pull,
        });
    }
    Ok(ConfRegistry {
        file: file.to_path_buf(),
        prefix,
        location,
        insecure,
        blocked,
        mirrors,
    })
}

/// Whether registries.conf `prefix` matches `registry/name`; the length of
/// the matched part of `full` (for the longest match and the rewrite).
fn prefix_match(prefix: &str, registry: &str, full: &str) -> Option<usize> {
    if let Some(domain) = prefix.strip_prefix("*.") {
        let host = registry.split(':').next().unwrap_or(registry);
        return host
            .strip_suffix(domain)
            .filter(|h| h.ends_with('.') && h.len() > 1)
            .map(|_| registry.len());
    }
    let rest = full.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(prefix.len())
}

/// `location` + what follows the matched prefix, split into (host, name).
fn rewrite(location: &str, rest: &str) -> Option<(String, String)> {
    let joined = format!("{location}{rest}");
    let (host, name) = joined.split_once('/')?;
    (!name.is_empty()).then(|| (host.to_string(), name.to_string()))
}

impl Hosts {
    /// Load containerd's `hosts_dir` (every `<host>/hosts.toml` in it) and
    /// containers' `registries_conf`. A missing directory or file means no
    /// mirrors; an unreadable or malformed one is an error naming it.
    pub fn load(hosts_dir: Option<&Path>, registries_conf: Option<&Path>) -> Result<Hosts> {
        let mut hosts = Hosts::default();
        if let Some(dir) = hosts_dir {
            match std::fs::read_dir(dir) {
                Ok(rd) => {
                    for e in rd {
                        let e = e.map_err(|e| config_err(dir, format!("cannot list: {e}")))?;
                        let sub = e.path();
                        let file = sub.join("hosts.toml");
                        let text = match std::fs::read(&file) {
                            Ok(b) => String::from_utf8(b)
                                .map_err(|_| config_err(&file, "not UTF-8 text"))?,
                            Err(err)
                                if err.kind() == std::io::ErrorKind::NotFound
                                    || err.kind() == std::io::ErrorKind::NotADirectory =>
                            {
                                continue
                            }
                            Err(err) => {
                                return Err(config_err(&file, format!("cannot read: {err}")))
                            }
                        };
                        let Some(name) = e.file_name().to_str().map(str::to_string) else {
                            continue;
                        };
                        let parsed = parse_hosts_toml(&file, &sub, &text)?;
                        hosts.certs_d.insert(name, parsed);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(config_err(dir, format!("cannot list: {e}"))),
            }
        }
        if let Some(file) = registries_conf {
            match std::fs::read(file) {
                Ok(b) => {
                    let text =
                        String::from_utf8(b).map_err(|_| config_err(file, "not UTF-8 text"))?;
                    hosts.registries = parse_registries_conf(file, &text)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(config_err(file, format!("cannot read: {e}"))),
            }
        }
        Ok(hosts)
    }

    /// No mirrors configured anywhere.
    pub fn is_empty(&self) -> bool {
        self.certs_d.is_empty() && self.registries.is_empty() && self.added.is_empty()
    }

    /// Add a mirror (`http(s)://host[:port][/path]`, or `host[:port]` for
    /// HTTPS) for `registry` (`docker.io`, `host:port`), tried before the
    /// mirrors the files name, for tags and content.
    pub fn add_mirror(&mut self, registry: &str, url: &str) -> Result<()> {
        let src = format!("mirror for {registry}");
        let (scheme, host, path) = parse_host_url(url).map_err(|e| OciError::Config {
            path: src.clone(),
            reason: e,
        })?;
        self.added
            .entry(registry.to_string())
            .or_default()
            .push(HostSpec {
                scheme,
                host,
                path: api_path(&path, false),
                capabilities: Capabilities::MIRROR,
                skip_verify: false,
                ca_files: Vec::new(),
                headers: Vec::new(),
                source: src,
            });
        Ok(())
    }

    /// The `certs.d` entry for `registry`: `host:port`, containerd's
    /// `host_port_` spelling, then `_default`.
    fn hosts_file(&self, registry: &str) -> Option<&HostsFile> {
        let underscored = match registry.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => Some(format!("{h}_{p}_")),
            _ => None,
        };
        self.certs_d
            .get(registry)
            .or_else(|| underscored.and_then(|u| self.certs_d.get(&u)))
            .or_else(|| self.certs_d.get("_default"))
    }

    /// The hosts to try, in order, for a request of `purpose` about `repo`:
    /// mirrors first (added ones, then hosts.toml's, then registries.conf's),
    /// the upstream registry last. `insecure_registries` (and loopback) are
    /// spoken to over plain HTTP when no file names a scheme.
    pub fn endpoints(
        &self,
        repo: &Repository,
        purpose: Purpose,
        insecure_registries: &[String],
    ) -> Result<Vec<Endpoint>> {
        let registry = repo.registry.as_str();
        let full = format!("{registry}/{}", repo.name);
        let conf = self
            .registries
            .iter()
            .filter_map(|r| prefix_match(&r.prefix, registry, &full).map(|n| (n, r)))
            .max_by_key(|(n, _)| *n);
        if let Some((_, r)) = conf.filter(|(_, r)| r.blocked) {
            return Err(OciError::Blocked {
                registry: full,
                path: r.file.display().to_string(),
            });
        }
        let plain = |host: &str| is_loopback(host) || insecure_registries.iter().any(|h| h == host);
        let mut out: Vec<Endpoint> = Vec::new();
        let push = |spec: &HostSpec, name: String, mirror: bool, out: &mut Vec<Endpoint>| {
            let caps = if mirror {
                Capabilities {
                    push: false,
                    ..spec.capabilities
                }
            } else {
                spec.capabilities
            };
            if !caps.allows(purpose) {
                return;
            }
            let ep = Endpoint {
                scheme: spec.scheme.clone(),
                host: spec.host.clone(),
                path: spec.path.clone(),
                name,
                capabilities: caps,
                skip_verify: spec.skip_verify,
                ca_files: spec.ca_files.clone(),
                headers: spec.headers.clone(),
                registry: registry.to_string(),
                mirror,
                source: spec.source.clone(),
            };
            if !out.iter().any(|e| {
                e.scheme == ep.scheme && e.host == ep.host && e.path == ep.path && e.name == ep.name
            }) {
                out.push(ep);
            }
        };
        for spec in self.added.get(registry).into_iter().flatten() {
            push(spec, repo.name.clone(), true, &mut out);
        }
        let file = self.hosts_file(registry);
        for spec in file.into_iter().flat_map(|f| &f.hosts) {
            // A mirror that is the registry itself (some files list it as a
            // host) is the upstream, not a mirror.
            let is_upstream = spec.host == repo.api_host();
            push(spec, repo.name.clone(), !is_upstream, &mut out);
        }
        let mut upstream_name = repo.name.clone();
        let mut upstream_host = repo.api_host().to_string();
        if let Some((n, r)) = conf {
            let rest = &full[n..];
            for m in &r.mirrors {
                let allowed = match (m.pull_from, purpose) {
                    (PullFrom::DigestOnly, Purpose::Resolve) => false,
                    // tag-only: the mirror answers tags, and the content they
                    // name (which is asked for by digest) comes from it too.
                    _ => true,
                };
                if !allowed {
                    continue;
                }
                let Some((host, name)) = rewrite(&m.location, rest) else {
                    continue;
                };
                for spec in conf_specs(&r.file, &host, m.insecure, plain(&host)) {
                    push(&spec, name.clone(), true, &mut out);
                }
            }
            if !r.location.is_empty() {
                if let Some((host, name)) = rewrite(&r.location, rest) {
                    upstream_host = if host == DEFAULT_REGISTRY {
                        "registry-1.docker.io".into()
                    } else {
                        host
                    };
                    upstream_name = name;
                }
            }
        }
        // The registry itself, last: hosts.toml's `server` when it names one.
        match file.and_then(|f| f.server.as_ref()) {
            Some(spec) => push(spec, upstream_name, false, &mut out),
            None => {
                let settings = file.and_then(|f| f.server_settings.as_ref());
                let conf_insecure = conf.is_some_and(|(_, r)| r.insecure);
                let specs = if plain(&upstream_host) || plain(registry) {
                    vec![conf_spec("", &upstream_host, "http", false)]
                } else if conf_insecure {
                    conf_specs(&conf.unwrap().1.file, &upstream_host, true, false)
                } else {
                    vec![conf_spec("", &upstream_host, "https", false)]
                };
                for mut spec in specs {
                    if let Some(s) = settings {
                        spec.path = s.path.clone();
                        spec.capabilities = s.capabilities;
                        spec.skip_verify |= s.skip_verify;
                        spec.ca_files = s.ca_files.clone();
                        spec.headers = s.headers.clone();
                        spec.source = s.source.clone();
                    }
                    push(&spec, upstream_name.clone(), false, &mut out);
                }
            }
        }
        if out.is_empty() {
            return Err(OciError::NoHost {
                registry: registry.to_string(),
                purpose: format!("{purpose:?}").to_lowercase(),
            });
        }
        Ok(out)
    }
}

fn conf_spec(source: &str, host: &str, scheme: &str, skip_verify: bool) -> HostSpec {
    HostSpec {
        scheme: scheme.into(),
        host: host.into(),
        path: "/v2".into(),
        capabilities: Capabilities::ALL,
        skip_verify,
        ca_files: Vec::new(),
        headers: Vec::new(),
        source: source.into(),
    }
}

/// A registries.conf host: HTTPS; `insecure` allows an unverified
/// certificate and then plain HTTP (as containers/image does); loopback is
/// plain HTTP.
fn conf_specs(file: &Path, host: &str, insecure: bool, plain: bool) -> Vec<HostSpec> {
    let src = file.display().to_string();
    if plain {
        vec![conf_spec(&src, host, "http", false)]
    } else if insecure {
        vec![
            conf_spec(&src, host, "https", true),
            conf_spec(&src, host, "http", false),
        ]
    } else {
        vec![conf_spec(&src, host, "https", false)]
    }
}

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;
