//! `nbd info`: what an export (or a server's exports) looks like, as nbdinfo shows it.

use std::fmt::Write as _;
use std::process::ExitCode;

use nbd_blocking::Error;
use nbd_proto::uri::NbdUri;
use nbd_proto::{Config, Connection};

use crate::failure::{self, Failure};
use crate::json::{self, Value};
use crate::operand::{self, Operand};
use crate::size::human_size;
use crate::unknown_export;

/// Options of `nbd info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// NBD URI of the export (or of the server, with --list), or, after
    /// `--`, `[ CMD ARGS ... ]`: a server program started by socket
    /// activation and stopped at the end.
    #[arg(value_name = "URI | [ CMD ARGS ... ]", required = true)]
    pub server: Vec<String>,
    /// Print a JSON document shaped like `nbdinfo --json`.
    #[arg(long)]
    pub json: bool,
    /// Print only the size in bytes (with --json too, as nbdinfo 1.14 does).
    #[arg(long, conflicts_with_all = ["list", "question"])]
    pub size: bool,
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
    let mut export = describe(conn, &name, server.uri())?;
    export.contexts = contexts;
    let report = render_exports(args.json, conn, &[export]);
    client.shutdown()?;
    failure::print(&report)?;
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

/// Lists every export through opt mode, asking about each in turn.
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
        let mut export = describe(client.connection(), &entry.name, uri.as_deref())?;
        if export.description.is_none() && !entry.description.is_empty() {
            export.description = Some(entry.description.clone());
        }
        exports.push(export);
    }
    let report = render_exports(args.json, client.connection(), &exports);
    client.opt_abort()?;
    failure::print(&report)?;
    Ok(ExitCode::SUCCESS)
}

/// What is printed about one export.
struct ExportReport {
    name: String,
    description: Option<String>,
    /// `None` for a server program the command started, as nbdinfo omits it.
    uri: Option<String>,
    size: u64,
    contexts: Option<Vec<String>>,
    flags: Vec<(&'static str, bool)>,
    block_sizes: Option<nbd_proto::BlockSizes>,
}

fn describe(c: &Connection, name: &str, uri: Option<&str>) -> Result<ExportReport, Error> {
    Ok(ExportReport {
        name: name.to_string(),
        description: c.description().map(str::to_string),
        uri: uri.map(str::to_string),
        size: c.size()?,
        contexts: None,
        flags: vec![
            ("is_rotational", c.is_rotational()?),
            ("is_read_only", c.is_read_only()?),
            ("can_cache", c.can_cache()?),
            ("can_df", c.can_df()?),
            ("can_fast_zero", c.can_fast_zero()?),
            ("can_flush", c.can_flush()?),
            ("can_fua", c.can_fua()?),
            ("can_multi_conn", c.can_multi_conn()?),
            ("can_trim", c.can_trim()?),
            ("can_zero", c.can_zero()?),
        ],
        block_sizes: c.block_sizes(),
    })
}

/// The report of `exports`, as text or JSON, as nbdinfo prints it.
fn render_exports(as_json: bool, c: &Connection, exports: &[ExportReport]) -> String {
    let protocol = c.protocol().unwrap_or("unknown");
    if as_json {
        let mut json = render_json(
            protocol,
            c.tls_negotiated(),
            c.structured_replies_negotiated(),
            exports,
        );
        json.push('\n');
        return json;
    }
    let packets = if c.structured_replies_negotiated() {
        "structured"
    } else {
        "simple"
    };
    // Writing to a String cannot fail.
    let mut out = String::new();
    let tls = if c.tls_negotiated() {
        "with"
    } else {
        "without"
    };
    let _ = writeln!(
        out,
        "protocol: {protocol} {tls} TLS, using {packets} packets"
    );
    for e in exports {
        let _ = writeln!(out, "export={}:", json::quote(&e.name));
        if let Some(d) = &e.description {
            let _ = writeln!(out, "\tdescription: {d}");
        }
        // As nbdinfo: the human form only where it says something new.
        let human = human_size(e.size);
        if human == e.size.to_string() {
            let _ = writeln!(out, "\texport-size: {}", e.size);
        } else {
            let _ = writeln!(out, "\texport-size: {} ({human})", e.size);
        }
        if let Some(uri) = &e.uri {
            let _ = writeln!(out, "\turi: {uri}");
        }
        if let Some(contexts) = &e.contexts {
            let _ = writeln!(out, "\tcontexts:");
            for c in contexts {
                let _ = writeln!(out, "\t\t{c}");
            }
        }
        for (k, v) in &e.flags {
            let _ = writeln!(out, "\t{k}: {v}");
        }
        if let Some(b) = e.block_sizes {
            let _ = writeln!(out, "\tblock_size_minimum: {}", b.minimum);
            let _ = writeln!(out, "\tblock_size_preferred: {}", b.preferred);
            let _ = writeln!(out, "\tblock_size_maximum: {}", b.maximum);
        }
    }
    out
}

fn render_json(protocol: &str, tls: bool, structured: bool, exports: &[ExportReport]) -> String {
    let head = json::fields(
        &[
            ("protocol", Value::Str(protocol.into())),
            ("TLS", Value::Bool(tls)),
            ("structured", Value::Bool(structured)),
        ],
        0,
    );
    let bodies: Vec<String> = exports
        .iter()
        .map(|e| {
            let mut f = vec![("export-name", Value::Str(e.name.clone()))];
            if let Some(d) = &e.description {
                f.push(("description", Value::Str(d.clone())));
            }
            if let Some(uri) = &e.uri {
                f.push(("uri", Value::Str(uri.clone())));
            }
            let mut body = json::fields(&f, 1);
            if let Some(contexts) = &e.contexts {
                let items: Vec<String> = contexts
                    .iter()
                    .map(|c| format!("\t\t{}", json::quote(c)))
                    .collect();
                body.push_str(&format!(",\n\t\"contexts\": [\n{}\n\t]", items.join(",\n")));
            }
            let mut f = Vec::new();
            f.extend(e.flags.iter().map(|(k, v)| (*k, Value::Bool(*v))));
            if let Some(b) = e.block_sizes {
                f.push(("block_size_minimum", Value::Num(b.minimum.into())));
                f.push(("block_size_preferred", Value::Num(b.preferred.into())));
                f.push(("block_size_maximum", Value::Num(b.maximum.into())));
            }
            f.push(("export-size", Value::Num(e.size)));
            f.push(("export-size-str", Value::Str(human_size(e.size))));
            format!("\t{{\n{body},\n{}\n\t}}", json::fields(&f, 1))
        })
        .collect();
    format!("{{\n{head},\n\"exports\": [\n{} ]\n}}", bodies.join(",\n"))
}
