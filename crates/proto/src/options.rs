//! Option payloads of the handshake, in both directions: the requests a
//! client sends ([`OptionRequest`], with [`InfoRequest`] for INFO/GO and
//! [`MetaContextRequest`] for the meta-context options) and the replies a
//! server sends ([`OptionReply`], with [`InfoReply`] inside `REP_INFO`).
//!
//! The server's state machine ([`crate::negotiation`]) decodes the payload
//! of each option it handles with the types here and encodes every reply
//! with them; it keeps its own per-option dispatch because each option
//! refuses a malformed payload in its own way (an EXPORT_NAME hangs up, a
//! LIST with data gets a specific message).
//!
//! Names (export names, context names) are decoded strictly: UTF-8, no NUL,
//! at most [`MAX_STRING_LEN`] bytes. Descriptions and error messages are only
//! shown to people, so they are decoded leniently (invalid UTF-8 replaced,
//! clipped to the limit) and encoded clipped to the limit.

use crate::codec::{clip, lossy, Codec, DecodeError, PutBe, Reader};
use crate::consts::*;
use crate::handshake::{HandshakeError, OptionHeader, OptionReplyHeader};
use crate::session::BlockSize;

/// INFO/GO payload: u32 name length, name, u16 count, count × u16 info type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name; "" asks for the default export.
    pub name: String,
    /// `INFO_*` types the client would like; the server may ignore them.
    pub info_requests: Vec<u16>,
}

impl Codec<'_> for InfoRequest {
    type Error = DecodeError;

    fn encode(&self, out: &mut Vec<u8>) {
        put_string32(out, &self.name);
        out.put_u16(self.info_requests.len() as u16);
        for i in &self.info_requests {
            out.put_u16(*i);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let name = r.string32(MAX_STRING_LEN)?.to_owned();
        let n = r.u16()? as usize;
        // Bound the allocation by what the payload can actually hold.
        let mut info_requests = Vec::with_capacity(n.min(r.remaining() / 2));
        for _ in 0..n {
            info_requests.push(r.u16()?);
        }
        Ok(InfoRequest {
            name,
            info_requests,
        })
    }
}

/// LIST_META_CONTEXT / SET_META_CONTEXT payload: export name, then a u32
/// count of u32-length queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    /// Context names or, for LIST, namespace prefixes such as `base:`.
    pub queries: Vec<String>,
}

impl Codec<'_> for MetaContextRequest {
    type Error = DecodeError;

    fn encode(&self, out: &mut Vec<u8>) {
        put_string32(out, &self.export);
        out.put_u32(self.queries.len() as u32);
        for q in &self.queries {
            put_string32(out, q);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let export = r.string32(MAX_STRING_LEN)?.to_owned();
        let n = r.u32()? as usize;
        let mut queries = Vec::with_capacity(n.min(r.remaining() / 4));
        for _ in 0..n {
            queries.push(r.string32(MAX_STRING_LEN)?.to_owned());
        }
        Ok(MetaContextRequest { export, queries })
    }
}

/// One option request, header included, as a client sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    /// The whole payload is the name; "" is the default export.
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    ExtendedHeaders,
    /// Any other option code (e.g. the withdrawn PEEK_EXPORT), kept raw.
    Other {
        option: u32,
        data: Vec<u8>,
    },
}

impl OptionRequest {
    /// The `OPT_*` code this request is sent with.
    pub fn option(&self) -> u32 {
        match self {
            OptionRequest::ExportName(_) => OPT_EXPORT_NAME,
            OptionRequest::Abort => OPT_ABORT,
            OptionRequest::List => OPT_LIST,
            OptionRequest::StartTls => OPT_STARTTLS,
            OptionRequest::Info(_) => OPT_INFO,
            OptionRequest::Go(_) => OPT_GO,
            OptionRequest::StructuredReply => OPT_STRUCTURED_REPLY,
            OptionRequest::ListMetaContext(_) => OPT_LIST_META_CONTEXT,
            OptionRequest::SetMetaContext(_) => OPT_SET_META_CONTEXT,
            OptionRequest::ExtendedHeaders => OPT_EXTENDED_HEADERS,
            OptionRequest::Other { option, .. } => *option,
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            OptionRequest::ExportName(name) => out.extend_from_slice(name.as_bytes()),
            OptionRequest::Info(i) | OptionRequest::Go(i) => i.encode(out),
            OptionRequest::ListMetaContext(m) | OptionRequest::SetMetaContext(m) => m.encode(out),
            OptionRequest::Other { data, .. } => out.extend_from_slice(data),
            OptionRequest::Abort
            | OptionRequest::List
            | OptionRequest::StartTls
            | OptionRequest::StructuredReply
            | OptionRequest::ExtendedHeaders => {}
        }
    }

