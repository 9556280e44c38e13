//! `nbd copy --changed=CONTEXT`: an incremental backup driven by a qcow2
//! dirty bitmap served by qemu-nbd. A full copy, writes to the source, an
//! incremental copy; the backup then equals the source, only the dirty bytes
//! were read, and the clean bytes of the backup were left alone.

use std::fs;
use std::path::Path;
use std::process::Command;

use nbd_tests::testkit::run_nbd;
use nbd_tests::{qemu_img_compare, require_tool, NbdkitBuilder};

const MIB: usize = 1 << 20;
const BITMAP: &str = "backup-0";
const CONTEXT: &str = "qemu:dirty-bitmap:backup-0";

fn run(program: &str, args: &[&str]) -> String {
    require_tool(program);
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nbd copy ARGS` must succeed; returns its standard error (for `-v`).
fn nbd_copy(args: &[&str]) -> String {
    let mut all = vec!["copy"];
    all.extend_from_slice(args);
    let out = run_nbd(&all);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "nbd {all:?}: {stderr}");
    stderr
}

/// The number after `word` in the `-v` summary line.
fn count_after(summary: &str, word: &str) -> u64 {
    let line = summary
        .lines()
        .find(|l| l.contains("bytes from the source"))
        .unwrap_or_else(|| panic!("no summary in {summary:?}"));
    let at = line
        .find(word)
        .unwrap_or_else(|| panic!("{word} in {line}"))
        + word.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count after {word} in {line}"))
}

/// The runs of `context` of the served image, as nbdinfo maps them: offset,
/// length, flags.
fn map(image: &Path, context: &str) -> Vec<(u64, u64, u64)> {
    let image = image.to_str().unwrap();
    let map = run(
        "nbdinfo",
        &[
            &format!("--map={context}"),
            "--",
            "[",
            "qemu-nbd",
            "-r",
            "-f",
            "qcow2",
            "-B",
            BITMAP,
            image,
            "]",
        ],
    );
    map.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((
                fields.first()?.parse().ok()?,
                fields.get(1)?.parse().ok()?,
                fields.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

/// Whether each 4 KiB block of an `size`-byte image has `flag` in `runs`.
fn blocks_with(runs: &[(u64, u64, u64)], flag: u64, size: usize) -> Vec<bool> {
    let mut blocks = vec![false; size / 4096];
    for &(offset, length, flags) in runs {
        if flags & flag != 0 {
            for b in offset / 4096..(offset + length).div_ceil(4096) {
                blocks[b as usize] = true;
            }
        }
    }
    blocks
}

/// Bytes the bitmap marks dirty, and of those the ones that read as zeroes
/// (which the copy zeroes without reading).
fn dirty_bytes(image: &Path) -> (u64, u64) {
    let size = 8 * MIB;
    let dirty = blocks_with(&map(image, CONTEXT), 1, size);
    let zero = blocks_with(&map(image, "base:allocation"), 2, size);
    let count =
        |f: &dyn Fn(usize) -> bool| (0..dirty.len()).filter(|&b| f(b)).count() as u64 * 4096;
    (count(&|b| dirty[b]), count(&|b| dirty[b] && zero[b]))
}

/// The source served read-only with its bitmap, as `[ CMD ]` words.
fn served(image: &str) -> Vec<&str> {
    vec![
        "--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", BITMAP, image, "]",
    ]
}

#[test]
fn incremental_copy_reads_only_dirty_bytes_and_leaves_clean_ones() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("source.qcow2");
    let image_s = image.to_str().unwrap();
    let backup = dir.path().join("backup.raw");
    let backup_s = backup.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", image_s, "8M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 8M", image_s],
    );
    run("qemu-img", &["bitmap", "--add", image_s, BITMAP]);

    // The full backup.
    let mut args = vec![];
    args.extend(served(image_s));
    args.push(backup_s);
    nbd_copy(&args);
    assert!(qemu_img_compare(&image, &backup), "full copy differs");

    // Changes: data, data smaller than the bitmap's granularity, zeroes.
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 1M 64K",
            "-c",
            "write -P 0x33 5M 4K",
            "-c",
            "write -z 3M 128K",
            image_s,
        ],
    );
    assert!(!qemu_img_compare(&image, &backup));
    let (dirty, dirty_zero) = dirty_bytes(&image);
    assert!(dirty > 0 && dirty < 1024 * 1024, "dirty {dirty}");
    // The zeroes written at 3M read as zeroes: those dirty bytes are not read.
    assert!(dirty_zero >= 128 * 1024, "dirty and zero {dirty_zero}");

    // A marker in a clean region of the backup: an incremental copy leaves it.
    let mut bytes = fs::read(&backup).unwrap();
    bytes[7 * MIB] = 0x99;
    fs::write(&backup, &bytes).unwrap();

    let mut args = vec!["-v", "--changed", CONTEXT];
    args.extend(served(image_s));
    args.push(backup_s);
    let summary = nbd_copy(&args);
    assert_eq!(
        count_after(&summary, "read "),
        dirty - dirty_zero,
        "{summary}"
    );
    assert_eq!(count_after(&summary, "zeroed "), dirty_zero, "{summary}");
    assert_eq!(count_after(&summary, "left alone "), 8 * MIB as u64 - dirty);

    let mut got = fs::read(&backup).unwrap();
    assert_eq!(got.len(), 8 * MIB, "the backup changed size");
    assert_eq!(got[7 * MIB], 0x99, "a clean byte was rewritten");
    got[7 * MIB] = 0x11;
    fs::write(&backup, &got).unwrap();
    assert!(
        qemu_img_compare(&image, &backup),
        "incremental copy differs"
    );

    // The same increment into an NBD export of an older backup.
    let older = dir.path().join("older.raw");
    fs::write(&older, vec![0x11; 8 * MIB]).unwrap();
    let export = NbdkitBuilder::file(&older).start();
    let mut args = vec!["--changed", CONTEXT];
    let uri = export.uri();
    args.extend(served(image_s));
    args.push(&uri);
    nbd_copy(&args);
    assert!(
        qemu_img_compare(&image, &older),
        "increment into an export differs"
    );
}

#[test]
fn a_missing_bitmap_or_backup_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("source.qcow2");
    let image_s = image.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", image_s, "1M"]);
    run("qemu-img", &["bitmap", "--add", image_s, BITMAP]);
    let backup = dir.path().join("backup.raw");
    let backup_s = backup.to_str().unwrap();

    // No such backup yet: an incremental copy needs one.
    let mut args = vec!["copy", "--changed", CONTEXT];
    args.extend(served(image_s));
    args.push(backup_s);
    let out = run_nbd(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("nbd: destination: "), "{stderr}");
    assert!(!backup.exists(), "a refused copy created the backup");

    // A context the source does not offer.
    fs::write(&backup, vec![0u8; MIB]).unwrap();
    let mut args = vec!["copy", "--changed", "qemu:dirty-bitmap:nope"];
    args.extend(served(image_s));
    args.push(backup_s);
    let out = run_nbd(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("nbd: source: ") && stderr.contains("nope"),
        "{stderr}"
    );
}
