//! Request headers: parsing, payload plans and validation must never panic,
//! and an accepted command must lie within the export.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scratchd_proto::negotiation::{BlockSize, ExportInfo, ReplyMode, Session};
use scratchd_proto::request::{request_len, validate, Command, RequestHeader};
use scratchd_proto::TransmissionFlags;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let mode = [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended][selector as usize % 3];
    let len = request_len(mode);
    if rest.len() < len {
        return;
    }
    let mut raw = rest[..len].to_vec();
    let magic: u32 = if mode == ReplyMode::Extended { 0x21e4_1c71 } else { 0x2560_9513 };
    raw[..4].copy_from_slice(&magic.to_be_bytes());
    let Ok(h) = RequestHeader::from_bytes(&raw, mode) else { return };
    let _ = h.payload_plan(mode);
    let session = Session {
        export: ExportInfo {
            name: String::new(),
            size: 1 << 30,
            flags: TransmissionFlags(if selector & 0x80 != 0 { 0xffff } else { 0xfdff }),
            block_size: BlockSize { min: 1, preferred: 4096, max: 1 << 25 },
            description: None,
        },
        mode,
        base_allocation: Some(1),
    };
    if let Ok(cmd) = validate(&h, &session) {
        if !matches!(cmd, Command::Disconnect | Command::Flush) {
            assert!(h.offset.checked_add(h.length).is_some_and(|e| e <= 1 << 30));
        }
    }
});
