use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lazylayer_oci::Keychain;
use lazylayer_podman::auth_helper::{parse_helper_input, MAX_INPUT};
use lazylayer_podman::{LayerStore, StoreOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::context::GlobalArgs;

/// Serve optimized images to Podman, lazily, through containers-storage's
/// "additional layer store". For each image, the store lays out
/// `DIR/<base64 of REF>/<layer digest>/{diff,info,blob}`; the top (boot)
/// layer's `diff` is the image's lazy merged root (FUSE), the others are
/// empty. Podman then pulls only manifest and config, and its containers run
/// on the lazy root. Keep this running while Podman uses the images; a
/// restart with the same images (after a crash, or SIGTERM for an upgrade)
/// takes over the roots in use, whose FUSE connections a descriptor holder
/// keeps meanwhile. Images the store holds whole are laid out from its
/// extracted layers, no FUSE.
///
/// Configure Podman with `--storage-opt overlay.additionallayerstore=DIR:ref`
/// (or storage.conf: `additionallayerstores = ["DIR:ref"]`). See docs/podman.md.
#[derive(clap::Args)]
pub struct Args {
    /// The additional layer store directory Podman is configured with
    #[arg(long, default_value = "/var/lib/lazylayer/podman-layers")]
    pub dir: PathBuf,
    /// Fetch the remaining layers in the background (starting once a start
    /// has settled: file-system requests quiet for 0.2 s, or 2 s after the mount)
    /// [config: fetch.prefetch; default: on]
    #[arg(long, value_parser = ["on", "off"])]
    pub prefetch: Option<String>,
    /// Longest a read waits for its file before EIO (seconds)
    /// [config: fetch.read_timeout; default: 60]
    #[arg(long, value_name = "SECS")]
    pub fetch_timeout: Option<f64>,
    /// Serve Prometheus metrics on HOST:PORT (/metrics)
    /// [config: metrics.address; default: none]
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Optimized images to serve, named exactly as Podman will pull them
    #[arg(required = true)]
    pub images: Vec<String>,
}

pub async fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let images = (a.images.iter())
        .map(|i| super::parse_reference(i))
        .collect::<Result<Vec<_>>>()?;
    let store = g.store()?;
    super::evict_periodically(&store);
    // Lazy roots outlive this process: their FUSE connections are kept by a
    // holder, and a restart with the same images takes them over.
    let holder_dir = store.root().join("podman-store");
    lazylayer_store::create_private_dir(&holder_dir)
        .with_context(|| format!("creating {}", holder_dir.display()))?;
    let holder = super::holder::client(&holder_dir.join("holder.sock"))?;
    let opts = StoreOptions {
        dir: a.dir.clone(),
        fetch: g.fetch_options(a.fetch_timeout)?,
        mount: g.mount_options(a.prefetch.as_deref(), None),
        holder: Some(holder),
    };
    // Credentials Podman hands over through the auth helper: for their
    // repository only, in memory only, as long as the store runs (its
    // containers may read lazily for days).
    let keychain = Arc::new(Keychain::new(CREDENTIALS_KEPT));
    let client = Arc::new(g.client_with(|c| c.auth.keychain = Some(keychain.clone()))?);
    let auth_socket = holder_dir.join(AUTH_SOCKET);
    let listener = listen_private(&auth_socket)?;
    super::serve_metrics(g, &store, a.metrics_address).await?;
    let mut served = LayerStore::serve(&store, client.clone(), &images, &opts)
        .await
        .with_context(|| format!("serving images in {}", a.dir.display()))?;
    for i in served.images() {
        let (image, layers) = (i.reference, i.layers);
        println!("serving {image} ({layers} layers) in {}", a.dir.display());
    }
    for image in served.waiting() {
        println!("waiting for credentials for {image} (from Podman's additional-layer-store-auth-helper)");
    }
    eprintln!(
        "ready: run podman with --storage-opt overlay.additionallayerstore={}:ref (Ctrl-C to stop)",
        a.dir.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            conn = listener.accept() => {
                let Ok((conn, _)) = conn else { continue };
                // One at a time: Podman waits for its helper, which waits
                // for the images it names to be laid out.
                let env = HelperEnv { keychain: &keychain, store: &store, client: &client, opts: &opts };
                if let Err(e) = answer_helper(conn, &env, &mut served).await {
                    tracing::warn!(error = %format!("{e:#}"), "an auth helper's request");
                }
            }
        }
    }
    let _ = std::fs::remove_file(&auth_socket);
    eprintln!(
        "stopping: unmounting the images no container uses (those in use stay for the next store)"
    );
    // Each image is recorded in the store once all its layers arrived.
    served.stop().await;
    Ok(())
}

/// The store's socket for its auth helper, in `<root>/podman-store/`.
const AUTH_SOCKET: &str = "auth.sock";

