//! What `nbd info` prints, as libnbd 1.14's nbdinfo (the one Debian installs)
//! would print it.
//!
//! `nbd info` follows the newest nbdinfo, which says a little more than
//! 1.14: a top-level `"extended"` field in JSON, `using extended packets`
//! when extended headers are in use, and block sizes in words in the text
//! (`block_size_preferred: 4096 (4K)`). Tests compare with the installed
//! nbdinfo after taking exactly those out, and check the newer parts
//! themselves separately.

/// `ours` (text or JSON from `nbd info`) without what nbdinfo 1.14 lacks.
pub fn as_nbdinfo_1_14(ours: &str) -> String {
    let mut out = String::with_capacity(ours.len());
    for whole in ours.split_inclusive('\n') {
        let (line, newline) = match whole.strip_suffix('\n') {
            Some(line) => (line, "\n"),
            None => (whole, ""),
        };
        if line.starts_with("\"extended\": ") {
            continue;
        }
        let line = line.replace("using extended packets", "using structured packets");
        let line = match line.strip_prefix("\tblock_size_") {
            Some(rest) => match rest.split_once(" (") {
                Some((kept, _words)) => format!("\tblock_size_{kept}"),
                None => line.clone(),
            },
            None => line,
        };
        out.push_str(&line);
        out.push_str(newline);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newer_parts_change() {
        let text = "protocol: newstyle-fixed without TLS, using extended packets\n\
                    \tblock_size_minimum: 1\n\tblock_size_preferred: 4096 (4K)\n\tcan_zero: true\n";
        assert_eq!(
            as_nbdinfo_1_14(text),
            "protocol: newstyle-fixed without TLS, using structured packets\n\
             \tblock_size_minimum: 1\n\tblock_size_preferred: 4096\n\tcan_zero: true\n"
        );
        let json = "{\n\"structured\": true,\n\"extended\": false,\n\"exports\": [\n";
        assert_eq!(
            as_nbdinfo_1_14(json),
            "{\n\"structured\": true,\n\"exports\": [\n"
        );
    }
}