    /// Decodes the payload of `option`, which must fill `r` exactly.
    /// Options that take no data refuse any.
    pub fn decode_payload(option: u32, r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let request = match option {
            OPT_EXPORT_NAME => {
                OptionRequest::ExportName(r.string(r.remaining(), MAX_STRING_LEN)?.to_owned())
            }
            OPT_ABORT => OptionRequest::Abort,
            OPT_LIST => OptionRequest::List,
            OPT_STARTTLS => OptionRequest::StartTls,
            OPT_INFO => OptionRequest::Info(InfoRequest::decode(r)?),
            OPT_GO => OptionRequest::Go(InfoRequest::decode(r)?),
            OPT_STRUCTURED_REPLY => OptionRequest::StructuredReply,
            OPT_LIST_META_CONTEXT => OptionRequest::ListMetaContext(MetaContextRequest::decode(r)?),
            OPT_SET_META_CONTEXT => OptionRequest::SetMetaContext(MetaContextRequest::decode(r)?),
            OPT_EXTENDED_HEADERS => OptionRequest::ExtendedHeaders,
            option => OptionRequest::Other {
                option,
                data: r.rest().to_vec(),
            },
        };
        r.finish()?;
        Ok(request)
    }
}

impl Codec<'_> for OptionRequest {
    type Error = HandshakeError;

    fn encode(&self, out: &mut Vec<u8>) {
        let mut payload = Vec::new();
        self.encode_payload(&mut payload);
        OptionHeader {
            option: self.option(),
            len: payload.len() as u32,
        }
        .encode(out);
        out.extend_from_slice(&payload);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, HandshakeError> {
        let header = OptionHeader::decode(r)?;
        let mut payload = r.sub(header.len as usize)?;
        Ok(OptionRequest::decode_payload(header.option, &mut payload)?)
    }
}

/// The payload of a `REP_INFO` reply: a u16 info type, then its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// Size and transmission flags; always sent.
    Export {
        size: u64,
        flags: TransmissionFlags,
    },
    Name(String),
    Description(String),
    BlockSize(BlockSize),
    /// An info type this crate does not know, kept raw.
    Other {
        info_type: u16,
        data: Vec<u8>,
    },
}

impl Codec<'_> for InfoReply {
    type Error = DecodeError;

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            InfoReply::Export { size, flags } => {
                out.put_u16(INFO_EXPORT);
                out.put_u64(*size);
                out.put_u16(flags.0);
            }
            InfoReply::Name(name) => {
                out.put_u16(INFO_NAME);
                out.extend_from_slice(name.as_bytes());
            }
            InfoReply::Description(d) => {
                out.put_u16(INFO_DESCRIPTION);
                out.extend_from_slice(clip(d).as_bytes());
            }
            InfoReply::BlockSize(b) => {
                out.put_u16(INFO_BLOCK_SIZE);
                out.put_u32(b.min);
                out.put_u32(b.preferred);
                out.put_u32(b.max);
            }
            InfoReply::Other { info_type, data } => {
                out.put_u16(*info_type);
                out.extend_from_slice(data);
            }
        }
    }

    /// Reads the rest of `r`: the info's length is that of the reply.
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let info = match r.u16()? {
            INFO_EXPORT => InfoReply::Export {
                size: r.u64()?,
                flags: TransmissionFlags(r.u16()?),
            },
            INFO_NAME => InfoReply::Name(r.string(r.remaining(), MAX_STRING_LEN)?.to_owned()),
            INFO_DESCRIPTION => InfoReply::Description(lossy(r.rest())),
            INFO_BLOCK_SIZE => InfoReply::BlockSize(BlockSize {
                min: r.u32()?,
                preferred: r.u32()?,
                max: r.u32()?,
            }),
            info_type => InfoReply::Other {
                info_type,
                data: r.rest().to_vec(),
            },
        };
        r.finish()?;
        Ok(info)
    }
}

/// What an option reply says, by reply type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReplyBody {
    /// The option is done (or, for ABORT, acknowledged).
    Ack,
    /// One export of a LIST answer; an empty description is none.
    Server {
        name: String,
        description: String,
    },
    Info(InfoReply),
    /// A selected (SET) or available (LIST, id 0) metadata context.
    MetaContext {
        id: u32,
        name: String,
    },
    /// An error (`code` has bit 31 set; see [`OptError`]) with a message
    /// for people.
    Error {
        code: u32,
        message: String,
    },
    /// A non-error reply type this crate does not know, kept raw.
    Other {
        reply_type: u32,
        data: Vec<u8>,
    },
}

