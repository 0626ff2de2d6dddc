//! What every command of the binary shares at its edge: exit statuses,
//! logging set-up, error reports, and the parsers of values several
//! commands take.

use std::error::Error;
use std::process::ExitStatus;
use std::time::Duration;

use scratchd_scratch::units::{parse_duration, parse_positive_duration};

/// Exit status for bad usage, as clap uses.
pub const EXIT_USAGE: i32 = 2;

/// A child's exit status as a shell reports it: its code, or 128+N when
/// signal N killed it.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Reports why `scratchd COMMAND` failed, on standard error, and returns
/// its exit status: [`EXIT_USAGE`] and the error alone for a usage error;
/// `failed` and the error with its causes otherwise.
pub fn fail(command: &str, error: &dyn Error, usage: bool, failed: i32) -> i32 {
    if usage {
        eprintln!("scratchd {command}: {error}");
        return EXIT_USAGE;
    }
    eprintln!("scratchd {command}: {}", with_causes(error));
    failed
}

/// Logs to standard error: warnings, or more with `-v` (info) and `-vv`
/// (debug); `level` (a filter such as `debug` or `scratchd_server=trace`)
/// overrides them.
pub fn init_logging(verbose: u8, level: Option<&str>) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_new(level.unwrap_or(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal: not into the journal or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// An error and the chain of its causes, as one line (for the messages of
/// commands that fail).
pub fn with_causes(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        // Some errors already carry their cause's text.
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

/// A duration that must be more than 0 (`--reply-timeout`,
/// `--handshake-timeout`, `ctl --for`): clap's value parser for
/// [`parse_positive_duration`].
pub fn parse_reply_timeout(text: &str) -> Result<Duration, String> {
    parse_positive_duration(text).map_err(|e| e.to_string())
}

/// A duration where 0 turns something off (`--tcp-keepalive`,
/// `--busy-poll`): clap's value parser for [`parse_duration`].
pub fn parse_duration_or_off(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_are_joined_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(with_causes(&e), "outer: inner");
        let carried = std::io::Error::other("inner");
        assert_eq!(with_causes(&carried), "inner");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_reply_timeout("60s"), Ok(Duration::from_secs(60)));
        assert!(parse_reply_timeout("0").is_err());
        assert_eq!(parse_duration_or_off("0"), Ok(Duration::ZERO));
    }
}
