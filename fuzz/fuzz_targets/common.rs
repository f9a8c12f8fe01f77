//! Shared by the targets that feed a file path to the code under test.

use std::path::PathBuf;

/// A scratch file for this fuzz process, rewritten every run: the code under
/// test takes paths (`analyze`, the route tester and the trainer's npy
/// reader all read files), so the fuzzer's bytes go through the file system.
/// /dev/shm keeps that off the disk where it exists.
pub fn scratch(name: &str) -> PathBuf {
    let dir = ["/dev/shm", "/tmp"]
        .iter()
        .map(PathBuf::from)
        .find(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("bmn-fuzz-{}-{name}", std::process::id()))
}
