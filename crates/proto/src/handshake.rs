//! Framing of the fixed-newstyle handshake, in both directions: the
//! greeting, the client's flags, option request and option reply headers, and
//! the reply to `NBD_OPT_EXPORT_NAME`. Option payloads (and option error
//! replies) are in [`crate::options`].

use crate::codec::{Codec, DecodeError, PutBe, Reader};
use crate::consts::*;
use thiserror::Error;

/// Bytes of the server greeting: magic, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Bytes of an option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes of the EXPORT_NAME reply without and with its 124 zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
pub const EXPORT_NAME_REPLY_ZEROES: usize = 124;

/// Longest option payload read into memory. The largest legitimate option
/// (a meta-context query or an INFO request with a 4096-byte name and a few
/// queries) is far smaller; anything longer is refused without allocating.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Longest over-size option payload the server reads and throws away to keep
/// the stream in sync before answering `ERR_TOO_BIG`; beyond it the client is
/// clearly not speaking NBD and is disconnected.
pub const MAX_OPTION_DRAIN: u32 = 16 * 1024 * 1024;

/// The greeting scratchd sends: fixed newstyle, and NO_ZEROES offered.
pub fn greeting() -> Vec<u8> {
    Greeting {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    }
    .to_bytes()
}

/// A handshake violation after which the connection is dropped.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("client flags {0:#x} include bits the server did not offer")]
    UnknownClientFlags(u32),
    #[error("client does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
    #[error("option request has bad magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {option} has length {len}, beyond any sane option")]
    AbsurdOptionLength { option: u32, len: u32 },
    /// The peer is not an NBD server (first greeting word).
    #[error("greeting has bad magic {0:#018x}")]
    BadGreetingMagic(u64),
    /// The server speaks only oldstyle negotiation (second greeting word).
    #[error("server does not offer newstyle negotiation ({0:#018x})")]
    NotNewstyle(u64),
    #[error("option reply has bad magic {0:#018x}")]
    BadOptionReplyMagic(u64),
    /// A message whose fields do not fit its bytes.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// `FLAG_*` handshake flags; a client ignores bits it does not know.
    pub flags: u16,
}

impl Codec<'_> for Greeting {
    type Error = HandshakeError;

    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(NBD_MAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(self.flags);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, HandshakeError> {
        let magic = r.u64()?;
        if magic != NBD_MAGIC {
            return Err(HandshakeError::BadGreetingMagic(magic));
        }
        let style = r.u64()?;
        if style != IHAVEOPT {
            return Err(HandshakeError::NotNewstyle(style));
        }
        Ok(Greeting { flags: r.u16()? })
    }
}

/// What the client asked for in its 4-byte flags word. Fixed newstyle is
/// implied: a client without it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The 124 zero bytes after an EXPORT_NAME reply are omitted.
    pub no_zeroes: bool,
}

impl Codec<'_> for ClientFlags {
    type Error = HandshakeError;

    fn encode(&self, out: &mut Vec<u8>) {
        let no_zeroes = if self.no_zeroes { CLIENT_NO_ZEROES } else { 0 };
        out.put_u32(CLIENT_FIXED_NEWSTYLE | no_zeroes);
    }

    /// Refuses bits the server did not offer (it offers both known ones).
    fn decode(r: &mut Reader<'_>) -> Result<Self, HandshakeError> {
        let raw = r.u32()?;
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
}

/// The fixed part of an option request; `len` payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// How the server must deal with an option's payload, judged by its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionPayload {
    /// Read it and handle the option.
    Read,
    /// Read and discard it, then answer `ERR_TOO_BIG`.
    DrainAndRefuse,
}

impl Codec<'_> for OptionHeader {
    type Error = HandshakeError;

    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(IHAVEOPT);
        out.put_u32(self.option);
        out.put_u32(self.len);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, HandshakeError> {
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        Ok(OptionHeader {
            option: r.u32()?,
            len: r.u32()?,
        })
    }
}

impl OptionHeader {
    pub fn payload_plan(&self) -> Result<OptionPayload, HandshakeError> {
        match self.len {
            len if len <= MAX_OPTION_LEN => Ok(OptionPayload::Read),
            len if len <= MAX_OPTION_DRAIN => Ok(OptionPayload::DrainAndRefuse),
            len => Err(HandshakeError::AbsurdOptionLength {
                option: self.option,
                len,
            }),
        }
    }
}

/// The fixed part of an option reply; `len` payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option being answered, echoed.
    pub option: u32,
    /// `REP_*`, or an error code with bit 31 set.
    pub reply_type: u32,
    pub len: u32,
}

impl Codec<'_> for OptionReplyHeader {
    type Error = HandshakeError;

    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(OPTION_REPLY_MAGIC);
        out.put_u32(self.option);
        out.put_u32(self.reply_type);
        out.put_u32(self.len);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, HandshakeError> {
        let magic = r.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(HandshakeError::BadOptionReplyMagic(magic));
        }
        Ok(OptionReplyHeader {
            option: r.u32()?,
            reply_type: r.u32()?,
            len: r.u32()?,
        })
    }
}

