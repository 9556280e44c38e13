//! `nbd dump`: a hex dump of an export, laid out as nbddump lays it out
//! (see [`crate::hexdump`]). What the server's `base:allocation` reports as
//! zero is not read but printed as zeroes, so a mostly empty export dumps in
//! a few block status requests.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use nbd_proto::Config;

use crate::extents::{self, BASE_ALLOCATION, STATE_ZERO};
use crate::failure::Failure;
use crate::hexdump::HexDump;
use crate::operand::{self, Operand};
use crate::size::parse_size;
use crate::unknown_export;

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
    #[arg(short = 'o', long, default_value = "0", value_parser = parse_size)]
    pub offset: u64,
    /// Dump up to N bytes, then stop (default: to the end of the export).
    #[arg(short = 'n', long, visible_alias = "limit", value_name = "N", value_parser = parse_size)]
    pub length: Option<u64>,
    /// Colour the output (the default when standard output is a terminal).
    #[arg(
        long,
        visible_alias = "colour",
        alias = "colors",
        alias = "colours",
        overrides_with = "no_color"
    )]
    pub color: bool,
    /// Plain output, even on a terminal.
    #[arg(
        long,
        visible_alias = "no-colour",
        alias = "no-colors",
        alias = "no-colours",
        overrides_with = "color"
    )]
    pub no_color: bool,
}

/// Largest read, and largest span asked about at once.
const CHUNK: u64 = 1 << 20;

impl DumpArgs {
    /// The one operand: the server.
    pub fn server(&self) -> Result<Operand, String> {
        let [server] = operand::exactly(&self.server, ["URI or [ CMD ARGS ... ]"])?;
        Ok(server)
    }

    /// Whether to colour: as asked, else when standard output is a terminal.
    fn colour(&self) -> bool {
        if self.color || self.no_color {
            return self.color;
        }
        io::stdout().is_terminal()
    }
}

/// Runs `nbd dump` against `server`.
pub fn run(args: &DumpArgs, server: &Operand) -> Result<ExitCode, Failure> {
    let config = Config::default().meta_context(BASE_ALLOCATION);
    let mut client = unknown_export::connect(server, config)?;
    let size = client.size()?;
    if args.offset > size {
        return Err(nbd_proto::Error::InvalidArgument(format!(
            "offset {} is beyond the export size {size}",
            args.offset
        ))
        .into());
    }
    // As nbddump: a length past the end dumps to the end.
    let end = args.offset + args.length.unwrap_or(u64::MAX).min(size - args.offset);
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut dump = HexDump::new(args.offset, end, args.colour());
    let skip_zeroes = client.connection().can_meta_context(BASE_ALLOCATION);
    let chunk = CHUNK.min(client.max_request() as u64);
    let mut buf = vec![0u8; chunk as usize];
    let mut at = args.offset;
    while at < end {
        let span = (end - at).min(chunk);
        let runs = if skip_zeroes {
            extents::query(&mut client, BASE_ALLOCATION, at, span)?
        } else {
            vec![extents::Run {
                offset: at,
                length: span,
                flags: 0,
            }]
        };
        for run in runs {
            if run.flags & STATE_ZERO != 0 {
                dump.feed_zeroes(&mut out, run.length)
                    .map_err(Failure::Stdout)?;
            } else {
                let data = &mut buf[..run.length as usize];
                client.read_exact_at(data, run.offset)?;
                dump.feed(&mut out, data).map_err(Failure::Stdout)?;
            }
            at = run.offset + run.length;
        }
    }
    dump.finish(&mut out)
        .and_then(|()| out.flush())
        .map_err(Failure::Stdout)?;
    client.shutdown()?;
    Ok(ExitCode::SUCCESS)
}
