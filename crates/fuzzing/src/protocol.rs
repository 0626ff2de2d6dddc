//! Targets over the wire protocol (`scratchd-proto`).

use scratchd_proto::codec::clip;
use scratchd_proto::consts::*;
use scratchd_proto::handshake::{
    ClientFlags, ExportNameReply, Greeting, OptionHeader, OptionReplyHeader,
};
use scratchd_proto::negotiation::{
    BlockSize, Catalog, ExportInfo, ExportListing, LookupError, Negotiator, OpenVia, Opened,
    ReplyMode, Session, Step, TlsPolicy,
};
use scratchd_proto::options::{OptionReply, OptionReplyBody, OptionRequest};
use scratchd_proto::reply::{
    put_block_status, put_chunk, put_error, put_ok, put_read_data, put_read_hole, ChunkPayload,
    Descriptor, ExtDescriptor, ReplyHeader, ReplyTo,
};
use scratchd_proto::request::{
    request_len, validate, Command, RequestHeader, RequestPayload, MAX_PAYLOAD,
};
use scratchd_proto::snapshots::{
    AnswerReader, SnapshotAnswer, SnapshotEntry, SnapshotRequest, REP_SCRATCHD_SNAPSHOT,
};
use scratchd_proto::{Codec, Errno, Reader, TransmissionFlags};

use crate::Input;

const MODES: [ReplyMode; 3] = [
    ReplyMode::Simple,
    ReplyMode::Structured,
    ReplyMode::Extended,
];

/// Exports the negotiation target can see: "" and "a" name the same disk,
/// "ro" is read-only, "policy" is refused by policy, anything else is
/// unknown.
struct Catalogue {
    size: u64,
}

impl Catalog for Catalogue {
    fn list(&self) -> Vec<ExportListing> {
        vec![
            ExportListing {
                name: "a".into(),
                description: Some("first".into()),
            },
            ExportListing {
                name: "ro".into(),
                description: None,
            },
        ]
    }

    fn info(&self, name: &str) -> Result<ExportInfo, LookupError> {
        let read_only = match name {
            "" | "a" => 0,
            "ro" => TransmissionFlags::READ_ONLY,
            "policy" => return Err(LookupError::Policy("refused".into())),
            _ => return Err(LookupError::Unknown(name.into())),
        };
        Ok(ExportInfo {
            name: if read_only == 0 { "a" } else { "ro" }.into(),
            size: self.size,
            flags: TransmissionFlags(!TransmissionFlags::READ_ONLY | read_only),
            block_size: BlockSize {
                min: 1,
                preferred: 4096,
                max: MAX_PAYLOAD,
            },
            description: Some("d".into()),
        })
    }
}

/// Checks that `out` is a sequence of option replies to `option`, each well
/// framed, and, when `final_reply`, that exactly the last one is final (an
/// ACK or an error), as a client waiting for the end of an answer needs.
fn check_option_replies(out: &[u8], option: u32, final_reply: bool) {
    let mut r = Reader::new(out);
    let mut finals = 0;
    let mut last_final = false;
    while !r.is_empty() {
        let reply = OptionReply::decode(&mut r)
            .unwrap_or_else(|e| panic!("option {option}: badly framed reply: {e}: {out:?}"));
        assert_eq!(reply.option, option, "reply to the wrong option");
        last_final = matches!(
            reply.body,
            OptionReplyBody::Ack | OptionReplyBody::Error { .. }
        );
        finals += usize::from(last_final);
        // What the server sends is what it meant to send.
        assert_eq!(
            OptionReply::from_bytes(&reply.to_bytes()).as_ref(),
            Ok(&reply)
        );
    }
    if final_reply {
        assert!(
            finals == 1 && last_final,
            "option {option}: {finals} final replies, last final: {last_final}"
        );
    } else {
        assert_eq!(finals, 0, "option {option}: unexpected final reply");
    }
}

