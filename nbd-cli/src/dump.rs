//! `nbd dump`: a hex dump of an export, 16 bytes a line, repeated lines folded to `*`.

use std::io::{self, Write};
use std::process::ExitCode;

use nbd_proto::Config;

use crate::failure::Failure;
use crate::operand::{self, Operand};
use crate::size::parse_size;

/// Options of `nbd dump`.
#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// NBD URI of the export, or, after `--`, `[ CMD ARGS ... ]`: a server
    /// program started by socket activation and stopped at the end.
    #[arg(value_name = "URI | [ CMD ARGS ... ]", required = true)]
    pub server: Vec<String>,
    #[command(flatten)]
    pub timeout: crate::deadline::TimeoutArg,
    /// Where to start (suffixes K, M, G allowed).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub offset: u64,
    /// How many bytes to show (default: to the end).
    #[arg(long, value_parser = parse_size)]
    pub length: Option<u64>,
}

const READ_CHUNK: u64 = 1 << 20;

impl DumpArgs {
    /// The one operand: the server.
    pub fn server(&self) -> Result<Operand, String> {
        let [server] = operand::exactly(&self.server, ["URI or [ CMD ARGS ... ]"])?;
        Ok(server)
    }
}

/// Runs `nbd dump` against `server`.
pub fn run(args: &DumpArgs, server: &Operand) -> Result<ExitCode, Failure> {
    let mut client = server.connect(Config::default())?;
    let size = client.size()?;
    if args.offset > size {
        return Err(nbd_proto::Error::InvalidArgument(format!(
            "offset {} is beyond the export size {size}",
            args.offset
        ))
        .into());
    }
    let end = match args.length {
        Some(len) => args
            .offset
            .checked_add(len)
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                nbd_proto::Error::InvalidArgument(format!(
                    "{len} bytes at {} run past the export size {size}",
                    args.offset
                ))
            })?,
        None => size,
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut dumper = HexDump::default();
    let mut at = args.offset;
    let chunk = READ_CHUNK.min(client.max_request() as u64);
    let mut buf = vec![0u8; chunk as usize];
    while at < end {
        let n = (end - at).min(chunk) as usize;
        client.read_exact_at(&mut buf[..n], at)?;
        dumper
            .feed(&mut out, at, &buf[..n])
            .map_err(Failure::Stdout)?;
        at += n as u64;
    }
    dumper
        .finish(&mut out, end)
        .and_then(|()| out.flush())
        .map_err(Failure::Stdout)?;
    client.shutdown()?;
    Ok(ExitCode::SUCCESS)
}

/// Formats lines as `hexdump -C` does, folding runs of identical lines.
#[derive(Default)]
pub struct HexDump {
    partial: Vec<u8>,
    partial_at: u64,
    last: Option<[u8; 16]>,
    folded: bool,
}

impl HexDump {
    /// Adds `data`, which starts at export offset `at`.
    pub fn feed(&mut self, out: &mut impl Write, at: u64, data: &[u8]) -> io::Result<()> {
        let mut data = data;
        let mut at = at;
        if self.partial.is_empty() {
            self.partial_at = at;
        }
        while !data.is_empty() {
            let take = (16 - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            at += take as u64;
            if self.partial.len() == 16 {
                let line: [u8; 16] = self.partial[..].try_into().expect("16 bytes");
                self.line(out, self.partial_at, &line)?;
                self.partial.clear();
                self.partial_at = at;
            }
        }
        Ok(())
    }

    fn line(&mut self, out: &mut impl Write, at: u64, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() == 16 && self.last.as_ref().is_some_and(|l| l[..] == *bytes) {
            if !self.folded {
                writeln!(out, "*")?;
                self.folded = true;
            }
            return Ok(());
        }
        self.folded = false;
        self.last = bytes.try_into().ok();
        write!(out, "{at:016x} ")?;
        for i in 0..16 {
            if i == 8 {
                write!(out, " ")?;
            }
            match bytes.get(i) {
                Some(b) => write!(out, " {b:02x}")?,
                None => write!(out, "   ")?,
            }
        }
        let text: String = bytes
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        writeln!(out, "  |{text}|")
    }

    /// Ends the dump: the last short line, then the end offset.
    pub fn finish(mut self, out: &mut impl Write, end: u64) -> io::Result<()> {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.line(out, self.partial_at, &rest)?;
        }
        writeln!(out, "{end:016x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_repeats_and_prints_text() {
        let mut out = Vec::new();
        let mut d = HexDump::default();
        let mut data = vec![0u8; 48];
        data.extend_from_slice(b"hello");
        d.feed(&mut out, 0, &data[..20]).unwrap();
        d.feed(&mut out, 20, &data[20..]).unwrap();
        d.finish(&mut out, 53).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("0000000000000000  00 00"));
        assert_eq!(lines[1], "*");
        assert!(lines[2].starts_with("0000000000000030  68 65 6c 6c 6f"));
        assert!(lines[2].ends_with("|hello|"));
        assert_eq!(lines[3], "0000000000000035");
    }
}
