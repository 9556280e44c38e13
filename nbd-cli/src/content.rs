//! What an export's first bytes are, as file(1) names them: nbdinfo's
//! `content` field.
//!
//! nbdinfo reads the first 8 KiB and runs `file -b` on them; this does the
//! same through file(1)'s standard input, so no temporary file is needed. A
//! machine without file(1), or a probe that fails in any way, gives no
//! field at all (as nbdinfo's does), never an error: the content is a
//! courtesy, the rest of the report is what was asked for.

use std::io::Write;
use std::process::{Command, Stdio};

use nbd_blocking::Client;

/// How much of the export file(1) sees, as nbdinfo.
const PROBE_LEN: u64 = 8192;

/// file(1)'s one-line description of the first bytes of the export behind
/// `client` (which must be in transmission), or `None`.
pub fn probe(client: &mut Client) -> Option<String> {
    let size = client.size().ok()?;
    let mut head = vec![0u8; size.min(PROBE_LEN) as usize];
    if !head.is_empty() {
        client.read_exact_at(&mut head, 0).ok()?;
    }
    describe(&head)
}

/// file(1)'s description of `bytes`, or `None` if it cannot say.
pub fn describe(bytes: &[u8]) -> Option<String> {
    let mut child = Command::new("file")
        .args(["-b", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // file(1) may stop reading once it knows; what it did not read does not matter.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(bytes);
    }
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?.trim_end();
    (!line.is_empty()).then(|| line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only where file(1) is installed: elsewhere `None` is the right answer.
    #[test]
    fn file_names_what_nbdinfo_names() {
        if describe(b"").is_none() {
            return;
        }
        assert_eq!(describe(&[0; 8192]).as_deref(), Some("data"));
        assert_eq!(describe(b"").as_deref(), Some("empty"));
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(describe(&mbr).as_deref(), Some("DOS/MBR boot sector"));
    }
}
