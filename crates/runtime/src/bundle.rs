//! Image config + run options -> an OCI runtime bundle (`config.json`), with the
//! defaults docker and podman apply.

use std::path::{Path, PathBuf};

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capabilities, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Mount, MountBuilder,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};
use oci_spec::OciSpecError;

use crate::user::resolve_user;
use crate::RuntimeError;

/// What to run, and how: the input of [`write_bundle`].
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Container id: `[A-Za-z0-9][A-Za-z0-9_.-]*`.
    pub id: String,
    /// An already-prepared root file system (e.g. an overlay mount).
    pub rootfs: PathBuf,
    pub image_config: ImageConfiguration,
    /// Replaces the image's Cmd; its Entrypoint is kept (as `docker run IMAGE ARGS`).
    pub args: Option<Vec<String>>,
    /// Replaces the image's Entrypoint and drops its Cmd (as `docker run --entrypoint`).
    pub entrypoint: Option<Vec<String>>,
    /// `K=V` added to or overriding the image's Env; a bare `K` takes our own value of K.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// Replaces the image's User.
    pub user: Option<String>,
    pub network: NetworkMode,
    /// Defaults to the container id.
    pub hostname: Option<String>,
    /// Give the process a pty. `runc run` in the foreground ties it to our own
    /// controlling terminal (/dev/tty), so this is for interactive use from a tty only.
    pub terminal: bool,
    pub readonly_rootfs: bool,
}

