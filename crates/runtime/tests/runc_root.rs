//! Real containers with real runc on a busybox root file system. Needs root.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{have_root, image_with, spec, TestEnv};
use lazylayer_runtime::{
    mounts_below, wait_ready, write_bundle, Container, ContainerBuilder, Readiness, RunSpec,
    RunningContainer, RuntimeError, Stdio, WaitCondition,
};

/// Writes the bundle and starts it with piped output.
fn start(env: &TestEnv, spec: &RunSpec, name: &str) -> Container {
    let bundle = env.bundle(name);
    write_bundle(spec, &bundle).unwrap();
    env.runc.start(&spec.id, &bundle, Stdio::Piped).unwrap()
}

/// Runs to completion: (exit code, stdout, stderr).
fn run(env: &TestEnv, spec: &RunSpec, name: &str) -> (i32, String, String) {
    let mut c = start(env, spec, name);
    let (mut out, mut err) = (String::new(), String::new());
    let mut stderr = c.take_stderr().unwrap();
    // Drained on a thread so neither pipe can fill up and stall the container.
    let err_reader = std::thread::spawn(move || {
        stderr.read_to_string(&mut err).unwrap();
        err
    });
    c.take_stdout().unwrap().read_to_string(&mut out).unwrap();
    let code = c.wait().unwrap();
    (code, out, err_reader.join().unwrap())
}

#[test]
fn root_echo_prints_and_exits_zero() {
    if !have_root("root_echo_prints_and_exits_zero") {
        return;
    }
    let env = TestEnv::new();
    let (code, out, err) = run(&env, &spec(&env, "echo", &["echo", "hello"]), "echo");
    assert_eq!((code, out.as_str()), (0, "hello\n"), "stderr: {err}");
    assert!(env.runc_list().is_empty());
}

#[test]
fn root_exit_code_is_returned() {
    if !have_root("root_exit_code_is_returned") {
        return;
    }
    let env = TestEnv::new();
    let (code, _, err) = run(&env, &spec(&env, "exit7", &["sh", "-c", "exit 7"]), "exit7");
    assert_eq!(code, 7, "stderr: {err}");
}

#[test]
fn root_env_workdir_and_args_overrides() {
    if !have_root("root_env_workdir_and_args_overrides") {
        return;
    }
    let env = TestEnv::new();
    let image = image_with(&["echo", "image cmd"], |c| {
        c.entrypoint(vec!["sh".to_string(), "-c".to_string()])
            .working_dir("/srv/app".to_string())
            .env(vec!["FOO=image".to_string(), "KEEP=kept".to_string()])
    });
    let mut s = RunSpec::new(TestEnv::id("envwd"), &env.rootfs, image);
    // Replaces Cmd only: the image's `sh -c` entrypoint stays.
    s.args = Some(vec!["echo $FOO $KEEP $BAR; pwd; echo $HOME".to_string()]);
    s.env = vec!["FOO=override".to_string(), "BAR=added".to_string()];
    let (code, out, err) = run(&env, &s, "envwd");
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "override kept added\n/srv/app\n/root\n");

    // An explicit workdir wins over the image's.
    s.id = TestEnv::id("envwd2");
    s.workdir = Some("/tmp".to_string());
    s.args = Some(vec!["pwd".to_string()]);
    let (_, out, _) = run(&env, &s, "envwd2");
    assert_eq!(out, "/tmp\n");
}

#[test]
fn root_user_from_image_passwd_and_groups() {
    if !have_root("root_user_from_image_passwd_and_groups") {
        return;
    }
    let env = TestEnv::new();
    let mut s = spec(
        &env,
        "user",
        &["sh", "-c", "id -u; id -g; id -G; echo $HOME"],
    );
    s.user = Some("app".to_string());
    let (code, out, err) = run(&env, &s, "user");
    assert_eq!(code, 0, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[1], "1000");
    let groups: Vec<&str> = lines[2].split_whitespace().collect();
    assert!(groups.contains(&"2000"), "groups: {groups:?}");
    assert_eq!(lines[3], "/home/app");

    // "uid:group" by name.
    let mut s = spec(&env, "user2", &["sh", "-c", "id -u; id -g"]);
    s.user = Some("1000:extra".to_string());
    let (_, out, _) = run(&env, &s, "user2");
    assert_eq!(out, "1000\n2000\n");
}

