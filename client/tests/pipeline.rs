//! rmctl as a program in a pipeline.

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

/// `rmctl ... | grep -q x` once panicked ("failed printing to stdout: Broken
/// pipe") with a backtrace when grep had stopped reading. The pipe's read end
/// is closed before rmctl starts, so every write fails.
#[test]
fn a_reader_that_stops_reading_ends_the_output_quietly() {
    let (read, write) = std::io::pipe().unwrap();
    drop(read);
    let out = Command::new(env!("CARGO_BIN_EXE_rmctl"))
        .args(["completions", "bash"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(OwnedFd::from(write)))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "stderr: {err}");
    assert!(out.status.success(), "{:?}", out.status);
}