/// Option streams through the server's option state machine, then, once an
/// export is open, request headers against the negotiated session.
///
/// Input: a byte of settings, then options (a byte choosing the option code,
/// a little-endian u16 payload length, the payload), then request headers.
pub fn negotiation(data: &[u8]) {
    let mut input = Input::new(data);
    let settings = input.u8();
    let no_zeroes = settings & 1 != 0;
    let open_fails = settings & 2 != 0;
    let catalog = Catalogue {
        size: if settings & 4 != 0 {
            1 << 30
        } else {
            4096 * 3 + 7
        },
    };
    // Bits 3-4: the server's TLS policy (STARTTLS then "succeeds" at once).
    let tls = match (settings >> 3) & 3 {
        1 => TlsPolicy::On,
        2 => TlsPolicy::Require,
        _ => TlsPolicy::Off,
    };
    let mut n = Negotiator::with_tls(no_zeroes, tls);
    let mut out = Vec::new();
    while !input.is_empty() {
        let selector = input.u8();
        let option = if selector < 0xf0 {
            u32::from(selector % 13)
        } else {
            input.u32()
        };
        let len = input.u16() as usize;
        let payload = input.bytes(len);
        out.clear();
        match n.handle(option, payload, &catalog, &mut out) {
            Step::Continue => check_option_replies(&out, option, true),
            Step::StartTls => {
                assert_eq!(option, OPT_STARTTLS);
                assert_ne!(tls, TlsPolicy::Off, "STARTTLS accepted without TLS");
                check_option_replies(&out, option, true);
                n.tls_started();
            }
            Step::Close => {
                if option == OPT_ABORT {
                    check_option_replies(&out, option, true);
                } else {
                    assert!(out.is_empty(), "option {option} closed after replying");
                }
                return;
            }
            Step::Snapshots(request) => {
                assert_eq!(request.option(), option);
                assert!(out.is_empty(), "replied before the request was carried out");
                let result = if open_fails {
                    Err(LookupError::Unknown("no snapshot".into()))
                } else {
                    Ok(SnapshotAnswer::Done)
                };
                n.finish_snapshots(&request, result, &mut out);
                check_option_replies(&out, option, true);
            }
            Step::Open { name, via, from: _ } => {
                assert!(matches!(option, OPT_GO | OPT_EXPORT_NAME));
                assert!(out.is_empty(), "replied before the export was opened");
                let result = if open_fails {
                    Err(LookupError::Platform("mkfs failed".into()))
                } else {
                    catalog.info(&name)
                };
                let expected = result.clone();
                match n.finish_open(&via, result, &mut out) {
                    Opened::Transmit(session) => {
                        let info = expected.expect("opened an export that failed");
                        assert_eq!(session.export.size, info.size);
                        assert_eq!(session.export.name, info.name);
                        match via {
                            OpenVia::Go { .. } => check_option_replies(&out, option, true),
                            OpenVia::ExportName => {
                                let reply =
                                    ExportNameReply::decode(&mut Reader::new(&out), no_zeroes)
                                        .expect("EXPORT_NAME reply");
                                assert_eq!(reply.size, info.size);
                                assert_eq!(reply.flags, session.export.flags);
                                let len = if no_zeroes { 10 } else { 134 };
                                assert_eq!(out.len(), len);
                            }
                        }
                        if session.base_allocation.is_some() {
                            assert_ne!(session.mode, ReplyMode::Simple);
                        }
                        transmission(&mut input, &session);
                        return;
                    }
                    Opened::Continue => {
                        assert!(expected.is_err() && matches!(via, OpenVia::Go { .. }));
                        check_option_replies(&out, option, true);
                    }
                    Opened::Close => {
                        assert!(expected.is_err() && via == OpenVia::ExportName);
                        return;
                    }
                }
            }
        }
    }
}

/// Request headers, in the session's framing, until the input ends.
fn transmission(input: &mut Input, session: &Session) {
    let len = request_len(session.mode);
    while !input.is_empty() {
        let mut raw = input.bytes(len).to_vec();
        raw.resize(len, 0);
        raw[..4].copy_from_slice(&request_magic(session.mode).to_be_bytes());
        let h = RequestHeader::from_bytes(&raw, session.mode).expect("a header with its magic");
        check_request(&h, &raw, session);
    }
}

fn request_magic(mode: ReplyMode) -> u32 {
    match mode {
        ReplyMode::Extended => EXTENDED_REQUEST_MAGIC,
        _ => REQUEST_MAGIC,
    }
}

