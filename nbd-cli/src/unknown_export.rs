//! Selecting an export, and saying plainly when the server has none of that name.
//!
//! A server that does not know the export answers `NBD_REP_ERR_UNKNOWN`. The
//! bare protocol error reads like a fault of the server; the user needs the
//! name they asked for and the way to find the right one (`--list`).

use std::io;

use nbd_blocking::{Client, Error};
use nbd_proto::{Config, OptionReplyError};

use crate::operand::Operand;

/// Connects to `server` and selects its export as `config` says, negotiating
/// in opt mode so that a refusal of the export is explained by [`explain`].
pub fn connect(server: &Operand, config: Config) -> Result<Client, Error> {
    let mut client = server.connect(config.opt_mode(true))?;
    if client.connection().is_negotiating() {
        if let Err(e) = client.opt_go() {
            return Err(explain(server, client.connection().export_name(), e));
        }
    }
    Ok(client)
}

/// `e`, from asking `server` for `export`: a refusal for want of such an
/// export names it and suggests `--list`; any other error names the server.
pub fn explain(server: &Operand, export: &str, e: Error) -> Error {
    match e {
        Error::Nbd(nbd_proto::Error::OptionRefused {
            option,
            reply: OptionReplyError::Unknown,
            message,
        }) => {
            let because = if message.0.is_empty() {
                String::new()
            } else {
                format!(": {}", terminal_safe(&message.0))
            };
            Error::Io(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{server}: the server has no export \"{}\" \
                     (it refused {option} with NBD_REP_ERR_UNKNOWN{because}); \
                     to see its exports, use --list",
                    terminal_safe(export)
                ),
            ))
        }
        other => server.name_in(other),
    }
}

/// `text` with what a terminal would act on (control characters, and the
/// marks that reorder the text around them) escaped; quotes and every other
/// printable character are left as they are, to read as the server wrote them.
pub fn terminal_safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let acts = c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if acts {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_safe_escapes_only_what_a_terminal_acts_on() {
        assert_eq!(terminal_safe("export 'a' \"b\" é"), "export 'a' \"b\" é");
        assert_eq!(
            terminal_safe("a\x1b[2Jb\nc\u{202e}d"),
            "a\\u{1b}[2Jb\\nc\\u{202e}d"
        );
    }

    #[test]
    fn an_unknown_export_is_named_with_the_way_to_list() {
        let server = Operand::Word("nbd://host/x".into());
        let refused = Error::Nbd(nbd_proto::Error::OptionRefused {
            option: nbd_proto::NbdOption::Go,
            reply: OptionReplyError::Unknown,
            message: nbd_proto::ServerText("export 'x' not present\x07".into()),
        });
        let text = explain(&server, "x\n", refused).to_string();
        assert_eq!(
            text,
            "nbd://host/x: the server has no export \"x\\n\" (it refused NBD_OPT_GO \
             with NBD_REP_ERR_UNKNOWN: export 'x' not present\\u{7}); to see its exports, use --list"
        );
    }
}
