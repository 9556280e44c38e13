//! The `nbd` command: inspect, dump and copy NBD exports.
//!
//! ```text
//! nbd info URI [--json] [--size] [--list] [--can FEATURE] [--is PROPERTY]
//! nbd copy SRC DST [--requests N] [--request-size N] [--flush]
//! nbd dump URI [--offset N] [--length N]
//! ```
//! Errors are one line on standard error and exit code 1; `--can` / `--is`
//! answer 0 (yes) or 2 (no), as nbdinfo does. A reader of standard output
//! that goes away (`nbd dump URI | head`) ends the command quietly.

mod copy;
mod dump;
mod extents;
mod failure;
mod info;
mod json;
mod map;
mod size;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Inspect, dump and copy Network Block Device exports.
#[derive(Debug, Parser)]
#[command(name = "nbd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show an export's size, flags and block sizes, or list a server's exports.
    Info(info::InfoArgs),
    /// Copy between NBD exports, files, stdin/stdout and null:.
    Copy(copy::CopyArgs),
    /// Hex dump of an export.
    Dump(dump::DumpArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Info(args) => info::run(args),
        Command::Copy(args) => copy::run(args).map_err(failure::Failure::from),
        Command::Dump(args) => dump::run(args),
    };
    match result {
        Ok(code) => code,
        Err(failure) => failure.report(),
    }
}
