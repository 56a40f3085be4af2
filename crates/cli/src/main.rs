//! `lazylayer`: start containers before their image has downloaded.
//!
//! The binary is thin: each subcommand parses its arguments and calls the
//! library crates (`lazylayer-oci`, `lazylayer-store`, `lazylayer-layer`).

mod commands;
mod config;
mod context;
mod metrics;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use context::{GlobalArgs, GlobalFlags};

#[derive(Parser)]
#[command(
    name = "lazylayer",
    version,
    about = "Start containers before their image has downloaded",
    long_about = "lazylayer starts containers before their image has downloaded.\n\n\
                  `optimize SRC DST` runs an image's workload once under a tracing file system and\n\
                  pushes DST = SRC's layers + a boot layer (the files read at start and an index of\n\
                  every path). DST is a plain OCI image: any registry stores it, any runtime runs it.\n\
                  `run DST` fetches manifest, config and boot layer only, and starts the container at\n\
                  once; other files arrive on first touch and by background prefetch.\n\
                  containerd (snapshotter) and Podman (store) use optimized images the same way.\n\n\
                  Images live in a content-addressed store (--root) shared by every image and process.\n\
                  Logging: -v, -vv or RUST_LOG (e.g. RUST_LOG=lazylayer=debug)."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalFlags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pull an image fully into the store (every layer fetched, verified and extracted)
    Pull(commands::pull::Args),
    /// Run a container, starting lazily from an optimized image's boot layer
    Run(commands::run::Args),
    /// List containers
    Ps(commands::ps::Args),
    /// Remove containers
    Rm(commands::rm::Args),
    /// Show a container's per-layer fetch progress
    Status(commands::status::Args),
    /// Serve optimized images to Podman lazily (containers-storage additional layer store)
    Store(commands::store::Args),
    /// Hand Podman's pull credentials to `lazylayer store` (its additional-layer-store-auth-helper)
    #[command(name = "store-auth-helper")]
    StoreAuthHelper(commands::store::HelperArgs),
    /// Show an image's manifest and config summary (from the registry)
    Inspect(commands::inspect::Args),
    /// List the images in the store
    Images(commands::images::Args),
    /// Build an optimized image (original layers + a boot layer) from a traced run, or attach the boot layer to the unchanged image (--attach)
    Optimize(commands::optimize::Args),
    /// Push an image from the store to a registry (layers mounted or skipped when present)
    Push(commands::push::Args),
    /// Forget an image reference (its content goes at the next prune)
    Rmi(commands::rmi::Args),
    /// Remove blobs and layers that no image references (or, with --to SIZE, evict down to a size)
    Prune(commands::prune::Args),
    /// Verify the store (digests, complete layers, records, partials); --repair removes damage
    Check(commands::check::Args),
    /// Show the store's disk usage: per image, per directory, and the size limit
    Df(commands::df::Args),
    /// Serve containerd's snapshots API (remote snapshotter for optimized images)
    Snapshotter(commands::snapshotter::Args),
    /// Talk to containerd: `containerd pull` registers an optimized image lazily
    Containerd(commands::containerd::Args),
    /// Print the effective configuration (file, environment and flags merged)
    Config(commands::config::Args),
    /// Keep live lazy roots' FUSE connections across server restarts (started by the servers)
    #[command(name = "fd-holder", hide = true)]
    FdHolder(commands::holder::Args),
}

static EXIT_CODE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The name under which lazylayer acts as Podman's auth helper: Podman runs
/// the helper without arguments.
const AUTH_HELPER_NAME: &str = "lazylayer-store-auth-helper";

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let called = args.first().map(std::path::PathBuf::from);
    if called.as_deref().and_then(std::path::Path::file_name) == Some(AUTH_HELPER_NAME.as_ref()) {
        args.insert(1, "store-auth-helper".into());
    }
    let cli = Cli::parse_from(args);
    context::init_logging(cli.global.verbose);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The descriptor holder reads no configuration: it must start even
    // when a broken file stops everything else.
    if let Command::FdHolder(a) = cli.command {
        return match commands::holder::run(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("Error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let global = match GlobalArgs::resolve(cli.global) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("Error: configuration: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let g = &global;
        match cli.command {
            Command::Pull(a) => commands::pull::run(g, a).await,
            Command::Run(a) => commands::run::run(g, a).await.map(|code| {
                EXIT_CODE.store(code, std::sync::atomic::Ordering::SeqCst);
            }),
            Command::Ps(a) => commands::ps::run(g, a),
            Command::Rm(a) => commands::rm::run(g, a),
            Command::Status(a) => commands::status::run(g, a),
            Command::Store(a) => commands::store::run(g, a).await,
            Command::StoreAuthHelper(a) => commands::store::helper(g, a).await,
            Command::Inspect(a) => commands::inspect::run(g, a).await,
            Command::Images(a) => commands::images::run(g, a),
            Command::Optimize(a) => commands::optimize::run(g, a).await,
            Command::Push(a) => commands::push::run(g, a).await,
            Command::Rmi(a) => commands::rmi::run(g, a),
            Command::Prune(a) => commands::prune::run(g, a),
            Command::Df(a) => commands::df::run(g, a),
            Command::Check(a) => commands::check::run(g, a).map(|code| {
                EXIT_CODE.store(code, std::sync::atomic::Ordering::SeqCst);
            }),
            Command::Snapshotter(a) => commands::snapshotter::run(g, a).await,
            Command::Containerd(a) => commands::containerd::run(g, a).await,
            Command::Config(a) => commands::config::run(g, a),
            Command::FdHolder(_) => unreachable!("served above"),
        }
    });
    // Work still in flight belongs to nobody now (a background prefetch cut by
    // the container's exit, a lock wait): don't let it hold the exit. What a
    // cut download received stays in the store's partial/, and the next fetch
    // of that layer continues from there with Range.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        // `run` passes the container's exit code through.
        Ok(()) => ExitCode::from(
            EXIT_CODE
                .load(std::sync::atomic::Ordering::SeqCst)
                .clamp(0, 255) as u8,
        ),
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    /// `ExecStart=` of a unit file, split into words.
    fn exec_start(unit: &str) -> Vec<String> {
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("the unit has an ExecStart line");
        line.split_whitespace().map(str::to_string).collect()
    }

    /// The systemd units in packaging/systemd start `lazylayer` with a
    /// command line this very CLI accepts, as the server each one is for.
    #[test]
    fn systemd_units_exec_start_lines_parse_as_this_cli() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/systemd");
        let mut seen = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let unit = std::fs::read_to_string(&path).unwrap();
            let mut argv = exec_start(&unit);
            assert_eq!(argv[0], "/usr/local/bin/lazylayer", "{}", path.display());
            // What /etc/lazylayer/store.env would name.
            for a in argv.iter_mut() {
                if a == "$LAZYLAYER_STORE_IMAGES" {
                    *a = "registry.example.com/app:lazy".into();
                }
            }
            let cli = Cli::try_parse_from(&argv)
                .unwrap_or_else(|e| panic!("{}: {argv:?}: {e}", path.display()));
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            match (name.as_str(), &cli.command) {
                ("lazylayer-snapshotter.service", Command::Snapshotter(_))
                | ("lazylayer-store.service", Command::Store(_)) => {}
                _ => panic!("{name} starts another command: {argv:?}"),
            }
            // The descriptor holder must outlive a stop of the service.
            assert!(unit.lines().any(|l| l == "KillMode=process"), "{name}");
            seen.push(name);
        }
        seen.sort();
        assert_eq!(
            seen,
            ["lazylayer-snapshotter.service", "lazylayer-store.service"]
        );
    }
}
