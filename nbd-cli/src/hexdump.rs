//! The hex dump layout of nbddump: 16 bytes a line, as
//!
//! ```text
//! 0000000000: 01 02 03 41 42 20 2e 00  00 00 00 00 00 00 00 00 |...AB ..........|
//! *
//! 0000000040: ff                                               |.               |
//! ```
//!
//! A line equal to the one printed before it is squashed: one `*` stands for
//! the whole run. The first and the last line of a dump are always printed,
//! so the reader sees where it starts and ends. (nbddump 1.14 with `-n`
//! may squash a short last line of zeroes into the `*` before it, hiding
//! where the dump ends; here the last line is printed whatever `-n` says.) With colour (as nbddump's
//! `--color`) the offset is green, zero bytes grey, other bytes blue,
//! letters and digits red, other printable characters magenta, and the
//! frame uses `│`, `·` and `☆` in place of `|`, `.` and `*`.

use std::io::{self, Write};

const LINE: usize = 16;

const GREEN: &str = "\x1b[22;32m";
const GREY: &str = "\x1b[22;90m";
const BLUE: &str = "\x1b[1;34m";
const RED: &str = "\x1b[1;31m";
const MAGENTA: &str = "\x1b[1;35m";
const RESTORE: &str = "\x1b[0m";

/// Formats a dump of export bytes `start..end`, fed in order.
pub struct HexDump {
    colour: bool,
    end: u64,
    /// Export offset of the next line.
    line_at: u64,
    /// Bytes of the next line gathered so far.
    partial: Vec<u8>,
    /// The last line printed, for squashing.
    last: Option<[u8; LINE]>,
    /// Whether the current run of equal lines has had its `*`.
    squashed: bool,
}

impl HexDump {
    /// A dump of the bytes from `start` to `end`, with or without colour.
    pub fn new(start: u64, end: u64, colour: bool) -> Self {
        HexDump {
            colour,
            end,
            line_at: start,
            partial: Vec::with_capacity(LINE),
            last: None,
            squashed: false,
        }
    }

    /// Adds `data`, the next bytes of the dump.
    pub fn feed(&mut self, out: &mut impl Write, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let take = (LINE - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() == LINE {
                self.complete_line(out)?;
            }
        }
        Ok(())
    }

    /// Adds `len` zero bytes without touching each line in between: a run of
    /// zero lines is one printed line, one `*` and perhaps the dump's last line.
    pub fn feed_zeroes(&mut self, out: &mut impl Write, mut len: u64) -> io::Result<()> {
        const ZEROES: [u8; LINE] = [0; LINE];
        // Finish the current line, and print (or squash) one whole zero line,
        // so that `last` is a zero line when a whole run is skipped.
        for _ in 0..2 {
            let fill = ((LINE - self.partial.len()) as u64).min(len);
            self.feed(out, &ZEROES[..fill as usize])?;
            len -= fill;
        }
        // Every line left but the one that reaches the end equals the last.
        let whole_lines = len / LINE as u64;
        let skippable = if self.line_at + len >= self.end {
            whole_lines.saturating_sub(1)
        } else {
            whole_lines
        };
        if skippable > 0 && self.last == Some(ZEROES) {
            self.squash(out)?;
            self.line_at += skippable * LINE as u64;
            len -= skippable * LINE as u64;
        }
        while len > 0 {
            let fill = ((LINE - self.partial.len()) as u64).min(len);
            self.feed(out, &ZEROES[..fill as usize])?;
            len -= fill;
        }
        Ok(())
    }

    /// Prints the last, short line, if any.
    pub fn finish(mut self, out: &mut impl Write) -> io::Result<()> {
        if !self.partial.is_empty() {
            let bytes = std::mem::take(&mut self.partial);
            self.print_line(out, &bytes)?;
        }
        Ok(())
    }

    fn complete_line(&mut self, out: &mut impl Write) -> io::Result<()> {
        let line: [u8; LINE] = self.partial[..]
            .try_into()
            .expect("a complete line has 16 bytes");
        self.partial.clear();
        let is_last = self.line_at + LINE as u64 >= self.end;
        if !is_last && self.last == Some(line) {
            self.squash(out)?;
            self.line_at += LINE as u64;
            return Ok(());
        }
        self.last = Some(line);
        self.print_line(out, &line)
    }

    fn squash(&mut self, out: &mut impl Write) -> io::Result<()> {
        if !self.squashed {
            self.squashed = true;
            let splat = if self.colour { "☆" } else { "*" };
            writeln!(out, "{splat}")?;
        }
        Ok(())
    }

