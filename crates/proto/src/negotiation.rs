//! The option-haggling phase: a state machine that turns each option request
//! into replies, and decides when transmission starts.
//!
//! It does no I/O and knows no storage. Read-only questions about exports
//! (LIST, INFO, meta-context queries) go to a [`Catalog`]; opening an export
//! for GO or EXPORT_NAME may create a disk, so it is handed back to the caller
//! as [`Step::Open`], whose result comes back through
//! [`Negotiator::finish_open`]. INFO therefore can never create anything.

use crate::codec::{Codec, Reader};
use crate::consts::*;
use crate::handshake::ExportNameReply;
use crate::options::{
    put_option_error, InfoReply, InfoRequest, MetaContextRequest, OptionReply, OptionReplyBody,
};
/// The session types, where the server and client crates have always found
/// them (they live in [`crate::session`]).
pub use crate::session::{BlockSize, ExportInfo, ReplyMode, Session};
use crate::snapshots::{
    decode_from, SnapshotAnswer, SnapshotRequest, OPT_SCRATCHD_DELETE_SNAPSHOT, OPT_SCRATCHD_FROM,
    OPT_SCRATCHD_SNAPSHOT, OPT_SCRATCHD_SNAPSHOTS, REP_SCRATCHD_SNAPSHOT,
};

/// One entry of an `NBD_OPT_LIST` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListing {
    pub name: String,
    pub description: Option<String>,
}

/// Why an export cannot be described or opened; each maps to one option error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// No such export.
    Unknown(String),
    /// The name or request is refused by policy (bad name, limit reached).
    Policy(String),
    /// The server failed to set the export up (e.g. mkfs failed).
    Platform(String),
    /// The server is going down.
    Shutdown(String),
}

impl LookupError {
    fn code_and_message(&self) -> (OptError, &str) {
        match self {
            LookupError::Unknown(m) => (OptError::Unknown, m),
            LookupError::Policy(m) => (OptError::Policy, m),
            LookupError::Platform(m) => (OptError::Platform, m),
            LookupError::Shutdown(m) => (OptError::Shutdown, m),
        }
    }
}

/// Read-only view of the exports, for questions that must not create one.
pub trait Catalog {
    fn list(&self) -> Vec<ExportListing>;
    fn info(&self, name: &str) -> Result<ExportInfo, LookupError>;
}

/// Which option asked to open an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenVia {
    ExportName,
    Go { info_requests: Vec<u16> },
}

/// What the caller does after [`Negotiator::handle`] filled its output buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the output and read the next option.
    Continue,
    /// Send the output, then close the connection.
    Close,
    /// Open the named export (creating it if need be, as a clone of the
    /// snapshot `from` if the client named one) and pass the result to
    /// [`Negotiator::finish_open`].
    Open {
        name: String,
        via: OpenVia,
        from: Option<String>,
    },
    /// Carry out a snapshot request (scratchd's own options, see
    /// [`crate::snapshots`]) and pass the result to
    /// [`Negotiator::finish_snapshots`].
    Snapshots(SnapshotRequest),
    /// Send the output (STARTTLS's ACK), run the TLS handshake, then call
    /// [`Negotiator::tls_started`] and read the next option over TLS.
    StartTls,
}

/// Whether the server offers TLS (`--tls`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsPolicy {
    /// STARTTLS is refused (`ERR_POLICY`).
    #[default]
    Off,
    /// Clients may start TLS, or not.
    On,
    /// Every option but STARTTLS and ABORT is refused with `ERR_TLS_REQD`
    /// (EXPORT_NAME, which has no error reply, closes) until TLS is up.
    Require,
}

/// Result of [`Negotiator::finish_open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Send the output; transmission starts right after it.
    Transmit(Session),
    /// Send the output and read the next option (GO failed).
    Continue,
    /// Send the output (if any) and close (EXPORT_NAME failed).
    Close,
}