/// What must hold for any decoded request header: it encodes back to its
/// bytes, its payload plan keeps the stream in sync, and a command that
/// validation lets through is one the export can run.
fn check_request(h: &RequestHeader, raw: &[u8], session: &Session) {
    let mode = session.mode;
    let mut out = Vec::new();
    h.encode(mode, &mut out);
    assert_eq!(out, raw);
    let plan = h.payload_plan(mode);
    match plan {
        RequestPayload::None => assert_eq!(h.payload_len(mode), 0),
        RequestPayload::Receive(n) => {
            assert!(n <= MAX_PAYLOAD);
            assert_eq!(u64::from(n), h.payload_len(mode));
        }
        RequestPayload::Discard(n) => {
            assert_ne!(mode, ReplyMode::Extended);
            assert!(n > u64::from(MAX_PAYLOAD));
        }
        RequestPayload::Disconnect => assert!(h.payload_len(mode) > u64::from(MAX_PAYLOAD)),
    }
    let Ok(cmd) = validate(h, session) else {
        return;
    };
    let size = session.export.size;
    let flags = session.export.flags;
    let within = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= size);
    let writable = !flags.contains(TransmissionFlags::READ_ONLY);
    match cmd {
        Command::Read { offset, len, .. } => {
            assert_eq!(h.kind, CMD_READ);
            assert!(len <= MAX_PAYLOAD && within(offset, len.into()));
            assert_eq!(plan, RequestPayload::None, "a READ with a payload");
        }
        Command::Write { offset, len, .. } => {
            assert_eq!(h.kind, CMD_WRITE);
            assert!(writable && len <= MAX_PAYLOAD && within(offset, len.into()));
            let expected = if len == 0 {
                RequestPayload::None
            } else {
                RequestPayload::Receive(len)
            };
            assert_eq!(plan, expected, "a WRITE whose payload is not its data");
        }
        Command::Disconnect => assert_eq!(h.kind, CMD_DISC),
        Command::Flush => assert!(flags.contains(TransmissionFlags::SEND_FLUSH)),
        Command::Trim { offset, len, .. } => {
            assert!(writable && flags.contains(TransmissionFlags::SEND_TRIM));
            assert!(within(offset, len));
        }
        Command::WriteZeroes {
            offset, len, fast, ..
        } => {
            assert!(writable && flags.contains(TransmissionFlags::SEND_WRITE_ZEROES));
            assert!(!fast || flags.contains(TransmissionFlags::SEND_FAST_ZERO));
            assert!(within(offset, len));
        }
        Command::Cache { offset, len } => {
            assert!(flags.contains(TransmissionFlags::SEND_CACHE) && within(offset, len));
        }
        Command::BlockStatus { offset, len, .. } => {
            assert!(
                session.base_allocation.is_some(),
                "BLOCK_STATUS without a context"
            );
            assert!(within(offset, len));
        }
    }
}

/// Request headers in each framing: a byte of settings (framing, export
/// flags, whether `base:allocation` was selected), then one header whose
/// magic is forced to the framing's.
pub fn request(data: &[u8]) {
    let mut input = Input::new(data);
    let settings = input.u8();
    let mode = MODES[usize::from(settings % 3)];
    let read_only = if settings & 0x40 != 0 {
        TransmissionFlags::READ_ONLY
    } else {
        0
    };
    let flags = if settings & 0x80 != 0 {
        0xffff
    } else {
        // A minimal export: no FLUSH, TRIM, CACHE, DF, FAST_ZERO.
        TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_WRITE_ZEROES
    } & !TransmissionFlags::READ_ONLY
        | read_only;
    let session = Session {
        export: ExportInfo {
            name: String::new(),
            size: if settings & 0x20 != 0 {
                1 << 30
            } else {
                12_345
            },
            flags: TransmissionFlags(flags),
            block_size: BlockSize {
                min: 1,
                preferred: 4096,
                max: MAX_PAYLOAD,
            },
            description: None,
        },
        mode,
        base_allocation: (settings & 0x10 != 0 && mode != ReplyMode::Simple).then_some(1),
    };
    let raw = input.rest();
    // The header as it came, magic and all: decoding must refuse or accept
    // it without panicking.
    if let Ok(h) = RequestHeader::from_bytes(raw, mode) {
        check_request(&h, raw, &session);
    }
    let len = request_len(mode);
    if raw.len() < len {
        return;
    }
    let mut fixed = raw[..len].to_vec();
    fixed[..4].copy_from_slice(&request_magic(mode).to_be_bytes());
    let h = RequestHeader::from_bytes(&fixed, mode).expect("a header with its magic");
    check_request(&h, &fixed, &session);
}

