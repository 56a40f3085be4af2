//! containerd's `Snapshots` gRPC service over a unix socket: type conversions
//! and status codes only; the logic is in [`Snapshotter`].

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::{io, Result, SnapshotError};
use crate::proto::snapshots as pb;
use crate::proto::snapshots::snapshots_server::{Snapshots as SnapshotsApi, SnapshotsServer};
use crate::proto::types as pbt;
use crate::remote::Snapshotter;
use crate::snapshots::{Info, Kind, Mount, Time};
use lazylayer_sys::error_chain;

/// The status containerd maps back to its errdefs (NotFound, AlreadyExists...).
pub fn status(e: SnapshotError) -> Status {
    let msg = error_chain(&e);
    match e {
        SnapshotError::NotFound(_) => Status::not_found(msg),
        SnapshotError::AlreadyExists(_) => Status::already_exists(msg),
        SnapshotError::FailedPrecondition { .. } => Status::failed_precondition(msg),
        SnapshotError::InvalidArgument(_) => Status::invalid_argument(msg),
        SnapshotError::Image { .. } => Status::unavailable(msg),
        SnapshotError::Io(_) | SnapshotError::Metadata { .. } | SnapshotError::Internal(_) => {
            Status::internal(msg)
        }
    }
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn mounts(v: Vec<Mount>) -> Vec<pbt::Mount> {
    v.into_iter()
        .map(|m| pbt::Mount {
            r#type: m.fstype,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn ts(t: Time) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.secs,
        nanos: t.nanos,
    }
}

fn to_pb(i: Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent.unwrap_or_default(),
        kind: match i.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(ts(i.created)),
        updated_at: Some(ts(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

fn from_pb(i: pb::Info) -> Info {
    let t = |t: Option<prost_types::Timestamp>| {
        t.map_or(Time { secs: 0, nanos: 0 }, |t| Time {
            secs: t.seconds,
            nanos: t.nanos,
        })
    };
    Info {
        name: i.name,
        parent: (!i.parent.is_empty()).then_some(i.parent),
        kind: match pb::Kind::try_from(i.kind) {
            Ok(pb::Kind::View) => Kind::View,
            Ok(pb::Kind::Active) => Kind::Active,
            _ => Kind::Committed,
        },
        created: t(i.created_at),
        updated: t(i.updated_at),
        labels: labels(i.labels),
    }
}

pub struct Service(pub Arc<Snapshotter>);

type R<T> = std::result::Result<Response<T>, Status>;

/// Serve one call with `handler`: a panic in it fails this call with
/// Internal, naming `what` it served (the key, the image), and leaves the
/// connection, the other calls and the other images served. The
/// snapshotter's locks tolerate poisoning, so nothing cascades.
async fn guarded<T>(what: String, handler: impl Future<Output = R<T>>) -> R<T> {
    match AssertUnwindSafe(handler).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => {
            let msg = lazylayer_fs::panic_message(&*panic);
            tracing::error!(
                call = what,
                panic = msg,
                "a call panicked; failing it alone"
            );
            Err(Status::internal(format!(
                "internal error serving {what}: {msg}"
            )))
        }
    }
}

/// The image a call's labels name, for a panic's message.
fn naming_image(what: String, labels: &std::collections::HashMap<String, String>) -> String {
    match labels.get(crate::remote::LABEL_IMAGE_REF) {
        Some(image) => format!("{what} (image {image})"),
        None => what,
    }
}

#[tonic::async_trait]
impl SnapshotsApi for Service {
    async fn prepare(
        &self,
        r: Request<pb::PrepareSnapshotRequest>,
    ) -> R<pb::PrepareSnapshotResponse> {
        let r = r.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, labels = ?r.labels, "Prepare");
        let what = naming_image(format!("Prepare of {}", r.key), &r.labels);
        guarded(what, async {
            let m = self
                .0
                .prepare(&r.key, &r.parent, labels(r.labels))
                .await
                .map_err(status)?;
            Ok(Response::new(pb::PrepareSnapshotResponse {
                mounts: mounts(m),
            }))
        })
        .await
    }

    async fn view(&self, r: Request<pb::ViewSnapshotRequest>) -> R<pb::ViewSnapshotResponse> {
        let r = r.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, "View");
        guarded(format!("View of {}", r.key), async {
            let m = self
                .0
                .view(&r.key, &r.parent, labels(r.labels))
                .await
                .map_err(status)?;
            Ok(Response::new(pb::ViewSnapshotResponse {
                mounts: mounts(m),
            }))
        })
        .await
    }

    async fn mounts(&self, r: Request<pb::MountsRequest>) -> R<pb::MountsResponse> {
        let key = r.into_inner().key;
        guarded(format!("Mounts of {key}"), async {
            let m = self.0.mounts(&key).await.map_err(status)?;
            Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
        })
        .await
    }

    async fn commit(&self, r: Request<pb::CommitSnapshotRequest>) -> R<()> {
        let r = r.into_inner();
        tracing::debug!(key = %r.key, name = %r.name, "Commit");
        guarded(format!("Commit of {}", r.key), async {
            self.0
                .commit(&r.name, &r.key, labels(r.labels))
                .map_err(status)?;
            Ok(Response::new(()))
        })
        .await
    }

    async fn remove(&self, r: Request<pb::RemoveSnapshotRequest>) -> R<()> {
        let key = r.into_inner().key;
        tracing::debug!(%key, "Remove");
        guarded(format!("Remove of {key}"), async {
            self.0.remove(&key).await.map_err(status)?;
            Ok(Response::new(()))
        })
        .await
    }

    async fn stat(&self, r: Request<pb::StatSnapshotRequest>) -> R<pb::StatSnapshotResponse> {
        let key = r.into_inner().key;
        guarded(format!("Stat of {key}"), async {
            let i = self.0.stat(&key).map_err(status)?;
            Ok(Response::new(pb::StatSnapshotResponse {
                info: Some(to_pb(i)),
            }))
        })
        .await
    }

    async fn update(&self, r: Request<pb::UpdateSnapshotRequest>) -> R<pb::UpdateSnapshotResponse> {
        let r = r.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        guarded(format!("Update of {}", info.name), async {
            let i = self.0.update(&from_pb(info), &paths).map_err(status)?;
            Ok(Response::new(pb::UpdateSnapshotResponse {
                info: Some(to_pb(i)),
            }))
        })
        .await
    }

    type ListStream =
        Pin<Box<dyn Stream<Item = std::result::Result<pb::ListSnapshotsResponse, Status>> + Send>>;

    /// Every snapshot, in batches. Filters are not applied: containerd's
    /// callers (the metadata store's remote-snapshot lookup) check each
    /// result themselves, and `ctr snapshots ls` reads containerd's own db.
    async fn list(&self, _r: Request<pb::ListSnapshotsRequest>) -> R<Self::ListStream> {
        guarded("List".into(), async {
            let all: Vec<pb::Info> = self.0.list().into_iter().map(to_pb).collect();
            let batches: Vec<_> = all
                .chunks(100)
                .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
                .collect();
            let stream: Self::ListStream = Box::pin(tokio_stream::iter(batches));
            Ok(Response::new(stream))
        })
        .await
    }

    async fn usage(&self, r: Request<pb::UsageRequest>) -> R<pb::UsageResponse> {
        let key = r.into_inner().key;
        guarded(format!("Usage of {key}"), async {
            let u = self.0.usage(&key).await.map_err(status)?;
            Ok(Response::new(pb::UsageResponse {
                size: u.size,
                inodes: u.inodes,
            }))
        })
        .await
    }

    async fn cleanup(&self, _r: Request<pb::CleanupRequest>) -> R<()> {
        guarded("Cleanup".into(), async {
            let n = self.0.cleanup().await.map_err(status)?;
            tracing::debug!(removed = n, "Cleanup");
            Ok(Response::new(()))
        })
        .await
    }
}

/// Serve `snapshotter` on the unix socket `address` until `shutdown` resolves,
/// then unmount its lazy roots.
pub async fn serve(
    snapshotter: Arc<Snapshotter>,
    address: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let listener = bind_private(address)?;
    tracing::info!(address = %address.display(), "snapshotter serving");
    let res = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service(snapshotter.clone())))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    snapshotter.shutdown().await;
    let _ = std::fs::remove_file(address);
    res.map_err(|e| {
        SnapshotError::Io(lazylayer_sys::IoError {
            what: format!("serving gRPC: {e}"),
            path: address.to_path_buf(),
            source: std::io::Error::other(e),
        })
    })
}

