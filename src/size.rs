//! Human-friendly sizes: `512`, `4K`, `1M`, `1.5G`, `2T`, `1GiB`.
//!
//! Suffixes are binary (K = KiB = 1024), as in nbdkit and qemu-img; a
//! fraction must come out as a whole number of bytes.

/// Parses `text` as a size for parameter `what` (named in the error).
pub fn parse_size(what: &str, text: &str) -> Result<u64, String> {
    let bad = |why: &str| {
        format!("invalid size {what}={text:?}: {why} (examples: 512, 4K, 1M, 1.5G, 2T, 1GiB)")
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => return Err(bad("unknown unit")),
    };
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(bad("not a number"));
    }
    let parse = |s: &str| -> Result<u128, String> {
        if s.is_empty() {
            Ok(0)
        } else {
            s.parse::<u128>().map_err(|_| bad("not a number"))
        }
    };
    if frac.len() > 18 {
        return Err(bad("too many decimals"));
    }
    let scale = 10u128.pow(frac.len() as u32);
    let mult = 1u128 << shift;
    let fraction = parse(frac)? * mult;
    let total = parse(whole)?
        .checked_mul(mult)
        .and_then(|w| w.checked_mul(scale))
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(|| bad("too large"))?;
    if total % scale != 0 {
        return Err(bad("not a whole number of bytes"));
    }
    u64::try_from(total / scale).map_err(|_| bad("too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn accepts_documented_forms() {
        for (text, want) in [
            ("512", 512),
            ("4K", 4096),
            ("4k", 4096),
            ("1M", 1 << 20),
            ("1.5G", 3 << 29),
            ("2T", 2 << 40),
            ("1GiB", 1 << 30),
            ("0", 0),
            (" 64KiB ", 64 << 10),
        ] {
            assert_eq!(parse_size("size", text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_garbage_naming_the_parameter() {
        for text in ["", "abc", "1X", "1.2.3", "0.3", "-1", "99999999999E", "."] {
            let err = parse_size("size", text).unwrap_err();
            assert!(err.contains("size="), "{err}");
        }
    }
}
