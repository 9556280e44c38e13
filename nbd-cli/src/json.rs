//! A small JSON writer laid out as nbdinfo lays out its output (tabs, one field a line).

use std::fmt::Write;

/// A JSON string literal with everything JSON requires escaped.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One field value.
pub enum Value {
    /// A string.
    Str(String),
    /// A boolean.
    Bool(bool),
    /// A number.
    Num(u64),
}

impl Value {
    fn render(&self) -> String {
        match self {
            Value::Str(s) => quote(s),
            Value::Bool(b) => b.to_string(),
            Value::Num(n) => n.to_string(),
        }
    }
}

/// Renders `fields` as the lines of an object at `indent` tabs (without braces).
pub fn fields(fields: &[(&str, Value)], indent: usize) -> String {
    let tabs = "\t".repeat(indent);
    fields
        .iter()
        .map(|(k, v)| format!("{tabs}{}: {}", quote(k), v.render()))
        .collect::<Vec<_>>()
        .join(",\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_control_characters() {
        assert_eq!(quote("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
