//! A small client of containerd's own gRPC API (content, images, leases and
//! the snapshots service in front of its snapshotters), enough to register an
//! optimized image whose layers a remote snapshotter claims: what `ctr images
//! pull` would do, minus the layer downloads, plus the labels that make the
//! snapshotter claim each layer.

use std::collections::HashMap;

// containerd-client generates every service's messages into one module; the
// three names say which service a message belongs to.
use containerd_client::services::v1 as cpb;
use containerd_client::services::v1 as ipb;
use containerd_client::services::v1 as lpb;
use containerd_client::services::v1::snapshots::{self as spb, snapshots_client::SnapshotsClient};
use containerd_client::services::v1::{
    content_client::ContentClient, images_client::ImagesClient, leases_client::LeasesClient,
};
use containerd_client::types as pbt;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Labels containerd's garbage collector follows from content.
pub const LABEL_GC_REF_CONTENT_CONFIG: &str = "containerd.io/gc.ref.content.config";
pub const LABEL_GC_REF_SNAPSHOT_PREFIX: &str = "containerd.io/gc.ref.snapshot.";
/// An index's reference to its child manifest number N (suffix `N`).
pub const LABEL_GC_REF_CONTENT_MANIFEST_PREFIX: &str = "containerd.io/gc.ref.content.m.";
/// Label asking containerd's metadata layer to create the snapshot under this
/// name (the chain ID) when the snapshotter says it already has it.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Lease label: when containerd may collect a lease left behind.
pub const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";

/// The chain IDs of a layer stack, bottom first:
/// chainID(0) = diffID(0), chainID(i) = sha256(chainID(i-1) + " " + diffID(i)).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let id = match out.last() {
            None => d.clone(),
            Some(prev) => {
                lazylayer_oci::Digest::sha256_of(format!("{prev} {d}").as_bytes()).to_string()
            }
        };
        out.push(id);
    }
    out
}

/// What a layer's Prepare came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrepareOutcome {
    /// AlreadyExists: the snapshotter claimed the layer (or it was there
    /// already); containerd records the chain ID as committed.
    Claimed,
    /// A normal active snapshot: the snapshotter did not claim the layer.
    Active(Vec<pbt::Mount>),
}

