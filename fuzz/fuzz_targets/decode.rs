//! Every decoder of the wire protocol, both directions, on arbitrary bytes:
//! none may panic, and whatever decodes must encode back to the same bytes
//! where the encoding is canonical.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scratchd_proto::handshake::{
    ClientFlags, ExportNameReply, Greeting, OptionHeader, OptionReplyHeader,
};
use scratchd_proto::negotiation::ReplyMode;
use scratchd_proto::options::{OptionReply, OptionRequest};
use scratchd_proto::reply::{ChunkPayload, ReplyHeader};
use scratchd_proto::request::RequestHeader;
use scratchd_proto::{Codec, Reader};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    // Fixed-layout messages re-encode to exactly their input.
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
    let mode = [
        ReplyMode::Simple,
        ReplyMode::Structured,
        ReplyMode::Extended,
    ][selector as usize % 3];
    if let Ok(h) = RequestHeader::from_bytes(rest, mode) {
        let mut out = Vec::new();
        h.encode(mode, &mut out);
        assert_eq!(out, rest);
    }
    let _ = ClientFlags::from_bytes(rest);
    let _ = ExportNameReply::decode(&mut Reader::new(rest), selector & 1 == 1);
    // Variable-layout messages: decoding must not panic, and what decodes
    // must decode again to the same value after encoding.
    if let Ok(o) = OptionRequest::from_bytes(rest) {
        assert_eq!(OptionRequest::from_bytes(&o.to_bytes()), Ok(o));
    }
    if let Ok(o) = OptionReply::from_bytes(rest) {
        assert_eq!(OptionReply::from_bytes(&o.to_bytes()), Ok(o));
    }
    let kind = u16::from(selector & 0x0f) | if selector & 0x80 != 0 { 0x8000 } else { 0 };
    if let Ok(p) = ChunkPayload::decode(kind, &mut Reader::new(rest)) {
        let mut out = Vec::new();
        p.encode(&mut out);
        assert_eq!(ChunkPayload::decode(kind, &mut Reader::new(&out)), Ok(p));
    }
});
