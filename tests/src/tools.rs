//! Finding the external programs the harness runs, and failing loudly (with the
//! Debian package to install) when one is missing.
//!
//! Tests must never skip silently because a server is not installed: every
//! builder and helper calls [`require_tool`] first, which panics with a message
//! naming the missing package.

use std::env;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Programs the harness knows about, with the Debian package that ships each.
const PACKAGES: &[(&str, &str)] = &[
    ("nbdkit", "nbdkit"),
    ("qemu-nbd", "qemu-utils"),
    ("qemu-img", "qemu-utils"),
    ("qemu-io", "qemu-utils"),
    ("nbd-server", "nbd-server"),
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("nbdsh", "libnbd-bin"),
    ("nbddump", "libnbd-bin"),
    ("file", "file"),
    ("fincore", "util-linux-extra"),
    // Pseudo-terminals for progress bars (Debian marks it essential).
    ("script", "bsdutils"),
];

/// The Debian package that ships `program`, if the harness knows it.
///
/// ```
/// assert_eq!(nbd_tests::debian_package("qemu-img"), Some("qemu-utils"));
/// assert_eq!(nbd_tests::debian_package("ls"), None);
/// ```
pub fn debian_package(program: &str) -> Option<&'static str> {
    PACKAGES
        .iter()
        .find(|(name, _)| *name == program)
        .map(|(_, package)| *package)
}

/// Where `program` is on `PATH` (like `which`), or `None`.
///
/// A name containing a `/` is checked as a path instead.
pub fn find_tool(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let path = Path::new(program);
        return is_executable(path).then(|| path.to_path_buf());
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

/// Whether `program` is on `PATH`.
pub fn tool_exists(program: &str) -> bool {
    find_tool(program).is_some()
}

/// The path of `program`; panics with the Debian package to install when it
/// is not on `PATH`.
///
/// Tests call this (the builders and helpers of this crate already do) so that
/// a machine without the servers fails with an actionable message instead of a
/// cryptic "No such file or directory" or a silently skipped test.
pub fn require_tool(program: &str) -> PathBuf {
    match find_tool(program) {
        Some(path) => path,
        None => match debian_package(program) {
            Some(package) => panic!(
                "`{program}` was not found on PATH: install the Debian package \
                 `{package}` (apt-get install {package}); the NBD integration tests \
                 need it and do not skip without it"
            ),
            None => panic!(
                "`{program}` was not found on PATH; the NBD integration tests need it \
                 and do not skip without it"
            ),
        },
    }
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
