//! Image references, content digests, manifest/config types and an OCI
//! distribution-spec registry client.
//!
//! This crate sits at the bottom of lazylayer: it knows the wire formats and the
//! registry protocol, and nothing about stores, file systems or runtimes.

pub mod auth;
mod breaker;
pub mod client;
pub mod credential_provider;
pub mod digest;
pub mod error;
pub mod hosts;
pub mod keychain;
pub mod manifest;
pub mod reference;
pub mod retry;

pub use client::{
    BlobResume, BodyStream, ClientConfig, PushOutcome, RangeParts, RegistryClient, WarmUp,
};
pub use digest::{Digest, DigestHasher};
pub use error::OciError;
pub use hosts::{Endpoint, Hosts, Purpose};
pub use keychain::Keychain;
pub use manifest::{Platform, ResolvedImage, ResolvedManifest};
pub use reference::{Reference, Repository};
