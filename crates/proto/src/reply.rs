//! Transmission replies in the three framings: simple (16-byte header),
//! structured chunks (20-byte header) and extended chunks (32-byte header),
//! in both directions.
//!
//! The server side is a set of `put_*` functions that append to a byte
//! buffer, so a connection can gather many replies and send them with one
//! system call, without building a value per reply. Payload data (READ
//! bytes) is appended by the caller right after [`put_read_data`]'s header.
//!
//! The client side reads a [`ReplyHeader`] (its magic says which framing it
//! has: [`reply_header_len`] tells how many bytes to read), then, for a
//! chunk, its payload as a [`ChunkPayload`]. [`put_chunk`] is the matching
//! general encoder, which the `put_*` functions agree with byte for byte.

use crate::codec::{clip, lossy, Codec, DecodeError, PutBe, Reader};
use crate::consts::*;
use crate::session::ReplyMode;

pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;
pub const EXTENDED_REPLY_LEN: usize = 32;

/// Header bytes that precede READ data in each mode (for buffer sizing).
pub fn read_header_len(mode: ReplyMode) -> usize {
    match mode {
        ReplyMode::Simple => SIMPLE_REPLY_LEN,
        ReplyMode::Structured => STRUCTURED_REPLY_LEN + 8,
        ReplyMode::Extended => EXTENDED_REPLY_LEN + 8,
    }
}

/// Length of the reply header that starts with `magic`, or `None` if it is
/// no reply magic. A client reads the first 4 bytes, then the rest: in
/// structured mode a server may answer with simple replies too.
pub fn reply_header_len(magic: u32) -> Option<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Some(STRUCTURED_REPLY_LEN),
        EXTENDED_REPLY_MAGIC => Some(EXTENDED_REPLY_LEN),
        _ => None,
    }
}

/// Which request a reply answers: its cookie, and its offset (echoed in the
/// extended chunk header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub cookie: u64,
    pub offset: u64,
}

/// A reply header in any of the three framings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// `error` is 0 on success; a successful READ's data follows (its length
    /// is the request's).
    Simple { error: u32, cookie: u64 },
    /// A structured chunk: `length` payload bytes of type `kind` follow.
    Structured {
        flags: u16,
        kind: u16,
        cookie: u64,
        length: u32,
    },
    /// An extended chunk, which also echoes the request's offset.
    Extended {
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        length: u64,
    },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. }
            | ReplyHeader::Structured { cookie, .. }
            | ReplyHeader::Extended { cookie, .. } => cookie,
        }
    }

    /// Whether this is the request's last reply (a simple reply always is).
    pub fn is_done(&self) -> bool {
        match *self {
            ReplyHeader::Simple { .. } => true,
            ReplyHeader::Structured { flags, .. } | ReplyHeader::Extended { flags, .. } => {
                flags & REPLY_FLAG_DONE != 0
            }
        }
    }

    /// The chunk type and payload length, for chunks.
    pub fn chunk(&self) -> Option<(u16, u64)> {
        match *self {
            ReplyHeader::Simple { .. } => None,
            ReplyHeader::Structured { kind, length, .. } => Some((kind, length.into())),
            ReplyHeader::Extended { kind, length, .. } => Some((kind, length)),
        }
    }
}

impl Codec<'_> for ReplyHeader {
    type Error = DecodeError;

    fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            ReplyHeader::Simple { error, cookie } => {
                out.put_u32(SIMPLE_REPLY_MAGIC);
                out.put_u32(error);
                out.put_u64(cookie);
            }
            ReplyHeader::Structured {
                flags,
                kind,
                cookie,
                length,
            } => {
                out.put_u32(STRUCTURED_REPLY_MAGIC);
                out.put_u16(flags);
                out.put_u16(kind);
                out.put_u64(cookie);
                out.put_u32(length);
            }
            ReplyHeader::Extended {
                flags,
                kind,
                cookie,
                offset,
                length,
            } => {
                out.put_u32(EXTENDED_REPLY_MAGIC);
                out.put_u16(flags);
                out.put_u16(kind);
                out.put_u64(cookie);
                out.put_u64(offset);
                out.put_u64(length);
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let magic = r.u32()?;
        let Some(len) = reply_header_len(magic) else {
            return Err(DecodeError::BadMagic {
                what: "reply",
                found: magic.into(),
            });
        };
        // Whole header present before any field is looked at.
        if r.remaining() < len - 4 {
            return Err(DecodeError::Truncated);
        }
        Ok(match magic {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                error: r.u32()?,
                cookie: r.u64()?,
            },
            STRUCTURED_REPLY_MAGIC => ReplyHeader::Structured {
                flags: r.u16()?,
                kind: r.u16()?,
                cookie: r.u64()?,
                length: r.u32()?,
            },
            _ => ReplyHeader::Extended {
                flags: r.u16()?,
                kind: r.u16()?,
                cookie: r.u64()?,
                offset: r.u64()?,
                length: r.u64()?,
            },
        })
    }
}