#[test]
fn root_unknown_user_fails_before_starting() {
    if !have_root("root_unknown_user_fails_before_starting") {
        return;
    }
    let env = TestEnv::new();
    let mut s = spec(&env, "nouser", &["true"]);
    s.user = Some("ghost".to_string());
    let bundle = env.bundle("nouser");
    let err = write_bundle(&s, &bundle).unwrap_err();
    assert!(matches!(err, RuntimeError::User { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("ghost") && msg.contains(&s.id), "{msg}");
    assert!(!bundle.join("config.json").exists());
    assert!(!env.runc.root.exists() || env.runc_list().is_empty());
}

#[test]
fn root_runc_failure_carries_runc_message() {
    if !have_root("root_runc_failure_carries_runc_message") {
        return;
    }
    let env = TestEnv::new();
    let mut c = start(&env, &spec(&env, "noexec", &["/no/such/binary"]), "noexec");
    let err = c.wait().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RuntimeError::Runc { .. }), "{err:?}");
    assert!(
        msg.contains("/no/such/binary") && msg.contains(c.id()),
        "{msg}"
    );
}

#[test]
fn root_config_rlimits_within_hard_limit() {
    if !have_root("root_config_rlimits_within_hard_limit") {
        return;
    }
    let env = TestEnv::new();
    let s = spec(&env, "rlimit", &["sh", "-c", "ulimit -n; ulimit -Hn"]);
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX);
    write_bundle(&s, &env.bundle("rlimit")).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.bundle("rlimit").join("config.json")).unwrap())
            .unwrap();
    let rlimits = config["process"]["rlimits"].as_array().unwrap();
    assert!(!rlimits.iter().any(|r| r["type"] == "RLIMIT_NPROC"));
    for r in rlimits {
        assert!(r["hard"].as_u64().unwrap() <= hard && r["soft"].as_u64().unwrap() <= hard);
    }
    assert_eq!(config["root"]["path"], env.rootfs.to_str().unwrap());
    // And runc accepts it: the container sees exactly our hard limit.
    let (code, out, err) = run(&env, &s, "rlimit");
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, format!("{hard}\n{hard}\n"));
}

#[test]
fn root_drop_of_running_container_leaves_nothing() {
    if !have_root("root_drop_of_running_container_leaves_nothing") {
        return;
    }
    let env = TestEnv::new();
    let s = spec(&env, "dropme", &["sleep", "30"]);
    let c = start(&env, &s, "dropme");
    let pid = c.pid().expect("running container has a pid");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(env.runc_list(), vec![s.id.clone()]);
    let cgroup = format!("/sys/fs/cgroup/pids/lazylayer/{}", s.id);
    assert!(std::path::Path::new(&cgroup).exists(), "runc made {cgroup}");
    let t = Instant::now();
    drop(c);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "drop took {:?}",
        t.elapsed()
    );
    assert!(env.runc_list().is_empty());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} survived"
    );
    assert!(
        !std::path::Path::new(&cgroup).exists(),
        "{cgroup} left behind"
    );
}

#[test]
fn root_stop_uses_term_then_kill() {
    if !have_root("root_stop_uses_term_then_kill") {
        return;
    }
    let env = TestEnv::new();
    // A PID 1 that handles TERM exits with its own code...
    let s = spec(
        &env,
        "stopterm",
        &[
            "sh",
            "-c",
            "trap 'exit 3' TERM; echo up; while true; do sleep 0.05; done",
        ],
    );
    let mut c = start(&env, &s, "stopterm");
    // Only once the trap is set does TERM mean anything.
    let ready = wait_ready(
        &mut c,
        &WaitCondition::Log("up".into()),
        Duration::from_secs(10),
    );
    assert_eq!(ready.unwrap(), Readiness::Ready);
    assert_eq!(c.stop(Duration::from_secs(10)).unwrap(), 3);

    // ...one without a handler ignores it (PID 1 has no default action) and gets KILL.
    let s = spec(&env, "stopkill", &["sleep", "30"]);
    let mut c = start(&env, &s, "stopkill");
    assert!(c.pid().is_some());
    let t = Instant::now();
    assert_eq!(c.stop(Duration::from_millis(300)).unwrap(), 128 + 9);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(env.runc_list().is_empty());
}

