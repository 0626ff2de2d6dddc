//! Transmission requests: header decoding and validation against the
//! negotiated session.
//!
//! Decoding and validation are separate on purpose: the server must know how
//! many payload bytes follow a header (to keep the stream in sync) even when
//! the request itself is refused.

use crate::codec::{DecodeError, PutBe, Reader};
use crate::consts::*;
use crate::session::{ReplyMode, Session};

pub const COMPACT_REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// Largest READ or WRITE payload served, advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// A request header as it came off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Compact headers carry 32 bits, extended headers 64.
    pub length: u64,
}

pub fn request_len(mode: ReplyMode) -> usize {
    match mode {
        ReplyMode::Extended => EXTENDED_REQUEST_LEN,
        _ => COMPACT_REQUEST_LEN,
    }
}

impl RequestHeader {
    /// Appends the header in the framing of `mode`: extended headers once
    /// they are negotiated, compact ones otherwise. A compact header carries
    /// only the low 32 bits of `length`, so a client must not build one with
    /// a longer length. Payload data, if any, is appended by the caller.
    pub fn encode(&self, mode: ReplyMode, out: &mut Vec<u8>) {
        let extended = mode == ReplyMode::Extended;
        out.put_u32(if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        });
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        if extended {
            out.put_u64(self.length);
        } else {
            out.put_u32(self.length as u32);
        }
    }

    /// Reads one header in the framing of `mode`. A header with the other
    /// framing's magic is refused: the stream can no longer be trusted, so
    /// the server drops the connection.
    pub fn decode(r: &mut Reader<'_>, mode: ReplyMode) -> Result<Self, DecodeError> {
        // Whole header present before any field is looked at.
        if r.remaining() < request_len(mode) {
            return Err(DecodeError::Truncated);
        }
        let extended = mode == ReplyMode::Extended;
        let expected = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        let magic = r.u32()?;
        if magic != expected {
            return Err(DecodeError::BadMagic {
                what: "request",
                found: magic.into(),
            });
        }
        Ok(RequestHeader {
            flags: r.u16()?,
            kind: r.u16()?,
            cookie: r.u64()?,
            offset: r.u64()?,
            length: if extended { r.u64()? } else { r.u32()?.into() },
        })
    }

    /// Decodes a header from exactly [`request_len`] bytes.
    pub fn from_bytes(b: &[u8], mode: ReplyMode) -> Result<Self, DecodeError> {
        let mut r = Reader::new(b);
        let header = Self::decode(&mut r, mode)?;
        r.finish()?;
        Ok(header)
    }

    /// Bytes of payload that follow this header on the wire, whether or not
    /// the request turns out to be valid. With extended headers a WRITE must
    /// carry PAYLOAD_LEN; scratchd treats the flag as implied on WRITE rather
    /// than lose stream sync over a client's omission.
    pub fn payload_len(&self, mode: ReplyMode) -> u64 {
        let declared = mode == ReplyMode::Extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        if self.kind == CMD_WRITE || declared {
            self.length
        } else {
            0
        }
    }

    /// How the server must deal with the payload after this header.
    pub fn payload_plan(&self, mode: ReplyMode) -> RequestPayload {
        match self.payload_len(mode) {
            0 => RequestPayload::None,
            n if n <= MAX_PAYLOAD as u64 => RequestPayload::Receive(n as u32),
            // The extended-headers spec asks for a hard disconnect here.
            _ if mode == ReplyMode::Extended => RequestPayload::Disconnect,
            n if n <= MAX_PAYLOAD_DRAIN => RequestPayload::Discard(n),
            _ => RequestPayload::Disconnect,
        }
    }
}

/// Longest over-size WRITE payload (compact headers) read and thrown away to
/// keep the stream in sync; anything longer ends the connection instead.
pub const MAX_PAYLOAD_DRAIN: u64 = 2 * MAX_PAYLOAD as u64;

/// What to do with the bytes that follow a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestPayload {
    None,
    /// Read them into a buffer (the request may still be refused).
    Receive(u32),
    /// Too long to hold: read and discard them in small pieces, then refuse.
    Discard(u64),
    /// Too long to be anything but a broken or hostile client.
    Disconnect,
}

/// A validated request, ready for a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
}

/// A refused request: the error to send and a message for structured replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub errno: Errno,
    pub message: &'static str,
}

fn refuse(errno: Errno, message: &'static str) -> Refusal {
    Refusal { errno, message }
}

