//! What names a server on the command line: an NBD URI, or `[ CMD ARGS ... ]`,
//! a server program that the command starts by socket activation and stops
//! when it is done, as libnbd's tools take it:
//!
//! ```text
//! nbd info -- [ nbdkit memory 1G ]
//! nbd copy -- [ qemu-nbd -f qcow2 disk.qcow2 ] out.raw
//! ```
//!
//! `[` and `]` are words of their own; the `--` keeps the server's options
//! (`-f`, `--filter=...`) from being read as the `nbd` command's.
//!
//! A URI may require TLS (`nbds://`, `nbds+unix://`, `nbds+vsock://`) with
//! the `tls-*` parameters of the NBD URI specification, a PSK file included:
//!
//! ```text
//! nbd info 'nbds://server.example/disk?tls-certificates=/etc/pki/libnbd'
//! nbd copy 'nbds+unix://alice@/?socket=/run/nbd.sock&tls-psk-file=keys.psk' out.raw
//! ```

use std::fmt;
use std::io;

use nbd_blocking::{Client, Error, Target, UriPolicy};
use nbd_proto::Config;

/// One operand of a subcommand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    /// A single word: an NBD URI, or for `nbd copy` also a file, `-` or `null:`.
    Word(String),
    /// `[ CMD ARGS ... ]`: a server program and its arguments.
    Command(Vec<String>),
}

impl fmt::Display for Operand {
    /// As the user wrote it, for messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Word(word) => f.write_str(word),
            Operand::Command(argv) => write!(f, "[ {} ]", argv.join(" ")),
        }
    }
}

impl Operand {
    /// The word, when it names no NBD server but a local file, `-` or
    /// `null:` (for `nbd copy`); `None` for a URI or a server program.
    pub fn local(&self) -> Option<&str> {
        match self {
            Operand::Word(word) if !(word.starts_with("nbd") && word.contains("://")) => Some(word),
            _ => None,
        }
    }

    /// The word, taken as a URI (where only an NBD server will do); `None`
    /// for a server program, which has no URI.
    pub fn uri(&self) -> Option<&str> {
        match self {
            Operand::Word(word) => Some(word),
            Operand::Command(_) => None,
        }
    }

    /// Reaches the server and negotiates as `config` says; a URI's export
    /// name replaces `config.export_name`. A server program is started by
    /// socket activation and stopped when the client goes.
    ///
    /// The URI is the user's own, so it may name local files (such as
    /// `tls-psk-file`). An error names this operand unless it already names
    /// what was reached.
    ///
    /// `--timeout` (see `crate::deadline`) bounds connecting and the
    /// handshake; when it passes, the error says so.
    pub fn connect(&self, config: Config) -> Result<Client, Error> {
        let config = crate::deadline::apply(config);
        let result = match self {
            Operand::Word(uri) => Client::connect_uri_with_policy(uri, config, &cli_policy()),
            Operand::Command(argv) => Client::connect(&Target::activation(argv), config),
        };
        result.map_err(|e| {
            if crate::deadline::timed_out(&e) {
                let what = "the connection and the handshake";
                crate::deadline::explain(e, &self.to_string(), what)
            } else {
                self.name_in(e)
            }
        })
    }

    /// `e`, naming this operand unless it names what was reached already.
    pub fn name_in(&self, e: Error) -> Error {
        match e {
            // These name it already.
            Error::Connect { .. }
            | Error::Resolve { .. }
            | Error::Spawn { .. }
            | Error::Unsupported(_) => e,
            other => {
                let message = format!("{self}: {other}");
                let kind = io::Error::from(other).kind();
                Error::Io(io::Error::new(kind, message))
            }
        }
    }
}

/// The URIs the `nbd` command accepts: every transport, and local files,
/// since the user names their own.
fn cli_policy() -> UriPolicy {
    UriPolicy {
        local_files: true,
        ..UriPolicy::default()
    }
}