#[test]
fn root_killer_signals_while_another_thread_waits() {
    if !have_root("root_killer_signals_while_another_thread_waits") {
        return;
    }
    let env = TestEnv::new();
    let s = spec(
        &env,
        "killer",
        &[
            "sh",
            "-c",
            "trap 'exit 4' HUP; echo up; while true; do sleep 0.05; done",
        ],
    );
    let mut c = start(&env, &s, "killer");
    let ready = wait_ready(
        &mut c,
        &WaitCondition::Log("up".into()),
        Duration::from_secs(10),
    );
    assert_eq!(ready.unwrap(), Readiness::Ready);
    let killer = c.killer();
    let waiter = std::thread::spawn(move || c.wait().unwrap());
    killer.kill(1).unwrap();
    assert_eq!(waiter.join().unwrap(), 4);
    // Exited: nothing left to signal, not an error; a bad number is.
    killer.kill(9).unwrap();
    assert!(killer.kill(0).is_err());
    // runc's own kill, once, of a container it does not know.
    assert!(env.runc.kill("killer", 9).is_err());
    assert!(env.runc_list().is_empty());
}

#[test]
fn root_ready_on_log_line_then_stop() {
    if !have_root("root_ready_on_log_line_then_stop") {
        return;
    }
    let env = TestEnv::new();
    let s = spec(
        &env,
        "log",
        &["sh", "-c", "sleep 0.3; echo READY; sleep 30"],
    );
    let mut c = start(&env, &s, "log");
    let t = Instant::now();
    let r = wait_ready(
        &mut c,
        &WaitCondition::Log("READY".into()),
        Duration::from_secs(10),
    );
    assert_eq!(r.unwrap(), Readiness::Ready);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "ready before the line: {:?}",
        t.elapsed()
    );
    assert_eq!(c.try_wait().unwrap(), None, "still running after readiness");
    let code = c.stop(Duration::from_millis(200)).unwrap();
    assert_eq!(code, 137);
}

#[test]
fn root_ready_on_port_inside_netns() {
    if !have_root("root_ready_on_port_inside_netns") {
        return;
    }
    let env = TestEnv::new();
    let port = 20000 + (std::process::id() % 20000) as u16;
    let host_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let host_busy = TcpStream::connect_timeout(&host_addr, Duration::from_millis(200)).is_ok();
    let s = spec(&env, "port", &["httpd", "-f", "-p", &port.to_string()]);
    let mut c = start(&env, &s, "port");
    let r = wait_ready(&mut c, &WaitCondition::Port(port), Duration::from_secs(10));
    assert_eq!(r.unwrap(), Readiness::Ready);
    assert_eq!(c.try_wait().unwrap(), None);
    // The listener is in the container's own namespace, not the host's.
    if !host_busy {
        assert!(TcpStream::connect_timeout(&host_addr, Duration::from_millis(200)).is_err());
    }
}

#[test]
fn root_ready_after_time() {
    if !have_root("root_ready_after_time") {
        return;
    }
    let env = TestEnv::new();
    let mut c = start(&env, &spec(&env, "time", &["sleep", "30"]), "time");
    let t = Instant::now();
    let r = wait_ready(
        &mut c,
        &"time:0.3".parse().unwrap(),
        Duration::from_secs(10),
    );
    assert_eq!(r.unwrap(), Readiness::Ready);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}

#[test]
fn root_exit_before_condition_reports_code() {
    if !have_root("root_exit_before_condition_reports_code") {
        return;
    }
    let env = TestEnv::new();
    let mut c = start(
        &env,
        &spec(&env, "early", &["sh", "-c", "sleep 0.2; exit 3"]),
        "early",
    );
    let r = wait_ready(&mut c, &WaitCondition::Port(8080), Duration::from_secs(10));
    assert_eq!(r.unwrap(), Readiness::Exited(3));

    let mut c = start(&env, &spec(&env, "exitc", &["sh", "-c", "exit 5"]), "exitc");
    let r = wait_ready(&mut c, &WaitCondition::Exit, Duration::from_secs(10));
    assert_eq!(r.unwrap(), Readiness::Exited(5));
}

#[test]
fn root_timeout_is_bounded() {
    if !have_root("root_timeout_is_bounded") {
        return;
    }
    let env = TestEnv::new();
    for (name, cond) in [
        ("tport", WaitCondition::Port(9)),
        ("tlog", WaitCondition::Log("never".into())),
        ("texit", WaitCondition::Exit),
    ] {
        let mut c = start(&env, &spec(&env, name, &["sleep", "30"]), name);
        let t = Instant::now();
        let err = wait_ready(&mut c, &cond, Duration::from_millis(500)).unwrap_err();
        let took = t.elapsed();
        assert!(
            matches!(err, RuntimeError::Timeout { .. }),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains(&cond.to_string()), "{err}");
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(2),
            "{name}: {took:?}"
        );
    }
}