/// Every decoder of the wire protocol, both directions, on arbitrary bytes:
/// none may panic, fixed-layout messages encode back to exactly their
/// input, and what decodes decodes again to the same value after encoding.
pub fn decode(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if let Ok(g) = Greeting::from_bytes(rest) {
        assert_eq!(g.to_bytes(), rest);
    }
    if let Ok(h) = OptionHeader::from_bytes(rest) {
        assert_eq!(h.to_bytes(), rest);
    }
    if let Ok(h) = OptionReplyHeader::from_bytes(rest) {
        assert_eq!(h.to_bytes(), rest);
    }
    if let Ok(h) = ReplyHeader::from_bytes(rest) {
        assert_eq!(h.to_bytes(), rest);
    }
    let mode = MODES[usize::from(selector % 3)];
    if let Ok(h) = RequestHeader::from_bytes(rest, mode) {
        let mut out = Vec::new();
        h.encode(mode, &mut out);
        assert_eq!(out, rest);
    }
    if let Ok(c) = ClientFlags::from_bytes(rest) {
        assert_eq!(ClientFlags::from_bytes(&c.to_bytes()), Ok(c));
    }
    let no_zeroes = selector & 1 == 1;
    if let Ok(reply) = ExportNameReply::decode(&mut Reader::new(rest), no_zeroes) {
        let mut out = Vec::new();
        reply.encode(no_zeroes, &mut out);
        assert_eq!(
            ExportNameReply::decode(&mut Reader::new(&out), no_zeroes),
            Ok(reply)
        );
    }
    if let Ok(o) = OptionRequest::from_bytes(rest) {
        assert_eq!(OptionRequest::from_bytes(&o.to_bytes()), Ok(o));
    }
    if let Ok(o) = OptionReply::from_bytes(rest) {
        assert_eq!(OptionReply::from_bytes(&o.to_bytes()), Ok(o));
    }
    if let Ok(entry) = SnapshotEntry::decode(rest) {
        let mut out = Vec::new();
        entry.encode(&mut out);
        assert_eq!(out, rest);
    }
    snapshot_answer(selector, rest);
    let kind = u16::from(selector & 0x0f) | if selector & 0x80 != 0 { 0x8000 } else { 0 };
    if let Ok(p) = ChunkPayload::decode(kind, &mut Reader::new(rest)) {
        let mut out = Vec::new();
        p.encode(&mut out);
        assert_eq!(out.len() as u64, p.encoded_len());
        assert_eq!(ChunkPayload::decode(kind, &mut Reader::new(&out)), Ok(p));
    }
}

/// A server's reply to a snapshot request, as the client reads it: any
/// bytes give an answer or an error, never a panic; a listing is only
/// ever one of the request that lists.
fn snapshot_answer(selector: u8, data: &[u8]) {
    let request = match selector % 3 {
        0 => SnapshotRequest::List,
        1 => SnapshotRequest::Delete { name: "a".into() },
        _ => SnapshotRequest::Take {
            disk: "d".into(),
            name: "a".into(),
        },
    };
    let reply_type = match selector >> 6 {
        0 => REP_ACK,
        1 => REP_SCRATCHD_SNAPSHOT,
        _ => u32::from(selector),
    };
    let mut reader = AnswerReader::new(&request);
    if let Ok(Some(SnapshotAnswer::Listing(_))) = reader.reply(reply_type, data) {
        assert_eq!(request, SnapshotRequest::List);
    }
}

/// A reply the client side must read back from what the encoders wrote.
struct Expected<'a> {
    header: ReplyHeader,
    /// Simple-reply READ data that follows the header.
    data: &'a [u8],
    payload: Option<ChunkPayload<'a>>,
}

fn chunk_header(mode: ReplyMode, to: ReplyTo, last: bool, kind: u16, len: u64) -> ReplyHeader {
    let flags = if last { REPLY_FLAG_DONE } else { 0 };
    match mode {
        ReplyMode::Extended => ReplyHeader::Extended {
            flags,
            kind,
            cookie: to.cookie,
            offset: to.offset,
            length: len,
        },
        _ => ReplyHeader::Structured {
            flags,
            kind,
            cookie: to.cookie,
            length: len as u32,
        },
    }
}

fn message(input: &mut Input) -> String {
    let n = input.below(64) as usize;
    String::from_utf8_lossy(input.bytes(n)).into_owned()
}

