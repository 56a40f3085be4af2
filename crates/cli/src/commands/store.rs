use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lazylayer_fetch::{FetchOptions, LazyRoot, MountOptions, OpenError};

use crate::context::GlobalArgs;

/// Serve optimized images to Podman, lazily, through containers-storage's
/// "additional layer store". For each image, the store lays out
/// `DIR/<base64 of REF>/<layer digest>/{diff,info,blob}`; the top (boot)
/// layer's `diff` is the image's lazy merged root (FUSE), the others are
/// empty. Podman then pulls only manifest and config, and its containers run
/// on the lazy root. Keep this running while Podman uses the images.
///
/// Configure Podman with `--storage-opt overlay.additionallayerstore=DIR:ref`
/// (or storage.conf: `additionallayerstores = ["DIR:ref"]`). See docs/podman.md.
#[derive(clap::Args)]
pub struct Args {
    /// The additional layer store directory Podman is configured with
    #[arg(long, default_value = "/var/lib/lazylayer/podman-layers")]
    pub dir: PathBuf,
    /// Fetch the remaining layers in the background
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub prefetch: String,
    /// Longest a read waits for its file before EIO (seconds)
    #[arg(long, default_value_t = 60.0)]
    pub fetch_timeout: f64,
    /// Optimized images to serve, named exactly as Podman will pull them
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// One image laid out for Podman; undone on drop (bind mount, dirs, then
/// the lazy root: FUSE, fetches, pin).
struct Served {
    base: PathBuf,
    bind: PathBuf,
    _root: LazyRoot,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.bind, rustix::mount::UnmountFlags::DETACH);
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn base64_std(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn serve(mut root: LazyRoot, dir: &Path, work: &Path, prefetch: bool) -> Result<Served> {
    let reference = root.reference().to_string();
    // Podman looks the image up by its reference as it names it (base64, std
    // alphabet: a '/' in it simply nests directories).
    let base = dir.join(base64_std(reference.as_bytes()));
    if base.exists() {
        bail!("{} is already served at {}", reference, base.display());
    }
    let target = work.join("root");
    std::fs::create_dir_all(&target)?;
    // Prefetch once the start has settled (a container's first reads, or
    // 2 s after the mount), as `run` and the snapshotter do.
    let opts = MountOptions {
        prefetch,
        ..MountOptions::default()
    };
    root.mount(&target, opts)
        .context("mounting the lazy file system")?;
    let n = root.layers().len();
    let mut top_diff = PathBuf::new();
    for (i, l) in root.layers().iter().enumerate() {
        let ld = base.join(l.digest.to_string());
        std::fs::create_dir_all(ld.join("diff"))?;
        std::fs::write(ld.join("blob"), b"")?;
        // A diff-digest of our own, not the layer's real one: containers-storage
        // reuses layers by digest, and these are views (the top one holds the
        // whole image, the others nothing), not the layers themselves.
        let view = lazylayer_oci::Digest::sha256_of(
            format!("lazylayer-view:{reference}:{}", l.diff_id).as_bytes(),
        );
        let info =
            serde_json::json!({ "compressed-size": l.size, "diff-digest": view.to_string() });
        std::fs::write(ld.join("info"), serde_json::to_vec(&info)?)?;
        if i == n - 1 {
            top_diff = ld.join("diff");
        }
    }
    rustix::mount::mount_bind(&target, &top_diff)
        .with_context(|| format!("bind-mounting the lazy root at {}", top_diff.display()))?;
    Ok(Served {
        base,
        bind: top_diff,
        _root: root,
    })
}

pub async fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let store = g.store()?;
    let client = Arc::new(g.client()?);
    // Private: it exposes images' roots (podman reads it as root).
    lazylayer_store::create_private_dir(&a.dir)
        .with_context(|| format!("creating {}", a.dir.display()))?;
    let fopts = FetchOptions {
        read_timeout: Duration::from_secs_f64(a.fetch_timeout),
        ..FetchOptions::default()
    };
    let mut served = Vec::new();
    for (i, name) in a.images.iter().enumerate() {
        let reference = super::parse_reference(name)?;
        let pin = format!("podman-store-{}-{i}", std::process::id());
        let opened = LazyRoot::open(&store, client.clone(), &reference, fopts.clone(), &pin);
        let root = match opened.await {
            Ok(root) => root,
            Err(OpenError::NoBootLayer(r)) => {
                bail!("{r} has no boot layer: optimize it first (`lazylayer optimize`)")
            }
            Err(OpenError::Failed(e)) => {
                return Err(e).with_context(|| format!("opening {reference}"))
            }
        };
        let work = store
            .root()
            .join("podman-store")
            .join(format!("{}-{i}", std::process::id()));
        let layers = root.layers().len();
        served.push(
            serve(root, &a.dir, &work, a.prefetch == "on")
                .with_context(|| format!("serving {reference}"))?,
        );
        println!(
            "serving {reference} ({layers} layers) in {}",
            a.dir.display()
        );
    }
    eprintln!(
        "ready: run podman with --storage-opt overlay.additionallayerstore={}:ref (Ctrl-C to stop)",
        a.dir.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("stopping: unmounting and removing the layer store entries");
    // Each image is recorded in the store once all its layers arrived.
    drop(served);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(super::base64_std(b""), "");
        assert_eq!(super::base64_std(b"f"), "Zg==");
        assert_eq!(super::base64_std(b"fo"), "Zm8=");
        assert_eq!(super::base64_std(b"foo"), "Zm9v");
        assert_eq!(super::base64_std(&[0xfb, 0xff]), "+/8=");
    }
}
