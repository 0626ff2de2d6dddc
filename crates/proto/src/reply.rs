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
            put_chunk_header(out, mode, to, done(last), REPLY_TYPE_OFFSET_DATA, 8 + len as u64);
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
            put_chunk_header(out, mode, to, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, 8 + 16 * n);
            out.put_u32(context_id);
            out.put_u32(descriptors.len() as u32);
            for d in descriptors {
                out.put_u64(d.len);
                out.put_u64(d.status as u64);
            }
        }
        _ => {
            put_chunk_header(out, mode, to, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n);
            out.put_u32(context_id);
            for d in descriptors {
                out.put_u32(d.len as u32);
                out.put_u32(d.status);
            }
        }
    }
}
