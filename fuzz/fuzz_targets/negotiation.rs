//! Feeds arbitrary option streams through the option state machine: it must
//! never panic, and every reply it emits must be well framed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scratchd_proto::handshake::{OptionHeader, OptionPayload, OPTION_HEADER_LEN};
use scratchd_proto::negotiation::{
    BlockSize, Catalog, ExportInfo, ExportListing, LookupError, Negotiator, Step,
};
use scratchd_proto::{Codec, TransmissionFlags};

struct Catalogue;

impl Catalog for Catalogue {
    fn list(&self) -> Vec<ExportListing> {
        vec![ExportListing { name: "a".into(), description: None }]
    }
    fn info(&self, name: &str) -> Result<ExportInfo, LookupError> {
        if name.len() > 3 {
            return Err(LookupError::Unknown(name.into()));
        }
        Ok(ExportInfo {
            name: "a".into(),
            size: 1 << 30,
            flags: TransmissionFlags(0xffff),
            block_size: BlockSize { min: 1, preferred: 4096, max: 1 << 25 },
            description: Some("d".into()),
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let mut n = Negotiator::new(data.first().is_some_and(|b| b & 1 == 1));
    let mut rest = data.get(1..).unwrap_or_default();
    let mut out = Vec::new();
    while rest.len() >= OPTION_HEADER_LEN {
        let mut raw = [0u8; OPTION_HEADER_LEN];
        raw.copy_from_slice(&rest[..OPTION_HEADER_LEN]);
        raw[..8].copy_from_slice(b"IHAVEOPT");
        rest = &rest[OPTION_HEADER_LEN..];
        let Ok(h) = OptionHeader::from_bytes(&raw) else { return };
        if h.payload_plan() != Ok(OptionPayload::Read) {
            return;
        }
        let len = (h.len as usize).min(rest.len());
        let (payload, tail) = rest.split_at(len);
        rest = tail;
        out.clear();
        match n.handle(h.option, payload, &Catalogue, &mut out) {
            Step::Continue => {}
            Step::Close => return,
            Step::Open { via, .. } => {
                let _ = n.finish_open(&via, Catalogue.info(""), &mut out);
                return;
            }
        }
    }
});
