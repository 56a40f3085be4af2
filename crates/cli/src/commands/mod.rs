pub mod containerd;
pub mod images;
pub mod inspect;
pub mod optimize;
pub mod prune;
pub mod ps;
pub mod pull;
pub mod push;
pub mod rm;
pub mod rmi;
pub mod run;
pub mod snapshotter;
pub mod status;
pub mod store;

use anyhow::{Context, Result};
use lazylayer_oci::{Platform, Reference};

pub fn parse_reference(s: &str) -> Result<Reference> {
    s.parse::<Reference>()
        .with_context(|| format!("bad image reference {s:?}"))
}

pub fn parse_platform(s: Option<&str>) -> Result<Platform> {
    match s {
        Some(p) => p.parse::<Platform>().map_err(anyhow::Error::msg),
        None => Ok(Platform::host()),
    }
}
