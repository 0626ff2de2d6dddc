//! The one decoder of this crate, [`Reader`], the [`Codec`] trait every
//! context-free wire type implements, and big-endian append helpers.
//!
//! [`Reader`] never reads past its slice: every accessor checks the length
//! first and returns [`DecodeError::Truncated`] instead, [`Reader::sub`] bounds
//! a nested message by its declared length, and [`Reader::finish`] rejects
//! trailing bytes. So a message whose inner lengths disagree with its outer
//! length is always caught, and no input can make decoding panic.
//!
//! Wire types whose layout depends on negotiated state (request headers on
//! the reply mode, chunk payloads on the chunk type, the EXPORT_NAME reply on
//! NO_ZEROES) have inherent `encode`/`decode` methods of the same shape that
//! take that state as an extra argument.

use thiserror::Error;

use crate::consts::MAX_STRING_LEN;

/// Bytes that cannot be a message of the expected kind. The `Display` texts
/// reach clients in option error replies, so they are part of the protocol
/// behaviour and change only deliberately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before a field.
    #[error("message is shorter than its fields")]
    Truncated,
    /// The input went on after the last field.
    #[error("message has {0} bytes after its last field")]
    TrailingBytes(usize),
    #[error("string is not valid UTF-8 or contains NUL")]
    BadString,
    #[error("string is longer than {max} bytes")]
    StringTooLong { max: usize },
    /// A transmission message starts with a magic number that is not the
    /// one expected here (`what` names the message).
    #[error("bad {what} magic {found:#x}")]
    BadMagic { what: &'static str, found: u64 },
    /// A boolean byte that is neither 0 nor 1.
    #[error("flag byte is {0}, neither 0 nor 1")]
    BadFlag(u8),
}

/// A cursor over a byte slice that can only move forward and never past the
/// slice's end.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        match self.buf.split_at_checked(n) {
            Some((head, tail)) => {
                self.buf = tail;
                Ok(head)
            }
            None => Err(DecodeError::Truncated),
        }
    }

    /// A reader over the next `len` bytes, which this reader skips: the
    /// nested message can neither read beyond its declared length nor leave
    /// part of it for the outer message.
    pub fn sub(&mut self, len: usize) -> Result<Reader<'a>, DecodeError> {
        self.take(len).map(Reader::new)
    }

    /// Everything not yet read.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        match self.buf.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.buf = tail;
                Ok(*head)
            }
            None => Err(DecodeError::Truncated),
        }
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array().map(u8::from_be_bytes)
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

    /// A string of `len` bytes: UTF-8, no NUL, at most `max` bytes. The
    /// length limit is checked before anything is read.
    pub fn string(&mut self, len: usize, max: usize) -> Result<&'a str, DecodeError> {
        if len > max {
            return Err(DecodeError::StringTooLong { max });
        }
        let raw = self.take(len)?;
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
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// A wire type whose layout needs no negotiated state, after rustls'
/// `Codec`. `'a` lets decoded values borrow from the input (a READ chunk's
/// data is not copied).
pub trait Codec<'a>: Sized {
    /// What decoding reports: [`DecodeError`], or a richer error for types
    /// whose decoding also judges the peer (handshake messages).
    type Error: From<DecodeError>;

    /// Appends the wire form of `self`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Reads one value from `r`, leaving whatever follows it.
    fn decode(r: &mut Reader<'a>) -> Result<Self, Self::Error>;

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes a value that must fill `bytes` exactly.
    fn from_bytes(bytes: &'a [u8]) -> Result<Self, Self::Error> {
        let mut r = Reader::new(bytes);
        let value = Self::decode(&mut r)?;
        r.finish()?;
        Ok(value)
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

/// Shortens a message to the protocol's string limit, on a char boundary.
pub fn clip(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A string shown to people (description, error message) as decoded from
/// the peer: invalid UTF-8 replaced, then clipped to the protocol's limit as
/// the encoders clip it, so that a decoded value encodes back to what it
/// holds (a longer one would be clipped on the way out, and replacement
/// characters can triple a string's length).
pub fn lossy(bytes: &[u8]) -> String {
    clip(&String::from_utf8_lossy(bytes)).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_respects_char_boundaries() {
        let long = "é".repeat(3000);
        let c = clip(&long);
        assert!(c.len() <= MAX_STRING_LEN);
        assert!(c.chars().all(|ch| ch == 'é'));
    }

    use proptest::prelude::*;

    #[test]
    fn reads_fields_and_rejects_truncation_and_trailing_bytes() {
        let mut r = Reader::new(&[0, 1, 0, 0, 0, 2, 9]);
        assert_eq!(r.u16(), Ok(1));
        assert_eq!(r.u32(), Ok(2));
        assert_eq!(r.u16(), Err(DecodeError::Truncated));
        assert_eq!(r.finish(), Err(DecodeError::TrailingBytes(1)));
        assert_eq!(r.u8(), Ok(9));
        assert_eq!(r.finish(), Ok(()));
        assert_eq!(r.u8(), Err(DecodeError::Truncated));
    }

    #[test]
    fn sub_readers_are_bounded_and_skipped() {
        let mut r = Reader::new(&[1, 2, 3, 4, 5]);
        let mut sub = r.sub(3).unwrap();
        assert_eq!(sub.u16(), Ok(0x0102));
        assert_eq!(sub.u16(), Err(DecodeError::Truncated));
        assert_eq!(sub.finish(), Err(DecodeError::TrailingBytes(1)));
        assert_eq!(r.rest(), &[4, 5]);
        assert!(r.is_empty());
        assert_eq!(r.sub(1).map(|s| s.remaining()), Err(DecodeError::Truncated));
        assert_eq!(Reader::new(&[0; 4]).take(5), Err(DecodeError::Truncated));
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
        // The limit is judged before the length is compared with the input.
        assert_eq!(
            Reader::new(b"\xff\xff\xff\xff").string32(10),
            Err(DecodeError::StringTooLong { max: 10 })
        );
    }

    proptest! {
        #[test]
        fn integers_round_trip(a: u8, b: u16, c: u32, d: u64) {
            let mut out = vec![a];
            out.put_u16(b);
            out.put_u32(c);
            out.put_u64(d);
            let mut r = Reader::new(&out);
            prop_assert_eq!(r.u8(), Ok(a));
            prop_assert_eq!(r.u16(), Ok(b));
            prop_assert_eq!(r.u32(), Ok(c));
            prop_assert_eq!(r.u64(), Ok(d));
            prop_assert_eq!(r.finish(), Ok(()));
        }

        #[test]
        fn any_input_is_read_or_refused(bytes: Vec<u8>, n in 0usize..64) {
            let mut r = Reader::new(&bytes);
            let _ = r.sub(n).map(|mut s| s.string32(16));
            let _ = r.u64();
            let _ = r.string(n, 8);
            prop_assert!(r.remaining() <= bytes.len());
        }
    }
}