#[test]
fn root_terminal_mode_needs_a_controlling_tty() {
    if !have_root("root_terminal_mode_needs_a_controlling_tty") {
        return;
    }
    let env = TestEnv::new();
    let mut s = spec(&env, "tty", &["sh", "-c", "[ -t 1 ] && echo tty $TERM"]);
    s.terminal = true;
    if std::fs::File::open("/dev/tty").is_err() {
        // runc run in the foreground wires the container's pty to *our* /dev/tty.
        let mut c = start(&env, &s, "tty");
        let err = c.wait().unwrap_err().to_string();
        assert!(err.contains("/dev/tty") && err.contains(&s.id), "{err}");
    } else {
        let (code, out, err) = run(&env, &s, "tty");
        assert_eq!(code, 0, "stdout: {out:?} stderr: {err}");
        // Line endings depend on the pty mode runc sets.
        assert_eq!(out.trim_end(), "tty xterm");
    }
}

#[test]
fn root_host_network_shares_our_loopback_and_resolver() {
    if !have_root("root_host_network_shares_our_loopback_and_resolver") {
        return;
    }
    let env = TestEnv::new();
    // The host's port space is shared with every other process (CI ran the
    // registry and ephemeral client ports there): ask the kernel for a free one.
    let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut s = spec(
        &env,
        "hostnet",
        &["httpd", "-f", "-p", &format!("127.0.0.1:{port}")],
    );
    s.network = lazylayer_runtime::NetworkMode::Host;
    let mut c = start(&env, &s, "hostnet");
    let r = wait_ready(&mut c, &WaitCondition::Port(port), Duration::from_secs(10));
    if !matches!(r, Ok(Readiness::Ready)) {
        let mut err = String::new();
        let _ = c.kill(9); // so reading stderr to its end cannot hang
        if let Some(mut e) = c.take_stderr() {
            let _ = e.read_to_string(&mut err);
        }
        panic!("httpd on host port {port} not ready: {r:?}; stderr: {err}");
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok());
    drop(c);

    if let Ok(host) = std::fs::read_to_string("/etc/resolv.conf") {
        let mut s = spec(&env, "resolv", &["cat", "/etc/resolv.conf"]);
        s.network = lazylayer_runtime::NetworkMode::Host;
        let (code, out, err) = run(&env, &s, "resolv");
        assert_eq!(code, 0, "stderr: {err}");
        assert_eq!(out, host);
    }
}

#[test]
fn root_runc_failure_is_sticky_and_kill_is_harmless() {
    if !have_root("root_runc_failure_is_sticky_and_kill_is_harmless") {
        return;
    }
    let env = TestEnv::new();
    let mut c = start(&env, &spec(&env, "sticky", &["/missing"]), "sticky");
    assert!(c.wait().is_err());
    assert!(
        c.wait().is_err(),
        "a second wait must not turn the failure into a code"
    );
    assert!(c.try_wait().is_err());
    c.kill(9).unwrap();
    assert!(c.kill(0).is_err());
}

/// A [`ContainerBuilder`] over the test's busybox root, writable in `DIR/NAME`.
fn builder(env: &TestEnv, name: &str, cmd: &[&str]) -> (ContainerBuilder, std::path::PathBuf) {
    let writable = env.dir.path().join(name);
    let b = ContainerBuilder::new(TestEnv::id(name), &env.runc)
        .lowers(vec![env.rootfs.clone()])
        .writable(&writable)
        .spec(spec(env, name, cmd))
        .stdio(Stdio::Piped);
    (b, writable)
}

/// What a container start makes in its writable dir, present or not.
fn made(writable: &std::path::Path) -> Vec<&'static str> {
    ["upper", "work", "rootfs", "bundle"]
        .into_iter()
        .filter(|d| writable.join(d).exists())
        .collect()
}

