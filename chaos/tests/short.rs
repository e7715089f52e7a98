//! The harness's short profile, run as the suite's test: a few minutes of
//! faults under load, every check of the harness passing.

use std::process::Command;

#[test]
fn the_short_fault_profile_passes_every_check() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: weft-chaos needs root (a network namespace, cgroups)");
        return;
    }
    if !Command::new("iptables")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("skipped: weft-chaos needs iptables (.ci/run installs it)");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_weft-chaos"))
        .output()
        .expect("running weft-chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "weft-chaos failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("| lost | 0 | ok |"), "{stdout}");
}
