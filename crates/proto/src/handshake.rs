//! Framing of the fixed-newstyle handshake: the greeting, the client's flags,
//! option requests and option replies.

use crate::codec::PutBe;
use crate::consts::*;
use thiserror::Error;

/// Bytes of the server greeting: magic, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Bytes of an option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;

/// Longest option payload read into memory. The largest legitimate option
/// (a meta-context query or an INFO request with a 4096-byte name and a few
/// queries) is far smaller; anything longer is refused without allocating.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Longest over-size option payload the server reads and throws away to keep
/// the stream in sync before answering `ERR_TOO_BIG`; beyond it the client is
/// clearly not speaking NBD and is disconnected.
pub const MAX_OPTION_DRAIN: u32 = 16 * 1024 * 1024;

pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// A handshake violation after which the connection is dropped.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    #[error("client flags {0:#x} include bits the server did not offer")]
    UnknownClientFlags(u32),
    #[error("client does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
    #[error("option request has bad magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {option} has length {len}, beyond any sane option")]
    AbsurdOptionLength { option: u32, len: u32 },
}

/// What the client asked for in its 4-byte flags word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The 124 zero bytes after an EXPORT_NAME reply are omitted.
    pub no_zeroes: bool,
}

pub fn parse_client_flags(raw: u32) -> Result<ClientFlags, HandshakeError> {
    let known = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;
    if raw & !known != 0 {
        return Err(HandshakeError::UnknownClientFlags(raw));
    }
    if raw & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle);
    }
    Ok(ClientFlags {
        no_zeroes: raw & CLIENT_NO_ZEROES != 0,
    })
}

/// The fixed part of an option request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// How the server must deal with an option's payload, judged by its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadPlan {
    /// Read it and handle the option.
    Read,
    /// Read and discard it, then answer `ERR_TOO_BIG`.
    DrainAndRefuse,
}

impl OptionHeader {
    pub fn parse(raw: &[u8; OPTION_HEADER_LEN]) -> Result<Self, HandshakeError> {
        let word = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&raw[i..i + 4]);
            u32::from_be_bytes(b)
        };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&raw[..8]);
        let magic = u64::from_be_bytes(magic);
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        Ok(OptionHeader {
            option: word(8),
            len: word(12),
        })
    }

    pub fn payload_plan(&self) -> Result<PayloadPlan, HandshakeError> {
        match self.len {
            len if len <= MAX_OPTION_LEN => Ok(PayloadPlan::Read),
            len if len <= MAX_OPTION_DRAIN => Ok(PayloadPlan::DrainAndRefuse),
            len => Err(HandshakeError::AbsurdOptionLength {
                option: self.option,
                len,
            }),
        }
    }
}

/// Appends one option reply to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(data.len() as u32);
    out.extend_from_slice(data);
}

/// Appends an option error reply carrying a human-readable message.
pub fn put_option_error(out: &mut Vec<u8>, option: u32, err: OptError, message: &str) {
    put_option_reply(out, option, err as u32, clip(message).as_bytes());
}

/// Appends the reply to a successful `NBD_OPT_EXPORT_NAME`.
pub fn put_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.put_u64(size);
    out.put_u16(flags);
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_layout() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags(1), Ok(ClientFlags { no_zeroes: false }));
        assert_eq!(parse_client_flags(3), Ok(ClientFlags { no_zeroes: true }));
        assert_eq!(parse_client_flags(0), Err(HandshakeError::NotFixedNewstyle));
        assert_eq!(
            parse_client_flags(5),
            Err(HandshakeError::UnknownClientFlags(5))
        );
    }

    #[test]
    fn option_header_and_length_plan() {
        let mut raw = [0u8; OPTION_HEADER_LEN];
        raw[..8].copy_from_slice(b"IHAVEOPT");
        raw[8..12].copy_from_slice(&7u32.to_be_bytes());
        raw[12..].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        let h = OptionHeader::parse(&raw).unwrap();
        assert_eq!(h.option, 7);
        assert_eq!(h.payload_plan(), Ok(PayloadPlan::DrainAndRefuse));
        raw[12..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(OptionHeader::parse(&raw).unwrap().payload_plan().is_err());
        raw[0] = b'X';
        assert!(matches!(
            OptionHeader::parse(&raw),
            Err(HandshakeError::BadOptionMagic(_))
        ));
    }

    #[test]
    fn clip_respects_char_boundaries() {
        let long = "é".repeat(3000);
        let c = clip(&long);
        assert!(c.len() <= MAX_STRING_LEN);
        assert!(c.chars().all(|ch| ch == 'é'));
    }
}
