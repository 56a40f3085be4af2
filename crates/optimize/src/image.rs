//! The optimized image: SRC's manifest and config, with the boot layer
//! appended. Both documents are edited as JSON values so that every field
//! we do not know survives untouched.

use lazylayer_layer::LayerDigests;
use lazylayer_oci::manifest::{
    ANNOTATION_STARGZ_TOC, ANNOTATION_ZSTD_CHUNKED_TOC, DOCKER_MANIFEST, OCI_LAYER_GZIP,
};
use serde_json::{json, Value};

use crate::OptimizeError;

use lazylayer_index::chunks::ChunkCompression;
pub use lazylayer_index::{ANNOTATION_BOOT_LAYER, ANNOTATION_INDEX, ANNOTATION_VERSION};
use lazylayer_index::{ANNOTATION_INDEX_REGION_DIGEST, ANNOTATION_INDEX_REGION_SIZE};
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub use lazylayer_oci::manifest::OCI_LAYER_ZSTD;

/// The boot layer as the manifest describes it.
#[derive(Debug, Clone)]
pub struct BootDescriptor<'a> {
    pub digests: &'a LayerDigests,
    pub index_name: &'a str,
    /// Format version of the index inside.
    pub index_version: u32,
    pub compression: ChunkCompression,
    /// A chunked boot layer's index region: compressed length and digest.
    pub region: Option<(u64, String)>,
}

#[derive(Debug)]
pub struct OptimizedImage {
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    pub media_type: String,
}

fn bad(reason: impl Into<String>) -> OptimizeError {
    OptimizeError::BadImage(reason.into())
}

/// Append the boot layer to SRC's config (diff_ids, history) and manifest.
pub fn optimized_image(
    src_manifest: &[u8],
    src_config: &[u8],
    desc: &BootDescriptor<'_>,
    created: &str,
) -> Result<OptimizedImage, OptimizeError> {
    let boot = desc.digests;
    let mut config: Value =
        serde_json::from_slice(src_config).map_err(|e| bad(format!("config: {e}")))?;
    let rootfs = config
        .get_mut("rootfs")
        .and_then(|r| r.get_mut("diff_ids"))
        .and_then(|d| d.as_array_mut())
        .ok_or_else(|| bad("config has no rootfs.diff_ids"))?;
    rootfs.push(json!(boot.diff_id));
    let history = config
        .as_object_mut()
        .ok_or_else(|| bad("config is not an object"))?
        .entry("history")
        .or_insert_with(|| json!([]));
    if let Some(h) = history.as_array_mut() {
        h.push(json!({
            "created": created,
            "created_by": "lazylayer optimize",
            "comment": "boot layer: files the workload reads at start, and the image's path index",
        }));
    }
    let config_bytes = serde_json::to_vec(&config).expect("serialisable");
    let config_digest = lazylayer_oci::Digest::sha256_of(&config_bytes);

    let mut manifest: Value =
        serde_json::from_slice(src_manifest).map_err(|e| bad(format!("manifest: {e}")))?;
    let media_type = manifest
        .get("mediaType")
        .and_then(|m| m.as_str())
        .unwrap_or(lazylayer_oci::manifest::OCI_MANIFEST)
        .to_string();
    let layer_type = match (media_type == DOCKER_MANIFEST, desc.compression) {
        (true, ChunkCompression::Gzip) => DOCKER_LAYER_GZIP,
        (false, ChunkCompression::Gzip) => OCI_LAYER_GZIP,
        (false, ChunkCompression::Zstd) => OCI_LAYER_ZSTD,
        (true, ChunkCompression::Zstd) => {
            return Err(bad(
                "a Docker schema 2 manifest cannot name a zstd layer: use gzip for this image",
            ))
        }
    };
    let m = manifest
        .as_object_mut()
        .ok_or_else(|| bad("manifest is not an object"))?;
    let cfg = m
        .get_mut("config")
        .and_then(|c| c.as_object_mut())
        .ok_or_else(|| bad("manifest has no config"))?;
    cfg.insert("digest".into(), json!(config_digest.to_string()));
    cfg.insert("size".into(), json!(config_bytes.len()));
    let layers = m
        .get_mut("layers")
        .and_then(|l| l.as_array_mut())
        .ok_or_else(|| bad("manifest has no layers"))?;
    if layers
        .last()
        .and_then(|l| l.get("annotations"))
        .and_then(|a| a.get(ANNOTATION_INDEX))
        .is_some()
    {
        return Err(bad(
            "image is already optimized (its top layer is a lazylayer boot layer)",
        ));
    }
    layers.push(json!({
        "mediaType": layer_type,
        "digest": boot.digest,
        "size": boot.size,
        "annotations": {
            ANNOTATION_INDEX: desc.index_name,
            ANNOTATION_VERSION: desc.index_version.to_string(),
        }
    }));
    if media_type != DOCKER_MANIFEST {
        name_layers_for_podman5(layers);
    }
    let ann = m.entry("annotations").or_insert_with(|| json!({}));
    if let Some(a) = ann.as_object_mut() {
        a.insert(ANNOTATION_BOOT_LAYER.into(), json!(boot.digest));
        if let Some((len, digest)) = &desc.region {
            a.insert(ANNOTATION_INDEX_REGION_SIZE.into(), json!(len.to_string()));
            a.insert(ANNOTATION_INDEX_REGION_DIGEST.into(), json!(digest));
        }
    }
    let manifest_bytes = serde_json::to_vec(&manifest).expect("serialisable");
    Ok(OptimizedImage {
        config: config_bytes,
        manifest: manifest_bytes,
        media_type,
    })
}