/// One `base:allocation` descriptor: a length and its status bits. Compact
/// `BLOCK_STATUS` chunks carry both as u32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub len: u64,
    pub status: u32,
}

/// A descriptor of a `BLOCK_STATUS_EXT` chunk, whose status field is 64
/// bits wide (contexts defined so far use the low 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtDescriptor {
    pub len: u64,
    pub status: u64,
}

/// The payload of a structured or extended chunk, by chunk type. Data and
/// unknown payloads borrow from the decoded bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPayload<'a> {
    /// No payload: success without data (always with DONE).
    None,
    OffsetData {
        offset: u64,
        data: &'a [u8],
    },
    /// `len` bytes at `offset` read as zeros.
    OffsetHole {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        context_id: u32,
        descriptors: Vec<Descriptor>,
    },
    BlockStatusExt {
        context_id: u32,
        descriptors: Vec<ExtDescriptor>,
    },
    /// `error` is an NBD error number ([`Errno`] lists those scratchd sends).
    Error {
        error: u32,
        message: String,
    },
    /// An error that concerns the data at `offset` of a READ.
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
    /// A chunk type this crate does not know, kept raw.
    Unknown {
        kind: u16,
        data: &'a [u8],
    },
}

impl<'a> ChunkPayload<'a> {
    /// The `REPLY_TYPE_*` this payload is sent with.
    pub fn kind(&self) -> u16 {
        match self {
            ChunkPayload::None => REPLY_TYPE_NONE,
            ChunkPayload::OffsetData { .. } => REPLY_TYPE_OFFSET_DATA,
            ChunkPayload::OffsetHole { .. } => REPLY_TYPE_OFFSET_HOLE,
            ChunkPayload::BlockStatus { .. } => REPLY_TYPE_BLOCK_STATUS,
            ChunkPayload::BlockStatusExt { .. } => REPLY_TYPE_BLOCK_STATUS_EXT,
            ChunkPayload::Error { .. } => REPLY_TYPE_ERROR,
            ChunkPayload::ErrorOffset { .. } => REPLY_TYPE_ERROR_OFFSET,
            ChunkPayload::Unknown { kind, .. } => *kind,
        }
    }

    /// Bytes [`ChunkPayload::encode`] appends, for the chunk header.
    pub fn encoded_len(&self) -> u64 {
        let n = |len: usize| len as u64;
        match self {
            ChunkPayload::None => 0,
            ChunkPayload::OffsetData { data, .. } => 8 + n(data.len()),
            ChunkPayload::OffsetHole { .. } => 12,
            ChunkPayload::BlockStatus { descriptors, .. } => 4 + 8 * n(descriptors.len()),
            ChunkPayload::BlockStatusExt { descriptors, .. } => 8 + 16 * n(descriptors.len()),
            ChunkPayload::Error { message, .. } => 6 + n(clip(message).len()),
            ChunkPayload::ErrorOffset { message, .. } => 14 + n(clip(message).len()),
            ChunkPayload::Unknown { data, .. } => n(data.len()),
        }
    }