/// containerd's API on one connection, scoped to a namespace and, once
/// [`Containerd::create_lease`] is called, to a lease.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Containerd {
    pub fn new(channel: Channel, namespace: &str) -> Containerd {
        Containerd {
            channel,
            namespace: namespace.to_string(),
            lease: None,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn req<T>(&self, msg: T) -> Result<Request<T>, Status> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert(
            "containerd-namespace",
            MetadataValue::try_from(self.namespace.as_str())
                .map_err(|_| Status::invalid_argument("bad namespace"))?,
        );
        if let Some(l) = &self.lease {
            md.insert(
                "containerd-lease",
                MetadataValue::try_from(l.as_str())
                    .map_err(|_| Status::invalid_argument("bad lease id"))?,
            );
        }
        Ok(r)
    }

    /// Create a lease (expiring at `expire`, RFC 3339, if given) and make
    /// every later call of this client hold its resources under it, so
    /// containerd's GC cannot collect content or snapshots before the image
    /// record references them.
    pub async fn create_lease(&mut self, id: &str, expire: Option<&str>) -> Result<(), Status> {
        let mut labels = HashMap::new();
        if let Some(e) = expire {
            labels.insert(LABEL_GC_EXPIRE.to_string(), e.to_string());
        }
        let r = self.req(lpb::CreateRequest {
            id: id.to_string(),
            labels,
        })?;
        let l = LeasesClient::new(self.channel.clone()).create(r).await?;
        self.lease = Some(l.into_inner().lease.map_or(id.to_string(), |l| l.id));
        Ok(())
    }

    /// Delete the lease [`Containerd::create_lease`] made, if any.
    pub async fn delete_lease(&mut self) -> Result<(), Status> {
        let Some(id) = self.lease.take() else {
            return Ok(());
        };
        let r = self.req(lpb::DeleteRequest { id, sync: false })?;
        LeasesClient::new(self.channel.clone()).delete(r).await?;
        Ok(())
    }

    /// Write `data` into the content store as `digest`, labelled. Content
    /// already present is fine: its labels are then set to `labels`.
    /// Returns whether the content was written (false: it was there).
    pub async fn write_content(
        &self,
        digest: &str,
        data: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<bool, Status> {
        const CHUNK: usize = 1 << 20;
        let total = data.len() as i64;
        let ingest_ref = format!("lazylayer-{digest}");
        let mut msgs = vec![cpb::WriteContentRequest {
            action: cpb::WriteAction::Stat as i32,
            r#ref: ingest_ref.clone(),
            total,
            expected: digest.to_string(),
            ..Default::default()
        }];
        for (i, c) in data.chunks(CHUNK).enumerate() {
            msgs.push(cpb::WriteContentRequest {
                action: cpb::WriteAction::Write as i32,
                r#ref: ingest_ref.clone(),
                total,
                expected: digest.to_string(),
                offset: (i * CHUNK) as i64,
                data: c.to_vec(),
                ..Default::default()
            });
        }
        msgs.push(cpb::WriteContentRequest {
            action: cpb::WriteAction::Commit as i32,
            r#ref: ingest_ref.clone(),
            total,
            expected: digest.to_string(),
            offset: total,
            labels: labels.clone(),
            ..Default::default()
        });
        let n = msgs.len();
        let r = self.req(tokio_stream::iter(msgs))?;
        let mut client = ContentClient::new(self.channel.clone());
        let result: Result<(), Status> = async {
            let mut stream = client.write(r).await?.into_inner();
            let mut last = None;
            while let Some(m) = stream.message().await? {
                last = Some(m);
            }
            let Some(last) = last else {
                return Err(Status::internal(format!(
                    "content write of {digest}: no response to {n} requests"
                )));
            };
            if last.action != cpb::WriteAction::Commit as i32 || last.digest != digest {
                return Err(Status::internal(format!(
                    "content write of {digest}: ended with action {} digest {:?}",
                    last.action, last.digest
                )));
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(true),
            Err(s) if s.code() == Code::AlreadyExists => {
                self.update_content_labels(digest, labels).await?;
                Ok(false)
            }
            Err(s) => {
                // Best effort: free the ingest so a retry starts clean.
                if let Ok(r) = self.req(cpb::AbortRequest { r#ref: ingest_ref }) {
                    let _ = client.abort(r).await;
                }
                Err(s)
            }
        }
    }

    /// Set `labels` on existing content (other labels are kept).
    pub async fn update_content_labels(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Status> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let r = self.req(cpb::UpdateRequest {
            info: Some(cpb::Info {
                digest: digest.to_string(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        })?;
        ContentClient::new(self.channel.clone()).update(r).await?;
        Ok(())
    }

    /// Prepare `key` on `parent` in `snapshotter` through containerd (its
    /// metadata layer, then the snapshotter itself).
    pub async fn prepare_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<PrepareOutcome, Status> {
        let r = self.req(spb::PrepareSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
            parent: parent.to_string(),
            labels,
        })?;
        match SnapshotsClient::new(self.channel.clone()).prepare(r).await {
            Ok(m) => Ok(PrepareOutcome::Active(m.into_inner().mounts)),
            Err(s) if s.code() == Code::AlreadyExists => Ok(PrepareOutcome::Claimed),
            Err(s) => Err(s),
        }
    }

    pub async fn stat_snapshot(&self, snapshotter: &str, key: &str) -> Result<spb::Info, Status> {
        let r = self.req(spb::StatSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
        })?;
        SnapshotsClient::new(self.channel.clone())
            .stat(r)
            .await?
            .into_inner()
            .info
            .ok_or_else(|| Status::internal(format!("Stat of {key}: no info")))
    }

    pub async fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<(), Status> {
        let r = self.req(spb::RemoveSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
        })?;
        SnapshotsClient::new(self.channel.clone()).remove(r).await?;
        Ok(())
    }

    /// Create the image record `name` → `target`, or point an existing one
    /// at it. Returns true when it was created.
    pub async fn put_image(
        &self,
        name: &str,
        target: pbt::Descriptor,
        labels: HashMap<String, String>,
    ) -> Result<bool, Status> {
        let image = ipb::Image {
            name: name.to_string(),
            labels,
            target: Some(target),
            created_at: None,
            updated_at: None,
        };
        let mut client = ImagesClient::new(self.channel.clone());
        let r = self.req(ipb::CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        })?;
        match client.create(r).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::AlreadyExists => {
                let r = self.req(ipb::UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                    source_date_epoch: None,
                })?;
                client.update(r).await?;
                Ok(false)
            }
            Err(s) => Err(s),
        }
    }

    pub async fn get_image(&self, name: &str) -> Result<Option<ipb::Image>, Status> {
        let r = self.req(ipb::GetImageRequest {
            name: name.to_string(),
        })?;
        match ImagesClient::new(self.channel.clone()).get(r).await {
            Ok(i) => Ok(i.into_inner().image),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(
            c[1],
            lazylayer_oci::Digest::sha256_of(format!("{a} {b}").as_bytes()).to_string()
        );
        assert!(chain_ids(&[]).is_empty());
    }

    /// A client that never connects (no containerd needed); its channel
    /// wants a runtime to exist, not to run.
    fn offline(namespace: &str) -> (tokio::runtime::Runtime, Containerd) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let channel = {
            let _entered = rt.enter();
            tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy()
        };
        (rt, Containerd::new(channel, namespace))
    }

    /// Every request names the namespace, and the lease once there is one:
    /// that is what scopes containerd's records and keeps its GC away.
    #[test]
    fn requests_carry_the_namespace_and_the_lease() {
        let (_rt, mut cd) = offline("lazylayer");
        let r = cd.req(()).unwrap();
        assert_eq!(
            r.metadata().get("containerd-namespace").unwrap(),
            "lazylayer"
        );
        assert!(r.metadata().get("containerd-lease").is_none());

        cd.lease = Some("lazylayer-pull-1".into());
        let r = cd.req(()).unwrap();
        assert_eq!(
            r.metadata().get("containerd-namespace").unwrap(),
            "lazylayer"
        );
        assert_eq!(
            r.metadata().get("containerd-lease").unwrap(),
            "lazylayer-pull-1"
        );
    }

    /// A namespace or lease that cannot be a header value is refused
    /// before anything is sent.
    #[test]
    fn a_namespace_that_is_no_header_value_is_an_invalid_argument() {
        let (_rt, cd) = offline("bad\nname");
        let e = cd.req(()).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("namespace"), "{e}");
        let (_rt, mut cd) = offline("ok");
        cd.lease = Some("bad\nlease".into());
        let e = cd.req(()).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("lease"), "{e}");
    }
}
