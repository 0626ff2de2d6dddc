//! Transmission replies in the three framings: simple (16-byte header),
//! structured chunks (20-byte header) and extended chunks (32-byte header).
//!
//! Every function appends to a byte buffer, so a connection can gather many
//! replies and send them with one system call. Payload data (READ bytes) is
//! appended by the caller right after [`put_read_data`]'s header.

use crate::codec::PutBe;
use crate::consts::*;
use crate::handshake::clip;
use crate::negotiation::ReplyMode;

/// Header bytes that precede READ data in each mode (for buffer sizing).
pub fn read_header_len(mode: ReplyMode) -> usize {
    match mode {
        ReplyMode::Simple => 16,
        ReplyMode::Structured => 20 + 8,
        ReplyMode::Extended => 32 + 8,
    }
}

/// Which request a reply answers: its cookie, and its offset (echoed in the
/// extended chunk header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub cookie: u64,
    pub offset: u64,
}

fn put_chunk_header(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    to: ReplyTo,
    flags: u16,
    kind: u16,
    len: u64,
) {
    match mode {
        ReplyMode::Extended => {
            out.put_u32(EXTENDED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(kind);
            out.put_u64(to.cookie);
            out.put_u64(to.offset);
            out.put_u64(len);
        }
        _ => {
            out.put_u32(STRUCTURED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(kind);
            out.put_u64(to.cookie);
            out.put_u32(len as u32);
        }
    }
}

fn put_simple(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

fn done(last: bool) -> u16 {
    if last {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Success without data (WRITE, FLUSH, TRIM, ...).
pub fn put_ok(out: &mut Vec<u8>, mode: ReplyMode, to: ReplyTo) {
    match mode {
        ReplyMode::Simple => put_simple(out, 0, to.cookie),
        _ => put_chunk_header(out, mode, to, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0),
    }
}

/// A final error reply; `message` is sent only where the framing has room.
pub fn put_error(out: &mut Vec<u8>, mode: ReplyMode, to: ReplyTo, errno: Errno, message: &str) {
    match mode {
        ReplyMode::Simple => put_simple(out, errno as u32, to.cookie),
        _ => {
            let message = clip(message);
            let len = 4 + 2 + message.len() as u64;
            put_chunk_header(out, mode, to, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, len);
            out.put_u32(errno as u32);
            out.put_u16(message.len() as u16);
            out.extend_from_slice(message.as_bytes());
        }
    }
}

/// The header for `len` bytes of READ data at `offset`; the caller appends
/// the data. In simple mode there is exactly one such header per request.
pub fn put_read_data(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    to: ReplyTo,
    offset: u64,
    len: u32,
    last: bool,
) {
    match mode {
        ReplyMode::Simple => put_simple(out, 0, to.cookie),
        _ => {
            put_chunk_header(
                out,
                mode,
                to,
                done(last),
                REPLY_TYPE_OFFSET_DATA,
                8 + len as u64,
            );
            out.put_u64(offset);
        }
    }
}

/// A run of `len` bytes at `offset` that reads as zeros (structured modes only).
pub fn put_read_hole(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    to: ReplyTo,
    offset: u64,
    len: u32,
    last: bool,
) {
    debug_assert!(mode != ReplyMode::Simple);
    put_chunk_header(out, mode, to, done(last), REPLY_TYPE_OFFSET_HOLE, 12);
    out.put_u64(offset);
    out.put_u32(len);
}

/// One `base:allocation` descriptor: a length and its status bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub len: u64,
    pub status: u32,
}

/// A final block-status reply for context `context_id`. In compact mode,
/// lengths must fit in 32 bits (the caller splits or clips them).
pub fn put_block_status(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    to: ReplyTo,
    context_id: u32,
    descriptors: &[Descriptor],
) {
    let n = descriptors.len() as u64;
    match mode {
        ReplyMode::Extended => {
            put_chunk_header(
                out,
                mode,
                to,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS_EXT,
                8 + 16 * n,
            );
            out.put_u32(context_id);
            out.put_u32(descriptors.len() as u32);
            for d in descriptors {
                out.put_u64(d.len);
                out.put_u64(d.status as u64);
            }
        }
        _ => {
            put_chunk_header(
                out,
                mode,
                to,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                4 + 8 * n,
            );
            out.put_u32(context_id);
            for d in descriptors {
                out.put_u32(d.len as u32);
                out.put_u32(d.status);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TO: ReplyTo = ReplyTo {
        cookie: 0x1122,
        offset: 4096,
    };

    #[test]
    fn simple_replies() {
        let mut out = Vec::new();
        put_ok(&mut out, ReplyMode::Simple, TO);
        put_error(&mut out, ReplyMode::Simple, TO, Errno::NoSpc, "ignored");
        assert_eq!(
            out,
            [
                0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11, 0x22, //
                0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0x11, 0x22
            ]
        );
    }

    #[test]
    fn structured_chunks() {
        let mut out = Vec::new();
        put_read_hole(&mut out, ReplyMode::Structured, TO, 8192, 512, false);
        assert_eq!(out.len(), 20 + 12);
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..8], &[0, 0, 0, 2]); // no DONE, OFFSET_HOLE
        assert_eq!(&out[16..20], &[0, 0, 0, 12]);
        assert_eq!(&out[20..], &[0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 2, 0]);
        out.clear();
        put_error(&mut out, ReplyMode::Structured, TO, Errno::Inval, "bad");
        assert_eq!(&out[4..8], &[0, 1, 0x80, 0x01]);
        assert_eq!(
            &out[16..],
            &[0, 0, 0, 9, 0, 0, 0, 22, 0, 3, b'b', b'a', b'd']
        );
    }

    #[test]
    fn extended_chunks_echo_the_request_offset() {
        let mut out = Vec::new();
        put_read_data(&mut out, ReplyMode::Extended, TO, 8192, 4, true);
        assert_eq!(out.len(), read_header_len(ReplyMode::Extended));
        assert_eq!(&out[..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[16..24], &4096u64.to_be_bytes());
        assert_eq!(&out[24..32], &12u64.to_be_bytes());
        assert_eq!(&out[32..40], &8192u64.to_be_bytes());
        out.clear();
        let d = [Descriptor {
            len: 1 << 33,
            status: 3,
        }];
        put_block_status(&mut out, ReplyMode::Extended, TO, 1, &d);
        assert_eq!(&out[6..8], &REPLY_TYPE_BLOCK_STATUS_EXT.to_be_bytes());
        assert_eq!(&out[24..32], &24u64.to_be_bytes());
        assert_eq!(
            &out[32..],
            &[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]
        );
    }
}
