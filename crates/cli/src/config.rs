//! The configuration file (`/etc/lazylayer/config.toml`, or `--config`):
//! what a node's services share. Precedence, lowest first: built-in defaults,
//! the file, environment variables, flags. `lazylayer config` prints the
//! result in the file's own format, so it can seed a file.
//!
//! The file is read like any outside input: an unknown key is an error that
//! names it (a misspelt `size_limt` silently ignored would leave a node's
//! disk unbounded), and so is a value of the wrong type or out of range.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Where the configuration is read from when neither `--config` nor
/// `LAZYLAYER_CONFIG` names a file (a missing default file means defaults).
pub const DEFAULT_PATH: &str = "/etc/lazylayer/config.toml";

pub const DEFAULT_ROOT: &str = "/var/lib/lazylayer";
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";
pub const DEFAULT_REGISTRIES_CONF: &str = "/etc/containers/registries.conf";

/// The whole file. Every key is optional; [`Config::with_defaults`] fills in
/// what is missing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub registries: RegistriesSection,
    #[serde(default)]
    pub fetch: FetchSection,
    #[serde(default)]
    pub fs: FsSection,
    #[serde(default)]
    pub metrics: MetricsSection,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Store directory (blobs, extracted layers, image records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Largest the store may grow ("20GB", "1.5GiB", bytes); content no
    /// running container uses is evicted least recently used past it.
    /// "none" (the default) means unbounded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistriesSection {
    /// Registries (HOST or HOST:PORT) spoken to over plain HTTP; loopback
    /// hosts always are.
    #[serde(default)]
    pub insecure: Vec<String>,
    /// A Docker/Podman-style auth.json read before the usual ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_file: Option<PathBuf>,
    /// The kubelet's credential provider configuration
    /// (`--image-credential-provider-config`, YAML or JSON): its plugins
    /// give credentials for the images their patterns match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_provider_config: Option<PathBuf>,
    /// Where those plugins are (`--image-credential-provider-bin-dir`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_provider_bin_dir: Option<PathBuf>,
    /// containerd's certs.d layout (`<dir>/<registry>/hosts.toml`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts_dir: Option<PathBuf>,
    /// containers-registries.conf(5) mirrors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registries_conf: Option<PathBuf>,
    /// Mirrors per registry, tried in order before the registry itself:
    /// `"docker.io" = ["https://mirror.example.com"]`.
    #[serde(default)]
    pub mirrors: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchSection {
    /// Seconds a blob download may bring no data (or under 1 KiB/s on
    /// average) before it is dropped and resumed, and a request may wait
    /// for its answer before it is sent again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall_timeout: Option<f64>,
    /// Seconds to wait for a registry connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<f64>,
    /// Seconds a read on a lazy root waits for its file before EIO.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_timeout: Option<f64>,
    /// Fetch the rest of an image in the background once its start settled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<bool>,
    /// Bytes per second the background prefetch may take, all images of a
    /// process together ("20MB", "none"); reads that wait are never held back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch_bandwidth: Option<String>,
    /// Layers the background prefetch fetches at once, per image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch_concurrency: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsSection {
    /// Let the kernel read local files straight from the store (FUSE
    /// passthrough) instead of opening them alone once the image is local.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<bool>,
    /// How `run` stacks a lazily started container's root: `overlay`
    /// (overlayfs over a stub tree of the image's metadata, bytes from the
    /// store's layers; Linux 6.5+) or `fuse` (the FUSE root).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_root: Option<LazyRootMode>,
}

/// [`FsSection::lazy_root`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LazyRootMode {
    Overlay,
    Fuse,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// HOST:PORT the snapshotter and the Podman store serve Prometheus
    /// metrics on (`/metrics`); unset: no endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
}

