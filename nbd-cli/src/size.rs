//! Sizes as people write them (`256K`, `1M`) and as nbdinfo prints them.

/// Parses a byte count with an optional binary suffix: `4096`, `256K`, `1M`, `2G`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in {text:?}")),
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("not a size: {text:?}"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size too large: {text:?}"))
}

/// The largest binary unit that divides `size` exactly, as nbdinfo's `export-size-str`.
pub fn human_size(size: u64) -> String {
    const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];
    if size == 0 {
        return "0".into();
    }
    let mut value = size;
    let mut unit = None;
    for u in UNITS {
        if value % 1024 != 0 {
            break;
        }
        value /= 1024;
        unit = Some(u);
    }
    match unit {
        Some(u) => format!("{value}{u}"),
        None => size.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_match_nbdinfo() {
        assert_eq!(human_size(1_048_576), "1M");
        assert_eq!(human_size(1_572_864), "1536K");
        assert_eq!(human_size(1_000_000), "1000000");
        assert_eq!(human_size(1023), "1023");
        assert_eq!(human_size(10 << 30), "10G");
        assert_eq!(human_size(0), "0");
    }

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("256K"), Ok(256 * 1024));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }
}
