//! Human-friendly sizes: `512`, `4K`, `1M`, `1.5G`, `2T`, `1GiB`.
//!
//! Suffixes are binary (K = KiB = 1024), as in nbdkit and qemu-img; a
//! fraction must come out as a whole number of bytes.

/// A size [`parse_size`] refused, for the parameter it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {what}={text:?}: {why} (examples: 512, 4K, 1M, 1.5G, 2T, 1GiB)")]
pub struct SizeError {
    /// The parameter (`size`, `--memory-limit`).
    pub what: &'static str,
    pub text: String,
    pub why: SizeProblem,
}

/// What is wrong with a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SizeProblem {
    #[error("unknown unit")]
    UnknownUnit,
    #[error("not a number")]
    NotANumber,
    #[error("too many decimals")]
    TooManyDecimals,
    #[error("too large")]
    TooLarge,
    #[error("not a whole number of bytes")]
    NotWholeBytes,
}

/// Parses `text` as a size for parameter `what` (named in the error).
pub fn parse_size(what: &'static str, text: &str) -> Result<u64, SizeError> {
    let bad = |why| SizeError {
        what,
        text: text.to_owned(),
        why,
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
        _ => return Err(bad(SizeProblem::UnknownUnit)),
    };
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(bad(SizeProblem::NotANumber));
    }
    let parse = |s: &str| -> Result<u128, SizeError> {
        if s.is_empty() {
            Ok(0)
        } else {
            s.parse::<u128>().map_err(|_| bad(SizeProblem::NotANumber))
        }
    };
    if frac.len() > 18 {
        return Err(bad(SizeProblem::TooManyDecimals));
    }
    let scale = 10u128.pow(frac.len() as u32);
    let mult = 1u128 << shift;
    let fraction = parse(frac)? * mult;
    let total = parse(whole)?
        .checked_mul(mult)
        .and_then(|w| w.checked_mul(scale))
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(|| bad(SizeProblem::TooLarge))?;
    if total % scale != 0 {
        return Err(bad(SizeProblem::NotWholeBytes));
    }
    u64::try_from(total / scale).map_err(|_| bad(SizeProblem::TooLarge))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        use SizeProblem::*;
        for (text, why) in [
            ("", NotANumber),
            ("abc", UnknownUnit),
            ("1X", UnknownUnit),
            ("1.2.3", NotANumber),
            ("0.3", NotWholeBytes),
            ("-1", UnknownUnit),
            ("99999999999E", TooLarge),
            (".", NotANumber),
            ("1.0000000000000000001", TooManyDecimals),
        ] {
            let err = parse_size("size", text).unwrap_err();
            let text = text.to_owned();
            assert_eq!(
                err,
                SizeError {
                    what: "size",
                    text,
                    why
                }
            );
        }
    }
}