/// Replies in each framing: written with the server's encoders (`put_*`,
/// and the general [`put_chunk`]), read back as a client reads them (a
/// header, then a payload bounded by its length) to exactly what was
/// written; then the rest of the input read as a reply stream from an
/// untrusted server, which must be refused cleanly, never panic.
pub fn reply(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = MODES[input.below(3) as usize];
    let structured = mode != ReplyMode::Simple;
    let mut out = Vec::new();
    let mut expected = Vec::new();
    let count = input.below(8) + 1;
    for _ in 0..count {
        let to = ReplyTo {
            cookie: input.u64(),
            offset: input.u64(),
        };
        let last = input.bool();
        let choice = if structured {
            input.below(6)
        } else {
            input.below(3)
        };
        match choice {
            0 => {
                put_ok(&mut out, mode, to);
                expected.push(if structured {
                    Expected {
                        header: chunk_header(mode, to, true, REPLY_TYPE_NONE, 0),
                        data: &[],
                        payload: Some(ChunkPayload::None),
                    }
                } else {
                    Expected {
                        header: ReplyHeader::Simple {
                            error: 0,
                            cookie: to.cookie,
                        },
                        data: &[],
                        payload: None,
                    }
                });
            }
            1 => {
                let errno = input.pick(&Errno::ALL);
                let message = message(&mut input);
                put_error(&mut out, mode, to, errno, &message);
                expected.push(if structured {
                    let payload = ChunkPayload::Error {
                        error: errno as u32,
                        message: clip(&message).to_owned(),
                    };
                    Expected {
                        header: chunk_header(
                            mode,
                            to,
                            true,
                            REPLY_TYPE_ERROR,
                            payload.encoded_len(),
                        ),
                        data: &[],
                        payload: Some(payload),
                    }
                } else {
                    Expected {
                        header: ReplyHeader::Simple {
                            error: errno as u32,
                            cookie: to.cookie,
                        },
                        data: &[],
                        payload: None,
                    }
                });
            }
            2 => {
                let offset = input.u64();
                let n = input.below(64) as usize;
                let bytes = input.bytes(n);
                let len = bytes.len();
                put_read_data(&mut out, mode, to, offset, len as u32, last);
                out.extend_from_slice(bytes);
                expected.push(if structured {
                    Expected {
                        header: chunk_header(
                            mode,
                            to,
                            last,
                            REPLY_TYPE_OFFSET_DATA,
                            8 + len as u64,
                        ),
                        data: &[],
                        payload: Some(ChunkPayload::OffsetData {
                            offset,
                            data: bytes,
                        }),
                    }
                } else {
                    Expected {
                        header: ReplyHeader::Simple {
                            error: 0,
                            cookie: to.cookie,
                        },
                        data: bytes,
                        payload: None,
                    }
                });
            }
            3 => {
                let (offset, len) = (input.u64(), input.u32());
                put_read_hole(&mut out, mode, to, offset, len, last);
                expected.push(Expected {
                    header: chunk_header(mode, to, last, REPLY_TYPE_OFFSET_HOLE, 12),
                    data: &[],
                    payload: Some(ChunkPayload::OffsetHole { offset, len }),
                });
            }
            4 => {
                let context_id = input.u32();
                let n = input.below(8) as usize;
                let extended = mode == ReplyMode::Extended;
                let descriptors: Vec<Descriptor> = (0..n)
                    .map(|_| Descriptor {
                        // Compact descriptors are 32 bits by the caller's
                        // contract (the server splits longer runs).
                        len: if extended {
                            input.u64()
                        } else {
                            input.u32().into()
                        },
                        status: input.u32(),
                    })
                    .collect();
                put_block_status(&mut out, mode, to, context_id, &descriptors);
                let payload = if extended {
                    ChunkPayload::BlockStatusExt {
                        context_id,
                        descriptors: descriptors
                            .iter()
                            .map(|d| ExtDescriptor {
                                len: d.len,
                                status: d.status.into(),
                            })
                            .collect(),
                    }
                } else {
                    ChunkPayload::BlockStatus {
                        context_id,
                        descriptors,
                    }
                };
                expected.push(Expected {
                    header: chunk_header(mode, to, true, payload.kind(), payload.encoded_len()),
                    data: &[],
                    payload: Some(payload),
                });
            }
            _ => {
                let payload = any_payload(&mut input, mode);
                put_chunk(&mut out, mode, to, last, &payload);
                expected.push(Expected {
                    header: chunk_header(mode, to, last, payload.kind(), payload.encoded_len()),
                    data: &[],
                    payload: Some(payload),
                });
            }
        }
    }
    read_back(&out, &expected);
    untrusted_stream(input.rest(), mode);
}

