//! The systemd units in packaging/systemd pass `systemd-analyze verify`
//! (syntax, known keys, an executable ExecStart), run against this build's
//! binary in place of /usr/local/bin/lazylayer. Their command lines are
//! checked against the CLI by a unit test of the binary crate.

use std::process::Command;

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
        && lazylayer_testsupport::skip_because("systemd-analyze is not installed")
    {
        return;
    }
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("ExecStart=/usr/local/bin/lazylayer "),
            "{}",
            path.display()
        );
        let text = text.replace("/usr/local/bin/lazylayer", env!("CARGO_BIN_EXE_lazylayer"));
        let copy = dir.path().join(path.file_name().unwrap());
        std::fs::write(&copy, text).unwrap();
        units.push(copy);
    }
    assert_eq!(units.len(), 2);
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}