/// Groups positional words into operands: `[` up to the next `]` is one
/// server command (a `[` inside it is an argument, as in libnbd's tools);
/// any other word is an operand by itself.
pub fn group(words: &[String]) -> Result<Vec<Operand>, String> {
    let mut operands = Vec::new();
    let mut rest = words;
    while let Some((first, tail)) = rest.split_first() {
        match first.as_str() {
            "[" => {
                let end = tail
                    .iter()
                    .position(|w| w == "]")
                    .ok_or_else(|| format!("`[` without a matching `]` in {}", words.join(" ")))?;
                if end == 0 {
                    return Err("`[ ]` names no server command".into());
                }
                operands.push(Operand::Command(tail[..end].to_vec()));
                rest = &tail[end + 1..];
            }
            "]" => return Err(format!("`]` without a `[` in {}", words.join(" "))),
            _ => {
                operands.push(Operand::Word(first.clone()));
                rest = tail;
            }
        }
    }
    Ok(operands)
}

/// Exactly `N` operands, named by `names` in the message when the count is wrong.
pub fn exactly<const N: usize>(words: &[String], names: [&str; N]) -> Result<[Operand; N], String> {
    let operands = group(words)?;
    let count = operands.len();
    operands.try_into().map_err(|_| {
        format!(
            "expected {} ({}), got {count}: {}",
            names.join(" and "),
            if N == 1 {
                "one operand".to_string()
            } else {
                format!("{N} operands")
            },
            words.join(" ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    fn command(line: &str) -> Operand {
        Operand::Command(words(line))
    }

    #[test]
    fn uris_commands_and_files_group_as_written() {
        assert_eq!(
            group(&words("nbd://h/x")).unwrap(),
            [Operand::Word("nbd://h/x".into())]
        );
        assert_eq!(
            group(&words("[ nbdkit -f memory 1G ]")).unwrap(),
            [command("nbdkit -f memory 1G")]
        );
        assert_eq!(
            group(&words("[ qemu-nbd -f qcow2 d.qcow2 ] out.raw")).unwrap(),
            [
                command("qemu-nbd -f qcow2 d.qcow2"),
                Operand::Word("out.raw".into())
            ]
        );
        assert_eq!(
            group(&words("[ a ] [ b [ c ]")).unwrap(),
            [command("a"), command("b [ c")]
        );
    }

    #[test]
    fn unbalanced_or_empty_brackets_are_errors() {
        for (line, says) in [
            ("[ nbdkit memory 1G", "without a matching"),
            ("nbdkit memory 1G ]", "without a `[`"),
            ("[ ]", "no server command"),
            ("[ a ] ]", "without a `[`"),
        ] {
            let err = group(&words(line)).unwrap_err();
            assert!(err.contains(says), "{line}: {err}");
        }
    }

    #[test]
    fn the_operand_count_is_checked() {
        let [one] = exactly(&words("[ nbdkit null ]"), ["SERVER"]).unwrap();
        assert_eq!(one, command("nbdkit null"));
        let err = exactly(&words("[ a ] [ b ]"), ["SERVER"]).unwrap_err();
        assert!(err.contains("got 2"), "{err}");
        let err = exactly(&words("[ a ]"), ["SRC", "DST"]).unwrap_err();
        assert!(err.contains("SRC and DST"), "{err}");
        let [src, dst] = exactly(&words("- [ b ]"), ["SRC", "DST"]).unwrap();
        assert_eq!((src, dst), (Operand::Word("-".into()), command("b")));
    }

    #[test]
    fn operands_name_themselves_and_say_what_they_are() {
        assert_eq!(
            command("nbdkit memory 1G").to_string(),
            "[ nbdkit memory 1G ]"
        );
        assert_eq!(command("x").local(), None);
        assert_eq!(Operand::Word("nbd+unix:///?socket=/s".into()).local(), None);
        assert_eq!(Operand::Word("disk.img".into()).local(), Some("disk.img"));
        assert_eq!(Operand::Word("-".into()).local(), Some("-"));
    }
}
