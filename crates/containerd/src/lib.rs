//! containerd support for lazylayer: the remote snapshotter, a client of
//! containerd's own API, and lazy image registration ([`register`], behind
//! `lazylayer containerd pull`).
//!
//! The snapshotter: containerd plugs it in as a proxy snapshotter (`[proxy_plugins.lazylayer]`,
//! `type = "snapshot"`) and speaks `containerd.services.snapshots.v1` to it
//! over a unix socket. Ordinary layers get containerd's overlayfs semantics
//! (a bind mount of a fresh directory, or an overlay on the parent chain).
//! Layers of a lazylayer-optimized image are claimed as *remote* snapshots:
//! containerd records them committed and downloads nothing; a container on
//! top gets an overlay whose single lower is the image's lazy FUSE mount.
//!
//! [`snapshots::Snapshots`] holds the metadata and the mount rules (plain,
//! synchronous, unit-tested); [`remote::Snapshotter`] adds the images
//! (resolution, lazy mounts); [`grpc`] is the thin tonic adapter.

pub mod containerd_client;
pub mod error;
pub mod grpc;
pub mod image_proxy;
pub mod register;
pub mod remote;
pub mod snapshots;

pub use error::{Result, SnapshotError};
pub use register::{register_image, RegisterError, RegisterOptions, Registered};
pub use remote::{Images, Snapshotter};
pub use snapshots::{Info, Kind, Mount, RemoteLayer, Snapshots, Usage};
/// The gRPC library our generated code is built on, for clients of [`proto`].
pub use tonic;

/// Code generated from `proto/`: containerd's snapshots API, which the
/// snapshotter serves (the `containerd-client` crate generates clients only),
/// and the CRI client; [`containerd_client`] talks to containerd through the
/// `containerd-client` crate's bindings. Modules mirror the protobuf packages
/// because generated code refers across them by `super::`.
pub mod proto {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
    /// Kubernetes' CRI (`runtime.v1`), client side, PullImage only: what
    /// the kubelet calls on containerd's socket to pull an image.
    pub mod runtime {
        pub mod v1 {
            tonic::include_proto!("runtime.v1");
        }
    }
    pub use containerd::services::snapshots::v1 as snapshots;
    pub use containerd::types;
    pub use runtime::v1 as cri;
}
