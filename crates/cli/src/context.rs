//! Options every subcommand shares, and the objects built from them.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use lazylayer_oci::auth::AuthStore;
use lazylayer_oci::{ClientConfig, RegistryClient};
use lazylayer_store::Store;

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Store directory (blobs, extracted layers, image records)
    #[arg(
        long,
        global = true,
        env = "LAZYLAYER_ROOT",
        default_value = "/var/lib/lazylayer"
    )]
    pub root: PathBuf,
    /// Speak plain HTTP to this registry (HOST or HOST:PORT); loopback hosts always are. Repeatable.
    #[arg(long = "insecure-registry", global = true, value_name = "HOST")]
    pub insecure_registries: Vec<String>,
    /// Seconds a blob download may bring no data (or under 1 KiB/s on average)
    /// before it is dropped and resumed; gives up after 5 tries
    #[arg(
        long,
        global = true,
        env = "LAZYLAYER_STALL_TIMEOUT",
        default_value_t = 10.0,
        value_name = "SECS"
    )]
    pub stall_timeout: f64,
    /// Keep the store under SIZE (e.g. 200MB, 1.5GiB, 500000000): after a
    /// layer or an image lands, and every 30 s in the snapshotter and the
    /// Podman store, the least recently used images no container uses are
    /// evicted (fetched again when next needed). Unset: unlimited
    #[arg(
        long,
        global = true,
        env = "LAZYLAYER_STORE_SIZE_LIMIT",
        value_name = "SIZE",
        value_parser = lazylayer_store::parse_size,
        // So that "-1GB" reaches the parser and gets its clear error.
        allow_hyphen_values = true
    )]
    pub store_size_limit: Option<u64>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl GlobalArgs {
    pub fn store(&self) -> Result<Store> {
        Store::open(&self.root).with_context(|| format!("opening store at {}", self.root.display()))
    }

    /// The store size limit in bytes; None: unlimited.
    pub fn size_limit(&self) -> Option<u64> {
        self.store_size_limit
    }

    pub fn client(&self) -> Result<RegistryClient> {
        self.client_with(|_| {})
    }

    pub fn client_with(&self, tweak: impl FnOnce(&mut ClientConfig)) -> Result<RegistryClient> {
        let mut cfg = ClientConfig {
            insecure_registries: self.insecure_registries.clone(),
            auth: AuthStore::load(&AuthStore::default_paths()),
            stall_timeout: std::time::Duration::try_from_secs_f64(self.stall_timeout)
                .ok()
                .filter(|d| !d.is_zero())
                .context("--stall-timeout must be a positive number of seconds")?,
            ..ClientConfig::default()
        };
        tweak(&mut cfg);
        Ok(RegistryClient::new(cfg)?)
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

pub use lazylayer_oci::human_bytes;

pub fn short_digest(d: &impl std::fmt::Display) -> String {
    let s = d.to_string();
    let hex = s.split(':').nth(1).unwrap_or(&s);
    hex.chars().take(12).collect()
}
