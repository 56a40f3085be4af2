//! The CRI image-service proxy: how a Kubernetes pod's pull secrets reach
//! the snapshotter.
//!
//! The kubelet hands a pod's registry credentials only to the CRI's
//! `PullImage`, and containerd keeps them; the snapshotter that later fetches
//! the image's layers lazily never sees them. So the kubelet's
//! `--image-service-endpoint` points here instead: every
//! `runtime.v1.ImageService` call is forwarded to containerd byte for byte
//! (fields this code does not know pass unchanged). A `PullImage`'s
//! credential serves the snapshotter (its [`Keychain`]) for that image's
//! registry host and repository while containerd pulls, and is kept, in
//! memory only and for a bounded time, if containerd's pull succeeds. A pull
//! containerd refused leaves nothing, so a wrong secret of one pod never
//! replaces a working one.

use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes};
use prost::Message as _;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, BoxFuture};
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use lazylayer_oci::auth::Credential;
use lazylayer_oci::{Keychain, Reference};

use crate::error::{Result, SnapshotError};
use crate::proto::cri;

/// The kubelet's own limit for CRI messages (a node's image list can be
/// large); tonic's default of 4 MiB is smaller.
const MAX_MESSAGE: usize = 16 << 20;

const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";

/// Forwards the CRI image service to containerd and keeps each successful
/// pull's credential (see the module's documentation).
#[derive(Clone)]
pub struct ImageServiceProxy {
    upstream: Channel,
    keychain: Arc<Keychain>,
}

impl ImageServiceProxy {
    /// A proxy to containerd's CRI at `upstream` (connected on first use,
    /// so that either daemon may start first), keeping credentials in
    /// `keychain`.
    pub fn new(upstream: Channel, keychain: Arc<Keychain>) -> ImageServiceProxy {
        ImageServiceProxy { upstream, keychain }
    }

    async fn forward(&self, path: &str, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let pulled = (path == PULL_IMAGE).then(|| pull_credential(req.get_ref()));
        let path: http::uri::PathAndQuery = path
            .parse()
            .map_err(|_| Status::unimplemented(format!("no such method {path:?}")))?;
        let mut grpc = tonic::client::Grpc::new(self.upstream.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("containerd's CRI is not reachable: {e}")))?;
        // The credential serves the image's repository while containerd
        // pulls (it asks the snapshotter for the layers then), and is kept
        // only if the pull succeeds.
        let attempt = pulled.flatten().map(|(reference, cred)| {
            let user = cred.username.clone();
            (
                reference.repository.clone(),
                user,
                self.keychain.attempt(&reference.repository, cred),
            )
        });
        let answer = grpc.unary(req, path, RawCodec).await?;
        if let Some((repository, user, attempt)) = attempt {
            tracing::info!(%repository, %user, "keeping the pull's credential for lazy fetches");
            attempt.succeeded();
        }
        Ok(answer)
    }
}

/// The image and the credential of a `PullImage` request, if it carries a
/// usable one. What this code cannot use is said (never the secret) and the
/// pull goes on: containerd judges the request, not the proxy.
fn pull_credential(body: &Bytes) -> Option<(Reference, Credential)> {
    let req = match cri::PullImageRequest::decode(body.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "a PullImage request that does not decode; forwarded as is");
            return None;
        }
    };
    let image = req.image.map(|i| i.image).unwrap_or_default();
    let auth = req.auth?;
    let cred = credential_of(&auth);
    if cred.is_none() {
        tracing::warn!(%image, "a pull credential of a kind lazylayer cannot use (an identity or registry token, or an empty one); lazy fetches of this image go without it");
    }
    let reference: Reference = match image.parse() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%image, error = %e, "a pulled image whose reference does not parse; its credential is not kept");
            return None;
        }
    };
    Some((reference, cred?))
}

