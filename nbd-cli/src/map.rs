//! `nbd info --map`: an export's extents in one meta context, or their totals,
//! printed as nbdinfo prints them.

use std::collections::BTreeMap;
use std::process::ExitCode;

use nbd_proto::Config;

use crate::extents::{self, Run};
use crate::failure::{self, Failure};
use crate::json;
use crate::operand::Operand;
use crate::unknown_export;

/// Runs `--map` (and `--totals`).
pub fn run(
    server: &Operand,
    context: &str,
    totals: bool,
    as_json: bool,
) -> Result<ExitCode, Failure> {
    let config = Config::default().meta_context(context.to_string());
    let mut client = unknown_export::connect(server, config)?;
    if !client.connection().can_meta_context(context) {
        return Err(nbd_proto::Error::NotSupported(format!(
            "--map: server does not support metadata context {context:?}"
        ))
        .into());
    }
    let runs = extents::map(&mut client, context)?;
    client.shutdown()?;
    let out = if totals {
        render_totals(as_json, context, &runs)
    } else {
        render_map(as_json, context, &runs)
    };
    failure::print(&out)?;
    Ok(ExitCode::SUCCESS)
}

fn description_field(context: &str, flags: u64) -> String {
    extents::describe(context, flags)
        .map(|d| format!(", \"description\": {}", json::quote(&d)))
        .unwrap_or_default()
}

/// One line per run: offset, length, status and its description.
pub fn render_map(as_json: bool, context: &str, runs: &[Run]) -> String {
    if as_json {
        let rows: Vec<String> = runs
            .iter()
            .map(|r| {
                format!(
                    "{{ \"offset\": {}, \"length\": {}, \"type\": {}{}}}",
                    r.offset,
                    r.length,
                    r.flags,
                    description_field(context, r.flags)
                )
            })
            .collect();
        return format!("[\n{}\n]\n", rows.join(",\n"));
    }
    let mut out = String::new();
    for r in runs {
        out.push_str(&format!("{:10}  {:10}  {:3}", r.offset, r.length, r.flags));
        if let Some(d) = extents::describe(context, r.flags) {
            out.push_str(&format!("  {d}"));
        }
        out.push('\n');
    }
    out
}

/// One line per status: bytes, share of the export, status, description.
pub fn render_totals(as_json: bool, context: &str, runs: &[Run]) -> String {
    let mut totals: BTreeMap<u64, u64> = BTreeMap::new();
    for r in runs {
        *totals.entry(r.flags).or_default() += r.length;
    }
    let whole: u64 = totals.values().sum();
    let percent = |n: u64| {
        if whole == 0 {
            0.0
        } else {
            n as f64 * 100.0 / whole as f64
        }
    };
    if as_json {
        let rows: Vec<String> = totals
            .iter()
            .map(|(&flags, &size)| {
                format!(
                    "{{ \"size\": {size}, \"percent\": {}, \"type\": {flags}{} }}",
                    json::g(percent(size)),
                    description_field(context, flags)
                )
            })
            .collect();
        return format!("[\n{}\n]\n", rows.join(",\n"));
    }
    let mut out = String::new();
    for (&flags, &size) in &totals {
        out.push_str(&format!("{size:10} {:5.1}% {flags:3}", percent(size)));
        if let Some(d) = extents::describe(context, flags) {
            out.push_str(&format!(" {d}"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs() -> Vec<Run> {
        vec![
            Run {
                offset: 0,
                length: 196608,
                flags: 3,
            },
            Run {
                offset: 196608,
                length: 4096,
                flags: 0,
            },
            Run {
                offset: 200704,
                length: 847872,
                flags: 3,
            },
        ]
    }

    #[test]
    fn map_text_and_json_match_nbdinfo() {
        let text = render_map(false, "base:allocation", &runs());
        assert_eq!(
            text.lines().next(),
            Some("         0      196608    3  hole,zero")
        );
        let json = render_map(true, "base:allocation", &runs());
        assert!(json.contains(
            "{ \"offset\": 196608, \"length\": 4096, \"type\": 0, \"description\": \"data\"},"
        ));
    }

    #[test]
    fn totals_match_nbdinfo() {
        let text = render_totals(false, "base:allocation", &runs());
        assert_eq!(
            text,
            "      4096   0.4%   0 data\n   1044480  99.6%   3 hole,zero\n"
        );
        let json = render_totals(true, "base:allocation", &runs());
        assert!(json.contains(
            "{ \"size\": 4096, \"percent\": 0.390625, \"type\": 0, \"description\": \"data\" }"
        ));
        assert!(json.contains("\"percent\": 99.6094"));
    }
}