    /// Appends the payload. Compact descriptors carry the low 32 bits of
    /// their length (the server splits longer runs); messages are clipped to
    /// the protocol's string limit.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ChunkPayload::None => {}
            ChunkPayload::OffsetData { offset, data } => {
                out.put_u64(*offset);
                out.extend_from_slice(data);
            }
            ChunkPayload::OffsetHole { offset, len } => {
                out.put_u64(*offset);
                out.put_u32(*len);
            }
            ChunkPayload::BlockStatus {
                context_id,
                descriptors,
            } => put_descriptors(out, *context_id, descriptors),
            ChunkPayload::BlockStatusExt {
                context_id,
                descriptors,
            } => {
                out.put_u32(*context_id);
                out.put_u32(descriptors.len() as u32);
                for d in descriptors {
                    out.put_u64(d.len);
                    out.put_u64(d.status);
                }
            }
            ChunkPayload::Error { error, message } => put_error_payload(out, *error, message),
            ChunkPayload::ErrorOffset {
                error,
                message,
                offset,
            } => {
                put_error_payload(out, *error, message);
                out.put_u64(*offset);
            }
            ChunkPayload::Unknown { data, .. } => out.extend_from_slice(data),
        }
    }

    /// Decodes the payload of a chunk of type `kind`, which must fill `r`
    /// exactly (pass a [`Reader::sub`] of the header's length).
    pub fn decode(kind: u16, r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let payload = match kind {
            REPLY_TYPE_NONE => ChunkPayload::None,
            REPLY_TYPE_OFFSET_DATA => ChunkPayload::OffsetData {
                offset: r.u64()?,
                data: r.rest(),
            },
            REPLY_TYPE_OFFSET_HOLE => ChunkPayload::OffsetHole {
                offset: r.u64()?,
                len: r.u32()?,
            },
            REPLY_TYPE_BLOCK_STATUS => {
                let context_id = r.u32()?;
                let mut descriptors = Vec::with_capacity(r.remaining() / 8);
                while !r.is_empty() {
                    descriptors.push(Descriptor {
                        len: r.u32()?.into(),
                        status: r.u32()?,
                    });
                }
                ChunkPayload::BlockStatus {
                    context_id,
                    descriptors,
                }
            }
            REPLY_TYPE_BLOCK_STATUS_EXT => {
                let context_id = r.u32()?;
                let count = r.u32()? as usize;
                // The count must agree with the length; check before
                // allocating for it.
                if count.checked_mul(16) != Some(r.remaining()) {
                    return Err(match count.checked_mul(16) {
                        Some(need) if need < r.remaining() => {
                            DecodeError::TrailingBytes(r.remaining() - need)
                        }
                        _ => DecodeError::Truncated,
                    });
                }
                let mut descriptors = Vec::with_capacity(count);
                for _ in 0..count {
                    descriptors.push(ExtDescriptor {
                        len: r.u64()?,
                        status: r.u64()?,
                    });
                }
                ChunkPayload::BlockStatusExt {
                    context_id,
                    descriptors,
                }
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                let error = r.u32()?;
                let len = r.u16()?;
                // Leniently, and clipped as the encoder clips (see `lossy`).
                let message = lossy(r.take(len.into())?);
                if kind == REPLY_TYPE_ERROR {
                    ChunkPayload::Error { error, message }
                } else {
                    ChunkPayload::ErrorOffset {
                        error,
                        message,
                        offset: r.u64()?,
                    }
                }
            }
            kind => ChunkPayload::Unknown {
                kind,
                data: r.rest(),
            },
        };
        r.finish()?;
        Ok(payload)
    }
}

/// Appends a whole chunk: header in the framing of `mode` (simple mode has
/// no chunks, so it gets structured framing), then `payload`.
pub fn put_chunk(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    to: ReplyTo,
    last: bool,
    payload: &ChunkPayload,
) {
    chunk_header(mode, to, done(last), payload.kind(), payload.encoded_len()).encode(out);
    payload.encode(out);
}

/// Header of a chunk; structured lengths are 32 bits by the caller's
/// contract (no payload scratchd sends comes near).
fn chunk_header(mode: ReplyMode, to: ReplyTo, flags: u16, kind: u16, length: u64) -> ReplyHeader {
    match mode {
        ReplyMode::Extended => ReplyHeader::Extended {
            flags,
            kind,
            cookie: to.cookie,
            offset: to.offset,
            length,
        },
        _ => ReplyHeader::Structured {
            flags,
            kind,
            cookie: to.cookie,
            length: length as u32,
        },
    }
}

