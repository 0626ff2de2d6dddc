//! Sizes and durations as settings write them: one parser each, for the
//! command line's flags, `KEY=VALUE` parameters and the config file alike.
//!
//! Sizes: `512`, `4K`, `1M`, `1.5G`, `2T`, `1GiB`. Suffixes are binary
//! (K = KiB = 1024), as in nbdkit and qemu-img; a fraction must come out
//! as a whole number of bytes. Durations: `30s`, `500ms`, `2m`, `1h`, or
//! plain (possibly fractional) seconds.

use std::time::Duration;

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

/// Why [`parse_duration`] refused its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {text:?}: unknown unit {unit:?} (examples: 30s, 500ms, 2m, 1h, 10)")]
    UnknownUnit { text: String, unit: String },
    #[error("invalid duration {text:?}: not a number (examples: 30s, 500ms, 2m, 1h, 10)")]
    NotANumber { text: String },
    #[error("invalid duration {text:?}: out of range")]
    OutOfRange { text: String },
    /// From [`parse_positive_duration`].
    #[error("invalid duration {text:?}: must be more than 0")]
    Zero { text: String },
}

/// Parses a duration: `30s`, `500ms`, `50us`, `2m`, `1h`, or plain (possibly
/// fractional) seconds.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(DurationError::UnknownUnit {
                text: text.to_owned(),
                unit: unit.to_owned(),
            })
        }
    };
    let value: f64 = number.parse().map_err(|_| DurationError::NotANumber {
        text: text.to_owned(),
    })?;
    Duration::try_from_secs_f64(value * scale).map_err(|_| DurationError::OutOfRange {
        text: text.to_owned(),
    })
}

/// A duration that must be more than 0 (timeouts: `--reply-timeout`,
/// `--handshake-timeout`, `ctl --for`).
pub fn parse_positive_duration(text: &str) -> Result<Duration, DurationError> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(DurationError::Zero {
            text: text.to_owned(),
        }),
        d => Ok(d),
    }
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

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("30s"), Ok(ms(30_000)));
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_duration("50us"), Ok(Duration::from_micros(50)));
        assert_eq!(parse_duration("2m"), Ok(ms(120_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("10"), Ok(ms(10_000)));
        assert_eq!(parse_duration("0"), Ok(ms(0)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        for bad in ["", "s", "1.2.3s"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(matches!(err, DurationError::NotANumber { .. }), "{bad:?}");
        }
        // Signs and exponents are not digits, so they start the unit.
        for bad in ["-1s", "1d", "x", "1e400"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(matches!(err, DurationError::UnknownUnit { .. }), "{bad:?}");
        }
        let err = parse_duration(&"9".repeat(30)).unwrap_err();
        assert!(matches!(err, DurationError::OutOfRange { .. }), "{err}");
        assert_eq!(parse_positive_duration("1.5s"), Ok(ms(1500)));
        for zero in ["0", "0s", "0.0"] {
            let err = parse_positive_duration(zero).unwrap_err();
            assert!(err.to_string().contains("more than 0"), "{err}");
        }
    }
}
