//! `nbd info`: what an export (or a server's exports) looks like, as nbdinfo shows it.

use std::io::{self, IsTerminal};
use std::process::ExitCode;

use nbd_blocking::{Client, Error};
use nbd_proto::uri::NbdUri;
use nbd_proto::Config;

use crate::content;
use crate::failure::{self, Failure};
use crate::json;
use crate::operand::{self, Operand};
use crate::report::{self, ExportReport, Style};
use crate::unknown_export;

/// Options of `nbd info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// NBD URI of the export (or of the server, with --list), or, after
    /// `--`, `[ CMD ARGS ... ]`: a server program started by socket
    /// activation and stopped at the end.
    #[arg(value_name = "URI | [ CMD ARGS ... ]", required = true)]
    pub server: Vec<String>,
    #[command(flatten)]
    pub timeout: crate::deadline::TimeoutArg,
    /// Print a JSON document shaped like `nbdinfo --json`.
    #[arg(long)]
    pub json: bool,
    /// Print only the size in bytes (with --json too, as nbdinfo 1.14 does).
    #[arg(long, conflicts_with_all = ["list", "question", "uri"])]
    pub size: bool,
    /// Print only the export's URI (with --json, as a JSON string).
    #[arg(long, conflicts_with_all = ["list", "question", "map"])]
    pub uri: bool,
    /// Show what file(1) makes of the first bytes (the default without --list).
    #[arg(long, conflicts_with = "no_content")]
    pub content: bool,
    /// Do not read the export to show its content (the default with --list).
    #[arg(long)]
    pub no_content: bool,
    /// Colour the text output (the default when standard output is a terminal).
    #[arg(
        long,
        visible_alias = "colour",
        alias = "colors",
        alias = "colours",
        overrides_with = "no_color"
    )]
    pub color: bool,
    /// Plain text output, even on a terminal.
    #[arg(
        long,
        visible_alias = "no-colour",
        alias = "no-colors",
        alias = "no-colours",
        overrides_with = "color"
    )]
    pub no_color: bool,
    /// List every export of the server.
    #[arg(short = 'L', long, conflicts_with = "question")]
    pub list: bool,
    /// Exit 0 if the export supports FEATURE, 2 if not, 1 on error
    /// (connect, read, write, flush, fua, trim, zero, fast-zero, df, cache, multi-conn,
    /// structured-reply, extended-headers, block-status-payload).
    #[arg(long, value_name = "FEATURE", group = "question")]
    pub can: Option<String>,
    /// Exit 0 if the export does not support FEATURE, 2 if it does, 1 on error.
    #[arg(long, value_name = "FEATURE", group = "question")]
    pub cannot: Option<String>,
    /// Exit 0 if the export has PROPERTY, 2 if not, 1 on error (read-only, rotational, tls).
    #[arg(long, value_name = "PROPERTY", group = "question")]
    pub is: Option<String>,
    /// Exit 0 if the export does not have PROPERTY, 2 if it does, 1 on error.
    #[arg(long, value_name = "PROPERTY", group = "question")]
    pub isnt: Option<String>,
    /// Exit 0 if the connection has FEATURE (structured-reply, extended-headers), 2 if not.
    #[arg(long, value_name = "FEATURE", group = "question")]
    pub has: Option<String>,
    /// Exit 0 if the connection does not have FEATURE, 2 if it does.
    #[arg(long, value_name = "FEATURE", group = "question")]
    pub hasnt: Option<String>,
    /// Print the extents of a meta context (default base:allocation) as nbdinfo --map.
    #[arg(
        long,
        value_name = "CONTEXT",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "base:allocation",
        conflicts_with_all = ["size", "list", "question"]
    )]
    pub map: Option<String>,
    /// With --map: how much of the export has each status.
    #[arg(long, requires = "map")]
    pub totals: bool,
}

