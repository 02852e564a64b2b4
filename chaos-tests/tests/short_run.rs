//! A short chaos run: 3 real nodes of the debug `tollgate` binary, 20 s of `kill -9` faults and
//! a rolling upgrade, then the judge. The binary is built first with `cargo build -p tollgate`
//! (in the profile of this test), so the test runs against the current sources. The upgrade is
//! from a copy of the same binary (a previous version is not built here): it keeps the
//! `--upgrade-from` machinery working; real upgrades are run by hand (chaos-tests/README.md).

use std::path::Path;
use std::process::Command;

#[test]
fn test_chaos_short_run_with_kills_and_an_upgrade_passes_the_judge() {
    let chaos = Path::new(env!("CARGO_BIN_EXE_tollgate-chaos"));
    // target/<profile>/tollgate-chaos: build `tollgate` into the same directory.
    let profile_dir = chaos.parent().expect("the binary's directory");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(workspace).args(["build", "-p", "tollgate", "--bin", "tollgate"]);
    if profile_dir.file_name().is_some_and(|name| name == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "cargo build -p tollgate failed: {status}");
    let tollgate = profile_dir.join("tollgate");
    assert!(tollgate.is_file(), "no {} after cargo build -p tollgate", tollgate.display());

    let data = tempfile::tempdir().expect("temporary directory");
    let previous = data.path().join("tollgate-previous");
    std::fs::copy(&tollgate, &previous).expect("a copy of the binary");
    let output = Command::new(chaos)
        .arg("--tollgate")
        .arg(&tollgate)
        .arg("--upgrade-from")
        .arg(&previous)
        .args(["--nodes", "3", "--duration", "20", "--faults", "kill,upgrade", "--seed", "20261028"])
        .arg("--data")
        .arg(data.path().join("run"))
        .env("TOLLGATE_CHAOS_LOG", "warn")
        .output()
        .expect("tollgate-chaos runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        // Keep the run's files for a post-mortem.
        let kept = data.keep();
        panic!(
            "tollgate-chaos failed ({}); its files are in {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            output.status,
            kept.display()
        );
    }
    assert!(stdout.contains("verdict: PASS"), "{stdout}");
    assert!(stdout.contains("faults injected: kill"), "kills were injected: {stdout}");
    // Each of the three first members is upgraded once, during the faults or after them.
    assert!(stdout.contains("upgrade 3"), "every first member was upgraded: {stdout}");
    eprintln!("{stdout}");
}
