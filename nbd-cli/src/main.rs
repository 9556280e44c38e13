//! The `nbd` command: inspect, dump and copy NBD exports.
//!
//! ```text
//! nbd info [--json] [--size|--uri] [-L|--list] [--content|--no-content] [--color|--no-color] URI
//! nbd info --can|--cannot|--is|--isnt|--has|--hasnt FEATURE URI
//! nbd copy [-C N] [-T N] [-R N] [--request-size N] [--queue-size N] [-S N]
//!          [--destination-is-zero] [--allocated] [--synchronous] [--flush]
//!          [--no-extents] [--changed CONTEXT] [-p|--progress[=FD]] [--retries N]
//!          SRC DST
//! nbd dump [-o|--offset N] [-n|--length N] [--color|--no-color] URI
//! (info, copy and dump take --timeout SECONDS; without it they wait as long
//! as the server takes)
//! nbd info [OPTIONS] -- [ CMD ARGS ... ]
//! nbd copy [OPTIONS] -- [ CMD ARGS ... ] DST       (either side may be [ ... ])
//! ```
//! `[ CMD ARGS ... ]` in place of a URI starts that server program by socket
//! activation (as libnbd's tools do) and stops it when the command ends.
//!
//! `-v` / `--verbose` (or `LIBNBD_DEBUG=1`) prints the library's protocol
//! trace to standard error.
//!
//! Errors are one line on standard error and exit code 1; usage errors exit 1
//! too, so that a mistyped option is never read as the "no" (2) with which
//! `--can` / `--is` / `--has` answer, as nbdinfo does. A reader of standard output
//! that goes away (`nbd dump URI | head`) ends the command quietly.

mod content;
mod copy;
mod deadline;
mod dump;
mod extents;
mod failure;
mod hexdump;
mod info;
mod json;
mod map;
mod operand;
mod report;
mod retries;
mod size;
mod unknown_export;
mod verbose;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// Inspect, dump and copy Network Block Device exports.
#[derive(Debug, Parser)]
#[command(name = "nbd", version, about)]
struct Cli {
    /// Print the protocol trace (options, replies, commands) to standard
    /// error; `LIBNBD_DEBUG=1` does the same.
    #[arg(short, long, global = true)]
    verbose: bool,
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
    let cli = Cli::try_parse().unwrap_or_else(|e| exit_with_clap_message(e));
    if verbose::wanted(cli.verbose) {
        verbose::enable();
    }
    let result = match &cli.command {
        Command::Info(args) => {
            let server = args.server().unwrap_or_else(|e| usage_error("info", e));
            deadline::set(&args.timeout);
            info::run(args, &server).map_err(|f| f.explain_timeout(&server, "a reply"))
        }
        Command::Copy(args) => {
            let [src, dst] = args.operands().unwrap_or_else(|e| usage_error("copy", e));
            deadline::set(&args.timeout);
            retries::set(&args.retries);
            copy::run(args, &src, &dst).map_err(failure::Failure::from)
        }
        Command::Dump(args) => {
            let server = args.server().unwrap_or_else(|e| usage_error("dump", e));
            deadline::set(&args.timeout);
            dump::run(args, &server).map_err(|f| f.explain_timeout(&server, "a read"))
        }
    };
    match result {
        Ok(code) => code,
        Err(failure) => failure.report(),
    }
}

/// Operands that clap could not check (how `[ ... ]` groups): a usage
/// error of `subcommand`, reported as clap reports its own.
fn usage_error(subcommand: &str, message: String) -> ! {
    let mut cli = Cli::command();
    cli.build();
    exit_with_clap_message(match cli.find_subcommand_mut(subcommand) {
        Some(sub) => sub.error(clap::error::ErrorKind::WrongNumberOfValues, message),
        None => cli.error(clap::error::ErrorKind::WrongNumberOfValues, message),
    })
}

/// Ends the process for a clap outcome: help and version go to standard
/// output with exit code 0, usage errors to standard error with exit code 1
/// (clap's own `exit` gives them 2, which `--can` / `--is` use for "no").
fn exit_with_clap_message(e: clap::Error) -> ! {
    // Nothing sensible is left to do if printing the message fails.
    let _ = e.print();
    std::process::exit(if e.use_stderr() { 1 } else { 0 })
}