    fn print_line(&mut self, out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
        self.squashed = false;
        let at = self.line_at;
        self.line_at += bytes.len() as u64;
        let paint = |code: &'static str| if self.colour { code } else { "" };
        let mut line = String::with_capacity(if self.colour { 400 } else { 80 });
        line.push_str(&format!("{}{at:010x}{}: ", paint(GREEN), paint(GREY)));
        for (i, &b) in bytes.iter().enumerate() {
            line.push_str(paint(if b == 0 { GREY } else { BLUE }));
            line.push_str(&format!("{b:02x} "));
            if i == 7 {
                line.push(' ');
            }
        }
        line.push_str(paint(GREY));
        for i in bytes.len()..LINE {
            line.push_str("   ");
            if i == 7 {
                line.push(' ');
            }
        }
        let frame = if self.colour { "│" } else { "|" };
        line.push_str(frame);
        for &b in bytes {
            let c = b as char;
            if b.is_ascii_alphanumeric() {
                line.push_str(paint(RED));
                line.push(c);
            } else if b.is_ascii_graphic() || b == b' ' {
                line.push_str(paint(MAGENTA));
                line.push(c);
            } else {
                line.push_str(paint(GREY));
                line.push_str(if self.colour { "·" } else { "." });
            }
        }
        line.push_str(paint(GREY));
        line.extend(std::iter::repeat_n(' ', LINE - bytes.len()));
        line.push_str(frame);
        line.push('\n');
        line.push_str(paint(RESTORE));
        out.write_all(line.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(start: u64, pieces: &[Piece], colour: bool) -> String {
        let len: u64 = pieces.iter().map(Piece::len).sum();
        let mut out = Vec::new();
        let mut d = HexDump::new(start, start + len, colour);
        for p in pieces {
            match p {
                Piece::Data(bytes) => d.feed(&mut out, bytes).unwrap(),
                Piece::Zeroes(n) => d.feed_zeroes(&mut out, *n).unwrap(),
            }
        }
        d.finish(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    enum Piece {
        Data(Vec<u8>),
        Zeroes(u64),
    }

    impl Piece {
        fn len(&self) -> u64 {
            match self {
                Piece::Data(b) => b.len() as u64,
                Piece::Zeroes(n) => *n,
            }
        }
    }

    #[test]
    fn lines_look_like_nbddump() {
        let mut data = vec![1, 2, 3, b'A', b'B', b' ', b'.'];
        data.resize(0x40, 0);
        data.push(0xff);
        let text = dump(0, &[Piece::Data(data)], false);
        assert_eq!(
            text,
            "0000000000: 01 02 03 41 42 20 2e 00  00 00 00 00 00 00 00 00 |...AB ..........|\n\
             0000000010: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n\
             *\n\
             0000000040: ff                                               |.               |\n"
        );
    }

    #[test]
    fn skipped_zeroes_print_as_read_zeroes_do() {
        for start in [0u64, 5, 16] {
            for (head, zeroes, tail) in [
                (3usize, 1u64 << 20, 20usize),
                (0, 100, 0),
                (16, 32, 1),
                (7, 9, 0),
                (0, 1 << 22, 0),
                (17, 15, 40),
            ] {
                let mut all = vec![0x61u8; head];
                all.resize(head + zeroes as usize, 0);
                all.extend(std::iter::repeat_n(0x62u8, tail));
                let read = dump(start, &[Piece::Data(all)], false);
                let skipped = dump(
                    start,
                    &[
                        Piece::Data(vec![0x61; head]),
                        Piece::Zeroes(zeroes),
                        Piece::Data(vec![0x62; tail]),
                    ],
                    false,
                );
                assert_eq!(
                    skipped, read,
                    "start {start} head {head} zeroes {zeroes} tail {tail}"
                );
            }
        }
    }

    #[test]
    fn the_last_line_is_never_squashed() {
        let text = dump(0, &[Piece::Zeroes(64)], false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[1], "*");
        assert!(lines[2].starts_with("0000000030: 00"), "{text}");
    }

    #[test]
    fn colour_marks_each_kind_of_byte() {
        let text = dump(0, &[Piece::Data(vec![b'A', b'.', 0, 0x80])], true);
        assert!(
            text.starts_with("\x1b[22;32m0000000000\x1b[22;90m: \x1b[1;34m41 "),
            "{text:?}"
        );
        assert!(
            text.contains("\x1b[1;31mA\x1b[1;35m.\x1b[22;90m·\x1b[22;90m·"),
            "{text:?}"
        );
        assert!(text.ends_with("│\n\x1b[0m"), "{text:?}");
    }
}
