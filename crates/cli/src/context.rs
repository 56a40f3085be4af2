//! Options every subcommand shares, merged with the configuration file, and
//! the objects built from them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use lazylayer_oci::auth::AuthStore;
use lazylayer_oci::{ClientConfig, Hosts, RegistryClient};
use lazylayer_store::Store;

use crate::config::{self, Config};

/// The shared flags as typed; [`GlobalArgs::resolve`] merges them with the
/// configuration file. Unset flags fall back to the file, then to defaults.
#[derive(Args, Debug, Clone)]
pub struct GlobalFlags {
    /// Configuration file [default: /etc/lazylayer/config.toml, if present].
    /// Flags and environment variables override it; `lazylayer config`
    /// prints the result
    #[arg(long, global = true, env = "LAZYLAYER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Store directory (blobs, extracted layers, image records)
    /// [config: store.root; default: /var/lib/lazylayer]
    #[arg(long, global = true, env = "LAZYLAYER_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Speak plain HTTP to this registry (HOST or HOST:PORT); loopback hosts
    /// always are. Repeatable; added to the config's registries.insecure
    #[arg(long = "insecure-registry", global = true, value_name = "HOST")]
    pub insecure_registries: Vec<String>,
    /// An auth.json (Docker/Podman format) read before the usual ones
    /// [config: registries.auth_file]
    #[arg(long, global = true, value_name = "FILE")]
    pub auth_file: Option<PathBuf>,
    /// Seconds a blob download may bring no data (or under 1 KiB/s on average)
    /// before it is dropped and resumed, and a request may wait for its answer
    /// before it is sent again; gives up on the host after 5 tries (its later
    /// requests then fail at once until it answers a probe)
    /// [config: fetch.stall_timeout; default: 10]
    #[arg(
        long,
        global = true,
        env = "LAZYLAYER_STALL_TIMEOUT",
        value_name = "SECS"
    )]
    pub stall_timeout: Option<f64>,
    /// Keep the store under SIZE (e.g. 200MB, 1.5GiB, 500000000, none): after a
    /// layer or an image lands, and every 30 s in the snapshotter and the
    /// Podman store, the least recently used images no container uses are
    /// evicted (fetched again when next needed)
    /// [config: store.size_limit; default: none]
    #[arg(
        long,
        global = true,
        env = "LAZYLAYER_STORE_SIZE_LIMIT",
        value_name = "SIZE",
        // So that "-1GB" reaches the parser and gets its clear error.
        allow_hyphen_values = true
    )]
    pub store_size_limit: Option<String>,
    /// Bytes per second the background prefetch may take ("20MB", "none");
    /// reads a container waits on are never held back
    /// [config: fetch.prefetch_bandwidth; default: none]
    #[arg(
        long,
        global = true,
        env = "LAZYLAYER_PREFETCH_BANDWIDTH",
        value_name = "RATE"
    )]
    pub prefetch_bandwidth: Option<String>,
    /// containerd-style registry host configuration: DIR/<registry host[:port]>/hosts.toml
    /// (and DIR/_default/hosts.toml) lists mirrors tried before the registry; a missing
    /// directory means none [config: registries.hosts_dir; default: /etc/containerd/certs.d]
    #[arg(long, global = true, env = "LAZYLAYER_HOSTS_DIR", value_name = "DIR")]
    pub hosts_dir: Option<PathBuf>,
    /// containers-registries.conf(5) file ([[registry]] mirrors, blocked registries);
    /// a missing file means none
    /// [config: registries.registries_conf; default: /etc/containers/registries.conf]
    #[arg(
        long,
        global = true,
        env = "LAZYLAYER_REGISTRIES_CONF",
        value_name = "FILE"
    )]
    pub registries_conf: Option<PathBuf>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The effective settings every command works with.