/// As long as the store runs, in practice (Instant + this must not overflow).
const CREDENTIALS_KEPT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A helper that sends nothing for this long is dropped: the store serves
/// one helper at a time.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// A unix socket only its owner (root, as Podman's helper runs) may use.
fn listen_private(path: &Path) -> Result<tokio::net::UnixListener> {
    let l = lazylayer_sys::socket::listen_private(path)?;
    Ok(tokio::net::UnixListener::from_std(l)?)
}

/// What answering a helper needs besides the served images.
struct HelperEnv<'a> {
    keychain: &'a Keychain,
    store: &'a lazylayer_store::Store,
    client: &'a Arc<lazylayer_oci::RegistryClient>,
    opts: &'a StoreOptions,
}

/// One helper's request: its stdin as Podman gave it; each credential goes
/// to the keychain for its repository, and images of that repository that
/// waited for credentials are opened before the answer (so that Podman,
/// which waits for its helper, finds their layers). Answers `ok ...` or
/// `error: ...`, one line.
async fn answer_helper(
    mut conn: tokio::net::UnixStream,
    env: &HelperEnv<'_>,
    served: &mut LayerStore,
) -> Result<()> {
    let mut input = Vec::new();
    let read = {
        let mut limited = (&mut conn).take(MAX_INPUT as u64 + 1);
        tokio::time::timeout(HELPER_TIMEOUT, limited.read_to_end(&mut input)).await
    };
    let answer = match read {
        Err(_) => "error: nothing received in time".to_string(),
        Ok(Err(e)) => format!("error: reading: {e}"),
        Ok(Ok(_)) => match parse_helper_input(&input) {
            Err(e) => format!("error: {e}"),
            Ok(entries) => {
                let mut opened = Vec::new();
                for e in entries {
                    let repo = &e.reference.repository;
                    match e.credential {
                        Some(c) => {
                            tracing::info!(repository = %repo, user = %c.username, "credential from Podman's auth helper");
                            env.keychain.put(repo, c);
                        }
                        None if e.identity_token => {
                            tracing::warn!(repository = %repo, "Podman's auth helper gave an identity token, which lazylayer cannot use")
                        }
                        None => {}
                    }
                    let now = served
                        .credentials_arrived(env.store, env.client.clone(), env.opts, repo)
                        .await;
                    match now {
                        Ok(now) => opened.extend(now),
                        Err(err) => {
                            tracing::warn!(repository = %repo, error = %lazylayer_sys::error_chain(&err), "serving an image that waited for credentials")
                        }
                    }
                }
                for r in &opened {
                    println!("serving {r} (credentials arrived)");
                }
                format!("ok: {} image(s) opened", opened.len())
            }
        },
    };
    conn.write_all(format!("{answer}\n").as_bytes()).await?;
    Ok(())
}

/// Hand Podman's credentials to the running store (`lazylayer store`):
/// name this program (or a link to lazylayer named
/// `lazylayer-store-auth-helper`) as `additional-layer-store-auth-helper`
/// in registries.conf. Podman (5.2 and later) runs it once per pull with
/// the image and its credential on stdin; the store then fetches that
/// repository's layers with it, keeping it in memory only. The store is
/// found by --root (or LAZYLAYER_ROOT, or the configuration).
#[derive(clap::Args)]
pub struct HelperArgs {
    /// The store's socket [default: <root>/podman-store/auth.sock]
    #[arg(long, value_name = "SOCK")]
    pub socket: Option<PathBuf>,
}

pub async fn helper(g: &GlobalArgs, a: HelperArgs) -> Result<()> {
    let socket = a
        .socket
        .unwrap_or_else(|| g.root.join("podman-store").join(AUTH_SOCKET));
    let mut input = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::io::stdin(), MAX_INPUT as u64 + 1),
        &mut input,
    )
    .context("reading stdin")?;
    let mut conn = tokio::net::UnixStream::connect(&socket)
        .await
        .with_context(|| {
            format!(
                "connecting to the store at {} (is `lazylayer store` running?)",
                socket.display()
            )
        })?;
    conn.write_all(&input).await?;
    conn.shutdown().await?;
    let mut answer = String::new();
    // The store opens the images before it answers (a registry far away
    // takes a few round trips); Podman waits for this program meanwhile.
    tokio::time::timeout(Duration::from_secs(120), conn.read_to_string(&mut answer))
        .await
        .context("the store did not answer in 120 s")??;
    let answer = answer.trim();
    match answer.strip_prefix("error: ") {
        Some(e) => bail!("the store refused: {e}"),
        None if answer.starts_with("ok") => {
            eprintln!("{answer}");
            Ok(())
        }
        None => bail!("unexpected answer from the store: {answer:?}"),
    }
}