/// Username and password, given as such or as the `auth` field's
/// base64 of `user:password` (what a dockerconfigjson secret holds).
fn credential_of(a: &cri::AuthConfig) -> Option<Credential> {
    if !a.username.is_empty() && !a.password.is_empty() {
        return Some(Credential {
            username: a.username.clone(),
            password: a.password.clone(),
        });
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(a.auth.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    (!user.is_empty() && !password.is_empty()).then(|| Credential {
        username: user.to_string(),
        password: password.to_string(),
    })
}

impl NamedService for ImageServiceProxy {
    const NAME: &'static str = "runtime.v1.ImageService";
}

impl tower::Service<http::Request<tonic::body::Body>> for ImageServiceProxy {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let method = Forward {
            proxy: self.clone(),
            path: req.uri().path().to_string(),
        };
        Box::pin(async move {
            // Every ImageService method is unary.
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            Ok(grpc.unary(method, req).await)
        })
    }
}

/// One call, forwarded to the same method of containerd.
struct Forward {
    proxy: ImageServiceProxy,
    path: String,
}

impl tonic::server::UnaryService<Bytes> for Forward {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let (proxy, path) = (self.proxy.clone(), self.path.clone());
        Box::pin(async move { proxy.forward(&path, req).await })
    }
}

/// Messages as bytes, untouched: the proxy forwards what it does not parse.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Listen on the unix socket `address`, private to its owner as
/// containerd's own socket is (whoever speaks to it pulls with the node's
/// credentials); bound before serving, so that a bad address fails the start.
pub fn listen(address: &Path) -> Result<tokio::net::UnixListener> {
    crate::grpc::bind_private(address)
}

/// Serve `proxy` on `listener` (from [`listen`] on `address`) until
/// `shutdown`, then remove the socket.
pub async fn serve(
    proxy: ImageServiceProxy,
    listener: tokio::net::UnixListener,
    address: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    tracing::info!(address = %address.display(), "CRI image service proxy serving");
    let res = tonic::transport::Server::builder()
        .add_service(proxy)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    let _ = std::fs::remove_file(address);
    res.map_err(|e| {
        SnapshotError::Io(lazylayer_sys::IoError {
            what: format!("serving the CRI image service proxy: {e}"),
            path: address.to_path_buf(),
            source: std::io::Error::other(e),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pull(image: &str, auth: Option<cri::AuthConfig>) -> Bytes {
        cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                annotations: Default::default(),
            }),
            auth,
            sandbox_config: None,
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn a_pull_credential_is_read_in_both_forms() {
        let plain = cri::AuthConfig {
            username: "alice".into(),
            password: "pw:with:colons".into(),
            ..Default::default()
        };
        let (r, c) = pull_credential(&pull("reg.example:5000/team/app:v1", Some(plain))).unwrap();
        assert_eq!(r.repository.registry, "reg.example:5000");
        assert_eq!(r.repository.name, "team/app");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "pw:with:colons")
        );
        let encoded = cri::AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("bob:s3cret:x"),
            ..Default::default()
        };
        let (r, c) = pull_credential(&pull("busybox", Some(encoded))).unwrap();
        assert_eq!(r.repository.registry, "docker.io");
        assert_eq!(r.repository.name, "library/busybox");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("bob", "s3cret:x")
        );
    }

    #[test]
    fn what_cannot_be_used_is_not_kept() {
        assert!(pull_credential(&pull("reg.example/app", None)).is_none());
        let token = cri::AuthConfig {
            identity_token: "refresh".into(),
            ..Default::default()
        };
        assert!(pull_credential(&pull("reg.example/app", Some(token))).is_none());
        let garbage = cri::AuthConfig {
            auth: "%%% not base64".into(),
            ..Default::default()
        };
        assert!(pull_credential(&pull("reg.example/app", Some(garbage))).is_none());
        let user = cri::AuthConfig {
            username: "alice".into(),
            ..Default::default()
        };
        let bad_ref = pull("UPPER/Case::x", Some(user.clone()));
        assert!(pull_credential(&bad_ref).is_none());
        assert!(pull_credential(&Bytes::from_static(b"\xff\xff\xff")).is_none());
    }
}
