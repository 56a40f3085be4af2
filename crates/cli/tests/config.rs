//! The configuration file: what it sets takes effect, environment and flags
//! override it, `lazylayer config` shows the result, and a bad file stops
//! every command with an error that names the key and the file.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn lazylayer_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lazylayer"));
    c.args(args).env_remove("RUST_LOG");
    for k in [
        "LAZYLAYER_ROOT",
        "LAZYLAYER_CONFIG",
        "LAZYLAYER_STALL_TIMEOUT",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    eprintln!(
        "$ lazylayer {}\n-- stdout:\n{}-- stderr:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn effective(args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["config", "--json"]);
    let out = lazylayer_env(&a, env);
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_config_file_is_used_and_env_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    std::fs::write(
        &file,
        format!(
            "[store]\nroot = {:?}\nsize_limit = \"5GB\"\n\
             [registries]\ninsecure = [\"registry.test:5000\"]\n\
             [fetch]\nstall_timeout = 3\nread_timeout = 7\nprefetch = false\n\
             [fs]\npassthrough = false\n",
            a.display().to_string()
        ),
    )
    .unwrap();
    let f = file.to_str().unwrap();

    let v = effective(&["--config", f], &[]);
    assert_eq!(v["file"], f);
    let cfg = &v["config"];
    assert_eq!(cfg["store"]["root"], a.to_str().unwrap());
    assert_eq!(cfg["store"]["size_limit"], "5GB");
    assert_eq!(cfg["fetch"]["stall_timeout"], 3.0);
    assert_eq!(cfg["fetch"]["read_timeout"], 7.0);
    assert_eq!(cfg["fetch"]["prefetch"], false);
    assert_eq!(cfg["fs"]["passthrough"], false);
    // Unset keys get their defaults.
    assert_eq!(cfg["fetch"]["connect_timeout"], 10.0);

    // LAZYLAYER_CONFIG names the file too; the environment beats the file,
    // and a flag beats both.
    let env = [
        ("LAZYLAYER_CONFIG", f),
        ("LAZYLAYER_ROOT", b.to_str().unwrap()),
        ("LAZYLAYER_STALL_TIMEOUT", "4"),
    ];
    let v = effective(&[], &env);
    assert_eq!(v["config"]["store"]["root"], b.to_str().unwrap());
    assert_eq!(v["config"]["fetch"]["stall_timeout"], 4.0);
    let v = effective(
        &[
            "--root",
            c.to_str().unwrap(),
            "--insecure-registry",
            "other.test",
        ],
        &env,
    );
    assert_eq!(v["config"]["store"]["root"], c.to_str().unwrap());
    // Lists add up: the file's registries and the flag's.
    assert_eq!(
        v["config"]["registries"]["insecure"],
        serde_json::json!(["registry.test:5000", "other.test"])
    );

    // The plain output is a configuration file itself: fed back, the same.
    let out = lazylayer_env(&["--config", f, "config"], &[]);
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &out.stdout).unwrap();
    let again = effective(&["--config", printed.to_str().unwrap()], &[]);
    assert_eq!(again["config"], effective(&["--config", f], &[])["config"]);
}

/// The file's store root is where a pull puts the image.
#[test]
fn a_pull_goes_to_the_store_the_file_names() {
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        format!("[store]\nroot = {:?}\n", root.to_str().unwrap()),
    )
    .unwrap();
    let image = image_ref(&reg, "busybox");
    let out = lazylayer_env(&["--config", file.to_str().unwrap(), "pull", &image], &[]);
    assert!(out.status.success());
    let images = std::fs::read_dir(root.join("images")).unwrap().count();
    assert_eq!(images, 1, "the image record is in the file's store");
}

#[test]
fn a_bad_config_file_stops_every_command_naming_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let cases = [
        ("[store]\nsize_limt = \"1GB\"\n", "size_limt"),
        ("[fetch]\nread_timeout = -3\n", "fetch.read_timeout"),
        ("[fetch\nread_timeout = 3\n", "line 1"),
        ("[registries]\ninsecure = \"one\"\n", "insecure"),
    ];
    for (i, (text, names)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let f = file.to_str().unwrap();
        for cmd in [&["config"][..], &["images"], &["prune"]] {
            let mut args = vec!["--config", f, "--root", root.to_str().unwrap()];
            args.extend_from_slice(cmd);
            let out = lazylayer_env(&args, &[]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{text:?} {cmd:?}");
            assert!(err.contains(names), "{text:?}: {err}");
            assert!(err.contains(f), "{text:?}: {err}");
        }
    }
    // Nothing was done: not even the store created.
    assert!(!Path::new(&root).exists());
    // A file named but missing is an error too (the default one may be absent).
    let out = lazylayer_env(&["--config", "/nonexistent/lazylayer.toml", "images"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/lazylayer.toml"));
}
