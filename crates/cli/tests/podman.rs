//! Podman (Debian's 4.3, unmodified) starting an optimized image lazily
//! through `lazylayer store` (containers-storage's additional layer store).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// `lazylayer store` serving `image` to podman from a store and a layer
/// store dir of its own, ready (its lazy root mounted) when returned. Fields
/// drop in order: the process is killed before its mounts are cleared, so a
/// failing test leaves nothing mounted.
struct ServedStore {
    process: KillOnDrop,
    args: Vec<String>,
    /// The store's environment besides the test's.
    env: Vec<(String, String)>,
    _leftovers: (StoreLeftovers, UnmountBelow),
    root: tempfile::TempDir,
    als: tempfile::TempDir,
    /// When the lazy root appeared.
    ready: Instant,
}

impl ServedStore {
    /// `lazylayer store` of `image` (with `extra` arguments) for the podman
    /// of `stack`: its directories where that podman sees them; ready when
    /// it serves the image.
    fn start_on(stack: Stack, image: &str, extra: &[&str]) -> ServedStore {
        ServedStore::start_in_dirs(stack.tempdir(), stack.tempdir(), image, extra)
    }

    /// [`ServedStore::start_on`] with a lazylayer store made beforehand
    /// (`root`) and the layer store directory `als`.
    fn start_in_dirs(
        root: tempfile::TempDir,
        als: tempfile::TempDir,
        image: &str,
        extra: &[&str],
    ) -> ServedStore {
        let mut s = ServedStore::spawn_in_dirs(root, als, image, extra, &[]);
        s.wait_ready(1);
        s
    }

    /// [`ServedStore::start_on`] with `env` added to the store's
    /// environment; not waited for.
    fn spawn_on(stack: Stack, image: &str, extra: &[&str], env: &[(&str, &str)]) -> ServedStore {
        ServedStore::spawn_in_dirs(stack.tempdir(), stack.tempdir(), image, extra, env)
    }

