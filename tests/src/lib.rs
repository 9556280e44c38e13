//! Test harness: starts real NBD servers (nbdkit, qemu-nbd, nbd-server) for the integration tests.
//!
//! Each builder ([`NbdkitBuilder`], [`QemuNbdBuilder`], [`NbdServerBuilder`])
//! creates a fresh temporary directory, starts its server on a Unix socket in
//! it (or, with `.tcp()`, on a free port of `127.0.0.1`), and returns a
//! [`ServerHandle`] only once the server listens. Dropping the handle stops
//! and reaps the server and deletes the directory, also when the test panics.
//!
//! A missing server program is a test failure naming the Debian package to
//! install ([`require_tool`]), never a silent skip.
//!
//! ```no_run
//! use nbd_tests::{nbdinfo_json, json_value, NbdkitBuilder};
//!
//! let server = NbdkitBuilder::eval()
//!     .method("get_size", "echo 1M")
//!     .method("pread", "dd if=/dev/zero count=$3 iflag=count_bytes")
//!     .method("block_size", "echo 512 4K 64K")
//!     .start();
//! let json = nbdinfo_json(&server.uri());
//! assert_eq!(json_value(&json, "block_size_minimum"), Some("512"));
//! ```
//!
//! The [`clients`] helpers run libnbd's `nbdinfo` / `nbdcopy` and
//! `qemu-img compare` for differential tests.

pub mod clients;
mod endpoint;
mod handle;
mod launch;
pub mod libnbd_1_14;
mod nbd_server;
mod nbdkit;
mod process;
mod qemu;
mod ready;
pub mod restart;
pub mod stress;
pub mod testkit;
mod tools;
mod watchdog;

pub use clients::{
    file_bytes, json_value, nbdcopy, nbdcopy_with, nbdinfo, nbdinfo_can, nbdinfo_is, nbdinfo_json,
    nbdinfo_list_json, nbdinfo_map, nbdinfo_size, qemu_img_compare, read_export,
};
pub use endpoint::{pick_free_port, Endpoint, Transport};
pub use handle::{ServerHandle, ServerKind};
pub use launch::START_TIMEOUT;
pub use nbd_server::{NbdServerBuilder, NbdServerExport};
pub use nbdkit::NbdkitBuilder;
pub use qemu::{create_image, create_image_from_bytes, ImageFormat, QemuNbdBuilder};
pub use restart::Restartable;
pub use tools::{debian_package, find_tool, require_tool, tool_exists};