/// Checks a request against the session; returns the command to run or the
/// error to reply with. Never fails the connection.
///
/// Flags come first (a flag the command does not take is refused whatever
/// else is wrong), then each command's own checks, in the order the spec
/// gives their errors.
pub fn validate(h: &RequestHeader, s: &Session) -> Result<Command, Refusal> {
    let c = Checks::new(h, s);
    c.known_flags()?;
    let (offset, len, fua) = (h.offset, h.length, c.has(CMD_FLAG_FUA));
    match h.kind {
        CMD_READ => {
            let len = c.payload()?;
            c.in_range()?;
            let df = c.has(CMD_FLAG_DF);
            Ok(Command::Read { offset, len, df })
        }
        CMD_WRITE => {
            let len = c.payload()?;
            c.writable(true, Errno::NoSpc)?;
            Ok(Command::Write { offset, len, fua })
        }
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH if c.offers(TransmissionFlags::SEND_FLUSH) => Ok(Command::Flush),
        CMD_TRIM => {
            // Past the end, a trim gets EINVAL where writes get ENOSPC.
            c.writable(c.offers(TransmissionFlags::SEND_TRIM), Errno::Inval)?;
            Ok(Command::Trim { offset, len, fua })
        }
        CMD_CACHE if c.offers(TransmissionFlags::SEND_CACHE) => {
            c.in_range()?;
            Ok(Command::Cache { offset, len })
        }
        CMD_WRITE_ZEROES => {
            let offered = c.offers(TransmissionFlags::SEND_WRITE_ZEROES);
            c.writable(offered, Errno::NoSpc)?;
            Ok(Command::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: c.has(CMD_FLAG_NO_HOLE),
                fast: c.has(CMD_FLAG_FAST_ZERO),
            })
        }
        CMD_BLOCK_STATUS => c.block_status(s.base_allocation.is_some()),
        _ => Err(refuse(Errno::Inval, "unknown or unsupported command")),
    }
}

/// One request seen against its session: the checks each command picks
/// from.
struct Checks<'a> {
    h: &'a RequestHeader,
    /// The export's flags as negotiated for this session.
    flags: TransmissionFlags,
    extended: bool,
    /// The whole range lies within the export.
    within: bool,
}

impl<'a> Checks<'a> {
    fn new(h: &'a RequestHeader, s: &Session) -> Self {
        let end = h.offset.checked_add(h.length);
        Checks {
            h,
            flags: s.export.flags,
            extended: s.mode == ReplyMode::Extended,
            within: end.is_some_and(|e| e <= s.export.size),
        }
    }

    /// The session offers `flag` (`TransmissionFlags::SEND_*`).
    fn offers(&self, flag: u16) -> bool {
        self.flags.contains(flag)
    }

    /// The request carries `flag` (`CMD_FLAG_*`).
    fn has(&self, flag: u16) -> bool {
        self.h.flags & flag != 0
    }

    fn known_flags(&self) -> Result<(), Refusal> {
        if self.h.flags & !self.allowed_flags() != 0 {
            return Err(refuse(Errno::Inval, "flag not valid for this command"));
        }
        Ok(())
    }