/// Bit 31 of a reply type marks an error.
const REP_FLAG_ERROR: u32 = 1 << 31;

impl OptionReplyBody {
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionReplyBody::Ack => REP_ACK,
            OptionReplyBody::Server { .. } => REP_SERVER,
            OptionReplyBody::Info(_) => REP_INFO,
            OptionReplyBody::MetaContext { .. } => REP_META_CONTEXT,
            OptionReplyBody::Error { code, .. } => *code,
            OptionReplyBody::Other { reply_type, .. } => *reply_type,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            OptionReplyBody::Ack => {}
            OptionReplyBody::Server { name, description } => {
                put_string32(out, name);
                out.extend_from_slice(clip(description).as_bytes());
            }
            OptionReplyBody::Info(info) => info.encode(out),
            OptionReplyBody::MetaContext { id, name } => {
                out.put_u32(*id);
                out.extend_from_slice(name.as_bytes());
            }
            OptionReplyBody::Error { message, .. } => {
                out.extend_from_slice(clip(message).as_bytes())
            }
            OptionReplyBody::Other { data, .. } => out.extend_from_slice(data),
        }
    }

    /// Decodes a reply of `reply_type` whose payload fills `r` exactly.
    pub fn decode(reply_type: u32, r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let body = match reply_type {
            t if t & REP_FLAG_ERROR != 0 => OptionReplyBody::Error {
                code: t,
                message: lossy(r.rest()),
            },
            REP_ACK => OptionReplyBody::Ack,
            REP_SERVER => OptionReplyBody::Server {
                name: r.string32(MAX_STRING_LEN)?.to_owned(),
                description: lossy(r.rest()),
            },
            REP_INFO => OptionReplyBody::Info(InfoReply::decode(r)?),
            REP_META_CONTEXT => OptionReplyBody::MetaContext {
                id: r.u32()?,
                name: r.string(r.remaining(), MAX_STRING_LEN)?.to_owned(),
            },
            reply_type => OptionReplyBody::Other {
                reply_type,
                data: r.rest().to_vec(),
            },
        };
        r.finish()?;
        Ok(body)
    }
}

/// One option reply, header included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option being answered.
    pub option: u32,
    pub body: OptionReplyBody,
}

impl Codec<'_> for OptionReply {
    type Error = HandshakeError;

    fn encode(&self, out: &mut Vec<u8>) {
        let mut body = Vec::new();
        self.body.encode(&mut body);
        OptionReplyHeader {
            option: self.option,
            reply_type: self.body.reply_type(),
            len: body.len() as u32,
        }
        .encode(out);
        out.extend_from_slice(&body);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, HandshakeError> {
        let header = OptionReplyHeader::decode(r)?;
        let mut payload = r.sub(header.len as usize)?;
        Ok(OptionReply {
            option: header.option,
            body: OptionReplyBody::decode(header.reply_type, &mut payload)?,
        })
    }
}

fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.put_u32(s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

/// Appends an option error reply carrying a human-readable message (clipped
/// to the protocol's string limit).
pub fn put_option_error(out: &mut Vec<u8>, option: u32, err: OptError, message: &str) {
    OptionReply {
        option,
        body: OptionReplyBody::Error {
            code: err as u32,
            message: message.into(),
        },
    }
    .encode(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn option_error_replies_are_framed_and_clipped() {
        let mut out = Vec::new();
        put_option_error(&mut out, 9, OptError::Policy, &"x".repeat(5000));
        let mut r = Reader::new(&out);
        let h = OptionReplyHeader::decode(&mut r).unwrap();
        assert_eq!(
            (h.option, h.reply_type, h.len as usize),
            (9, OptError::Policy as u32, MAX_STRING_LEN)
        );
        assert_eq!(r.remaining(), MAX_STRING_LEN);
    }

    #[test]
    fn client_requests_have_the_documented_layout() {
        let go = OptionRequest::Go(InfoRequest {
            name: "disk".into(),
            info_requests: vec![INFO_BLOCK_SIZE],
        });
        assert_eq!(
            go.to_bytes(),
            b"IHAVEOPT\0\0\0\x07\0\0\0\x0c\0\0\0\x04disk\0\x01\0\x03"
        );
        let set = OptionRequest::SetMetaContext(MetaContextRequest {
            export: "".into(),
            queries: vec![BASE_ALLOCATION.into()],
        });
        assert_eq!(
            set.to_bytes(),
            b"IHAVEOPT\0\0\0\x0a\0\0\0\x1b\0\0\0\0\0\0\0\x01\0\0\0\x0fbase:allocation"
        );
        assert_eq!(
            OptionRequest::ExportName("d".into()).to_bytes(),
            b"IHAVEOPT\0\0\0\x01\0\0\0\x01d"
        );
        for (request, option) in [
            (OptionRequest::Abort, OPT_ABORT),
            (OptionRequest::List, OPT_LIST),
            (OptionRequest::StartTls, OPT_STARTTLS),
            (OptionRequest::StructuredReply, OPT_STRUCTURED_REPLY),
            (OptionRequest::ExtendedHeaders, OPT_EXTENDED_HEADERS),
        ] {
            let mut want = b"IHAVEOPT".to_vec();
            want.put_u32(option);
            want.put_u32(0);
            assert_eq!(request.to_bytes(), want);
        }
    }

    #[test]
    fn options_without_data_refuse_data() {
        let mut raw = OptionRequest::List.to_bytes();
        raw[15] = 1;
        raw.push(b'x');
        assert_eq!(
            OptionRequest::from_bytes(&raw),
            Err(HandshakeError::Decode(DecodeError::TrailingBytes(1)))
        );
        // A length beyond the input is truncation, not a short read of the
        // next message.
        raw[15] = 2;
        assert_eq!(
            OptionRequest::from_bytes(&raw),
            Err(HandshakeError::Decode(DecodeError::Truncated))
        );
    }

    #[test]
    fn server_replies_decode() {
        let mut raw = Vec::new();
        OptionReplyHeader {
            option: OPT_INFO,
            reply_type: REP_INFO,
            len: 12,
        }
        .encode(&mut raw);
        raw.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 1]);
        assert_eq!(
            OptionReply::from_bytes(&raw),
            Ok(OptionReply {
                option: OPT_INFO,
                body: OptionReplyBody::Info(InfoReply::Export {
                    size: 1 << 20,
                    flags: TransmissionFlags(1)
                })
            })
        );
        // An INFO_EXPORT one byte short is malformed, not misread.
        raw[19] = 11;
        raw.pop();
        assert_eq!(
            OptionReply::from_bytes(&raw),
            Err(HandshakeError::Decode(DecodeError::Truncated))
        );

        let mut raw = Vec::new();
        OptionReplyHeader {
            option: OPT_GO,
            reply_type: OptError::Unknown as u32,
            len: 3,
        }
        .encode(&mut raw);
        raw.extend_from_slice(b"n\xffo");
        assert_eq!(
            OptionReply::from_bytes(&raw),
            Ok(OptionReply {
                option: OPT_GO,
                body: OptionReplyBody::Error {
                    code: OptError::Unknown as u32,
                    message: "n\u{fffd}o".into()
                }
            })
        );
        raw[12] = 0x7f;
        assert!(matches!(
            OptionReply::from_bytes(&raw),
            Ok(OptionReply {
                body: OptionReplyBody::Other { .. },
                ..
            })
        ));
        raw[7] ^= 1;
        assert!(matches!(
            OptionReply::from_bytes(&raw),
            Err(HandshakeError::BadOptionReplyMagic(_))
        ));
    }

    /// Found by the `decode` fuzz target: a description or error message
    /// longer than the limit (or one whose invalid UTF-8 grows when
    /// replaced) decoded whole, then encoded clipped, so the value changed
    /// on a round trip.
    #[test]
    fn long_or_invalid_texts_decode_clipped_and_round_trip() {
        let long = OptionReply {
            option: OPT_GO,
            body: OptionReplyBody::Error {
                code: OptError::Platform as u32,
                message: "m".repeat(5000),
            },
        };
        let mut bytes = Vec::new();
        let mut body = vec![0u8; 5000];
        body.fill(b'm');
        OptionReplyHeader {
            option: OPT_GO,
            reply_type: OptError::Platform as u32,
            len: 5000,
        }
        .encode(&mut bytes);
        bytes.extend_from_slice(&body);
        let decoded = OptionReply::from_bytes(&bytes).unwrap();
        let OptionReplyBody::Error { message, .. } = &decoded.body else {
            panic!("{decoded:?}");
        };
        assert_eq!(message.len(), MAX_STRING_LEN);
        assert_eq!(OptionReply::from_bytes(&decoded.to_bytes()), Ok(decoded));
        assert_eq!(long.to_bytes().len(), 20 + MAX_STRING_LEN);
        // 4096 invalid bytes would become 12288 bytes of U+FFFD.
        let invalid = [0xffu8; MAX_STRING_LEN];
        assert_eq!(lossy(&invalid).len(), MAX_STRING_LEN - MAX_STRING_LEN % 3);
        assert!(lossy(&invalid).chars().all(|c| c == '\u{fffd}'));
    }

    fn name() -> impl Strategy<Value = String> {
        "[^\u{0}]{0,12}"
    }

    fn info_request() -> impl Strategy<Value = InfoRequest> {
        (name(), prop::collection::vec(any::<u16>(), 0..5)).prop_map(|(name, info_requests)| {
            InfoRequest {
                name,
                info_requests,
            }
        })
    }

    fn meta_request() -> impl Strategy<Value = MetaContextRequest> {
        (name(), prop::collection::vec(name(), 0..4))
            .prop_map(|(export, queries)| MetaContextRequest { export, queries })
    }

    fn option_request() -> impl Strategy<Value = OptionRequest> {
        prop_oneof![
            name().prop_map(OptionRequest::ExportName),
            Just(OptionRequest::Abort),
            Just(OptionRequest::List),
            Just(OptionRequest::StartTls),
            info_request().prop_map(OptionRequest::Info),
            info_request().prop_map(OptionRequest::Go),
            Just(OptionRequest::StructuredReply),
            meta_request().prop_map(OptionRequest::ListMetaContext),
            meta_request().prop_map(OptionRequest::SetMetaContext),
            Just(OptionRequest::ExtendedHeaders),
            (12u32.., prop::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(option, data)| OptionRequest::Other { option, data }),
        ]
    }

    fn info_reply() -> impl Strategy<Value = InfoReply> {
        prop_oneof![
            (any::<u64>(), any::<u16>()).prop_map(|(size, f)| InfoReply::Export {
                size,
                flags: TransmissionFlags(f)
            }),
            name().prop_map(InfoReply::Name),
            ".{0,12}".prop_map(InfoReply::Description),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(min, preferred, max)| {
                InfoReply::BlockSize(BlockSize {
                    min,
                    preferred,
                    max,
                })
            }),
            (4u16.., prop::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(info_type, data)| InfoReply::Other { info_type, data }),
        ]
    }

    fn option_reply() -> impl Strategy<Value = OptionReply> {
        let body = prop_oneof![
            Just(OptionReplyBody::Ack),
            (name(), ".{0,12}")
                .prop_map(|(name, description)| OptionReplyBody::Server { name, description }),
            info_reply().prop_map(OptionReplyBody::Info),
            (any::<u32>(), name()).prop_map(|(id, name)| OptionReplyBody::MetaContext { id, name }),
            (REP_FLAG_ERROR.., ".{0,12}")
                .prop_map(|(code, message)| OptionReplyBody::Error { code, message }),
            (
                5u32..REP_FLAG_ERROR,
                prop::collection::vec(any::<u8>(), 0..16)
            )
                .prop_map(|(reply_type, data)| OptionReplyBody::Other { reply_type, data }),
        ];
        (any::<u32>(), body).prop_map(|(option, body)| OptionReply { option, body })
    }

    proptest! {
        #[test]
        fn option_requests_round_trip(request in option_request()) {
            let bytes = request.to_bytes();
            prop_assert_eq!(OptionRequest::from_bytes(&bytes), Ok(request));
        }

        #[test]
        fn option_replies_round_trip(reply in option_reply()) {
            let bytes = reply.to_bytes();
            prop_assert_eq!(OptionReply::from_bytes(&bytes), Ok(reply));
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes: Vec<u8>, code: u32) {
            let _ = OptionRequest::from_bytes(&bytes);
            let _ = OptionReply::from_bytes(&bytes);
            let _ = InfoRequest::from_bytes(&bytes);
            let _ = MetaContextRequest::from_bytes(&bytes);
            let _ = InfoReply::from_bytes(&bytes);
            let _ = OptionRequest::decode_payload(code % 16, &mut Reader::new(&bytes));
            let _ = OptionReplyBody::decode(code, &mut Reader::new(&bytes));
        }

        #[test]
        fn framed_garbage_decodes_or_fails_cleanly(option: u32, reply_type: u32, payload: Vec<u8>) {
            // Valid framing, arbitrary payload: reaches every payload decoder.
            let mut raw = Vec::new();
            OptionHeader { option: option % 16, len: payload.len() as u32 }.encode(&mut raw);
            raw.extend_from_slice(&payload);
            let _ = OptionRequest::from_bytes(&raw);
            let mut raw = Vec::new();
            OptionReplyHeader { option, reply_type: reply_type % 8, len: payload.len() as u32 }
                .encode(&mut raw);
            raw.extend_from_slice(&payload);
            let _ = OptionReply::from_bytes(&raw);
        }
    }
}