/// Listen on the unix socket `address`, private to its owner (as
/// containerd's own socket): whoever speaks to it drives mounts, or pulls
/// with the node's credentials.
pub(crate) fn bind_private(address: &Path) -> Result<tokio::net::UnixListener> {
    let l = lazylayer_sys::socket::listen_private(address).map_err(SnapshotError::Io)?;
    tokio::net::UnixListener::from_std(l).map_err(io("listening on the socket", address))
}

/// A gRPC channel to a unix socket (a snapshotter's or containerd's).
pub async fn connect(
    socket: &Path,
) -> std::result::Result<tonic::transport::Channel, tonic::transport::Error> {
    endpoint()
        .connect_with_connector(unix_connector(socket))
        .await
}

/// [`connect`], connected on first use (a daemon that starts later).
pub fn connect_lazy(socket: &Path) -> tonic::transport::Channel {
    endpoint().connect_with_connector_lazy(unix_connector(socket))
}

/// The URI is required by the API but unused: the connector decides.
fn endpoint() -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_static("http://localhost")
}

/// Connections to the unix socket `socket`.
fn unix_connector(
    socket: &Path,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    let socket = socket.to_path_buf();
    tower::service_fn(move |_: tonic::transport::Uri| {
        let socket = socket.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(socket).await?,
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::snapshots::snapshots_client::SnapshotsClient;

    /// A panic while serving one call fails that call with Internal, naming
    /// what it served; the next calls on the same connection are served.
    #[test]
    fn a_panicking_call_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sn = Arc::new(Snapshotter::open(&dir.path().join("state"), None).unwrap());
        let sock = dir.path().join("sn.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn({
            let sock = sock.clone();
            async move {
                serve(sn, &sock, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        rt.block_on(async {
            let mut client = loop {
                match connect(&sock).await {
                    Ok(c) => break SnapshotsClient::new(c),
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            };
            let prepare = |key: &str| pb::PrepareSnapshotRequest {
                snapshotter: "lazylayer".into(),
                key: key.into(),
                parent: String::new(),
                labels: Default::default(),
            };
            let err = client.prepare(prepare("test-panic-1")).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
            assert!(err.message().contains("Prepare of test-panic-1"), "{err:?}");
            assert!(err.message().contains("injected fault"), "{err:?}");
            let m = client.prepare(prepare("after")).await.unwrap().into_inner();
            assert_eq!(m.mounts[0].r#type, "bind");
            let info = client
                .stat(pb::StatSnapshotRequest {
                    snapshotter: "lazylayer".into(),
                    key: "after".into(),
                })
                .await
                .unwrap();
            assert_eq!(info.into_inner().info.unwrap().name, "after");
        });
        stop.send(()).unwrap();
        rt.block_on(server).unwrap().unwrap();
    }
}
