//! The report `nbd info` prints about one export or a server's exports, as
//! text or JSON, laid out as nbdinfo lays it out (newest libnbd where it
//! differs from older ones: `"extended"` in JSON, `using extended packets`,
//! block sizes in words where that says something new).

use std::fmt::Write as _;

use nbd_blocking::Error;
use nbd_proto::Connection;

use crate::json::{self, Value};
use crate::size::human_size;

/// What is printed about one export.
pub struct ExportReport {
    pub name: String,
    pub description: Option<String>,
    /// What file(1) says of the first bytes (`--content`).
    pub content: Option<String>,
    /// `None` for a server program the command started, as nbdinfo omits it.
    pub uri: Option<String>,
    pub size: u64,
    /// The meta contexts the server offers for the export, if it was asked.
    pub contexts: Option<Vec<String>>,
    pub flags: Vec<(&'static str, bool)>,
    pub block_sizes: Option<nbd_proto::BlockSizes>,
}

impl ExportReport {
    /// What `c` knows of its current export, named `name`.
    pub fn of(c: &Connection, name: &str, uri: Option<&str>) -> Result<Self, Error> {
        Ok(ExportReport {
            name: name.to_string(),
            description: c.description().map(str::to_string),
            content: None,
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
}

/// How the output looks.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub json: bool,
    /// ANSI colours in the text form (nbdinfo's `--color`).
    pub colour: bool,
}

const GREY: &str = "\x1b[22;90m";
const BOLD: &str = "\x1b[1;30m";
const GREEN: &str = "\x1b[22;32m";
const RED: &str = "\x1b[22;31m";
const RESTORE: &str = "\x1b[0m";

/// The report of `exports`, reached over `c`.
pub fn render(style: Style, c: &Connection, exports: &[ExportReport]) -> String {
    let protocol = c.protocol().unwrap_or("unknown");
    let structured = c.structured_replies_negotiated();
    let extended = c.extended_headers_negotiated();
    let tls = c.tls_negotiated();
    if style.json {
        let mut out = render_json(protocol, tls, structured, extended, exports);
        out.push('\n');
        return out;
    }
    let packets = if extended {
        "extended"
    } else if structured {
        "structured"
    } else {
        "simple"
    };
    let paint = |code: &'static str| if style.colour { code } else { "" };
    // Writing to a String cannot fail.
    let mut out = String::new();
    let with = if tls { "with" } else { "without" };
    let _ = writeln!(
        out,
        "{}protocol: {protocol} {with} TLS, using {packets} packets",
        paint(GREY)
    );
    out.push_str(paint(RESTORE));
    for e in exports {
        // As nbdinfo colours it: the name, description, size, content and
        // URI in bold; the contexts and rotation in grey; each capability
        // green or red.
        out.push_str(paint(BOLD));
        let _ = writeln!(out, "export={}:", json::quote(&e.name));
        if let Some(d) = &e.description {
            let _ = writeln!(out, "\tdescription: {d}");
        }
        let _ = writeln!(out, "\texport-size: {}", with_words(e.size));
        if let Some(content) = &e.content {
            let _ = writeln!(out, "\tcontent: {content}");
        }
        if let Some(uri) = &e.uri {
            let _ = writeln!(out, "\turi: {uri}");
        }
        out.push_str(paint(RESTORE));
        out.push_str(paint(GREY));
        if let Some(contexts) = &e.contexts {
            let _ = writeln!(out, "\tcontexts:");
            for c in contexts {
                let _ = writeln!(out, "\t\t{c}");
            }
        }
        for (k, v) in &e.flags {
            if k.starts_with("can_") {
                out.push_str(paint(if *v { GREEN } else { RED }));
                let _ = writeln!(out, "\t{k}: {v}");
                out.push_str(paint(RESTORE));
            } else {
                let _ = writeln!(out, "\t{k}: {v}");
                if *k == "is_rotational" {
                    out.push_str(paint(RESTORE));
                }
            }
        }
        if let Some(b) = e.block_sizes {
            let _ = writeln!(
                out,
                "\tblock_size_minimum: {}",
                with_words(b.minimum.into())
            );
            let _ = writeln!(
                out,
                "\tblock_size_preferred: {}",
                with_words(b.preferred.into())
            );
            let _ = writeln!(
                out,
                "\tblock_size_maximum: {}",
                with_words(b.maximum.into())
            );
        }
    }
    out
}

/// A size, and in parentheses its binary-unit form where that says
/// something new (`1048576 (1M)`, but `1000`), as nbdinfo prints sizes.
fn with_words(size: u64) -> String {
    let human = human_size(size);
    if human == size.to_string() {
        human
    } else {
        format!("{size} ({human})")
    }
}

fn render_json(
    protocol: &str,
    tls: bool,
    structured: bool,
    extended: bool,
    exports: &[ExportReport],
) -> String {
    let head = json::fields(
        &[
            ("protocol", Value::Str(protocol.into())),
            ("TLS", Value::Bool(tls)),
            ("structured", Value::Bool(structured)),
            ("extended", Value::Bool(extended)),
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
            if let Some(content) = &e.content {
                f.push(("content", Value::Str(content.clone())));
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