impl Config {
    /// Parse `text` (the contents of `path`, named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let cfg: Config = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        cfg.check()
            .with_context(|| format!("{}: invalid value", path.display()))?;
        Ok(cfg)
    }

    /// Read `path`: a missing file is an error unless `optional` (the
    /// default location), then it means defaults.
    pub fn load(path: &Path, optional: bool) -> Result<Config> {
        // Bounded: a configuration is a few kB; a huge or endless file
        // (a FIFO, /dev/zero) must not fill memory.
        const MAX: u64 = 1 << 20;
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default())
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
            bail!("{} is not a regular file", path.display());
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX + 1), &mut text)
            .with_context(|| format!("reading {} (is it UTF-8 text?)", path.display()))?;
        if text.len() as u64 > MAX {
            bail!("{} is larger than 1 MiB", path.display());
        }
        Config::parse(&text, path)
    }

    /// Values out of range, named by their key.
    fn check(&self) -> Result<()> {
        let f = &self.fetch;
        for (key, v) in [
            ("fetch.stall_timeout", f.stall_timeout),
            ("fetch.connect_timeout", f.connect_timeout),
            ("fetch.read_timeout", f.read_timeout),
        ] {
            if let Some(v) = v {
                seconds(v).with_context(|| format!("{key} = {v}"))?;
            }
        }
        if f.prefetch_concurrency == Some(0) {
            bail!("fetch.prefetch_concurrency must be at least 1");
        }
        if let Some(s) = &self.store.size_limit {
            parse_limit(s).with_context(|| format!("store.size_limit = {s:?}"))?;
        }
        if let Some(s) = &f.prefetch_bandwidth {
            parse_limit(s).with_context(|| format!("fetch.prefetch_bandwidth = {s:?}"))?;
        }
        for (registry, urls) in &self.registries.mirrors {
            if registry.is_empty() || registry.contains('/') || registry.contains("://") {
                bail!(
                    "registries.mirrors: {registry:?} is not a registry host (HOST or HOST:PORT)"
                );
            }
            for u in urls {
                let ok = (u.starts_with("http://") || u.starts_with("https://"))
                    && !u.contains('@')
                    && u.len() > "https://".len();
                if !ok {
                    bail!(
                        "registries.mirrors.{registry:?}: {u:?} is not an http:// or https:// URL \
                         without credentials (put credentials in the auth file)"
                    );
                }
            }
        }
        Ok(())
    }

    /// Every key given a value: `self`'s, else the built-in default.
    pub fn with_defaults(mut self) -> Config {
        let s = &mut self.store;
        s.root.get_or_insert_with(|| DEFAULT_ROOT.into());
        s.size_limit.get_or_insert_with(|| "none".into());
        let r = &mut self.registries;
        r.hosts_dir.get_or_insert_with(|| DEFAULT_HOSTS_DIR.into());
        r.registries_conf
            .get_or_insert_with(|| DEFAULT_REGISTRIES_CONF.into());
        let f = &mut self.fetch;
        f.stall_timeout.get_or_insert(10.0);
        f.connect_timeout.get_or_insert(10.0);
        f.read_timeout.get_or_insert(60.0);
        f.prefetch.get_or_insert(true);
        f.prefetch_bandwidth.get_or_insert_with(|| "none".into());
        f.prefetch_concurrency.get_or_insert(2);
        self.fs.passthrough.get_or_insert(false);
        self.fs.lazy_root.get_or_insert(LazyRootMode::Overlay);
        self
    }

    /// The file's format (TOML), every section present.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a configuration always serialises")
    }
}

/// A positive, finite number of seconds.
pub fn seconds(v: f64) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{v} is not a positive number of seconds"))
}