#[derive(Debug, Clone)]
pub struct GlobalArgs {
    pub root: PathBuf,
    /// Every key filled in (file, then flags and environment, then defaults).
    pub config: Config,
    /// The file it was read from, if any.
    pub config_file: Option<PathBuf>,
    /// `store.size_limit` in bytes; None: unlimited.
    size_limit: Option<u64>,
}

impl GlobalArgs {
    /// Read the configuration file and lay the flags over it.
    pub fn resolve(f: GlobalFlags) -> Result<GlobalArgs> {
        let (path, optional) = match &f.config {
            Some(p) => (p.clone(), false),
            None => (PathBuf::from(config::DEFAULT_PATH), true),
        };
        let mut cfg = Config::load(&path, optional)?;
        let config_file = (!optional || path.exists()).then_some(path);
        if let Some(r) = f.root {
            cfg.store.root = Some(r);
        }
        cfg.registries
            .insecure
            .extend(f.insecure_registries.iter().cloned());
        if let Some(d) = f.hosts_dir {
            cfg.registries.hosts_dir = Some(d);
        }
        if let Some(r) = f.registries_conf {
            cfg.registries.registries_conf = Some(r);
        }
        if let Some(a) = f.auth_file {
            cfg.registries.auth_file = Some(a);
        }
        if let Some(s) = f.stall_timeout {
            config::seconds(s).with_context(|| format!("--stall-timeout {s}"))?;
            cfg.fetch.stall_timeout = Some(s);
        }
        if let Some(s) = f.store_size_limit {
            config::parse_limit(&s).with_context(|| format!("--store-size-limit {s:?}"))?;
            cfg.store.size_limit = Some(s);
        }
        if let Some(b) = f.prefetch_bandwidth {
            config::parse_limit(&b).with_context(|| format!("--prefetch-bandwidth {b:?}"))?;
            cfg.fetch.prefetch_bandwidth = Some(b);
        }
        let config = cfg.with_defaults();
        let size_limit = config::parse_limit(config.store.size_limit.as_deref().unwrap_or("none"))?;
        Ok(GlobalArgs {
            root: config.store.root.clone().expect("defaulted"),
            config,
            config_file,
            size_limit,
        })
    }

    /// The store, with the size limit applied (eviction after layers and
    /// images land in this process).
    pub fn store(&self) -> Result<Store> {
        let store = Store::open(&self.root)
            .with_context(|| format!("opening store at {}", self.root.display()))?;
        Ok(store.with_size_limit(self.size_limit))
    }

    /// The store size limit in bytes; None: unlimited.
    pub fn size_limit(&self) -> Option<u64> {
        self.size_limit
    }

    pub fn client(&self) -> Result<RegistryClient> {
        self.client_with(|_| {})
    }

    pub fn client_with(&self, tweak: impl FnOnce(&mut ClientConfig)) -> Result<RegistryClient> {
        let r = &self.config.registries;
        let f = &self.config.fetch;
        let mut hosts = Hosts::load(r.hosts_dir.as_deref(), r.registries_conf.as_deref())
            .context("loading registry mirror configuration")?;
        // The configuration file's mirrors come first (`add_mirror` puts
        // them before the hosts.toml / registries.conf ones).
        for (registry, urls) in &r.mirrors {
            for u in urls {
                hosts
                    .add_mirror(registry, u)
                    .with_context(|| format!("registries.mirrors.{registry:?}: {u}"))?;
            }
        }
        let mut auth_paths = Vec::new();
        auth_paths.extend(r.auth_file.clone());
        auth_paths.extend(AuthStore::default_paths());
        let mut auth = AuthStore::load(&auth_paths);
        auth.providers = credential_providers(
            r.credential_provider_config.as_deref(),
            r.credential_provider_bin_dir.as_deref(),
        )?;
        let mut cfg = ClientConfig {
            hosts,
            insecure_registries: r.insecure.clone(),
            auth,
            stall_timeout: config::seconds(f.stall_timeout.expect("defaulted"))?,
            connect_timeout: config::seconds(f.connect_timeout.expect("defaulted"))?,
            // Every command that talks to registries (run, pull, optimize,
            // push, the snapshotter, the Podman store) shares the store's
            // tokens, so the next process skips the 401 round trip.
            token_cache: Some(self.root.join("tokens")),
            ..ClientConfig::default()
        };
        tweak(&mut cfg);
        Ok(RegistryClient::new(cfg)?)
    }