    /// The flags this command may carry in this session.
    fn allowed_flags(&self) -> u16 {
        let mut allowed = match self.h.kind {
            CMD_READ if self.offers(TransmissionFlags::SEND_DF) => CMD_FLAG_DF,
            CMD_WRITE_ZEROES if self.offers(TransmissionFlags::SEND_FAST_ZERO) => {
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
            }
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
        // With SEND_FUA advertised, FUA must be accepted on every command.
        if self.offers(TransmissionFlags::SEND_FUA) {
            allowed |= CMD_FLAG_FUA;
        }
        // PAYLOAD_LEN only restates a WRITE's length; on anything else it
        // means a payload this server never asked for.
        if self.extended && self.h.kind == CMD_WRITE {
            allowed |= CMD_FLAG_PAYLOAD_LEN;
        }
        allowed
    }

    /// The length of a request that moves data (READ, WRITE), which must
    /// fit one payload.
    fn payload(&self) -> Result<u32, Refusal> {
        if self.h.length > MAX_PAYLOAD as u64 {
            return Err(refuse(
                Errno::Inval,
                "request exceeds the maximum payload size",
            ));
        }
        Ok(self.h.length as u32)
    }

    fn in_range(&self) -> Result<(), Refusal> {
        if !self.within {
            return Err(refuse(
                Errno::Inval,
                "request goes past the end of the export",
            ));
        }
        Ok(())
    }

    /// A command that changes the disk: the export must be writable, the
    /// command `offered`, and the range within the export (else
    /// `past_end`, as the spec says for each command).
    fn writable(&self, offered: bool, past_end: Errno) -> Result<(), Refusal> {
        if self.offers(TransmissionFlags::READ_ONLY) {
            Err(refuse(Errno::Perm, "export is read-only"))
        } else if !offered {
            Err(refuse(Errno::Inval, "command not supported by this export"))
        } else if !self.within {
            Err(refuse(past_end, "request goes past the end of the export"))
        } else {
            Ok(())
        }
    }

    /// BLOCK_STATUS needs the metadata context selected in the handshake
    /// (`selected`) and a range that is not empty.
    fn block_status(&self, selected: bool) -> Result<Command, Refusal> {
        if !selected {
            return Err(refuse(Errno::Inval, "no metadata context was selected"));
        }
        if self.h.length == 0 {
            return Err(refuse(Errno::Inval, "block status of zero bytes"));
        }
        self.in_range()?;
        Ok(Command::BlockStatus {
            offset: self.h.offset,
            len: self.h.length,
            req_one: self.has(CMD_FLAG_REQ_ONE),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{BlockSize, ExportInfo};
    use proptest::prelude::*;

    fn encode(h: &RequestHeader, mode: ReplyMode) -> Vec<u8> {
        let mut b = Vec::new();
        h.encode(mode, &mut b);
        b
    }

    fn session(mode: ReplyMode, read_only: bool) -> Session {
        type F = TransmissionFlags;
        let mut flags = F::HAS_FLAGS
            | F::SEND_FLUSH
            | F::SEND_FUA
            | F::SEND_TRIM
            | F::SEND_WRITE_ZEROES
            | F::SEND_FAST_ZERO
            | F::SEND_CACHE;
        if mode != ReplyMode::Simple {
            flags |= F::SEND_DF;
        }
        if read_only {
            flags |= F::READ_ONLY;
        }
        Session {
            export: ExportInfo {
                name: String::new(),
                size: 1 << 20,
                flags: TransmissionFlags(flags),
                block_size: BlockSize {
                    min: 1,
                    preferred: 4096,
                    max: MAX_PAYLOAD,
                },
                description: None,
            },
            mode,
            base_allocation: (mode != ReplyMode::Simple).then_some(1),
        }
    }

    fn header(kind: u16, flags: u16, offset: u64, length: u64) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            length,
        }
    }

    fn errno(h: RequestHeader, s: &Session) -> Option<Errno> {
        validate(&h, s).err().map(|r| r.errno)
    }

    proptest! {
        #[test]
        fn headers_round_trip(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32, ext: bool) {
            let mode = if ext { ReplyMode::Extended } else { ReplyMode::Simple };
            let h = RequestHeader { flags, kind, cookie, offset, length: length as u64 };
            prop_assert_eq!(RequestHeader::from_bytes(&encode(&h, mode), mode), Ok(h));
        }

        #[test]
        fn extended_headers_keep_64_bit_lengths(flags: u16, kind: u16, cookie: u64, offset: u64, length: u64) {
            let h = RequestHeader { flags, kind, cookie, offset, length };
            let b = encode(&h, ReplyMode::Extended);
            prop_assert_eq!(b.len(), EXTENDED_REQUEST_LEN);
            prop_assert_eq!(RequestHeader::from_bytes(&b, ReplyMode::Extended), Ok(h));
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes: Vec<u8>, mode in 0..3) {
            let mode = [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended][mode as usize];
            if let Ok(h) = RequestHeader::from_bytes(&bytes, mode) {
                prop_assert_eq!(bytes.len(), request_len(mode));
                prop_assert_eq!(encode(&h, mode), bytes);
            }
        }

        #[test]
        fn validation_never_panics_and_accepted_ranges_fit(
            flags: u16, kind in 0u16..10, offset: u64, length: u64, mode in 0..3
        ) {
            let mode = [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended][mode as usize];
            let s = session(mode, false);
            if let Ok(cmd) = validate(&header(kind, flags, offset, length), &s) {
                if !matches!(cmd, Command::Disconnect | Command::Flush) {
                    prop_assert!(offset.checked_add(length).is_some_and(|e| e <= s.export.size));
                }
            }
        }
    }

    #[test]
    fn compact_request_layout() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let b = encode(&h, ReplyMode::Structured);
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, //
                0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0
            ]
        );
        // Short input is refused before any field is read.
        for n in 0..COMPACT_REQUEST_LEN {
            assert_eq!(
                RequestHeader::from_bytes(&b[..n], ReplyMode::Simple),
                Err(DecodeError::Truncated)
            );
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(
            RequestHeader::from_bytes(&long, ReplyMode::Simple),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    #[test]
    fn bad_magic_is_reported() {
        let mut b = encode(&header(CMD_READ, 0, 0, 1), ReplyMode::Simple);
        b[0] ^= 1;
        assert!(RequestHeader::from_bytes(&b, ReplyMode::Simple).is_err());
        // A compact header is not an extended one.
        let b = encode(&header(CMD_READ, 0, 0, 1), ReplyMode::Extended);
        assert!(RequestHeader::from_bytes(&b[..28], ReplyMode::Simple).is_err());
    }

    #[test]
    fn errors_follow_the_spec() {
        let s = session(ReplyMode::Structured, false);
        let end = 1 << 20;
        assert_eq!(errno(header(CMD_READ, 0, end, 1), &s), Some(Errno::Inval));
        assert_eq!(
            errno(header(CMD_TRIM, 0, end - 1, 2), &s),
            Some(Errno::Inval)
        );
        assert_eq!(errno(header(CMD_CACHE, 0, end, 1), &s), Some(Errno::Inval));
        assert_eq!(errno(header(CMD_WRITE, 0, end, 1), &s), Some(Errno::NoSpc));
        assert_eq!(
            errno(header(CMD_WRITE_ZEROES, 0, u64::MAX, 2), &s),
            Some(Errno::NoSpc)
        );
        assert_eq!(
            errno(header(CMD_READ, 0, 0, MAX_PAYLOAD as u64 + 1), &s),
            Some(Errno::Inval)
        );
        assert_eq!(errno(header(42, 0, 0, 0), &s), Some(Errno::Inval));
        assert_eq!(
            errno(header(CMD_READ, 1 << 9, 0, 1), &s),
            Some(Errno::Inval)
        );
        assert_eq!(
            errno(header(CMD_WRITE, CMD_FLAG_DF, 0, 1), &s),
            Some(Errno::Inval)
        );
        assert_eq!(
            errno(header(CMD_BLOCK_STATUS, 0, 0, 0), &s),
            Some(Errno::Inval)
        );
        // FUA is valid on every command once SEND_FUA is advertised.
        assert_eq!(errno(header(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &s), None);
        assert_eq!(
            errno(header(CMD_READ, CMD_FLAG_DF | CMD_FLAG_FUA, 0, 1), &s),
            None
        );
        // Zero-length requests are fine.
        assert_eq!(errno(header(CMD_WRITE, 0, end, 0), &s), None);

        let simple = session(ReplyMode::Simple, false);
        assert_eq!(
            errno(header(CMD_READ, CMD_FLAG_DF, 0, 1), &simple),
            Some(Errno::Inval)
        );
        assert_eq!(
            errno(header(CMD_BLOCK_STATUS, 0, 0, 1), &simple),
            Some(Errno::Inval)
        );

        let ro = session(ReplyMode::Simple, true);
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(errno(header(kind, 0, 0, 1), &ro), Some(Errno::Perm));
        }
    }

    #[test]
    fn payload_len_restates_a_write_only_with_extended_headers() {
        let ext = session(ReplyMode::Extended, false);
        let compact = session(ReplyMode::Structured, false);
        let write = header(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512);
        assert_eq!(errno(write, &ext), None);
        assert_eq!(errno(write, &compact), Some(Errno::Inval));
        let read = header(CMD_READ, CMD_FLAG_PAYLOAD_LEN, 0, 512);
        assert_eq!(errno(read, &ext), Some(Errno::Inval));
    }

    #[test]
    fn payload_plans_keep_the_stream_in_sync() {
        let big = MAX_PAYLOAD as u64 + 1;
        let compact = ReplyMode::Structured;
        let ext = ReplyMode::Extended;
        assert_eq!(
            header(CMD_READ, 0, 0, big).payload_plan(compact),
            RequestPayload::None
        );
        assert_eq!(
            header(CMD_WRITE, 0, 0, 5).payload_plan(compact),
            RequestPayload::Receive(5)
        );
        assert_eq!(
            header(CMD_WRITE, 0, 0, big).payload_plan(compact),
            RequestPayload::Discard(big)
        );
        assert_eq!(
            header(CMD_WRITE, 0, 0, u32::MAX as u64).payload_plan(compact),
            RequestPayload::Disconnect
        );
        assert_eq!(
            header(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, big).payload_plan(ext),
            RequestPayload::Disconnect
        );
        // PAYLOAD_LEN on another command carries a payload to consume.
        let h = header(CMD_TRIM, CMD_FLAG_PAYLOAD_LEN, 0, 16);
        assert_eq!(h.payload_plan(ext), RequestPayload::Receive(16));
        assert!(validate(&h, &session(ext, false)).is_err());
    }
}