impl InfoArgs {
    /// The yes/no question asked, if any: the feature and whether the
    /// answer is wanted negated (`--cannot`, `--isnt`, `--hasnt`).
    fn question(&self) -> Option<(&str, bool)> {
        let asked = [
            (&self.can, false),
            (&self.is, false),
            (&self.has, false),
            (&self.cannot, true),
            (&self.isnt, true),
            (&self.hasnt, true),
        ];
        asked
            .into_iter()
            .find_map(|(feature, negated)| Some((feature.as_deref()?, negated)))
    }

    /// Whether to probe the content: as asked, else only for one export.
    fn probe_content(&self) -> bool {
        if self.content || self.no_content {
            return self.content;
        }
        !self.list
    }

    /// How to print the report.
    fn style(&self) -> Style {
        let colour = if self.color || self.no_color {
            self.color
        } else {
            io::stdout().is_terminal()
        };
        Style {
            json: self.json,
            colour: colour && !self.json,
        }
    }

    /// The one operand: the server.
    pub fn server(&self) -> Result<Operand, String> {
        let [server] = operand::exactly(&self.server, ["URI or [ CMD ARGS ... ]"])?;
        Ok(server)
    }
}

/// Runs `nbd info` against `server`.
pub fn run(args: &InfoArgs, server: &Operand) -> Result<ExitCode, Failure> {
    if let Some((feature, negated)) = args.question() {
        return answer_feature(server, feature, negated);
    }
    if args.list {
        return list(args, server);
    }
    if let Some(context) = &args.map {
        return crate::map::run(server, context, args.totals, args.json);
    }
    if args.size {
        let client = unknown_export::connect(server, Config::default())?;
        let size = client.size()?;
        client.shutdown()?;
        failure::print(&format!("{size}\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.uri {
        return print_uri(args, server);
    }
    // Opt mode, so the meta contexts can be listed before the export is selected.
    let config = Config::default().opt_mode(true).full_info(true);
    let mut client = server.connect(config)?;
    let mut contexts = None;
    if client.connection().is_negotiating() {
        if client.connection().structured_replies_negotiated() {
            match client.opt_list_meta_context(&[]) {
                Ok(listed) => contexts = Some(listed),
                // A server may refuse the listing because the export does
                // not exist; selecting it says so with the right option.
                Err(e) => {
                    select(&mut client, server)?;
                    return Err(server.name_in(e).into());
                }
            }
        }
        select(&mut client, server)?;
    }
    let conn = client.connection();
    let name = conn
        .canonical_name()
        .unwrap_or(conn.export_name())
        .to_string();
    let mut export = ExportReport::of(conn, &name, server.uri())?;
    export.contexts = contexts;
    if args.probe_content() {
        export.content = content::probe(&mut client);
    }
    let report = report::render(args.style(), client.connection(), &[export]);
    client.shutdown()?;
    failure::print(&report)?;
    Ok(ExitCode::SUCCESS)
}

/// `--uri`: the URI the export is reached by, once the server has accepted
/// it (as nbdinfo, which connects first); a server program has none.
fn print_uri(args: &InfoArgs, server: &Operand) -> Result<ExitCode, Failure> {
    let Some(uri) = server.uri() else {
        return Err(nbd_proto::Error::NotSupported(format!(
            "--uri: {server} is a server program started by this command: it has no URI"
        ))
        .into());
    };
    let client = unknown_export::connect(server, Config::default())?;
    client.shutdown()?;
    let line = if args.json {
        json::quote(uri)
    } else {
        uri.to_string()
    };
    failure::print(&format!("{line}\n"))?;
    Ok(ExitCode::SUCCESS)
}

/// Selects the export named in the client's configuration.
fn select(client: &mut nbd_blocking::Client, server: &Operand) -> Result<(), Error> {
    client
        .opt_go()
        .map_err(|e| unknown_export::explain(server, client.connection().export_name(), e))
}

/// Whether a `--can` / `--is` / `--has` question holds (or, `negated`, does
/// not), answered by exit code as nbdinfo does.
fn answer_feature(server: &Operand, feature: &str, negated: bool) -> Result<ExitCode, Failure> {
    let known = [
        "connect",
        "read",
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "df",
        "cache",
        "multi-conn",
        "structured-reply",
        "extended-headers",
        "block-status-payload",
        "read-only",
        "rotational",
        "tls",
    ];
    if !known.contains(&feature) {
        return Err(nbd_proto::Error::InvalidArgument(format!(
            "unknown --can, --is or --has feature {feature:?}"
        ))
        .into());
    }
    let client = unknown_export::connect(server, Config::default())?;
    let c = client.connection();
    let yes = match feature {
        "connect" | "read" => true,
        "write" => !c.is_read_only()?,
        "flush" => c.can_flush()?,
        "fua" => c.can_fua()?,
        "trim" => c.can_trim()?,
        "zero" => c.can_zero()?,
        "fast-zero" => c.can_fast_zero()?,
        "df" => c.can_df()?,
        "cache" => c.can_cache()?,
        "multi-conn" => c.can_multi_conn()?,
        "structured-reply" => c.structured_replies_negotiated(),
        "extended-headers" => c.extended_headers_negotiated(),
        // As the core requires before it sends a filter: the flag means
        // nothing without extended headers.
        "block-status-payload" => {
            let flags = c.export_info().flags.unwrap_or_default();
            c.extended_headers_negotiated()
                && flags.contains(nbd_proto::TransmissionFlags::BLOCK_STATUS_PAYLOAD)
        }
        "read-only" => c.is_read_only()?,
        "rotational" => c.is_rotational()?,
        "tls" => c.tls_negotiated(),
        _ => unreachable!("checked above"),
    };
    client.shutdown()?;
    Ok(if yes != negated {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Lists every export through opt mode, asking about each in turn; with
/// `--content`, each export is also read over a connection of its own (as
/// nbdinfo does), since reading ends the negotiation.
fn list(args: &InfoArgs, server: &Operand) -> Result<ExitCode, Failure> {
    let mut client = server.connect(Config::default().opt_mode(true).full_info(true))?;
    let base: Option<NbdUri> = server.uri().map(str::parse).transpose()?;
    if !client.connection().is_negotiating() {
        return Err(nbd_proto::Error::NotSupported(
            "the server cannot list exports (no option negotiation)".into(),
        )
        .into());
    }
    let entries = client.opt_list().map_err(|e| server.name_in(e))?;
    let mut exports = Vec::new();
    for entry in &entries {
        client.set_export_name(&entry.name)?;
        client.opt_info().map_err(|e| server.name_in(e))?;
        // A server program has no URI to name its exports by.
        let uri = base.as_ref().map(|base| {
            let mut uri = base.clone();
            uri.export_name = entry.name.clone();
            uri.to_string()
        });
        let mut export = ExportReport::of(client.connection(), &entry.name, uri.as_deref())?;
        if export.description.is_none() && !entry.description.is_empty() {
            export.description = Some(entry.description.clone());
        }
        if client.connection().structured_replies_negotiated() {
            // As nbdinfo: a server that refuses the listing just has no contexts shown.
            export.contexts = client.opt_list_meta_context(&[]).ok();
        }
        if args.probe_content() {
            export.content = content_of(server, &entry.name)?;
        }
        exports.push(export);
    }
    let report = report::render(args.style(), client.connection(), &exports);
    client.opt_abort()?;
    failure::print(&report)?;
    Ok(ExitCode::SUCCESS)
}

/// The content of export `name` of `server`, read over a new connection.
fn content_of(server: &Operand, name: &str) -> Result<Option<String>, Error> {
    let mut client: Client = server.connect(Config::default().opt_mode(true))?;
    if client.connection().is_negotiating() {
        client.set_export_name(name)?;
        select(&mut client, server)?;
    }
    let content = content::probe(&mut client);
    client.shutdown()?;
    Ok(content)
}