    /// How long a read on a lazy root waits for its file (a command's own
    /// flag wins).
    pub fn read_timeout(&self, flag: Option<f64>) -> Result<Duration> {
        match flag {
            Some(s) => config::seconds(s).with_context(|| format!("--fetch-timeout {s}")),
            None => config::seconds(self.config.fetch.read_timeout.expect("defaulted")),
        }
    }

    /// How lazy roots serve: background prefetch and FUSE passthrough, from
    /// a command's own `on`/`off` flags, else the configuration.
    pub fn mount_options(
        &self,
        prefetch_flag: Option<&str>,
        passthrough_flag: Option<&str>,
    ) -> lazylayer_root::MountOptions {
        let on = |flag: Option<&str>, configured: Option<bool>| match flag {
            Some(v) => v == "on",
            None => configured.expect("defaulted"),
        };
        lazylayer_root::MountOptions {
            fs: lazylayer_fs::FsOptions {
                passthrough: on(passthrough_flag, self.config.fs.passthrough),
                ..lazylayer_fs::FsOptions::default()
            },
            prefetch: on(prefetch_flag, self.config.fetch.prefetch),
            // The daemons that serve roots hand them to a holder instead.
            force_unmount_on_death: false,
            // Their runtimes stack the FUSE root themselves.
            meta_tree: None,
        }
    }

    /// The fetch options of lazy roots, from the configuration.
    pub fn fetch_options(
        &self,
        read_timeout_flag: Option<f64>,
    ) -> Result<lazylayer_fetch::FetchOptions> {
        let f = &self.config.fetch;
        let limit = config::parse_limit(f.prefetch_bandwidth.as_deref().unwrap_or("none"))?;
        Ok(lazylayer_fetch::FetchOptions {
            read_timeout: self.read_timeout(read_timeout_flag)?,
            prefetch_concurrency: f.prefetch_concurrency.expect("defaulted"),
            prefetch_bandwidth: limit.map(lazylayer_fetch::Bandwidth::shared),
            ..lazylayer_fetch::FetchOptions::default()
        })
    }
}

pub fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    // fuser logs an error for every reply to a request the kernel already
    // dropped (a reader killed mid-read); that is normal at container exit.
    let default = match verbose {
        0 => "warn,fuser=off",
        1 => "info,fuser=warn",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// `12.3 MB` style sizes (decimal, as registries and podman report them).
pub fn human_bytes(n: u64) -> String {
    lazylayer_sys::ByteSize(n).to_string()
}

pub fn short_digest(d: &impl std::fmt::Display) -> String {
    let s = d.to_string();
    let hex = s.split(':').nth(1).unwrap_or(&s);
    hex.chars().take(12).collect()
}

/// The kubelet's credential provider plugins, if configured (both the
/// configuration and the plugin directory, as the kubelet needs both).
pub fn credential_providers(
    config: Option<&Path>,
    bin_dir: Option<&Path>,
) -> Result<Option<Arc<lazylayer_oci::credential_provider::CredentialProviders>>> {
    match (config, bin_dir) {
        (None, None) => Ok(None),
        (Some(c), Some(d)) => lazylayer_oci::credential_provider::CredentialProviders::load(c, d)
            .map(|p| Some(Arc::new(p)))
            .map_err(|e| anyhow::anyhow!("credential providers: {e}")),
        _ => anyhow::bail!(
            "registries.credential_provider_config and registries.credential_provider_bin_dir go together (as the kubelet's two flags)"
        ),
    }
}