impl RunSpec {
    /// A spec that runs the image as its config says, with no network.
    pub fn new(
        id: impl Into<String>,
        rootfs: impl Into<PathBuf>,
        image_config: ImageConfiguration,
    ) -> Self {
        RunSpec {
            id: id.into(),
            rootfs: rootfs.into(),
            image_config,
            args: None,
            entrypoint: None,
            env: Vec::new(),
            workdir: None,
            user: None,
            network: NetworkMode::None,
            hostname: None,
            terminal: false,
            readonly_rootfs: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// A new network namespace holding only `lo`.
    #[default]
    None,
    /// The host's network namespace.
    Host,
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's default capability set (moby `oci/caps/defaults.go`).
const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Checks a container id against `[A-Za-z0-9][A-Za-z0-9_.-]*` (what runc accepts, and
/// safe as a file and cgroup name).
pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let invalid = |reason| {
        Err(RuntimeError::InvalidId {
            id: id.to_owned(),
            reason,
        })
    };
    let mut bytes = id.bytes();
    match bytes.next() {
        None => return invalid("empty"),
        Some(b) if !b.is_ascii_alphanumeric() => {
            return invalid("must start with a letter or digit")
        }
        Some(_) => {}
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-') {
        return invalid("only letters, digits, '_', '.' and '-' are allowed");
    }
    if id.len() > 255 {
        return invalid("longer than 255 bytes");
    }
    Ok(())
}

/// Writes `bundle_dir/config.json` for `spec`; `root.path` is `spec.rootfs` made
/// absolute, so the bundle needs no `rootfs` directory of its own.
pub fn write_bundle(spec: &RunSpec, bundle_dir: &Path) -> Result<(), RuntimeError> {
    let config = runtime_spec(spec)?;
    std::fs::create_dir_all(bundle_dir)
        .map_err(|e| RuntimeError::io("create bundle directory", bundle_dir, e))?;
    let path = bundle_dir.join("config.json");
    let text = serde_json::to_vec_pretty(&config).map_err(|e| RuntimeError::Config {
        id: spec.id.clone(),
        reason: format!("config.json does not serialize: {e}"),
    })?;
    std::fs::write(&path, text).map_err(|e| RuntimeError::io("write", path, e))
}

/// The OCI runtime config for `spec`, as the JSON value written to config.json.
#[cfg(test)]
pub(crate) fn runtime_config(spec: &RunSpec) -> Result<serde_json::Value, RuntimeError> {
    let config = runtime_spec(spec)?;
    Ok(serde_json::to_value(config).expect("a runtime spec serializes"))
}

/// The OCI runtime config for `spec`.
pub(crate) fn runtime_spec(spec: &RunSpec) -> Result<Spec, RuntimeError> {
    validate_id(&spec.id)?;
    let id = spec.id.as_str();
    let config_err = |reason: String| RuntimeError::Config {
        id: id.to_owned(),
        reason,
    };
    // A builder refuses only a field it requires and we always set.
    let spec_err = |e: OciSpecError| RuntimeError::Config {
        id: id.to_owned(),
        reason: format!("runtime spec: {e}"),
    };
    let image = spec.image_config.config().as_ref();

    let args = process_args(
        image.and_then(|c| c.entrypoint().as_deref()),
        image.and_then(|c| c.cmd().as_deref()),
        spec.entrypoint.as_deref(),
        spec.args.as_deref(),
    );
    if args.is_empty() {
        return Err(config_err("image has no command; pass one".to_owned()));
    }

    let cwd = spec
        .workdir
        .as_deref()
        .or(image.and_then(|c| c.working_dir().as_deref()))
        .filter(|w| !w.is_empty())
        .unwrap_or("/");
    if !cwd.starts_with('/') {
        return Err(config_err(format!(
            "working directory {cwd:?} is not absolute"
        )));
    }

    let rootfs = std::path::absolute(&spec.rootfs)
        .map_err(|e| RuntimeError::io("resolve rootfs", &spec.rootfs, e))?;
    if !rootfs.is_dir() {
        return Err(config_err(format!(
            "rootfs {} is not a directory",
            rootfs.display()
        )));
    }

    let user_str = spec
        .user
        .as_deref()
        .or(image.and_then(|c| c.user().as_deref()))
        .unwrap_or("");
    let user = resolve_user(id, &rootfs, user_str)?;

    let hostname = spec.hostname.clone().unwrap_or_else(|| {
        // A hostname is at most 64 bytes; ids are ASCII so the cut is on a char boundary.
        id.chars().take(63).collect()
    });

    let mut env = merge_env(
        image.and_then(|c| c.env().as_deref()).unwrap_or_default(),
        &spec.env,
    )
    .map_err(config_err)?;
    let mut default_env = |entry: String| {
        let key = entry.split('=').next().unwrap_or_default();
        if !env.iter().any(|e| e.split('=').next() == Some(key)) {
            env.push(entry);
        }
    };
    default_env(DEFAULT_PATH.to_owned());
    default_env(format!("HOSTNAME={hostname}"));
    default_env(format!("HOME={}", user.home));
    if spec.terminal {
        default_env("TERM=xterm".to_owned());
    }

    // As docker: a non-root process keeps the bounding set (so setuid binaries work)
    // but starts with no effective or permitted capabilities.
    let all_caps: Capabilities = DEFAULT_CAPABILITIES.iter().copied().collect();
    let active_caps: Capabilities = if user.uid == 0 {
        all_caps.clone()
    } else {
        Capabilities::new()
    };

    // Root cannot raise rlimits here, so asking for more than we hold makes runc fail;
    // ask for exactly our hard limit, which every container may then use in full.
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(1 << 20);

    let mut namespace_types = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if spec.network == NetworkMode::None {
        namespace_types.push(LinuxNamespaceType::Network);
    }
    let namespaces = namespace_types
        .into_iter()
        .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(spec_err)?;

    let mut mounts = vec![
        mount("/proc", "proc", "proc", &[]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
    ];
    // Sharing the host's network makes its resolver the right one; in an empty netns
    // there is nothing to resolve with, so the image's own file stays.
    if spec.network == NetworkMode::Host && Path::new("/etc/resolv.conf").exists() {
        mounts.push(mount(
            "/etc/resolv.conf",
            "bind",
            "/etc/resolv.conf",
            &["rbind", "ro", "nosuid", "nodev", "noexec"],
        ));
    }
    let mounts = mounts
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(spec_err)?;

    let mut capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(all_caps)
        .effective(active_caps.clone())
        .permitted(active_caps)
        .build()
        .map_err(spec_err)?;
    // The builder starts from oci-spec's defaults, which give every process three
    // ambient and inheritable capabilities; docker gives none, and neither did we.
    capabilities.set_ambient(None);
    capabilities.set_inheritable(None);

    let process = ProcessBuilder::default()
        .terminal(spec.terminal)
        .user(
            UserBuilder::default()
                .uid(user.uid)
                .gid(user.gid)
                .additional_gids(user.additional_gids)
                .build()
                .map_err(spec_err)?,
        )
        .args(args)
        .env(env)
        .cwd(cwd)
        .capabilities(capabilities)
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .hard(nofile)
            .soft(nofile)
            .build()
            .map_err(spec_err)?])
        .no_new_privileges(false)
        .build()
        .map_err(spec_err)?;

    let linux = LinuxBuilder::default()
        // No cgroup namespace: runc then shows the container only its own cgroups
        // through the /sys/fs/cgroup bind mounts it makes.
        .cgroups_path(PathBuf::from(format!("/lazylayer/{id}")))
        .resources(
            LinuxResourcesBuilder::default()
                .devices(vec![LinuxDeviceCgroupBuilder::default()
                    .allow(false)
                    .access("rwm")
                    .build()
                    .map_err(spec_err)?])
                .build()
                .map_err(spec_err)?,
        )
        .namespaces(namespaces)
        .masked_paths(strings(&[
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/sys/firmware",
            "/proc/scsi",
        ]))
        .readonly_paths(strings(&[
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ]))
        .build()
        .map_err(spec_err)?;

    let mut config = SpecBuilder::default()
        .version("1.0.2-dev")
        .process(process)
        .root(
            RootBuilder::default()
                .path(rootfs)
                .readonly(spec.readonly_rootfs)
                .build()
                .map_err(spec_err)?,
        )
        .hostname(hostname)
        .mounts(mounts)
        .linux(linux)
        .build()
        .map_err(spec_err)?;
    // The builder starts from `Spec::default()`, which adds an empty annotations map
    // that the config never had.
    config.set_annotations(None);
    Ok(config)
}

/// One entry of the config's `mounts`.
fn mount(
    destination: &str,
    typ: &str,
    source: &str,
    options: &[&str],
) -> Result<Mount, OciSpecError> {
    let builder = MountBuilder::default()
        .destination(destination)
        .typ(typ)
        .source(source);
    if options.is_empty() {
        builder.build()
    } else {
        builder.options(strings(options)).build()
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Entrypoint + Cmd with docker's override rules.
fn process_args(
    image_entrypoint: Option<&[String]>,
    image_cmd: Option<&[String]>,
    entrypoint: Option<&[String]>,
    args: Option<&[String]>,
) -> Vec<String> {
    let entry = entrypoint.or(image_entrypoint).unwrap_or_default();
    // A new entrypoint makes the image's Cmd meaningless: it was written for the old one.
    let cmd = match (args, entrypoint) {
        (Some(args), _) => args,
        (None, Some(_)) => &[],
        (None, None) => image_cmd.unwrap_or_default(),
    };
    entry.iter().chain(cmd).cloned().collect()
}

/// The image's Env with `overrides` applied by variable name, in the image's order.
fn merge_env(image: &[String], overrides: &[String]) -> Result<Vec<String>, String> {
    let name = |e: &str| e.split('=').next().unwrap_or_default().to_owned();
    // Entries without '=' are invalid in an image config, and runc would refuse them.
    let mut env: Vec<String> = image.iter().filter(|e| e.contains('=')).cloned().collect();
    for entry in overrides {
        let entry = if entry.contains('=') {
            entry.clone()
        } else {
            match std::env::var(entry) {
                Ok(value) => format!("{entry}={value}"),
                Err(_) => continue,
            }
        };
        let key = name(&entry);
        if key.is_empty() {
            return Err(format!("environment entry {entry:?} has no name"));
        }
        match env.iter_mut().find(|e| name(e) == key) {
            Some(existing) => *existing = entry,
            None => env.push(entry),
        }
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};
    use serde_json::{json, Value};

    #[test]
    fn ids() {
        for ok in ["a", "A1", "0abc", "web_1.two-3"] {
            validate_id(ok).unwrap();
        }
        for bad in ["", "-a", ".a", "a/b", "a b", "ä", "../x"] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_id(&"a".repeat(256)).is_err());
    }

    #[test]
    fn args_follow_docker_rules() {
        let ep = strings(&["/entry"]);
        let cmd = strings(&["default"]);
        let args = strings(&["given"]);
        let new_ep = strings(&["/other"]);
        assert_eq!(
            process_args(Some(&ep), Some(&cmd), None, None),
            ["/entry", "default"]
        );
        assert_eq!(
            process_args(Some(&ep), Some(&cmd), None, Some(&args)),
            ["/entry", "given"]
        );
        assert_eq!(
            process_args(Some(&ep), Some(&cmd), Some(&new_ep), None),
            ["/other"]
        );
        assert_eq!(
            process_args(Some(&ep), Some(&cmd), Some(&new_ep), Some(&args)),
            ["/other", "given"]
        );
        // An empty entrypoint override clears the image's.
        assert_eq!(
            process_args(Some(&ep), Some(&cmd), Some(&[]), Some(&args)),
            ["given"]
        );
        assert!(process_args(None, None, None, None).is_empty());
    }

    #[test]
    fn env_overrides_by_name_in_place() {
        let image = strings(&["A=1", "PATH=/x", "broken", "B=2"]);
        let env = merge_env(&image, &strings(&["B=3", "C=4", "A=1=1"])).unwrap();
        assert_eq!(env, ["A=1=1", "PATH=/x", "B=3", "C=4"]);
        assert!(merge_env(&[], &strings(&["=x"])).is_err());
    }

    fn config_for(cmd: Option<&[&str]>, user: Option<&str>) -> (tempfile::TempDir, RunSpec) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "app:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        let mut c = ConfigBuilder::default().env(strings(&["FOO=image"]));
        if let Some(cmd) = cmd {
            c = c.cmd(strings(cmd));
        }
        if let Some(user) = user {
            c = c.user(user.to_owned());
        }
        let image = ImageConfigurationBuilder::default()
            .config(c.build().unwrap())
            .build()
            .unwrap();
        let spec = RunSpec::new("c1", dir.path(), image);
        (dir, spec)
    }

    #[test]
    fn config_has_defaults_and_resolved_user() {
        let (_dir, mut spec) = config_for(Some(&["run"]), Some("app"));
        spec.env.push("FOO=override".into());
        let v = runtime_config(&spec).unwrap();
        let p = &v["process"];
        assert_eq!(p["args"], json!(["run"]));
        assert_eq!(p["cwd"], "/");
        assert_eq!(p["user"]["uid"], 1000);
        let env: Vec<&str> = p["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert!(
            env.contains(&"FOO=override") && !env.contains(&"FOO=image"),
            "{env:?}"
        );
        assert!(env.contains(&"HOME=/home/app"), "{env:?}");
        assert!(env.iter().any(|e| e.starts_with("PATH=")), "{env:?}");
        // Non-root: no effective capabilities, bounding kept.
        assert_eq!(p["capabilities"]["effective"], json!([]));
        assert_eq!(p["capabilities"]["bounding"].as_array().unwrap().len(), 14);
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
        assert_eq!(p["rlimits"][0]["hard"].as_u64(), hard);
        assert_eq!(v["linux"]["cgroupsPath"], "/lazylayer/c1");
        let ns: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(ns.contains(&"network") && !ns.contains(&"user") && !ns.contains(&"cgroup"));
        spec.network = NetworkMode::Host;
        let v = runtime_config(&spec).unwrap();
        assert!(!v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["type"] == "network"));
    }

    /// A rootfs with a passwd and group file, for the golden configs.
    fn golden_rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\napp:x:1000:\nextra:x:2000:app\n",
        )
        .unwrap();
        dir
    }

    /// The representative inputs whose config.json is kept under tests/golden/:
    /// (file name, spec).
    fn golden_cases(rootfs: &Path) -> Vec<(&'static str, RunSpec)> {
        let image = |c: ConfigBuilder| {
            ImageConfigurationBuilder::default()
                .config(c.build().unwrap())
                .build()
                .unwrap()
        };
        // An image config as a real one looks: user, env, cwd, entrypoint and cmd.
        let full = || {
            ConfigBuilder::default()
                .user("app".to_owned())
                .env(strings(&[
                    "FOO=image",
                    "PATH=/opt/bin:/usr/bin",
                    "LANG=C.UTF-8",
                ]))
                .working_dir("/srv".to_owned())
                .entrypoint(strings(&["/usr/bin/python3", "-u"]))
                .cmd(strings(&["/app/hello.py"]))
        };
        let image_defaults = RunSpec::new("lazy-1", rootfs, image(full()));

        // Everything the caller may override, as root, read-only, on the host network.
        let mut overridden = RunSpec::new("local_2.x", rootfs, image(full()));
        overridden.args = Some(strings(&["-c", "print(1)"]));
        overridden.entrypoint = Some(strings(&["/usr/bin/python3"]));
        overridden.env = strings(&["FOO=given", "NEW=1"]);
        overridden.workdir = Some("/tmp".to_owned());
        overridden.user = Some("0:0".to_owned());
        overridden.network = NetworkMode::Host;
        overridden.hostname = Some("box".to_owned());
        overridden.terminal = true;
        overridden.readonly_rootfs = true;

        // A bare image: cmd only, no user (root), no env, no cwd.
        let bare = RunSpec::new(
            "bare",
            rootfs,
            image(ConfigBuilder::default().cmd(strings(&["/bin/sh"]))),
        );

        // A numeric user with a named group and supplementary groups from /etc/group.
        let mut grouped = RunSpec::new("grouped", rootfs, image(full()));
        grouped.user = Some("1000:extra".to_owned());
        grouped.entrypoint = Some(Vec::new());
        grouped.args = Some(strings(&["id"]));

        vec![
            ("image_defaults.json", image_defaults),
            ("overridden_readonly_host.json", overridden),
            ("bare_root.json", bare),
            ("numeric_user_group.json", grouped),
        ]
    }

    /// The config with what depends on the machine or the run replaced by markers:
    /// the rootfs path (a tempdir) and the NOFILE hard limit (this process's own).
    fn normalized(mut config: Value) -> Value {
        config["root"]["path"] = json!("ROOTFS");
        for rlimit in config["process"]["rlimits"].as_array_mut().unwrap() {
            if rlimit["type"] == "RLIMIT_NOFILE" {
                rlimit["hard"] = json!("NOFILE_HARD");
                rlimit["soft"] = json!("NOFILE_HARD");
            }
        }
        // Capability lists are sets to runc; oci-spec holds them in a HashSet, so
        // their order in config.json is arbitrary.
        for set in ["bounding", "effective", "permitted"] {
            if let Some(caps) = config["process"]["capabilities"][set].as_array_mut() {
                caps.sort_by_key(|c| c.as_str().map(str::to_owned));
            }
        }
        // The host's resolver is bound in only where the host has one.
        if let Some(mounts) = config["mounts"].as_array_mut() {
            mounts.retain(|m| m["destination"] != "/etc/resolv.conf");
        }
        config
    }

    /// config.json for representative inputs equals the kept golden files (as JSON
    /// values, so key order and whitespace do not matter). `LAZYLAYER_BLESS=1`
    /// rewrites them; review the diff before committing one.
    #[test]
    fn config_matches_golden_files() {
        let rootfs = golden_rootfs();
        let golden_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
        let bless = std::env::var_os("LAZYLAYER_BLESS").is_some();
        for (name, spec) in golden_cases(rootfs.path()) {
            let config = runtime_config(&spec).unwrap();
            // Only the host network case binds the resolver, and only where it exists.
            let resolv = config["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["destination"] == "/etc/resolv.conf");
            assert_eq!(
                resolv,
                spec.network == NetworkMode::Host && Path::new("/etc/resolv.conf").exists(),
                "{name}"
            );
            assert_eq!(
                config["root"]["path"],
                json!(rootfs.path()),
                "{name}: root.path is the absolute rootfs"
            );
            let actual = normalized(config);
            let path = golden_dir.join(name);
            if bless {
                std::fs::create_dir_all(&golden_dir).unwrap();
                let mut text = serde_json::to_string_pretty(&actual).unwrap();
                text.push('\n');
                std::fs::write(&path, text).unwrap();
                continue;
            }
            let expected: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            assert_eq!(actual, expected, "{name} differs from {}", path.display());
        }
    }

    /// The written config.json is what runc reads: it loads back as an OCI
    /// runtime spec equal to the one built, with root.path the absolute rootfs.
    #[test]
    fn write_bundle_writes_a_spec_that_loads_back() {
        let rootfs = golden_rootfs();
        let bundles = tempfile::tempdir().unwrap();
        for (name, spec) in golden_cases(rootfs.path()) {
            let bundle = bundles.path().join(name.trim_end_matches(".json"));
            write_bundle(&spec, &bundle).unwrap();
            let loaded = Spec::load(bundle.join("config.json")).unwrap();
            assert_eq!(loaded, runtime_spec(&spec).unwrap(), "{name}");
            assert_eq!(
                loaded.root().as_ref().unwrap().path(),
                rootfs.path(),
                "{name}"
            );
        }
    }

    #[test]
    fn config_errors_name_the_container() {
        let (_dir, spec) = config_for(None, None);
        let e = runtime_config(&spec).unwrap_err().to_string();
        assert!(
            e.contains("c1") && e.contains("image has no command; pass one"),
            "{e}"
        );
        let (_dir, mut spec) = config_for(Some(&["x"]), None);
        spec.workdir = Some("rel".into());
        assert!(runtime_config(&spec)
            .unwrap_err()
            .to_string()
            .contains("not absolute"));
        spec.workdir = None;
        spec.user = Some("ghost".into());
        let e = runtime_config(&spec).unwrap_err().to_string();
        assert!(e.contains("ghost"), "{e}");
    }
}
