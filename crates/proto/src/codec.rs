//! Bounded big-endian decoding and encoding.
//!
//! [`Reader`] never reads past its slice: every accessor returns
//! [`DecodeError::Truncated`] instead, and [`Reader::finish`] rejects trailing bytes, so a
//! message whose inner lengths disagree with its outer length is always caught.

use thiserror::Error;

/// The input ended before a field, or went on after the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("message is shorter than its fields")]
    Truncated,
    #[error("message has {0} bytes after its last field")]
    TrailingBytes(usize),
    #[error("string is not valid UTF-8 or contains NUL")]
    BadString,
    #[error("string is longer than {max} bytes")]
    StringTooLong { max: usize },
}

pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N)?;
        // The slice has exactly N bytes: bytes() checked the length.
        Ok(b.try_into().unwrap_or([0; N]))
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_be_bytes)
    }

    /// A string of `len` bytes: UTF-8, no NUL, at most `max` bytes.
    pub fn string(&mut self, len: usize, max: usize) -> Result<&'a str, DecodeError> {
        if len > max {
            return Err(DecodeError::StringTooLong { max });
        }
        let raw = self.bytes(len)?;
        let s = std::str::from_utf8(raw).map_err(|_| DecodeError::BadString)?;
        if s.contains('\0') {
            return Err(DecodeError::BadString);
        }
        Ok(s)
    }

    /// A string preceded by its u32 length.
    pub fn string32(&mut self, max: usize) -> Result<&'a str, DecodeError> {
        let len = self.u32()? as usize;
        self.string(len, max)
    }

    /// Succeeds only if every byte was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// Big-endian appends onto a byte buffer.
pub trait PutBe {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl PutBe for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_rejects_truncation_and_trailing_bytes() {
        let mut r = Reader::new(&[0, 1, 0, 0, 0, 2, 9]);
        assert_eq!(r.u16(), Ok(1));
        assert_eq!(r.u32(), Ok(2));
        assert_eq!(r.u16(), Err(DecodeError::Truncated));
        assert_eq!(r.finish(), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn strings_are_checked() {
        assert_eq!(
            Reader::new(b"a\0b").string(3, 10),
            Err(DecodeError::BadString)
        );
        assert_eq!(
            Reader::new(&[0xff, 0xfe]).string(2, 10),
            Err(DecodeError::BadString)
        );
        assert_eq!(
            Reader::new(b"abcd").string(4, 3),
            Err(DecodeError::StringTooLong { max: 3 })
        );
        assert_eq!(Reader::new(b"\0\0\0\x02hi").string32(10), Ok("hi"));
    }
}