    fn spawn_in_dirs(
        root: tempfile::TempDir,
        als: tempfile::TempDir,
        image: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> ServedStore {
        let leftovers = (
            StoreLeftovers(root.path().to_path_buf()),
            UnmountBelow(als.path().to_path_buf()),
        );
        let mut args: Vec<String> = vec!["--root".into(), root.path().display().to_string()];
        args.push("store".into());
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend([
            "--dir".into(),
            als.path().display().to_string(),
            image.into(),
        ]);
        let env: Vec<(String, String)> = (env.iter())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let process = ServedStore::spawn(&args, &env, root.path());
        ServedStore {
            process,
            args,
            env,
            _leftovers: leftovers,
            root,
            als,
            ready: Instant::now(),
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.root.path().join("store.out")).unwrap_or_default()
    }

    /// Until the store's output has a line starting with `prefix`.
    fn wait_for_line(&self, prefix: &str) {
        self.wait_for_lines(prefix, 1);
    }

    /// Until the store's output has `n` lines starting with `prefix` (all
    /// its starts write to the same file).
    fn wait_for_lines(&self, prefix: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self
            .output()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .count()
            < n
        {
            assert!(
                Instant::now() < deadline,
                "the store never said {prefix:?}: {}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn(args: &[String], env: &[(String, String)], root: &std::path::Path) -> KillOnDrop {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("store.out"))
            .unwrap();
        KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_lazylayer"))
                .args(args)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(out)
                .spawn()
                .unwrap(),
        )
    }

    /// Until the `n`th start of the store says it serves its image.
    fn wait_ready(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let served = || {
            let out =
                std::fs::read_to_string(self.root.path().join("store.out")).unwrap_or_default();
            out.lines().filter(|l| l.starts_with("serving ")).count()
        };
        while served() < n || mounts_below(self.als.path()).is_empty() {
            assert!(
                Instant::now() < deadline,
                "lazylayer store did not get ready"
            );
            assert!(
                self.process.0.try_wait().unwrap().is_none(),
                "lazylayer store exited early"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.ready = Instant::now();
    }

    /// Kill the store (SIGKILL, or SIGTERM and a clean exit when
    /// `graceful`) and start it again with the same arguments; ready when
    /// returned (the `n`th start).
    fn restart(&mut self, graceful: bool, n: usize) {
        self.restart_unwaited(graceful);
        self.wait_ready(n);
    }

    /// [`ServedStore::restart`] without waiting for the new store.
    fn restart_unwaited(&mut self, graceful: bool) {
        if graceful {
            send_signal(self.process.0.id(), rustix::process::Signal::TERM);
            assert_eq!(
                wait_exit(&mut self.process.0, Duration::from_secs(30)),
                Some(0)
            );
        } else {
            let _ = self.process.0.kill();
            let _ = self.process.0.wait();
        }
        self.process = ServedStore::spawn(&self.args, &self.env, self.root.path());
    }

    fn holder_pid(&self) -> Option<u32> {
        let p = self.root.path().join("podman-store/holder.pid");
        let pid: u32 = std::fs::read_to_string(p).ok()?.trim().parse().ok()?;
        std::path::Path::new(&format!("/proc/{pid}"))
            .exists()
            .then_some(pid)
    }

    /// `podman` with this layer store (its global option given).
    fn podman_cmd(&self, podman: &Podman) -> Command {
        let mut c = podman.cmd();
        c.arg("--storage-opt").arg(format!(
            "overlay.additionallayerstore={}:ref",
            self.als.path().display()
        ));
        c
    }

    /// `podman ARGS` with this layer store, which must succeed; its stdout.
    /// A `run` also gets `--tls-verify=false`: Podman 5.8 pulls the image
    /// again for it (docs/podman.md), from the plain-HTTP test registry.
    fn podman(&self, podman: &Podman, args: &[&str]) -> String {
        let opt = format!(
            "overlay.additionallayerstore={}:ref",
            self.als.path().display()
        );
        let mut args = args.to_vec();
        if args.first() == Some(&"run") && !args.contains(&"--tls-verify=false") {
            args.insert(1, "--tls-verify=false");
        }
        podman.ok_with(&["--storage-opt", &opt], &args)
    }

    /// SIGTERM: the store exits 0 and leaves no mount behind.
    fn stop(mut self) -> tempfile::TempDir {
        send_signal(self.process.0.id(), rustix::process::Signal::TERM);
        assert_eq!(
            wait_exit(&mut self.process.0, Duration::from_secs(30)),
            Some(0)
        );
        assert!(mounts_below(self.als.path()).is_empty(), "bind mounts left");
        assert!(
            mounts_below(self.root.path()).is_empty(),
            "FUSE mounts left"
        );
        self.als
    }
}

lazylayer_testsupport::on_each_podman!(
    root_podman_pull_credentials_reach_the_store,
    root_podman_store_restarts_keep_a_running_container_serving,
    root_podman_runs_an_optimized_image_lazily_through_the_layer_store,
    root_podman_store_prefetches_only_after_the_start_settles,
    root_podman_runs_an_image_local_whole_on_the_stores_layers_without_fuse,
    root_podman_runs_an_unchanged_image_from_its_attached_boot_layer,
);

/// Part 16: the unchanged image with a boot layer attached (`optimize
/// --attach`), served by the store. Podman 4.3 asks the store for every
/// layer: it runs the image lazily, downloading none of its layers. Podman
/// 5 asks only for layers whose descriptor names a TOC digest, which an
/// unchanged image's do not: it downloads them and runs the image as any
/// other (docs/podman.md); the test holds both, so a Podman that changes
/// this shows here.
fn root_podman_runs_an_unchanged_image_from_its_attached_boot_layer(stack: Stack) {
    if !stack.ready("root_podman_runs_an_unchanged_image_from_its_attached_boot_layer") {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let src = image_ref(&reg, "python3");
    let opt = stack.tempdir();
    lazylayer_ok(opt.path(), &["optimize", "--attach", &src]);
    let (_, layers) = layer_digests(opt.path(), &src);
    let before: Vec<usize> = layers.iter().map(|d| reg.blob_gets(d)).collect();

    let store = ServedStore::start_on(stack, &src, &["--prefetch", "off"]);
    assert!(
        !mounts_below(store.root.path()).is_empty(),
        "the store did not open the image lazily"
    );
    let podman = Podman::on(stack);
    store.podman(&podman, &["pull", "-q", "--tls-verify=false", &src]);
    let out = store.podman(&podman, &["run", "--rm", "--network=none", &src]);
    assert_eq!(out, "ok\n");
    let downloaded = layers
        .iter()
        .zip(&before)
        .filter(|(d, b)| reg.blob_gets(d) > **b)
        .count();
    match stack {
        Stack::Bookworm => assert_eq!(downloaded, 0, "podman 4.3 downloaded layers"),
        Stack::Sid => assert_eq!(
            downloaded,
            layers.len(),
            "podman 5 now asks the store for layers without a TOC digest: update docs/podman.md"
        ),
    }
    store.podman(&podman, &["rmi", "-a", "-f"]);
    store.stop();
}

/// A private registry (htpasswd: Basic). Podman 5.8 hands a pull's
/// credential to the store through registries.conf's
/// `additional-layer-store-auth-helper`, here lazylayer itself under the
/// name `lazylayer-store-auth-helper`: the store, started with no credential
/// at all, waits for the image, opens it when the helper brings alice's
/// credential (before Podman asks for the layers), and Podman runs the image
/// lazily. A wrong password fails Podman's pull clearly and opens nothing.
/// Podman 4.3 has no such helper: its store reads the credential from an
/// auth file (`--auth-file`), and Podman pulls with its own.
fn root_podman_pull_credentials_reach_the_store(stack: Stack) {
    if !stack.ready("root_podman_pull_credentials_reach_the_store") {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let (opt, src, dst) = optimize_image(&reg, "python3", &[]);
    let (_, src_layers) = layer_digests(opt.path(), &src);
    let (_, layers) = layer_digests(opt.path(), &dst);
    let boot = layers.last().unwrap().clone();
    let secrets = stack.tempdir();
    let private = Registry::start_with(&common::auth::htpasswd_config(
        secrets.path(),
        &[("alice", "alice-pw-1"), ("admin", "admin-pw-3")],
    ));
    let app = format!("{}/private/app:opt", private.addr());
    let admin = auth_file(secrets.path(), &private.addr(), "admin", "admin-pw-3");
    push_with_auth(opt.path(), &dst, &app, &admin);

    // The store has no credential of its own (an empty HOME, no auth file)
    // but, on bookworm, the one given by --auth-file.
    let home = secrets.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let alice = auth_file(secrets.path(), &private.addr(), "alice", "alice-pw-1");
    let alice = alice.display().to_string();
    let mut extra = vec!["--prefetch", "off"];
    if stack == Stack::Bookworm {
        extra.extend(["--auth-file", alice.as_str()]);
    }
    let home = home.display().to_string();
    let mut store = ServedStore::spawn_on(stack, &app, &extra, &[("HOME", &home)]);
    let conf = secrets.path().join("registries.conf");
    match stack {
        Stack::Bookworm => {
            std::fs::write(&conf, "").unwrap();
            store.wait_for_line("serving ");
        }
        Stack::Sid => {
            // Podman runs the helper by this path, with no argument; it
            // finds the store by LAZYLAYER_ROOT (Podman passes its own
            // environment on).
            let helper = secrets.path().join("lazylayer-store-auth-helper");
            std::fs::copy(env!("CARGO_BIN_EXE_lazylayer"), &helper).unwrap();
            std::fs::write(
                &conf,
                format!(
                    "additional-layer-store-auth-helper = \"{}\"\n",
                    helper.display()
                ),
            )
            .unwrap();
            store.wait_for_line("waiting for credentials for ");
            assert!(mounts_below(store.als.path()).is_empty());
        }
    }
    let podman = Podman::on(stack);
    // `podman ARGS` with the pull credential `creds` (`run` has no
    // --creds in 4.3: there it comes from alice's auth file).
    let pm = |store: &ServedStore, creds: &str, args: &[&str]| {
        let mut c = store.podman_cmd(&podman);
        c.env("CONTAINERS_REGISTRIES_CONF", &conf)
            .env("LAZYLAYER_ROOT", store.root.path())
            .arg(args[0])
            .arg("--tls-verify=false");
        match args[0] {
            "run" => c.env("REGISTRY_AUTH_FILE", &alice),
            _ => c.args(["--creds", creds]),
        };
        c.args(&args[1..]).output().unwrap()
    };

    let wrong = pm(&store, "alice:wrong-pw", &["pull", "-q", &app]);
    assert!(!wrong.status.success(), "a wrong password pulled");
    let err = String::from_utf8_lossy(&wrong.stderr).to_ascii_lowercase();
    assert!(
        err.contains("unauthorized")
            || err.contains("401")
            || err.contains("authentication required"),
        "not a clear pull error: {err}"
    );
    assert!(
        !store.output().contains("credentials arrived"),
        "{}",
        store.output()
    );

    let pulled = pm(&store, "alice:alice-pw-1", &["pull", "-q", &app]);
    assert!(pulled.status.success(), "{pulled:?}");
    if stack == Stack::Sid {
        assert!(
            store
                .output()
                .contains(&format!("serving {app} (credentials arrived)")),
            "{}",
            store.output()
        );
    }
    let ran = pm(&store, "", &["run", "--rm", "--network=none", &app]);
    assert!(ran.status.success(), "{ran:?}");
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "ok\n");
    for d in &src_layers {
        assert_eq!(
            private.blob_gets(d),
            0,
            "layer {d} was downloaded; podman should have used the layer store"
        );
    }
    assert!(
        private.blob_gets(&boot) > 0,
        "the store fetched no boot bytes"
    );

    if stack == Stack::Sid {
        // A store restarted (killed) under a running container forgets the
        // credential: the root it left stays mounted, kept by the holder,
        // waiting; the next pull's credential has it taken over, and the
        // container reads on. (Without waiting, the new store would clear
        // the root from under the container.)
        let run = pm(
            &store,
            "",
            &[
                "run",
                "-d",
                "--network=none",
                "--name",
                "long",
                &app,
                "sleep",
                "1000",
            ],
        );
        assert!(run.status.success(), "{run:?}");
        let inspect = |store: &ServedStore, what: &str| {
            let out = store
                .podman_cmd(&podman)
                .args(["inspect", "long", "--format", what])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let state0 = inspect(&store, "{{.State.Status}} {{.State.Pid}}");
        assert!(state0.starts_with("running "), "{state0}");
        let merged = stack.host_view(std::path::Path::new(&inspect(
            &store,
            "{{.GraphDriver.Data.MergedDir}}",
        )));
        store.restart_unwaited(false);
        store.wait_for_lines("waiting for credentials for ", 2);
        assert!(
            !mounts_below(store.als.path()).is_empty(),
            "the waiting root was cleared: {}",
            store.output()
        );
        assert_eq!(inspect(&store, "{{.State.Status}} {{.State.Pid}}"), state0);
        let pulled = pm(&store, "alice:alice-pw-1", &["pull", "-q", &app]);
        assert!(pulled.status.success(), "{pulled:?}");
        store.wait_for_lines(&format!("serving {app} (credentials arrived)"), 2);
        let base_fs = stored_layer(opt.path(), &src_layers[0]).join("fs");
        let f = &files_to_read(&base_fs)[0];
        assert!(
            std::fs::read(merged.join(f)).unwrap() == std::fs::read(base_fs.join(f)).unwrap(),
            "{f} through the root taken over"
        );
        assert_eq!(inspect(&store, "{{.State.Status}} {{.State.Pid}}"), state0);
        let rm = store
            .podman_cmd(&podman)
            .args(["rm", "-f", "-t", "0", "long"])
            .output()
            .unwrap();
        assert!(rm.status.success(), "{rm:?}");
    }
    assert!(!store.output().contains("alice-pw-1"));
}

/// Podman pulls the optimized image's manifest and config only, and runs
/// it from the store's lazy root. Podman 5 asks the store for a layer only
/// by the TOC digest its descriptor carries, which `lazylayer optimize`
/// writes. Podman 5.8 keeps no record of a layer from the store past the
/// process that pulled it (docs/podman.md): its `run` pulls again, manifest
/// and config, hence `--tls-verify=false` there too.
fn root_podman_runs_an_optimized_image_lazily_through_the_layer_store(stack: Stack) {
    if !stack.ready("root_podman_runs_an_optimized_image_lazily_through_the_layer_store") {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let (opt, src, dst) = optimize_image(&reg, "python3", &[]);
    let (_, layers) = layer_digests(opt.path(), &src);
    let before: Vec<usize> = layers.iter().map(|d| reg.blob_gets(d)).collect();

    let store = ServedStore::start_on(stack, &dst, &["--prefetch", "off"]);
    let podman = Podman::on(stack);
    let pm = |args: &[&str]| store.podman(&podman, args);
    pm(&["pull", "-q", "--tls-verify=false", &dst]);
    let out = pm(&["run", "--rm", "--network=none", "--tls-verify=false", &dst]);
    assert_eq!(
        out, "ok\n",
        "podman ran the image's own command on the lazy root"
    );
    for (d, b) in layers.iter().zip(&before) {
        assert_eq!(
            reg.blob_gets(d),
            *b,
            "layer {d} was downloaded; podman should have used the layer store"
        );
    }
    // A file outside the boot layer still reads (fetched on demand by the store).
    let out = pm(&[
        "run",
        "--rm",
        "--network=none",
        "--tls-verify=false",
        &dst,
        "python3",
        "-c",
        "import sqlite3; print('sql')",
    ]);
    assert_eq!(out, "sql\n");

    // Stopping the store undoes everything it set up.
    let als = store.stop();
    assert!(
        tree_listing(als.path()).is_empty(),
        "layer store entries left: {:?}",
        tree_listing(als.path())
    );
}

/// The store prefetches an image's other layers only once the start has
/// settled, as `run` and the snapshotter do, not when it mounts the image:
/// before any container touches the root there is no activity for the quiet
/// trigger, so the prefetch waits for `PREFETCH_MAX_WAIT` (2 s) after the
/// mount. The registry (behind a recording proxy) sees the first GET of an
/// original layer only then; podman still pulls and runs the image, and the
/// image is recorded in the store once every layer is local.
fn root_podman_store_prefetches_only_after_the_start_settles(stack: Stack) {
    if !stack.ready("root_podman_store_prefetches_only_after_the_start_settles") {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["multilayer"]);
    let (opt, src, dst) = optimize_image(&reg, "multilayer", &[]);
    let (_, layers) = layer_digests(opt.path(), &src);
    let proxy = common::proxy::CuttingProxy::relay(reg.port);
    let img = dst.replace(&reg.addr(), &format!("127.0.0.1:{}", proxy.port));
    let original_gets = || {
        let text = proxy.requests_text();
        layers
            .iter()
            .filter(|d| text.contains(&format!("get /v2/optimized/multilayer/blobs/{d}")))
            .count()
    };

    let store = ServedStore::start_on(stack, &img, &[]);
    let ready = store.ready;
    // Nothing touches the root: the first original-layer GET comes with the
    // max-wait trigger, 2 s after the mount (the mount precedes `ready`).
    while original_gets() == 0 {
        assert!(
            ready.elapsed() < Duration::from_secs(20),
            "no prefetch at all within 20 s: {}",
            proxy.requests_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = ready.elapsed();
    eprintln!("first GET of an original layer {first:?} after the store was ready");
    assert!(
        first >= Duration::from_millis(1500),
        "the store started prefetching {first:?} after it was ready, before its start could settle"
    );

    let podman = Podman::on(stack);
    let pm = |args: &[&str]| store.podman(&podman, args);
    pm(&["pull", "-q", "--tls-verify=false", &img]);
    let out = pm(&[
        "run",
        "--rm",
        "--network=none",
        &img,
        "cat",
        "/data/keep/a.txt",
    ]);
    assert!(!out.is_empty(), "podman ran the image on the lazy root");
    // Once every layer has arrived the image is recorded in the store, while
    // the store still serves it (not only when it stops).
    let recorded = || {
        let v = lazylayer_json(store.root.path(), &["images"]);
        let refs: Vec<String> = (v.as_array().unwrap().iter())
            .map(|i| i["reference"].as_str().unwrap_or_default().to_string())
            .collect();
        refs.iter().any(|r| r.starts_with(&img))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !recorded() {
        assert!(
            Instant::now() < deadline,
            "the image was not recorded once prefetched"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    store.stop();
}

/// A running Podman container of a lazy image keeps its file system while
/// `lazylayer store` is killed (SIGKILL) and restarted, or upgraded
/// (SIGTERM, then a new one), 20 times, alternating: a read waiting for the
/// streaming base layer when the store dies completes with the right bytes,
/// later first reads and listings work, the container is never stopped,
/// and neither mounts nor the holder's descriptors or memory grow.
fn root_podman_store_restarts_keep_a_running_container_serving(stack: Stack) {
    if !stack.ready("root_podman_store_restarts_keep_a_running_container_serving") {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let (opt, _src, dst) = optimize_image(&reg, "python3", &[]);
    let (_, layers) = layer_digests(opt.path(), &dst);
    let proxy = common::proxy::CuttingProxy::relay(reg.port);
    // 200 kB/s until the first read across a crash is done: a lazy read now
    // fetches its own range of the layer (its seek index), and at 1 MB/s a
    // file's compressed range could arrive within the test's wait.
    *proxy.slow_blob.lock().unwrap() = (layers[0].clone(), 200_000);
    let img = dst.replace(&reg.addr(), &format!("127.0.0.1:{}", proxy.port));
    let base_fs = stored_layer(opt.path(), &layers[0]).join("fs");
    let files = files_to_read(&base_fs);
    assert!(files.len() > 25, "{} files", files.len());

    let mut store = ServedStore::start_on(stack, &img, &[]);
    let podman = Podman::on(stack);
    let pm = |store: &ServedStore, args: &[&str]| store.podman(&podman, args);
    pm(&store, &["pull", "-q", "--tls-verify=false", &img]);
    pm(
        &store,
        &[
            "run",
            "-d",
            "--network=none",
            "--name",
            "long",
            &img,
            "sleep",
            "1000",
        ],
    );
    let state = |store: &ServedStore| {
        pm(
            store,
            &[
                "inspect",
                "long",
                "--format",
                "{{.State.Status}} {{.State.Pid}}",
            ],
        )
        .trim()
        .to_string()
    };
    let state0 = state(&store);
    assert!(state0.starts_with("running "), "{state0}");
    let merged = stack.host_view(std::path::Path::new(
        pm(
            &store,
            &[
                "inspect",
                "long",
                "--format",
                "{{.GraphDriver.Data.MergedDir}}",
            ],
        )
        .trim(),
    ));
    let expect = |f: &str| std::fs::read(base_fs.join(f)).unwrap();
    let read_in_thread = |f: &str| {
        let p = merged.join(f);
        std::thread::spawn(move || std::fs::read(p))
    };
    let check_alive = |store: &ServedStore, when: &str| {
        assert_eq!(state(store), state0, "the container after {when}");
        let n = std::fs::read_dir(merged.join("usr/lib")).unwrap().count();
        assert!(n > 10, "ls /usr/lib after {when}: {n} entries");
    };

    // SIGKILL while a first read waits for the base layer: of its last big
    // file, the latest the prefetch streaming the layer in order brings (it
    // runs from the first quiet moment, and Podman 5.8's `run` pulls again
    // first), and a range of its own too large for the wait at 200 kB/s.
    let late = last_big_file_of_layer(opt.path(), &layers[0], 3 << 20);
    let waiting = read_in_thread(&late);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !waiting.is_finished(),
        "the read of {late} must still be waiting for the layer: {:?}",
        waiting.join().map(|r| r.map(|b| b.len()))
    );
    store.restart(false, 2);
    assert!(waiting.join().unwrap().expect("read across the crash") == expect(&late));
    *proxy.slow_blob.lock().unwrap() = (layers[0].clone(), 1_000_000);
    check_alive(&store, "a SIGKILL");
    // An upgrade while a read waits.
    let r = read_in_thread(&files[0]);
    std::thread::sleep(Duration::from_millis(200));
    store.restart(true, 3);
    assert!(r.join().unwrap().expect("read across the upgrade") == expect(&files[0]));
    check_alive(&store, "an upgrade");

    let holder = store.holder_pid().expect("a holder runs");
    let (store_root, als) = (
        store.root.path().to_path_buf(),
        store.als.path().to_path_buf(),
    );
    let count_mounts = || mounts_below(&store_root).len() + mounts_below(&als).len();
    let mut figures = lazylayer_testsupport::RestartFigures::new(count_mounts(), holder);
    for k in 0..20 {
        store.restart(k % 2 == 1, 4 + k);
        let f = &files[1 + k];
        let got = read_in_thread(f).join().unwrap();
        assert!(
            got.unwrap_or_else(|e| panic!("{f} after restart {k}: {e}")) == expect(f),
            "{f}"
        );
        check_alive(&store, &format!("restart {k}"));
        figures.record(k, count_mounts(), store.holder_pid(), store.process.0.id());
    }
    figures.check("store");

    // With the container gone, a graceful stop removes everything.
    pm(&store, &["rm", "-f", "-t", "0", "long"]);
    let als = store.stop();
    assert!(
        tree_listing(als.path()).is_empty(),
        "{:?}",
        tree_listing(als.path())
    );
}

/// FUSE mounts at or below `dir` (mount points).
fn fuse_mounts_below(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[2].starts_with("fuse") && std::path::Path::new(f[1]).starts_with(dir))
                .then(|| f[1].to_string())
        })
        .collect()
}

/// An optimized image the lazylayer store holds whole is laid out from the
/// store's extracted layers: no FUSE mount, Podman stacks them itself, the
/// root lists and reads the same as the lazy one and has no index file.
fn root_podman_runs_an_image_local_whole_on_the_stores_layers_without_fuse(stack: Stack) {
    if !stack.ready("root_podman_runs_an_image_local_whole_on_the_stores_layers_without_fuse") {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let (_opt, _src, dst) = optimize_image(&reg, "python3", &[]);
    // The image's files (podman's own /proc, /sys, /dev, /run and the
    // per-container /etc files left out): type, mode, owner, file sizes,
    // the bytes of /app and /usr/bin, and whether the index shows.
    let skip = "\\( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /etc/hosts \
                -o -path /etc/hostname -o -path /etc/resolv.conf \\) -prune -o";
    let script = format!(
        "find / -xdev {skip} -printf '%p %y %m %U %G\\n' | sort; \
         find / -xdev {skip} -type f -printf '%p %s\\n' | sort | md5sum; \
         cat /app/* /usr/bin/* | md5sum; ls -a / | grep -c lazylayer; true"
    );
    let podman = Podman::on(stack);
    let run = |store: &ServedStore| {
        store.podman(&podman, &["pull", "-q", "--tls-verify=false", &dst]);
        let out = store.podman(
            &podman,
            &["run", "--rm", "--network=none", &dst, "sh", "-c", &script],
        );
        // Podman's record of these layers goes with this store's layout.
        store.podman(&podman, &["rmi", "-a", "-f"]);
        out
    };

    let lazy_store = ServedStore::start_on(stack, &dst, &["--prefetch", "off"]);
    assert!(!fuse_mounts_below(lazy_store.root.path()).is_empty());
    let lazy = run(&lazy_store);
    lazy_store.stop();

    let root = stack.tempdir();
    lazylayer_ok(root.path(), &["pull", "-q", &dst]);
    let store = ServedStore::start_in_dirs(root, stack.tempdir(), &dst, &[]);
    assert_eq!(
        fuse_mounts_below(store.root.path()),
        Vec::<String>::new(),
        "no FUSE for an image local whole"
    );
    // One mount per layer's diff: the store's layers (the boot one under the
    // index mask), nothing mounted as the whole image.
    let (_, layers) = layer_digests(store.root.path(), &dst);
    assert_eq!(mounts_below(store.als.path()).len(), layers.len());
    let native = run(&store);
    assert_eq!(native, lazy, "the native root differs from the lazy one");
    assert!(native.ends_with("\n0\n"), "the index file shows: {native}");
    store.stop();
}
