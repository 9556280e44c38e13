//! Helpers for differential tests: ask libnbd's tools (`nbdinfo`, `nbdcopy`)
//! and `qemu-img` what a server serves, to compare with our client.
//!
//! Every helper panics, with the command and its stderr, when the tool fails.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::tools::require_tool;

/// Runs `command`, panicking with its stderr unless it exits 0; returns its
/// output.
pub fn run_checked(command: &mut Command) -> Output {
    let output = run(command);
    if !output.status.success() {
        panic!(
            "{command:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

/// Runs `command` (stdin from /dev/null, output captured) and returns its
/// output whatever the exit status; panics only if it cannot be spawned.
pub fn run(command: &mut Command) -> Output {
    if let Some(program) = command.get_program().to_str() {
        require_tool(program);
    }
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"))
}

fn stdout_text(output: Output) -> String {
    String::from_utf8(output.stdout).unwrap_or_else(|err| panic!("non-UTF-8 output: {err}"))
}

/// `nbdinfo ARGS...`; returns stdout.
pub fn nbdinfo<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    stdout_text(run_checked(Command::new("nbdinfo").args(args)))
}

/// `nbdinfo --json URI`: the JSON description of the export (handshake
/// flags, sizes, block sizes, contexts); see also [`json_value`].
pub fn nbdinfo_json(uri: &str) -> String {
    nbdinfo(["--json", uri])
}

/// `nbdinfo --size URI`: the export size in bytes.
pub fn nbdinfo_size(uri: &str) -> u64 {
    let text = nbdinfo(["--size", uri]);
    text.trim()
        .parse()
        .unwrap_or_else(|err| panic!("nbdinfo --size printed {text:?}: {err}"))
}

/// `nbdinfo --list --json URI`: every export the server lists.
pub fn nbdinfo_list_json(uri: &str) -> String {
    nbdinfo(["--list", "--json", uri])
}

/// `nbdinfo --map URI`: the allocation map (`base:allocation`) as text.
pub fn nbdinfo_map(uri: &str) -> String {
    nbdinfo(["--map", uri])
}

/// `nbdinfo --can FEATURE URI` (e.g. `"flush"`, `"trim"`, `"zero"`,
/// `"multi-conn"`, `"structured-reply"`, `"connect"`): whether the server
/// advertises it (nbdinfo exits 0 for yes, 2 for no).
pub fn nbdinfo_can(feature: &str, uri: &str) -> bool {
    nbdinfo_test("--can", feature, uri)
}

/// `nbdinfo --is PROPERTY URI` (`"read-only"`, `"rotational"`, `"tls"`).
pub fn nbdinfo_is(property: &str, uri: &str) -> bool {
    nbdinfo_test("--is", property, uri)
}

fn nbdinfo_test(option: &str, what: &str, uri: &str) -> bool {
    let output = run(Command::new("nbdinfo").args([option, what, uri]));
    match output.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!(
            "nbdinfo {option} {what} {uri} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// The raw text of the first `"key": value` in nbdinfo's JSON (strings
/// without their quotes), e.g. `json_value(&json, "block_size_minimum")`.
///
/// A minimal reader for nbdinfo's flat, one-key-per-line output, not a JSON
/// parser: with `--list` the first export's value is returned.
///
/// ```
/// let json = "{\n\"export-size\": 1048576,\n\"export-name\": \"disk\",\n\"is_read_only\": false\n}";
/// assert_eq!(nbd_tests::json_value(json, "export-size"), Some("1048576"));
/// assert_eq!(nbd_tests::json_value(json, "export-name"), Some("disk"));
/// assert_eq!(nbd_tests::json_value(json, "is_read_only"), Some("false"));
/// assert_eq!(nbd_tests::json_value(json, "missing"), None);
/// ```
pub fn json_value<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("\"{key}\":");
    let start = json.find(&needle)? + needle.len();
    let rest = json[start..].trim_start();
    if let Some(string) = rest.strip_prefix('"') {
        return string.find('"').map(|end| &string[..end]);
    }
    let end = rest.find([',', '\n', '}', ']']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

/// `nbdcopy SRC DST`: copies between NBD URIs, files, and `-` (stdout).
pub fn nbdcopy(src: impl AsRef<OsStr>, dst: impl AsRef<OsStr>) {
    nbdcopy_with::<[&str; 0], &str>([], src, dst);
}

/// `nbdcopy FLAGS... SRC DST`, e.g. flags `["--flush", "--connections=1"]`.
pub fn nbdcopy_with<I, S>(flags: I, src: impl AsRef<OsStr>, dst: impl AsRef<OsStr>)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_checked(Command::new("nbdcopy").args(flags).arg(src).arg(dst));
}

/// Every byte of the export at `uri`, read with `nbdcopy URI -`.
pub fn read_export(uri: &str) -> Vec<u8> {
    run_checked(Command::new("nbdcopy").args([uri, "-"])).stdout
}

/// Every byte of a local file.
pub fn file_bytes(path: impl AsRef<Path>) -> Vec<u8> {
    let path = path.as_ref();
    fs::read(path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

/// `qemu-img compare -U A B`: whether the two images (paths or NBD URIs)
/// have the same guest-visible contents. `-U` (force-share) lets it read
/// images a running qemu-nbd holds locked. Panics if qemu-img fails (exit
/// code 2 or more).
pub fn qemu_img_compare(a: impl AsRef<OsStr>, b: impl AsRef<OsStr>) -> bool {
    let output = run(Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b));
    match output.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}