/// A chunk payload of any known type, in the domain its encoder accepts
/// (messages of at most the string limit, compact lengths of 32 bits).
fn any_payload<'a>(input: &mut Input<'a>, mode: ReplyMode) -> ChunkPayload<'a> {
    match input.below(7) {
        0 => ChunkPayload::None,
        1 => {
            let offset = input.u64();
            let n = input.below(32) as usize;
            ChunkPayload::OffsetData {
                offset,
                data: input.bytes(n),
            }
        }
        2 => ChunkPayload::OffsetHole {
            offset: input.u64(),
            len: input.u32(),
        },
        3 if mode != ReplyMode::Extended => ChunkPayload::BlockStatus {
            context_id: input.u32(),
            descriptors: (0..input.below(4))
                .map(|_| Descriptor {
                    len: input.u32().into(),
                    status: input.u32(),
                })
                .collect(),
        },
        3 => ChunkPayload::BlockStatusExt {
            context_id: input.u32(),
            descriptors: (0..input.below(4))
                .map(|_| ExtDescriptor {
                    len: input.u64(),
                    status: input.u64(),
                })
                .collect(),
        },
        4 => ChunkPayload::Error {
            error: input.u32(),
            message: message(input),
        },
        5 => ChunkPayload::ErrorOffset {
            error: input.u32(),
            message: message(input),
            offset: input.u64(),
        },
        _ => {
            // Unknown types, neither a known one nor an error one: a client
            // keeps them raw.
            let kind = 100 + input.below(0x7000) as u16;
            let n = input.below(32) as usize;
            ChunkPayload::Unknown {
                kind,
                data: input.bytes(n),
            }
        }
    }
}

/// Reads `out` as a client does and compares with `expected`.
fn read_back(out: &[u8], expected: &[Expected]) {
    let mut r = Reader::new(out);
    for (i, e) in expected.iter().enumerate() {
        let header = ReplyHeader::decode(&mut r).unwrap_or_else(|err| panic!("reply {i}: {err}"));
        assert_eq!(header, e.header, "reply {i}: header");
        match header.chunk() {
            None => {
                let data = r.take(e.data.len()).expect("simple READ data");
                assert_eq!(data, e.data, "reply {i}: data");
            }
            Some((kind, len)) => {
                let mut sub = r.sub(len as usize).expect("chunk payload");
                let payload = ChunkPayload::decode(kind, &mut sub)
                    .unwrap_or_else(|err| panic!("reply {i}: payload: {err}"));
                assert_eq!(Some(&payload), e.payload.as_ref(), "reply {i}: payload");
            }
        }
    }
    assert!(r.is_empty(), "bytes after the last reply");
}

/// Bytes from a server that cannot be trusted, read as a client reads a
/// reply stream (simple READ replies carry `read_len` bytes of data).
/// Decoding must refuse what is malformed and never read past a chunk's
/// declared length; a payload that decodes has the length it claimed,
/// except for error messages, which are decoded leniently.
fn untrusted_stream(bytes: &[u8], mode: ReplyMode) {
    let read_len = match mode {
        ReplyMode::Simple => 512,
        _ => 0,
    };
    let mut r = Reader::new(bytes);
    while !r.is_empty() {
        let Ok(header) = ReplyHeader::decode(&mut r) else {
            return;
        };
        if matches!(header, ReplyHeader::Simple { error: 0, .. }) && r.take(read_len).is_err() {
            return;
        }
        let Some((kind, len)) = header.chunk() else {
            continue;
        };
        let Ok(len) = usize::try_from(len) else {
            return;
        };
        let Ok(mut sub) = r.sub(len) else {
            return;
        };
        if let Ok(payload) = ChunkPayload::decode(kind, &mut sub) {
            assert_eq!(payload.kind(), kind);
            if !matches!(
                payload,
                ChunkPayload::Error { .. } | ChunkPayload::ErrorOffset { .. }
            ) {
                assert_eq!(payload.encoded_len(), len as u64);
            }
        }
    }
}