/// The reply to a successful `NBD_OPT_EXPORT_NAME`, which has no option
/// reply header. Its length depends on whether both sides set NO_ZEROES,
/// so it is encoded and decoded with that setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size: u64,
    pub flags: TransmissionFlags,
}

impl ExportNameReply {
    pub fn encode(&self, no_zeroes: bool, out: &mut Vec<u8>) {
        out.put_u64(self.size);
        out.put_u16(self.flags.0);
        if !no_zeroes {
            out.extend_from_slice(&[0u8; EXPORT_NAME_REPLY_ZEROES]);
        }
    }

    /// Reads the reply; the padding, when present, is skipped unchecked (it
    /// carries nothing, so a server that fills it differently is harmless).
    pub fn decode(r: &mut Reader<'_>, no_zeroes: bool) -> Result<Self, DecodeError> {
        let reply = ExportNameReply {
            size: r.u64()?,
            flags: TransmissionFlags(r.u16()?),
        };
        if !no_zeroes {
            r.take(EXPORT_NAME_REPLY_ZEROES)?;
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_layout() {
        let g = greeting();
        assert_eq!(g.len(), GREETING_LEN);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
        assert_eq!(Greeting::from_bytes(&g), Ok(Greeting { flags: 3 }));
    }

    #[test]
    fn greeting_from_something_else_is_refused() {
        let mut g = greeting();
        g[8] = b'X';
        assert!(matches!(
            Greeting::from_bytes(&g),
            Err(HandshakeError::NotNewstyle(_))
        ));
        g[0] = b'X';
        assert!(matches!(
            Greeting::from_bytes(&g),
            Err(HandshakeError::BadGreetingMagic(_))
        ));
        assert_eq!(
            Greeting::from_bytes(&greeting()[..17]),
            Err(HandshakeError::Decode(DecodeError::Truncated))
        );
    }

    #[test]
    fn client_flags() {
        let parse = |raw: u32| ClientFlags::from_bytes(&raw.to_be_bytes());
        assert_eq!(parse(1), Ok(ClientFlags { no_zeroes: false }));
        assert_eq!(parse(3), Ok(ClientFlags { no_zeroes: true }));
        assert_eq!(parse(0), Err(HandshakeError::NotFixedNewstyle));
        assert_eq!(parse(5), Err(HandshakeError::UnknownClientFlags(5)));
        assert_eq!(ClientFlags { no_zeroes: true }.to_bytes(), [0, 0, 0, 3]);
        assert_eq!(ClientFlags { no_zeroes: false }.to_bytes(), [0, 0, 0, 1]);
    }

    #[test]
    fn option_header_and_length_plan() {
        let mut raw = [0u8; OPTION_HEADER_LEN];
        raw[..8].copy_from_slice(b"IHAVEOPT");
        raw[8..12].copy_from_slice(&7u32.to_be_bytes());
        raw[12..].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        let h = OptionHeader::from_bytes(&raw).unwrap();
        assert_eq!(h.option, 7);
        assert_eq!(h.payload_plan(), Ok(OptionPayload::DrainAndRefuse));
        raw[12..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(OptionHeader::from_bytes(&raw)
            .unwrap()
            .payload_plan()
            .is_err());
        raw[0] = b'X';
        assert!(matches!(
            OptionHeader::from_bytes(&raw),
            Err(HandshakeError::BadOptionMagic(_))
        ));
    }

    proptest! {
        #[test]
        fn handshake_framing_round_trips(
            flags: u16, no_zeroes: bool, option: u32, reply_type: u32, len: u32, size: u64, tflags: u16
        ) {
            let g = Greeting { flags };
            prop_assert_eq!(Greeting::from_bytes(&g.to_bytes()), Ok(g));
            let c = ClientFlags { no_zeroes };
            prop_assert_eq!(ClientFlags::from_bytes(&c.to_bytes()), Ok(c));
            let h = OptionHeader { option, len };
            prop_assert_eq!(OptionHeader::from_bytes(&h.to_bytes()), Ok(h));
            let h = OptionReplyHeader { option, reply_type, len };
            prop_assert_eq!(OptionReplyHeader::from_bytes(&h.to_bytes()), Ok(h));
            let e = ExportNameReply { size, flags: TransmissionFlags(tflags) };
            let mut out = Vec::new();
            e.encode(no_zeroes, &mut out);
            let expected = EXPORT_NAME_REPLY_LEN + if no_zeroes { 0 } else { EXPORT_NAME_REPLY_ZEROES };
            prop_assert_eq!(out.len(), expected);
            let mut r = Reader::new(&out);
            prop_assert_eq!(ExportNameReply::decode(&mut r, no_zeroes), Ok(e));
            prop_assert_eq!(r.finish(), Ok(()));
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes: Vec<u8>, no_zeroes: bool) {
            let _ = Greeting::from_bytes(&bytes);
            let _ = ClientFlags::from_bytes(&bytes);
            let _ = OptionHeader::from_bytes(&bytes);
            let _ = OptionReplyHeader::from_bytes(&bytes);
            let _ = ExportNameReply::decode(&mut Reader::new(&bytes), no_zeroes);
        }
    }
}
