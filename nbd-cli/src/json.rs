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

/// A number as C's `%g` prints it: six significant digits, trailing zeroes dropped.
pub fn g(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let exponent = x.abs().log10().floor() as i32;
    if !(-4..6).contains(&exponent) {
        let s = format!("{x:.5e}");
        let (mantissa, exp) = s.split_once('e').expect("scientific form");
        let mantissa = trim_zeroes(mantissa);
        let exp: i32 = exp.parse().expect("exponent");
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let decimals = (5 - exponent).max(0) as usize;
    trim_zeroes(&format!("{x:.decimals$}")).to_string()
}

fn trim_zeroes(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn g_matches_c() {
        assert_eq!(g(0.390625), "0.390625");
        assert_eq!(g(99.609375), "99.6094");
        assert_eq!(g(100.0), "100");
        assert_eq!(g(1.5625), "1.5625");
        assert_eq!(g(98.4375), "98.4375");
        assert_eq!(g(0.0000123), "1.23e-05");
        assert_eq!(g(33.333333333), "33.3333");
    }

    #[test]
    fn quotes_control_characters() {
        assert_eq!(quote("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