/// A size or rate: "none" (no limit) or what [`lazylayer_store::parse_size`]
/// reads.
pub fn parse_limit(s: &str) -> Result<Option<u64>> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    Ok(Some(lazylayer_store::parse_size(s)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/lazylayer/config.toml"))
    }

    #[test]
    fn a_full_file_parses_into_every_section() {
        let cfg = parse(
            r#"
[store]
root = "/srv/lazylayer"
size_limit = "20GB"
[registries]
insecure = ["registry.local:5000"]
auth_file = "/etc/lazylayer/auth.json"
hosts_dir = "/etc/lazylayer/certs.d"
[registries.mirrors]
"docker.io" = ["https://mirror.example.com", "http://10.0.0.2:5000"]
[fetch]
stall_timeout = 5
read_timeout = 30.5
prefetch = false
prefetch_bandwidth = "50MB"
prefetch_concurrency = 4
[fs]
passthrough = false
lazy_root = "fuse"
[metrics]
address = "127.0.0.1:9155"
"#,
        )
        .unwrap();
        assert_eq!(cfg.store.root.as_deref(), Some(Path::new("/srv/lazylayer")));
        assert_eq!(cfg.registries.mirrors["docker.io"].len(), 2);
        assert_eq!(cfg.fetch.stall_timeout, Some(5.0));
        assert_eq!(cfg.fetch.read_timeout, Some(30.5));
        assert_eq!(cfg.fs.passthrough, Some(false));
        assert_eq!(cfg.fs.lazy_root, Some(LazyRootMode::Fuse));
        assert_eq!(cfg.metrics.address.unwrap().port(), 9155);
        // What `lazylayer config` prints reads back as the same configuration.
        let full = cfg.clone().with_defaults();
        assert_eq!(parse(&full.to_toml()).unwrap(), full);
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it_and_the_file() {
        for (text, key) in [
            ("[store]\nsize_limt = \"1GB\"\n", "size_limt"),
            (
                "[fetch]\nprefetch_bandwith = \"1MB\"\n",
                "prefetch_bandwith",
            ),
            ("[storage]\nroot = \"/x\"\n", "storage"),
            ("rot = \"/x\"\n", "rot"),
        ] {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(key), "{text:?}: {e}");
            assert!(e.contains("/etc/lazylayer/config.toml"), "{e}");
        }
    }

    #[test]
    fn bad_values_are_errors_naming_the_key() {
        for (text, key) in [
            ("[fetch]\nstall_timeout = -1\n", "fetch.stall_timeout"),
            ("[fetch]\nread_timeout = 0\n", "fetch.read_timeout"),
            (
                "[fetch]\nprefetch_concurrency = 0\n",
                "prefetch_concurrency",
            ),
            ("[store]\nsize_limit = \"12 parsecs\"\n", "store.size_limit"),
            ("[store]\nsize_limit = \"-5GB\"\n", "store.size_limit"),
            (
                "[fetch]\nprefetch_bandwidth = \"1e400\"\n",
                "prefetch_bandwidth",
            ),
            ("[fs]\npassthrough = \"yes\"\n", "passthrough"),
            ("[fs]\nlazy_root = \"ext4\"\n", "lazy_root"),
            ("[metrics]\naddress = \"not an address\"\n", "address"),
            (
                "[registries.mirrors]\n\"docker.io\" = [\"https://u:p@m.example\"]\n",
                "registries.mirrors",
            ),
            (
                "[registries.mirrors]\n\"docker.io\" = [\"ftp://m.example\"]\n",
                "registries.mirrors",
            ),
        ] {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(key), "{text:?}: {e}");
        }
    }

    /// The examples users copy: README's fleet set-up and the reference in
    /// docs/configuration.md (every key) are valid files.
    #[test]
    fn the_documented_examples_parse() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
        let start = readme
            .find("cat > /etc/lazylayer/config.toml <<'EOF'\n")
            .expect("README shows a configuration file");
        let body = &readme[start..];
        let body = &body[body.find('\n').unwrap() + 1..];
        let example = &body[..body.find("\nEOF\n").unwrap()];
        let cfg = parse(example).unwrap();
        assert_eq!(cfg.store.size_limit.as_deref(), Some("20GB"));

        let doc = std::fs::read_to_string(repo.join("docs/configuration.md")).unwrap();
        let body = &doc[doc.find("```toml\n").expect("a toml block") + 8..];
        let example = &body[..body.find("```").unwrap()];
        let cfg = parse(example).unwrap();
        // The reference names every section and key: nothing left at its default.
        assert_eq!(cfg.clone().with_defaults(), cfg);
    }

    #[test]
    fn limits_are_none_or_a_size() {
        assert_eq!(parse_limit("none").unwrap(), None);
        assert_eq!(parse_limit(" NONE ").unwrap(), None);
        assert_eq!(parse_limit("200MB").unwrap(), Some(200_000_000));
        assert!(parse_limit("nine").is_err());
    }

    #[test]
    fn a_missing_default_file_means_defaults_but_a_named_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("config.toml");
        assert_eq!(Config::load(&missing, true).unwrap(), Config::default());
        let e = format!("{:#}", Config::load(&missing, false).unwrap_err());
        assert!(e.contains("config.toml"), "{e}");
        // A directory (or a device) where the file should be.
        let e = format!("{:#}", Config::load(dir.path(), true).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
    }
}