/// The id scratchd gives `base:allocation`; any nonzero value would do.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// State of one connection's option haggling.
#[derive(Debug, Default)]
pub struct Negotiator {
    /// The client may skip the 124 zero bytes of the EXPORT_NAME reply.
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export name for which `base:allocation` was selected, if any.
    meta_for: Option<String>,
    tls: TlsPolicy,
    /// TLS is up on this connection.
    tls_active: bool,
    /// The snapshot a disk made by GO/EXPORT_NAME starts as
    /// (`OPT_SCRATCHD_FROM`).
    from: Option<String>,
}

impl Negotiator {
    pub fn new(no_zeroes: bool) -> Self {
        Self::with_tls(no_zeroes, TlsPolicy::Off)
    }

    pub fn with_tls(no_zeroes: bool, tls: TlsPolicy) -> Self {
        Negotiator {
            no_zeroes,
            tls,
            ..Default::default()
        }
    }

    /// TLS is up: everything negotiated before it is forgotten, as the spec
    /// demands (a man in the middle may have chosen it).
    pub fn tls_started(&mut self) {
        self.structured = false;
        self.extended = false;
        self.meta_for = None;
        self.from = None;
        self.tls_active = true;
    }

    fn reply_mode(&self) -> ReplyMode {
        if self.extended {
            ReplyMode::Extended
        } else if self.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        }
    }

    /// Handles one option request, appending its replies to `out`.
    pub fn handle(
        &mut self,
        option: u32,
        payload: &[u8],
        catalog: &dyn Catalog,
        out: &mut Vec<u8>,
    ) -> Step {
        if let Some(refused) = self.refuse_before_tls(option, out) {
            return refused;
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(payload),
            OPT_ABORT => {
                ack(out, option);
                Step::Close
            }
            OPT_LIST => list(payload, catalog, out),
            OPT_STARTTLS => self.start_tls(payload, out),
            OPT_INFO | OPT_GO => self.info_or_go(option, payload, catalog, out),
            OPT_STRUCTURED_REPLY => self.structured_reply(payload, out),
            OPT_EXTENDED_HEADERS => self.extended_headers(payload, out),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, payload, catalog, out)
            }
            OPT_SCRATCHD_FROM => self.remember_from(payload, out),
            OPT_SCRATCHD_SNAPSHOT | OPT_SCRATCHD_SNAPSHOTS | OPT_SCRATCHD_DELETE_SNAPSHOT => {
                match SnapshotRequest::decode(option, payload) {
                    Some(Ok(request)) => Step::Snapshots(request),
                    Some(Err(e)) => invalid(out, option, &format!("malformed request: {e}")),
                    None => invalid(out, option, "not a snapshot request"),
                }
            }
            _ => {
                let message = format!("option {option} is not supported");
                put_option_error(out, option, OptError::Unsup, &message);
                Step::Continue
            }
        }
    }

    /// With TLS required and not up yet, every option but STARTTLS and
    /// ABORT is refused (EXPORT_NAME, which has no error reply, hangs up).
    fn refuse_before_tls(&self, option: u32, out: &mut Vec<u8>) -> Option<Step> {
        let tls_missing = self.tls == TlsPolicy::Require && !self.tls_active;
        if !tls_missing || matches!(option, OPT_STARTTLS | OPT_ABORT) {
            return None;
        }
        if option == OPT_EXPORT_NAME {
            return Some(Step::Close);
        }
        put_option_error(
            out,
            option,
            OptError::TlsReqd,
            "TLS is required: send NBD_OPT_STARTTLS first",
        );
        Some(Step::Continue)
    }

    /// INFO describes an export (through the catalog, never creating it);
    /// GO asks the caller to open it.
    fn info_or_go(
        &self,
        option: u32,
        payload: &[u8],
        catalog: &dyn Catalog,
        out: &mut Vec<u8>,
    ) -> Step {
        let InfoRequest {
            name,
            info_requests,
        } = match InfoRequest::from_bytes(payload) {
            Ok(request) => request,
            Err(e) => return invalid(out, option, &format!("malformed request: {e}")),
        };
        if option == OPT_GO {
            return Step::Open {
                name,
                via: OpenVia::Go { info_requests },
                from: self.from.clone(),
            };
        }
        match catalog.info(&name) {
            Ok(info) => self.put_export_info(out, option, &info, &info_requests),
            Err(e) => put_lookup_error(out, option, &e),
        }
        Step::Continue
    }

    fn structured_reply(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Step {
        let option = OPT_STRUCTURED_REPLY;
        if !payload.is_empty() {
            return invalid(out, option, "NBD_OPT_STRUCTURED_REPLY takes no data");
        }
        if self.extended {
            put_option_error(
                out,
                option,
                OptError::ExtHeaderReqd,
                "extended headers are already negotiated",
            );
            return Step::Continue;
        }
        self.structured = true;
        ack(out, option);
        Step::Continue
    }

    fn extended_headers(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Step {
        let option = OPT_EXTENDED_HEADERS;
        if !payload.is_empty() {
            return invalid(out, option, "NBD_OPT_EXTENDED_HEADERS takes no data");
        }
        self.extended = true;
        ack(out, option);
        Step::Continue
    }

    fn start_tls(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Step {
        let option = OPT_STARTTLS;
        if self.tls == TlsPolicy::Off {
            put_option_error(
                out,
                option,
                OptError::Policy,
                "TLS is not enabled on this server",
            );
            return Step::Continue;
        }
        if !payload.is_empty() {
            return invalid(out, option, "NBD_OPT_STARTTLS takes no data");
        }
        if self.tls_active {
            return invalid(out, option, "TLS is already on");
        }
        ack(out, option);
        Step::StartTls
    }

    fn export_name(&mut self, payload: &[u8]) -> Step {
        if self.extended {
            // The reply has no room for an error, so the only answer is to
            // hang up, as the spec demands once extended headers are on.
            return Step::Close;
        }
        match Reader::new(payload).string(payload.len(), MAX_STRING_LEN) {
            Ok(name) => Step::Open {
                name: name.to_owned(),
                via: OpenVia::ExportName,
                from: self.from.clone(),
            },
            Err(_) => Step::Close,
        }
    }

    /// `OPT_SCRATCHD_FROM`: remembers the snapshot for the next open.
    fn remember_from(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Step {
        match decode_from(payload) {
            Ok(name) => {
                self.from = Some(name);
                ack(out, OPT_SCRATCHD_FROM);
                Step::Continue
            }
            Err(e) => invalid(out, OPT_SCRATCHD_FROM, &format!("malformed request: {e}")),
        }
    }

    /// Answers a snapshot request once the caller has carried it out.
    pub fn finish_snapshots(
        &self,
        request: &SnapshotRequest,
        result: Result<SnapshotAnswer, LookupError>,
        out: &mut Vec<u8>,
    ) {
        let option = request.option();
        match result {
            Ok(SnapshotAnswer::Done) => {}
            Ok(SnapshotAnswer::Listing(entries)) => {
                for entry in entries {
                    let mut data = Vec::new();
                    entry.encode(&mut data);
                    let body = OptionReplyBody::Other {
                        reply_type: REP_SCRATCHD_SNAPSHOT,
                        data,
                    };
                    reply(out, option, body);
                }
            }
            Err(e) => return put_lookup_error(out, option, &e),
        }
        ack(out, option);
    }

    /// Completes GO or EXPORT_NAME once the caller has tried to open `name`.
    pub fn finish_open(
        &mut self,
        via: &OpenVia,
        result: Result<ExportInfo, LookupError>,
        out: &mut Vec<u8>,
    ) -> Opened {
        let info = match (via, result) {
            (_, Ok(info)) => info,
            (OpenVia::Go { .. }, Err(e)) => {
                put_lookup_error(out, OPT_GO, &e);
                return Opened::Continue;
            }
            (OpenVia::ExportName, Err(_)) => return Opened::Close,
        };
        let flags = self.session_flags(info.flags);
        match via {
            OpenVia::Go { info_requests } => {
                self.put_export_info(out, OPT_GO, &info, info_requests);
            }
            OpenVia::ExportName => ExportNameReply {
                size: info.size,
                flags,
            }
            .encode(self.no_zeroes, out),
        }
        let base_allocation = match &self.meta_for {
            Some(n) if *n == info.name => Some(BASE_ALLOCATION_ID),
            _ => None,
        };
        Opened::Transmit(Session {
            export: ExportInfo { flags, ..info },
            mode: self.reply_mode(),
            base_allocation,
        })
    }

    /// The export's flags less those this session cannot use.
    fn session_flags(&self, flags: TransmissionFlags) -> TransmissionFlags {
        let mut f = flags.0 | TransmissionFlags::HAS_FLAGS;
        if self.reply_mode() == ReplyMode::Simple {
            f &= !TransmissionFlags::SEND_DF;
        }
        // Payloads on BLOCK_STATUS are not implemented, so never offered.
        f &= !TransmissionFlags::BLOCK_STATUS_PAYLOAD;
        TransmissionFlags(f)
    }

    /// INFO/GO answer: INFO_EXPORT always, BLOCK_SIZE always (our constraints
    /// are only hints a client may rely on), NAME and DESCRIPTION on request.
    fn put_export_info(&self, out: &mut Vec<u8>, option: u32, info: &ExportInfo, requests: &[u16]) {
        let flags = self.session_flags(info.flags);
        let mut info_reply = |i: InfoReply| reply(out, option, OptionReplyBody::Info(i));
        info_reply(InfoReply::Export {
            size: info.size,
            flags,
        });
        info_reply(InfoReply::BlockSize(info.block_size));
        if requests.contains(&INFO_NAME) {
            info_reply(InfoReply::Name(info.name.clone()));
        }
        if let (true, Some(desc)) = (requests.contains(&INFO_DESCRIPTION), &info.description) {
            info_reply(InfoReply::Description(desc.clone()));
        }
        ack(out, option);
    }

    fn meta_context(
        &mut self,
        option: u32,
        payload: &[u8],
        catalog: &dyn Catalog,
        out: &mut Vec<u8>,
    ) -> Step {
        let MetaContextRequest {
            export: name,
            queries,
        } = match MetaContextRequest::from_bytes(payload) {
            Ok(q) => q,
            Err(e) => return invalid(out, option, &format!("malformed request: {e}")),
        };
        if self.reply_mode() == ReplyMode::Simple {
            return invalid(
                out,
                option,
                "meta contexts need structured replies or extended headers first",
            );
        }
        let info = match catalog.info(&name) {
            Ok(info) => info,
            Err(e) => {
                put_lookup_error(out, option, &e);
                return Step::Continue;
            }
        };
        let listing = option == OPT_LIST_META_CONTEXT;
        let selected = if listing {
            queries.is_empty() || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
        } else {
            queries.iter().any(|q| q == BASE_ALLOCATION)
        };
        if selected {
            let body = OptionReplyBody::MetaContext {
                id: if listing { 0 } else { BASE_ALLOCATION_ID },
                name: BASE_ALLOCATION.into(),
            };
            reply(out, option, body);
        }
        if !listing {
            self.meta_for = selected.then_some(info.name);
        }
        ack(out, option);
        Step::Continue
    }
}

/// LIST: every export the catalog shows this client.
fn list(payload: &[u8], catalog: &dyn Catalog, out: &mut Vec<u8>) -> Step {
    if !payload.is_empty() {
        return invalid(out, OPT_LIST, "NBD_OPT_LIST takes no data");
    }
    for e in catalog.list() {
        let body = OptionReplyBody::Server {
            name: e.name,
            description: e.description.unwrap_or_default(),
        };
        reply(out, OPT_LIST, body);
    }
    ack(out, OPT_LIST);
    Step::Continue
}

fn invalid(out: &mut Vec<u8>, option: u32, message: &str) -> Step {
    put_option_error(out, option, OptError::Invalid, message);
    Step::Continue
}

fn reply(out: &mut Vec<u8>, option: u32, body: OptionReplyBody) {
    OptionReply { option, body }.encode(out);
}

fn ack(out: &mut Vec<u8>, option: u32) {
    reply(out, option, OptionReplyBody::Ack);
}

fn put_lookup_error(out: &mut Vec<u8>, option: u32, e: &LookupError) {
    let (code, message) = e.code_and_message();
    put_option_error(out, option, code, message);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::PutBe;
    use crate::handshake::OptionHeader;
    use crate::options::OptionRequest;

    struct OneExport;

    impl Catalog for OneExport {
        fn list(&self) -> Vec<ExportListing> {
            vec![ExportListing {
                name: "disk".into(),
                description: Some("a disk".into()),
            }]
        }
        fn info(&self, name: &str) -> Result<ExportInfo, LookupError> {
            match name {
                "" | "disk" => Ok(ExportInfo {
                    name: "disk".into(),
                    size: 1 << 20,
                    flags: TransmissionFlags(
                        TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_DF,
                    ),
                    block_size: BlockSize {
                        min: 1,
                        preferred: 4096,
                        max: 1 << 25,
                    },
                    description: Some("a disk".into()),
                }),
                _ => Err(LookupError::Unknown(format!("no {name}"))),
            }
        }
    }

    /// Splits option replies into (option, type, data).
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut r = Reader::new(out);
        let mut v = Vec::new();
        while r.remaining() > 0 {
            assert_eq!(r.u64().unwrap(), OPTION_REPLY_MAGIC);
            let opt = r.u32().unwrap();
            let ty = r.u32().unwrap();
            let len = r.u32().unwrap() as usize;
            v.push((opt, ty, r.take(len).unwrap().to_vec()));
        }
        v
    }

    fn name_request(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut p = Vec::new();
        p.put_u32(name.len() as u32);
        p.extend_from_slice(name.as_bytes());
        p.put_u16(infos.len() as u16);
        for i in infos {
            p.put_u16(*i);
        }
        p
    }

    fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut p = Vec::new();
        p.put_u32(name.len() as u32);
        p.extend_from_slice(name.as_bytes());
        p.put_u32(queries.len() as u32);
        for q in queries {
            p.put_u32(q.len() as u32);
            p.extend_from_slice(q.as_bytes());
        }
        p
    }

    fn handle(n: &mut Negotiator, opt: u32, payload: &[u8]) -> (Step, Vec<(u32, u32, Vec<u8>)>) {
        let mut out = Vec::new();
        let step = n.handle(opt, payload, &OneExport, &mut out);
        (step, replies(&out))
    }

    #[test]
    fn info_describes_without_opening_and_go_asks_to_open() {
        let mut n = Negotiator::new(true);
        let (step, r) = handle(
            &mut n,
            OPT_INFO,
            &name_request("", &[INFO_NAME, INFO_DESCRIPTION]),
        );
        assert_eq!(step, Step::Continue);
        let types: Vec<u32> = r.iter().map(|x| x.1).collect();
        assert_eq!(types, [REP_INFO, REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
        // INFO_EXPORT without SEND_DF: no structured replies yet.
        assert_eq!(r[0].2, [0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 1]);
        assert_eq!(&r[2].2[2..], b"disk");
        assert_eq!(&r[3].2[2..], b"a disk");

        let (step, r) = handle(&mut n, OPT_GO, &name_request("disk", &[]));
        assert!(r.is_empty());
        let Step::Open { name, via, from } = step else {
            panic!("GO must open")
        };
        assert_eq!((name.as_str(), from), ("disk", None));
        let mut out = Vec::new();
        let opened = n.finish_open(&via, OneExport.info("disk"), &mut out);
        let Opened::Transmit(s) = opened else {
            panic!("GO must transmit")
        };
        assert_eq!(s.mode, ReplyMode::Simple);
        assert_eq!(s.base_allocation, None);
        assert_eq!(replies(&out).last().unwrap().1, REP_ACK);
    }

    #[test]
    fn scratchd_options_name_a_snapshot_for_the_open_and_ask_for_snapshot_requests() {
        use crate::snapshots::*;
        let mut n = Negotiator::with_tls(false, TlsPolicy::On);
        let mut from = Vec::new();
        encode_from("base", &mut from);
        let (step, r) = handle(&mut n, OPT_SCRATCHD_FROM, &from);
        assert_eq!((step, r[0].1), (Step::Continue, REP_ACK));
        let (step, _) = handle(&mut n, OPT_GO, &name_request("disk", &[]));
        assert!(matches!(step, Step::Open { from: Some(f), .. } if f == "base"));
        let (step, _) = handle(&mut n, OPT_EXPORT_NAME, b"disk");
        assert!(matches!(step, Step::Open { from: Some(f), .. } if f == "base"));
        // TLS forgets it, as everything negotiated before.
        n.tls_started();
        let (step, _) = handle(&mut n, OPT_GO, &name_request("disk", &[]));
        assert!(matches!(step, Step::Open { from: None, .. }));
        // Malformed payloads are refused, and change nothing.
        let (step, r) = handle(&mut n, OPT_SCRATCHD_FROM, &from[..3]);
        assert_eq!((step, r[0].1), (Step::Continue, OptError::Invalid as u32));
        let (step, r) = handle(&mut n, OPT_SCRATCHD_SNAPSHOTS, b"x");
        assert_eq!((step, r[0].1), (Step::Continue, OptError::Invalid as u32));
        // Requests go to the caller, whose answer the negotiator encodes.
        let mut take = Vec::new();
        let request = SnapshotRequest::Take {
            disk: "root".into(),
            name: "base".into(),
        };
        request.encode(&mut take);
        let (step, r) = handle(&mut n, OPT_SCRATCHD_SNAPSHOT, &take);
        assert_eq!((step, r.len()), (Step::Snapshots(request.clone()), 0));
        let mut out = Vec::new();
        n.finish_snapshots(&request, Ok(SnapshotAnswer::Done), &mut out);
        assert_eq!(replies(&out)[0].1, REP_ACK);
        let entry = SnapshotEntry {
            name: "base".into(),
            published: false,
            size: 1,
            bytes: 0,
            clones: 0,
            age_ms: 0,
        };
        out.clear();
        let listing = Ok(SnapshotAnswer::Listing(vec![entry.clone()]));
        n.finish_snapshots(&SnapshotRequest::List, listing, &mut out);
        let r = replies(&out);
        assert_eq!(
            (r[0].0, r[0].1),
            (OPT_SCRATCHD_SNAPSHOTS, REP_SCRATCHD_SNAPSHOT)
        );
        assert_eq!(SnapshotEntry::decode(&r[0].2), Ok(entry));
        assert_eq!(r[1].1, REP_ACK);
        out.clear();
        let refused = Err(LookupError::Unknown("no disk".into()));
        n.finish_snapshots(&request, refused, &mut out);
        let r = replies(&out);
        assert_eq!((r.len(), r[0].1), (1, OptError::Unknown as u32));
    }

    #[test]
    fn failed_go_keeps_negotiating_and_failed_export_name_closes() {
        let mut n = Negotiator::new(false);
        let via = OpenVia::Go {
            info_requests: vec![],
        };
        let mut out = Vec::new();
        let err = Err(LookupError::Unknown("nope".into()));
        assert_eq!(n.finish_open(&via, err.clone(), &mut out), Opened::Continue);
        assert_eq!(replies(&out)[0].1, OptError::Unknown as u32);
        out.clear();
        assert_eq!(
            n.finish_open(&OpenVia::ExportName, err, &mut out),
            Opened::Close
        );
        assert!(out.is_empty());
    }

    #[test]
    fn export_name_reply_has_zeroes_unless_no_zeroes() {
        for (no_zeroes, len) in [(false, 134), (true, 10)] {
            let mut n = Negotiator::new(no_zeroes);
            let mut out = Vec::new();
            let opened = n.finish_open(&OpenVia::ExportName, OneExport.info(""), &mut out);
            assert!(matches!(opened, Opened::Transmit(_)));
            assert_eq!(out.len(), len);
        }
    }

    #[test]
    fn meta_contexts_need_structured_replies_and_bind_to_the_export() {
        let mut n = Negotiator::new(true);
        let q = meta_request("disk", &[BASE_ALLOCATION]);
        let (_, r) = handle(&mut n, OPT_SET_META_CONTEXT, &q);
        assert_eq!(r[0].1, OptError::Invalid as u32);

        let (_, r) = handle(&mut n, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r[0].1, REP_ACK);
        let (_, r) = handle(
            &mut n,
            OPT_LIST_META_CONTEXT,
            &meta_request("disk", &["base:"]),
        );
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(&r[0].2[..4], &[0, 0, 0, 0]);
        assert_eq!(&r[0].2[4..], BASE_ALLOCATION.as_bytes());
        // "base:" is only a wildcard for LIST; SET selects nothing with it.
        let (_, r) = handle(
            &mut n,
            OPT_SET_META_CONTEXT,
            &meta_request("disk", &["base:", "x:y"]),
        );
        assert_eq!(r.len(), 1);
        let (_, r) = handle(&mut n, OPT_SET_META_CONTEXT, &q);
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(&r[0].2[..4], &BASE_ALLOCATION_ID.to_be_bytes());

        let via = OpenVia::Go {
            info_requests: vec![],
        };
        let Opened::Transmit(s) = n.finish_open(&via, OneExport.info(""), &mut Vec::new()) else {
            panic!("GO must transmit")
        };
        assert_eq!(s.mode, ReplyMode::Structured);
        assert_eq!(s.base_allocation, Some(BASE_ALLOCATION_ID));
        assert!(s.export.flags.contains(TransmissionFlags::SEND_DF));
    }

    #[test]
    fn extended_headers_win_over_structured_replies() {
        let mut n = Negotiator::new(true);
        assert_eq!(handle(&mut n, OPT_EXTENDED_HEADERS, &[]).1[0].1, REP_ACK);
        assert_eq!(
            handle(&mut n, OPT_STRUCTURED_REPLY, &[]).1[0].1,
            OptError::ExtHeaderReqd as u32
        );
        assert_eq!(n.reply_mode(), ReplyMode::Extended);
        // EXPORT_NAME has no error reply, so it can only hang up now.
        assert_eq!(handle(&mut n, OPT_EXPORT_NAME, b"disk").0, Step::Close);
    }

    #[test]
    fn malformed_and_unknown_options_are_answered_not_fatal() {
        let mut n = Negotiator::new(true);
        let mut bad = name_request("disk", &[]);
        bad.push(0);
        assert_eq!(
            handle(&mut n, OPT_GO, &bad).1[0].1,
            OptError::Invalid as u32
        );
        let mut bad = name_request("disk", &[]);
        bad[3] = 200;
        assert_eq!(
            handle(&mut n, OPT_INFO, &bad).1[0].1,
            OptError::Invalid as u32
        );
        let (step, r) = handle(&mut n, 0x1234, b"junk");
        assert_eq!(step, Step::Continue);
        assert_eq!((r[0].0, r[0].1), (0x1234, OptError::Unsup as u32));
        assert_eq!(
            handle(&mut n, OPT_LIST, b"x").1[0].1,
            OptError::Invalid as u32
        );
        assert_eq!(
            handle(&mut n, OPT_STARTTLS, &[]).1[0].1,
            OptError::Policy as u32
        );
        assert_eq!(handle(&mut n, OPT_ABORT, &[]).0, Step::Close);
    }

    #[test]
    fn list_names_every_export() {
        let mut n = Negotiator::new(true);
        let (_, r) = handle(&mut n, OPT_LIST, &[]);
        assert_eq!(r[0].1, REP_SERVER);
        assert_eq!(r[0].2, b"\0\0\0\x04diska disk");
        assert_eq!(r[1].1, REP_ACK);
    }

    #[test]
    fn required_tls_refuses_everything_but_starttls_and_abort() {
        let mut n = Negotiator::with_tls(false, TlsPolicy::Require);
        for opt in [
            OPT_LIST,
            OPT_STRUCTURED_REPLY,
            OPT_EXTENDED_HEADERS,
            OPT_INFO,
            OPT_GO,
        ] {
            let (step, replies) = handle(&mut n, opt, &[]);
            assert_eq!(step, Step::Continue);
            assert_eq!(replies[0].1, OptError::TlsReqd as u32, "option {opt}");
        }
        assert_eq!(handle(&mut n, OPT_EXPORT_NAME, b"x").0, Step::Close);
        let (step, replies) = handle(&mut n, OPT_STARTTLS, &[]);
        assert_eq!(step, Step::StartTls);
        assert_eq!(replies[0].1, REP_ACK);
        n.tls_started();
        assert_eq!(handle(&mut n, OPT_STRUCTURED_REPLY, &[]).1[0].1, REP_ACK);
    }

    #[test]
    fn a_second_starttls_is_invalid_and_tls_forgets_what_came_before() {
        let mut n = Negotiator::with_tls(false, TlsPolicy::On);
        assert_eq!(handle(&mut n, OPT_STRUCTURED_REPLY, &[]).1[0].1, REP_ACK);
        assert_eq!(
            handle(&mut n, OPT_STARTTLS, b"x").1[0].1,
            OptError::Invalid as u32
        );
        assert_eq!(handle(&mut n, OPT_STARTTLS, &[]).0, Step::StartTls);
        n.tls_started();
        assert_eq!(n.reply_mode(), ReplyMode::Simple);
        assert_eq!(
            handle(&mut n, OPT_STARTTLS, &[]).1[0].1,
            OptError::Invalid as u32
        );
    }

    /// What the server's negotiator sends is what a client decodes.
    #[test]
    fn negotiator_replies_decode_as_a_client_reads_them() {
        struct One;
        impl Catalog for One {
            fn list(&self) -> Vec<ExportListing> {
                vec![ExportListing {
                    name: "disk".into(),
                    description: None,
                }]
            }
            fn info(&self, _: &str) -> Result<ExportInfo, LookupError> {
                Ok(ExportInfo {
                    name: "disk".into(),
                    size: 4096,
                    flags: TransmissionFlags(TransmissionFlags::HAS_FLAGS),
                    block_size: BlockSize {
                        min: 1,
                        preferred: 4096,
                        max: 1 << 25,
                    },
                    description: Some("scratch".into()),
                })
            }
        }
        let requests = [
            OptionRequest::StructuredReply,
            OptionRequest::List,
            OptionRequest::SetMetaContext(MetaContextRequest {
                export: "disk".into(),
                queries: vec![BASE_ALLOCATION.into()],
            }),
            OptionRequest::Info(InfoRequest {
                name: "".into(),
                info_requests: vec![INFO_NAME, INFO_DESCRIPTION],
            }),
            OptionRequest::Other {
                option: 99,
                data: vec![],
            },
        ];
        let mut n = Negotiator::new(true);
        let mut out = Vec::new();
        for request in &requests {
            // The server sees what a client encoded.
            let bytes = request.to_bytes();
            let mut r = Reader::new(&bytes);
            let header = OptionHeader::decode(&mut r).unwrap();
            n.handle(header.option, r.rest(), &One, &mut out);
        }
        let mut r = Reader::new(&out);
        let mut got = Vec::new();
        while !r.is_empty() {
            got.push(OptionReply::decode(&mut r).unwrap().body);
        }
        use OptionReplyBody as B;
        assert_eq!(
            got,
            [
                B::Ack,
                B::Server {
                    name: "disk".into(),
                    description: "".into()
                },
                B::Ack,
                B::MetaContext {
                    id: BASE_ALLOCATION_ID,
                    name: BASE_ALLOCATION.into()
                },
                B::Ack,
                B::Info(InfoReply::Export {
                    size: 4096,
                    flags: TransmissionFlags(TransmissionFlags::HAS_FLAGS)
                }),
                B::Info(InfoReply::BlockSize(BlockSize {
                    min: 1,
                    preferred: 4096,
                    max: 1 << 25
                })),
                B::Info(InfoReply::Name("disk".into())),
                B::Info(InfoReply::Description("scratch".into())),
                B::Ack,
                B::Error {
                    code: OptError::Unsup as u32,
                    message: "option 99 is not supported".into()
                },
            ]
        );
    }
}
