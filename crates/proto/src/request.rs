//! Transmission requests: header decoding and validation against the
//! negotiated session.
//!
//! Decoding and validation are separate on purpose: the server must know how
//! many payload bytes follow a header (to keep the stream in sync) even when
//! the request itself is refused.

use crate::consts::*;
use crate::negotiation::{ReplyMode, Session};

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

/// The header does not start with the request magic of the negotiated mode;
/// the stream can no longer be trusted, so the connection is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRequestMagic(pub u32);

impl std::fmt::Display for BadRequestMagic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad request magic {:#010x}", self.0)
    }
}

pub fn request_len(mode: ReplyMode) -> usize {
    match mode {
        ReplyMode::Extended => EXTENDED_REQUEST_LEN,
        _ => COMPACT_REQUEST_LEN,
    }
}

fn be<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

impl RequestHeader {
    /// Decodes a header from exactly [`request_len`] bytes.
    pub fn parse(b: &[u8], mode: ReplyMode) -> Result<Self, BadRequestMagic> {
        let magic = u32::from_be_bytes(be(b, 0));
        let extended = mode == ReplyMode::Extended;
        let expected = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != expected || b.len() != request_len(mode) {
            return Err(BadRequestMagic(magic));
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes(be(b, 4)),
            kind: u16::from_be_bytes(be(b, 6)),
            cookie: u64::from_be_bytes(be(b, 8)),
            offset: u64::from_be_bytes(be(b, 16)),
            length: if extended {
                u64::from_be_bytes(be(b, 24))
            } else {
                u32::from_be_bytes(be(b, 24)) as u64
            },
        })
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
    pub fn payload_plan(&self, mode: ReplyMode) -> PayloadPlan {
        match self.payload_len(mode) {
            0 => PayloadPlan::None,
            n if n <= MAX_PAYLOAD as u64 => PayloadPlan::Receive(n as u32),
            // The extended-headers spec asks for a hard disconnect here.
            _ if mode == ReplyMode::Extended => PayloadPlan::Disconnect,
            n if n <= MAX_PAYLOAD_DRAIN => PayloadPlan::Discard(n),
            _ => PayloadPlan::Disconnect,
        }
    }
}

/// Longest over-size WRITE payload (compact headers) read and thrown away to
/// keep the stream in sync; anything longer ends the connection instead.
pub const MAX_PAYLOAD_DRAIN: u64 = 2 * MAX_PAYLOAD as u64;

/// What to do with the bytes that follow a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadPlan {
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
    Read { offset: u64, len: u32, df: bool },
    Write { offset: u64, len: u32, fua: bool },
    Disconnect,
    Flush,
    Trim { offset: u64, len: u64, fua: bool },
    Cache { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, fua: bool, no_hole: bool, fast: bool },
    BlockStatus { offset: u64, len: u64, req_one: bool },
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
pub fn validate(h: &RequestHeader, s: &Session) -> Result<Command, Refusal> {
    let flags = s.export.flags;
    let extended = s.mode == ReplyMode::Extended;
    let allowed = match h.kind {
        CMD_READ if flags.contains(TransmissionFlags::SEND_DF) => CMD_FLAG_DF,
        CMD_WRITE_ZEROES if flags.contains(TransmissionFlags::SEND_FAST_ZERO) => {
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
        }
        CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    };
    // With SEND_FUA advertised, FUA must be accepted on every command.
    let allowed = if flags.contains(TransmissionFlags::SEND_FUA) {
        allowed | CMD_FLAG_FUA
    } else {
        allowed
    };
    // PAYLOAD_LEN only restates a WRITE's length; on anything else it means a
    // payload this server never asked for.
    let allowed = if extended && h.kind == CMD_WRITE {
        allowed | CMD_FLAG_PAYLOAD_LEN
    } else {
        allowed
    };
    if h.flags & !allowed != 0 {
        return Err(refuse(Errno::Inval, "flag not valid for this command"));
    }
    let (offset, len) = (h.offset, h.length);
    let end = offset.checked_add(len);
    let within = end.is_some_and(|e| e <= s.export.size);
    let read_only = flags.contains(TransmissionFlags::READ_ONLY);
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let payload = |len: u64| -> Result<u32, Refusal> {
        if len > MAX_PAYLOAD as u64 {
            Err(refuse(Errno::Inval, "request exceeds the maximum payload size"))
        } else {
            Ok(len as u32)
        }
    };
    let writable = |advertised: bool| -> Result<(), Refusal> {
        if read_only {
            Err(refuse(Errno::Perm, "export is read-only"))
        } else if !advertised {
            Err(refuse(Errno::Inval, "command not supported by this export"))
        } else if !within {
            Err(refuse(Errno::NoSpc, "request goes past the end of the export"))
        } else {
            Ok(())
        }
    };
    let in_range = || -> Result<(), Refusal> {
        if within {
            Ok(())
        } else {
            Err(refuse(Errno::Inval, "request goes past the end of the export"))
        }
    };
    match h.kind {
        CMD_READ => {
            let len = payload(len)?;
            in_range()?;
            Ok(Command::Read { offset, len, df: h.flags & CMD_FLAG_DF != 0 })
        }
        CMD_WRITE => {
            let len = payload(len)?;
            writable(true)?;
            Ok(Command::Write { offset, len, fua })
        }
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH if flags.contains(TransmissionFlags::SEND_FLUSH) => Ok(Command::Flush),
        CMD_TRIM => {
            writable(flags.contains(TransmissionFlags::SEND_TRIM))?;
            Ok(Command::Trim { offset, len, fua })
        }
        CMD_CACHE if flags.contains(TransmissionFlags::SEND_CACHE) => {
            in_range()?;
            Ok(Command::Cache { offset, len })
        }
        CMD_WRITE_ZEROES => {
            writable(flags.contains(TransmissionFlags::SEND_WRITE_ZEROES))?;
            Ok(Command::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
                fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
            })
        }
        CMD_BLOCK_STATUS => {
            if s.base_allocation.is_none() {
                return Err(refuse(Errno::Inval, "no metadata context was selected"));
            }
            if len == 0 {
                return Err(refuse(Errno::Inval, "block status of zero bytes"));
            }
            in_range()?;
            Ok(Command::BlockStatus { offset, len, req_one: h.flags & CMD_FLAG_REQ_ONE != 0 })
        }
        _ => Err(refuse(Errno::Inval, "unknown or unsupported command")),
    }
}