fn put_chunk_header(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    to: ReplyTo,
    flags: u16,
    kind: u16,
    len: u64,
) {
    chunk_header(mode, to, flags, kind, len).encode(out);
}

fn put_simple(out: &mut Vec<u8>, error: u32, cookie: u64) {
    ReplyHeader::Simple { error, cookie }.encode(out);
}

fn put_error_payload(out: &mut Vec<u8>, error: u32, message: &str) {
    let message = clip(message);
    out.put_u32(error);
    out.put_u16(message.len() as u16);
    out.extend_from_slice(message.as_bytes());
}

fn put_descriptors(out: &mut Vec<u8>, context_id: u32, descriptors: &[Descriptor]) {
    out.put_u32(context_id);
    for d in descriptors {
        out.put_u32(d.len as u32);
        out.put_u32(d.status);
    }
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
            let len = 4 + 2 + clip(message).len() as u64;
            put_chunk_header(out, mode, to, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, len);
            put_error_payload(out, errno as u32, message);
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
            put_descriptors(out, context_id, descriptors);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    /// Splits a buffer of replies the way a client reads them.
    fn decode_all(out: &[u8]) -> Vec<(ReplyHeader, ChunkPayload<'_>)> {
        let mut r = Reader::new(out);
        let mut v = Vec::new();
        while !r.is_empty() {
            let h = ReplyHeader::decode(&mut r).unwrap();
            let payload = match h.chunk() {
                Some((kind, len)) => {
                    ChunkPayload::decode(kind, &mut r.sub(len as usize).unwrap()).unwrap()
                }
                None => ChunkPayload::None,
            };
            v.push((h, payload));
        }
        v
    }

    #[test]
    fn server_replies_decode_as_a_client_reads_them() {
        let mut out = Vec::new();
        put_ok(&mut out, ReplyMode::Simple, TO);
        put_read_hole(&mut out, ReplyMode::Structured, TO, 8192, 512, false);
        put_error(&mut out, ReplyMode::Extended, TO, Errno::Inval, "bad");
        let d = [Descriptor {
            len: 512,
            status: 3,
        }];
        put_block_status(&mut out, ReplyMode::Structured, TO, 1, &d);
        put_block_status(&mut out, ReplyMode::Extended, TO, 1, &d);
        let got = decode_all(&out);
        assert_eq!(
            got[0].0,
            ReplyHeader::Simple {
                error: 0,
                cookie: 0x1122
            }
        );
        assert!(!got[1].0.is_done());
        assert_eq!(
            got[1].1,
            ChunkPayload::OffsetHole {
                offset: 8192,
                len: 512
            }
        );
        assert!(got[2].0.is_done());
        assert!(matches!(
            got[2].0,
            ReplyHeader::Extended { offset: 4096, .. }
        ));
        assert_eq!(
            got[2].1,
            ChunkPayload::Error {
                error: 22,
                message: "bad".into()
            }
        );
        assert_eq!(
            got[3].1,
            ChunkPayload::BlockStatus {
                context_id: 1,
                descriptors: d.to_vec()
            }
        );
        assert_eq!(
            got[4].1,
            ChunkPayload::BlockStatusExt {
                context_id: 1,
                descriptors: vec![ExtDescriptor {
                    len: 512,
                    status: 3
                }]
            }
        );
    }

    #[test]
    fn put_chunk_agrees_with_the_server_encoders() {
        for mode in [ReplyMode::Structured, ReplyMode::Extended] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            put_read_hole(&mut a, mode, TO, 1, 2, true);
            put_chunk(
                &mut b,
                mode,
                TO,
                true,
                &ChunkPayload::OffsetHole { offset: 1, len: 2 },
            );
            assert_eq!(a, b);
            a.clear();
            b.clear();
            put_read_data(&mut a, mode, TO, 7, 3, false);
            a.extend_from_slice(b"abc");
            let data = ChunkPayload::OffsetData {
                offset: 7,
                data: b"abc",
            };
            put_chunk(&mut b, mode, TO, false, &data);
            assert_eq!(a, b);
            a.clear();
            b.clear();
            put_ok(&mut a, mode, TO);
            put_chunk(&mut b, mode, TO, true, &ChunkPayload::None);
            assert_eq!(a, b);
            a.clear();
            b.clear();
            let long = "e".repeat(5000);
            put_error(&mut a, mode, TO, Errno::Io, &long);
            let error = ChunkPayload::Error {
                error: Errno::Io as u32,
                message: long,
            };
            put_chunk(&mut b, mode, TO, true, &error);
            assert_eq!(a, b);
        }
    }

    /// Found by the `decode` fuzz target: an ERROR chunk whose message is
    /// longer than the string limit decoded whole but encoded clipped, so a
    /// decoded payload did not encode back to itself (nor to its length).
    #[test]
    fn long_error_messages_decode_clipped_and_round_trip() {
        let mut bytes = Vec::new();
        bytes.put_u32(Errno::Io as u32);
        bytes.put_u16(5000);
        bytes.extend_from_slice(&[b'e'; 5000]);
        let p = ChunkPayload::decode(REPLY_TYPE_ERROR, &mut Reader::new(&bytes)).unwrap();
        let ChunkPayload::Error { message, .. } = &p else {
            panic!("{p:?}");
        };
        assert_eq!(message.len(), MAX_STRING_LEN);
        let mut out = Vec::new();
        p.encode(&mut out);
        assert_eq!(out.len() as u64, p.encoded_len());
        assert_eq!(
            ChunkPayload::decode(REPLY_TYPE_ERROR, &mut Reader::new(&out)),
            Ok(p)
        );
    }

    #[test]
    fn malformed_replies_are_refused() {
        assert_eq!(
            ReplyHeader::from_bytes(&[0, 0, 0, 0]),
            Err(DecodeError::BadMagic {
                what: "reply",
                found: 0
            })
        );
        let mut out = Vec::new();
        put_ok(&mut out, ReplyMode::Extended, TO);
        assert_eq!(
            ReplyHeader::from_bytes(&out[..31]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(reply_header_len(EXTENDED_REPLY_MAGIC), Some(out.len()));
        // A hole chunk one byte too long, a status chunk with half a
        // descriptor, an extended status count that disagrees with the length.
        let hole = [0u8; 13];
        assert_eq!(
            ChunkPayload::decode(REPLY_TYPE_OFFSET_HOLE, &mut Reader::new(&hole)),
            Err(DecodeError::TrailingBytes(1))
        );
        let status = [0u8; 8];
        assert_eq!(
            ChunkPayload::decode(REPLY_TYPE_BLOCK_STATUS, &mut Reader::new(&status)),
            Err(DecodeError::Truncated)
        );
        let mut ext = vec![0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff];
        ext.extend_from_slice(&[0; 16]);
        assert_eq!(
            ChunkPayload::decode(REPLY_TYPE_BLOCK_STATUS_EXT, &mut Reader::new(&ext)),
            Err(DecodeError::Truncated)
        );
        ext[4..8].copy_from_slice(&[0, 0, 0, 1]);
        ext.extend_from_slice(&[0; 3]);
        assert_eq!(
            ChunkPayload::decode(REPLY_TYPE_BLOCK_STATUS_EXT, &mut Reader::new(&ext)),
            Err(DecodeError::TrailingBytes(3))
        );
        // An error message longer than its chunk.
        let error = [0, 0, 0, 5, 0, 4, b'a'];
        assert_eq!(
            ChunkPayload::decode(REPLY_TYPE_ERROR, &mut Reader::new(&error)),
            Err(DecodeError::Truncated)
        );
    }

    fn header() -> impl Strategy<Value = ReplyHeader> {
        prop_oneof![
            (any::<u32>(), any::<u64>())
                .prop_map(|(error, cookie)| ReplyHeader::Simple { error, cookie }),
            (any::<u16>(), any::<u16>(), any::<u64>(), any::<u32>()).prop_map(
                |(flags, kind, cookie, length)| ReplyHeader::Structured {
                    flags,
                    kind,
                    cookie,
                    length
                }
            ),
            (
                any::<u16>(),
                any::<u16>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(flags, kind, cookie, offset, length)| {
                    ReplyHeader::Extended {
                        flags,
                        kind,
                        cookie,
                        offset,
                        length,
                    }
                }),
        ]
    }

    /// Bytes that borrowed payloads (READ data, unknown chunks) point into.
    static DATA: [u8; 64] = {
        let mut d = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            d[i] = (i as u8).wrapping_mul(37);
            i += 1;
        }
        d
    };

    fn data() -> impl Strategy<Value = &'static [u8]> {
        (0..=DATA.len()).prop_map(|n| &DATA[..n])
    }

    /// Payloads for chunks of the given mode.
    fn payload(extended: bool) -> impl Strategy<Value = ChunkPayload<'static>> {
        let descriptors = prop::collection::vec((any::<u32>(), any::<u32>()), 0..6);
        let ext_descriptors = prop::collection::vec((any::<u64>(), any::<u64>()), 0..6);
        let status = if extended {
            (any::<u32>(), ext_descriptors)
                .prop_map(|(context_id, ds)| ChunkPayload::BlockStatusExt {
                    context_id,
                    descriptors: ds
                        .into_iter()
                        .map(|(len, status)| ExtDescriptor { len, status })
                        .collect(),
                })
                .boxed()
        } else {
            (any::<u32>(), descriptors)
                .prop_map(|(context_id, ds)| ChunkPayload::BlockStatus {
                    context_id,
                    descriptors: ds
                        .into_iter()
                        .map(|(len, status)| Descriptor {
                            len: len.into(),
                            status,
                        })
                        .collect(),
                })
                .boxed()
        };
        let known = [
            REPLY_TYPE_NONE,
            REPLY_TYPE_OFFSET_DATA,
            REPLY_TYPE_OFFSET_HOLE,
            REPLY_TYPE_BLOCK_STATUS,
            REPLY_TYPE_BLOCK_STATUS_EXT,
            REPLY_TYPE_ERROR,
            REPLY_TYPE_ERROR_OFFSET,
        ];
        prop_oneof![
            Just(ChunkPayload::None),
            (any::<u64>(), data())
                .prop_map(|(offset, data)| ChunkPayload::OffsetData { offset, data }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(offset, len)| ChunkPayload::OffsetHole { offset, len }),
            status,
            (any::<u32>(), ".{0,20}")
                .prop_map(|(error, message)| ChunkPayload::Error { error, message }),
            (any::<u32>(), ".{0,20}", any::<u64>()).prop_map(|(error, message, offset)| {
                ChunkPayload::ErrorOffset {
                    error,
                    message,
                    offset,
                }
            }),
            (
                any::<u16>().prop_filter("unknown kinds only", move |k| !known.contains(k)),
                data()
            )
                .prop_map(|(kind, data)| ChunkPayload::Unknown { kind, data }),
        ]
    }

    proptest! {
        #[test]
        fn reply_headers_round_trip(h in header()) {
            let bytes = h.to_bytes();
            let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            prop_assert_eq!(reply_header_len(magic), Some(bytes.len()));
            prop_assert_eq!(ReplyHeader::from_bytes(&bytes), Ok(h));
        }

        #[test]
        fn chunks_round_trip(
            (extended, value) in any::<bool>().prop_flat_map(|e| (Just(e), payload(e))),
            cookie: u64,
            offset: u64,
            last: bool,
        ) {
            let mode = if extended { ReplyMode::Extended } else { ReplyMode::Structured };
            let mut out = Vec::new();
            put_chunk(&mut out, mode, ReplyTo { cookie, offset }, last, &value);
            let got = decode_all(&out);
            prop_assert_eq!(got.len(), 1);
            prop_assert_eq!(got[0].0.cookie(), cookie);
            prop_assert_eq!(got[0].0.is_done(), last);
            prop_assert_eq!(&got[0].1, &value);
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes: Vec<u8>, kind in 0u16..10, error_kind: bool) {
            let _ = ReplyHeader::from_bytes(&bytes);
            let kind = if error_kind { 0x8000 | kind } else { kind };
            let _ = ChunkPayload::decode(kind, &mut Reader::new(&bytes));
        }
    }
}
