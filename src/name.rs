//! Where a command takes an export's name from. The name is the disk's
//! key, and a command line is readable by every local user
//! (`/proc/PID/cmdline`), so every option or argument that names an export
//! also takes it from the environment ([`NAME_VAR`], root's own) or, given
//! as `-`, from one line of standard input.

use std::io::{self, Read};

pub use scratchd_builder::id::NAME_VAR;

/// What an option or argument says to read the name from standard input.
pub const FROM_STDIN: &str = "-";

/// The longest name NBD carries (the protocol's limit on strings).
const MAX_NAME: usize = 4096;

/// Why the name could not be had.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("cannot read the export's name from standard input")]
    Read(#[source] io::Error),
    #[error("standard input gave no export name (one line was expected)")]
    Empty,
    #[error("the export's name on standard input is longer than {MAX_NAME} bytes")]
    TooLong,
    #[error("the export's name on standard input is not UTF-8")]
    NotUtf8,
}

/// The name as given (by its option, argument or [`NAME_VAR`], which clap
/// has merged), with `-` replaced by a line of standard input.
pub fn resolve(given: Option<String>) -> Result<Option<String>, NameError> {
    match given {
        Some(name) if name == FROM_STDIN => read_line(raw_stdin()?).map(Some),
        other => Ok(other),
    }
}

/// Standard input's descriptor as a reader with no buffer: `Stdin` reads
/// through a buffer of its own, and would swallow what follows the name,
/// which belongs to the command `scratchd run` starts.
fn raw_stdin() -> Result<std::fs::File, NameError> {
    use std::os::fd::AsFd;
    let fd = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(NameError::Read)?;
    Ok(std::fs::File::from(fd))
}

/// One line, without its newline, read a byte at a time (from an
/// unbuffered reader, what follows stays unread).
fn read_line(mut input: impl Read) -> Result<String, NameError> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    // One byte per read, on purpose: a buffer would take the command's.
    while read_byte(&mut input, &mut byte)? && byte[0] != b'\n' {
        line.push(byte[0]);
        if line.len() > MAX_NAME {
            return Err(NameError::TooLong);
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if line.is_empty() {
        return Err(NameError::Empty);
    }
    String::from_utf8(line).map_err(|_| NameError::NotUtf8)
}

/// Reads one byte; false at the end of the input. A signal's interruption
/// is retried.
fn read_byte(input: &mut impl Read, byte: &mut [u8; 1]) -> Result<bool, NameError> {
    loop {
        match input.read(byte) {
            Ok(n) => return Ok(n == 1),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(NameError::Read(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_is_read_and_the_rest_left() {
        let mut input: &[u8] = b"build-42\nthe command's input";
        assert_eq!(read_line(&mut input).unwrap(), "build-42");
        assert_eq!(input, b"the command's input");
        assert_eq!(read_line(&b"crlf\r\n"[..]).unwrap(), "crlf");
        assert_eq!(read_line(&b"no newline"[..]).unwrap(), "no newline");
    }

    #[test]
    fn bad_lines_are_refused() {
        assert!(matches!(read_line(&b""[..]), Err(NameError::Empty)));
        assert!(matches!(read_line(&b"\n"[..]), Err(NameError::Empty)));
        assert!(matches!(
            read_line(&vec![b'a'; MAX_NAME + 1][..]),
            Err(NameError::TooLong)
        ));
        assert!(read_line(&vec![b'a'; MAX_NAME][..]).is_ok());
        assert!(matches!(read_line(&b"\xff\n"[..]), Err(NameError::NotUtf8)));
    }

    #[test]
    fn other_names_pass_unread() {
        assert_eq!(resolve(Some("b".into())).unwrap().as_deref(), Some("b"));
        assert_eq!(resolve(None).unwrap(), None);
    }
}