/// Give every layer without a TOC digest one: its own blob digest, under
/// eStargz's annotation. Podman 5 asks an additional layer store (`lazylayer
/// store`) only for layers with a TOC digest, by that digest; the store
/// answers for the blob digest. Without the store, Podman 5 pulls such a
/// layer whole, partial pulls on or off (it does not take a layer that is
/// not eStargz for one: seen with 5.8, docs/podman.md). A layer that has a
/// TOC digest of its own keeps it. The blobs are the same; only their
/// descriptors gain the annotation (a Docker schema 2 manifest has none).
fn name_layers_for_podman5(layers: &mut [Value]) {
    for l in layers {
        let digest = l.get("digest").cloned();
        let Some(ann) = l
            .as_object_mut()
            .map(|o| o.entry("annotations").or_insert_with(|| json!({})))
            .and_then(|a| a.as_object_mut())
        else {
            continue;
        };
        let has_toc = ann.contains_key(ANNOTATION_STARGZ_TOC)
            || ann.contains_key(ANNOTATION_ZSTD_CHUNKED_TOC);
        if let (false, Some(d)) = (has_toc, digest) {
            ann.insert(ANNOTATION_STARGZ_TOC.into(), d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn desc<'a>(d: &'a LayerDigests, name: &'a str) -> BootDescriptor<'a> {
        BootDescriptor {
            digests: d,
            index_name: name,
            index_version: 3,
            compression: ChunkCompression::Gzip,
            region: None,
        }
    }

    fn boot() -> LayerDigests {
        LayerDigests {
            digest: D.replace("e3b0", "aaaa"),
            diff_id: D.replace("e3b0", "bbbb"),
            size: 42,
        }
    }

    #[test]
    fn appends_boot_layer_and_keeps_unknown_fields() {
        let cfg = format!(
            r#"{{"architecture":"amd64","os":"linux","x-custom":1,"rootfs":{{"type":"layers","diff_ids":["{D}"]}},"history":[{{"created_by":"base"}}]}}"#
        );
        let man = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"x","digest":"{D}","size":1}},"layers":[{{"mediaType":"{DOCKER_LAYER_GZIP}","digest":"{D}","size":5}}]}}"#
        );
        let out = optimized_image(
            man.as_bytes(),
            cfg.as_bytes(),
            &desc(&boot(), ".wh..wh.idx"),
            "2026-01-01T00:00:00Z",
        )
        .unwrap();
        let c: Value = serde_json::from_slice(&out.config).unwrap();
        assert_eq!(c["x-custom"], 1);
        assert_eq!(c["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
        assert_eq!(c["rootfs"]["diff_ids"][1], boot().diff_id);
        assert_eq!(c["history"].as_array().unwrap().len(), 2);
        let m: Value = serde_json::from_slice(&out.manifest).unwrap();
        assert_eq!(m["layers"].as_array().unwrap().len(), 2);
        assert_eq!(m["layers"][1]["mediaType"], DOCKER_LAYER_GZIP);
        assert_eq!(m["layers"][1]["digest"], boot().digest);
        assert_eq!(
            m["config"]["digest"],
            lazylayer_oci::Digest::sha256_of(&out.config).to_string()
        );
        assert_eq!(m["annotations"][ANNOTATION_BOOT_LAYER], boot().digest);
        // Optimizing an optimized image is refused.
        let again = optimized_image(
            &out.manifest,
            &out.config,
            &desc(&boot(), ".wh..wh.idx"),
            "x",
        );
        assert!(again.unwrap_err().to_string().contains("already optimized"));
    }

    /// An OCI manifest's layers each get a TOC digest (their own blob
    /// digest) unless they have one; a Docker one's stay as they were.
    #[test]
    fn oci_layers_get_a_toc_digest_for_podman5() {
        let cfg = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{D}","{D}"]}}}}"#);
        let own = D.replace("e3b0", "cccc");
        let man = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"x","digest":"{D}","size":1}},"layers":[{{"mediaType":"{OCI_LAYER_GZIP}","digest":"{D}","size":5}},{{"mediaType":"{OCI_LAYER_GZIP}","digest":"{D}","size":5,"annotations":{{"{ANNOTATION_ZSTD_CHUNKED_TOC}":"{own}"}}}}]}}"#
        );
        let out =
            optimized_image(man.as_bytes(), cfg.as_bytes(), &desc(&boot(), "i"), "x").unwrap();
        let m: Value = serde_json::from_slice(&out.manifest).unwrap();
        let toc = |i: usize| m["layers"][i]["annotations"][ANNOTATION_STARGZ_TOC].clone();
        assert_eq!(toc(0), D);
        assert_eq!(
            toc(1),
            Value::Null,
            "a layer's own TOC digest is kept alone"
        );
        assert_eq!(
            m["layers"][1]["annotations"][ANNOTATION_ZSTD_CHUNKED_TOC],
            own.as_str()
        );
        assert_eq!(toc(2), boot().digest);
        assert_eq!(m["layers"][2]["annotations"][ANNOTATION_INDEX], "i");

        let docker = man.replace(
            "application/vnd.oci.image.manifest.v1+json",
            DOCKER_MANIFEST,
        );
        let out =
            optimized_image(docker.as_bytes(), cfg.as_bytes(), &desc(&boot(), "i"), "x").unwrap();
        let m: Value = serde_json::from_slice(&out.manifest).unwrap();
        assert_eq!(m["layers"][0].get("annotations"), None);
    }

    #[test]
    fn broken_inputs_are_errors() {
        assert!(optimized_image(b"{}", b"{}", &desc(&boot(), "i"), "x").is_err());
        assert!(optimized_image(b"not json", b"{}", &desc(&boot(), "i"), "x").is_err());
    }
}