#[test]
fn root_builder_start_wait_gives_the_exit_code_and_teardown_undoes_it() {
    if !have_root("root_builder_start_wait_gives_the_exit_code_and_teardown_undoes_it") {
        return;
    }
    let env = TestEnv::new();
    let cmd = ["sh", "-c", "echo data > /written; echo out; exit 7"];
    let (b, writable) = builder(&env, "bexit", &cmd);
    let mut c = b.start().unwrap();
    assert_eq!(c.rootfs(), writable.join("rootfs"));
    assert_eq!(mounts_below(&writable), vec![writable.join("rootfs")]);
    let mut out = String::new();
    c.take_stdout().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!((c.wait().unwrap(), out.as_str()), (7, "out\n"));
    c.teardown().unwrap();
    assert!(mounts_below(&writable).is_empty());
    assert!(env.runc_list().is_empty());
    assert!(made(&writable).is_empty(), "{:?}", made(&writable));
    // The lower is untouched: the write went to the (removed) upper.
    assert!(!env.rootfs.join("written").exists());

    // keep_upper: the container's writes stay, the rest goes.
    let (b, writable) = builder(&env, "bkeep", &cmd);
    let mut c = b.keep_upper(true).start().unwrap();
    assert_eq!(c.wait().unwrap(), 7);
    drop(c);
    assert_eq!(made(&writable), ["upper"]);
    assert_eq!(
        std::fs::read_to_string(writable.join("upper/written")).unwrap(),
        "data\n"
    );
}

#[test]
fn root_builder_drop_of_running_container_leaves_nothing() {
    if !have_root("root_builder_drop_of_running_container_leaves_nothing") {
        return;
    }
    let env = TestEnv::new();
    let (b, writable) = builder(&env, "bdrop", &["sleep", "30"]);
    let c = b.start().unwrap();
    let pid = c.pid().expect("running container has a pid");
    assert_eq!(env.runc_list(), vec![c.id().to_owned()]);
    assert_eq!(mounts_below(&writable).len(), 1);
    let t = Instant::now();
    drop(c);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(env.runc_list().is_empty());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(mounts_below(&writable).is_empty());
    assert!(made(&writable).is_empty(), "{:?}", made(&writable));
}

#[test]
fn root_builder_kill_from_another_thread_while_wait_blocks() {
    if !have_root("root_builder_kill_from_another_thread_while_wait_blocks") {
        return;
    }
    let env = TestEnv::new();
    let cmd = [
        "sh",
        "-c",
        "trap 'exit 4' HUP; echo up; while true; do sleep 0.05; done",
    ];
    let (b, writable) = builder(&env, "bkiller", &cmd);
    let mut c = b.start().unwrap();
    let ready = c.wait_ready(&WaitCondition::Log("up".into()), Duration::from_secs(10));
    assert_eq!(ready.unwrap(), Readiness::Ready);
    let killer = c.killer();
    let waiter = std::thread::spawn(move || {
        let code = c.wait();
        (c, code)
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(!waiter.is_finished(), "wait blocks while it runs");
    killer.kill(1).unwrap();
    let (c, code): (RunningContainer, _) = waiter.join().unwrap();
    assert_eq!(code.unwrap(), 4);
    // Still mounted until the owner lets it go.
    assert_eq!(mounts_below(&writable).len(), 1);
    drop(c);
    assert!(mounts_below(&writable).is_empty());
    assert!(env.runc_list().is_empty());
}

#[test]
fn root_builder_failed_start_undoes_what_it_did() {
    if !have_root("root_builder_failed_start_undoes_what_it_did") {
        return;
    }
    let env = TestEnv::new();
    // The bundle fails (unknown user) after the overlay is mounted.
    let writable = env.dir.path().join("bfail");
    let mut s = spec(&env, "bfail", &["true"]);
    s.user = Some("ghost".into());
    let err = ContainerBuilder::new(TestEnv::id("bfail"), &env.runc)
        .lowers(vec![env.rootfs.clone()])
        .writable(&writable)
        .spec(s)
        .start()
        .unwrap_err();
    assert!(matches!(err, RuntimeError::User { .. }), "{err:?}");
    assert!(mounts_below(&writable).is_empty());
    assert!(made(&writable).is_empty(), "{:?}", made(&writable));

    // A leftover from an earlier container is refused, not reused, and kept.
    std::fs::create_dir_all(writable.join("upper")).unwrap();
    let (b, _) = builder(&env, "bfail", &["true"]);
    assert!(b.start().is_err());
    assert_eq!(made(&writable), ["upper"]);
    assert!(mounts_below(&writable).is_empty());
    assert!(!env.runc.root.exists() || env.runc_list().is_empty());
}
