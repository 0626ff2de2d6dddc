//! The client's side of the fixed-newstyle handshake, on one [`Stream`](crate::transport::Stream).
//!
//! Order of options, each answered before the next is sent:
//! 1. `EXTENDED_HEADERS` (when [`Replies::Extended`] is wanted), else
//!    `STRUCTURED_REPLY` (when at least [`Replies::Structured`] is): a
//!    refusal just means the older framing;
//! 2. `SET_META_CONTEXT base:allocation` once replies are structured (block
//!    status needs them), so [`ExportInfo::base_allocation`] says whether
//!    extents can be asked for;
//! 3. `GO` with an `INFO_BLOCK_SIZE` request; a server too old for GO
//!    (`ERR_UNSUP`) gets `EXPORT_NAME` instead. Any other error reply is
//!    [`Error::Refused`], naming the export.
//!
//! Every message is encoded and decoded with `scratchd_proto`'s types, the
//! same ones the server uses: one codec, two roles.

use std::io::{self, Read, Write};

use scratchd_proto::codec::{Codec, Reader};
use scratchd_proto::consts::*;
use scratchd_proto::handshake::{
    ClientFlags, ExportNameReply, Greeting, HandshakeError, OptionReplyHeader,
    EXPORT_NAME_REPLY_LEN, EXPORT_NAME_REPLY_ZEROES, GREETING_LEN, MAX_OPTION_DRAIN,
    OPTION_REPLY_HEADER_LEN,
};
use scratchd_proto::negotiation::{BlockSize, ReplyMode};
use scratchd_proto::options::{
    InfoReply, InfoRequest, MetaContextRequest, OptionReplyBody, OptionRequest,
};
use scratchd_proto::request::MAX_PAYLOAD;
use scratchd_proto::snapshots::{
    encode_from, option_name, AnswerReader, SnapshotAnswer, SnapshotReplyError, SnapshotRequest,
    OPT_SCRATCHD_FROM,
};
use scratchd_proto::TransmissionFlags;
use tracing::debug;

use crate::error::{shown, Error};

/// The richest reply framing a connection asks for; the server may grant
/// less. The kernel's nbd driver speaks only [`Replies::Simple`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Replies {
    /// Simple replies only: no holes, no block status.
    Simple,
    /// Structured replies (holes in reads, errors with messages, block status).
    Structured,
    /// Extended headers (64-bit lengths), else structured replies.
    #[default]
    Extended,
}

/// What the handshake learnt about the export and the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The name asked for ("" is the default export).
    pub name: String,
    pub size: u64,
    pub flags: TransmissionFlags,
    /// Block size constraints, when the server advertised them.
    pub block_size: Option<BlockSize>,
    /// The reply framing in force.
    pub mode: ReplyMode,
    /// The id the server gave `base:allocation`, when it was selected.
    pub base_allocation: Option<u32>,
}

impl ExportInfo {
    /// The largest READ or WRITE payload to send in one request: the
    /// server's maximum block size, or the spec's 32 MiB default, and never
    /// more than 32 MiB (the buffers a reply may need).
    pub fn max_payload(&self) -> u32 {
        match self.block_size {
            Some(b) if b.max > 0 => b.max.min(MAX_PAYLOAD),
            _ => MAX_PAYLOAD,
        }
    }

    pub fn has(&self, flag: u16) -> bool {
        self.flags.contains(flag)
    }

    /// Whether several connections may be opened to this export.
    pub fn multi_conn(&self) -> bool {
        self.has(TransmissionFlags::CAN_MULTI_CONN)
    }

    pub fn read_only(&self) -> bool {
        self.has(TransmissionFlags::READ_ONLY)
    }
}

/// Reads the greeting and sends the client flags on `io`; returns whether
/// the server lets the client skip the zeros of the EXPORT_NAME reply.
pub(crate) fn greet(io: &mut dyn ReadWrite, address: &str, export: &str) -> Result<bool, Error> {
    let mut n = Negotiation {
        io,
        address,
        export,
    };
    let greeting = n.greeting()?;
    if greeting.flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(n.protocol("server does not offer fixed newstyle negotiation"));
    }
    let no_zeroes = greeting.flags & FLAG_NO_ZEROES != 0;
    n.send(&ClientFlags { no_zeroes }.to_bytes())?;
    Ok(no_zeroes)
}

/// Asks for TLS (NBD_OPT_STARTTLS); on success the caller runs the TLS
/// handshake on the same socket next. A refusal is an error: a client that
/// asked for TLS never falls back to plaintext.
pub(crate) fn start_tls(io: &mut dyn ReadWrite, address: &str, export: &str) -> Result<(), Error> {
    let mut n = Negotiation {
        io,
        address,
        export,
    };
    n.request(&OptionRequest::StartTls)?;
    match n.reply(OPT_STARTTLS)? {
        OptionReplyBody::Ack => Ok(()),
        OptionReplyBody::Error { code, message } => Err(Error::Refused {
            address: address.to_owned(),
            export: export.to_owned(),
            option: "STARTTLS",
            code,
            message,
        }),
        other => Err(n.unexpected(&other, "STARTTLS")),
    }
}

/// Runs the option haggling for `export` on `io`, after [`greet`] (and
/// TLS); `address` names the server in errors. Leaves `io` at the start of
/// transmission.
pub(crate) fn negotiate(
    io: &mut dyn ReadWrite,
    address: &str,
    export: &str,
    no_zeroes: bool,
    want: &Wanted<'_>,
) -> Result<ExportInfo, Error> {
    let mut n = Negotiation {
        io,
        address,
        export,
    };
    let Wanted {
        replies: want,
        block_status,
        from,
    } = *want;
    if let Some(from) = from {
        n.start_from(from)?;
    }
    let mut mode = ReplyMode::Simple;
    if want >= Replies::Extended && n.toggle(OptionRequest::ExtendedHeaders)? {
        mode = ReplyMode::Extended;
    }
    if mode == ReplyMode::Simple
        && want >= Replies::Structured
        && n.toggle(OptionRequest::StructuredReply)?
    {
        mode = ReplyMode::Structured;
    }
    let base_allocation = match mode {
        ReplyMode::Simple => None,
        _ if !block_status => None,
        _ => n.select_base_allocation()?,
    };
    let (size, flags, block_size) = match n.go()? {
        Some(found) => found,
        // EXPORT_NAME is forbidden with extended headers, and a server
        // that has them has GO.
        None if mode == ReplyMode::Extended => {
            return Err(n.protocol("GO refused as unsupported after EXTENDED_HEADERS"))
        }
        None => n.export_name(no_zeroes)?,
    };
    debug!(address, export, size, flags = flags.0, ?mode, "negotiated");
    Ok(ExportInfo {
        name: export.to_owned(),
        size,
        flags,
        block_size,
        mode,
        base_allocation,
    })
}

/// What [`negotiate`] asks the server for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wanted<'a> {
    pub replies: Replies,
    pub block_status: bool,
    /// A disk made by the GO starts as this snapshot (scratchd only).
    pub from: Option<&'a str>,
}

/// Sends one of scratchd's snapshot requests on `io`, after [`greet`] (and
/// TLS), and reads its answer; then ends the session with ABORT.
pub(crate) fn snapshot_request(
    io: &mut dyn ReadWrite,
    address: &str,
    request: &SnapshotRequest,
) -> Result<SnapshotAnswer, Error> {
    let subject = match request {
        SnapshotRequest::Take { disk, .. } => disk.as_str(),
        SnapshotRequest::List => "",
        SnapshotRequest::Delete { name } => name.as_str(),
    };
    let mut n = Negotiation {
        io,
        address,
        export: subject,
    };
    let option = request.option();
    let mut data = Vec::new();
    request.encode(&mut data);
    n.request(&OptionRequest::Other { option, data })?;
    let answer = n.scratchd_answer(option, AnswerReader::new(request))?;
    // The session ends here; the server's answer to ABORT changes nothing.
    let _ = n.request(&OptionRequest::Abort);
    Ok(answer)
}

/// `Read + Write` as one object-safe trait, so the handshake runs over any
/// stream (a plain socket today, a TLS session later).
pub(crate) trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

struct Negotiation<'a> {
    io: &'a mut dyn ReadWrite,
    address: &'a str,
    export: &'a str,
}

/// What GO gives: size, flags, block sizes.
type Found = (u64, TransmissionFlags, Option<BlockSize>);

impl Negotiation<'_> {
    fn io_error(&self, source: io::Error) -> Error {
        Error::Io {
            address: self.address.to_owned(),
            source,
        }
    }

    fn protocol(&self, reason: impl Into<String>) -> Error {
        Error::Protocol {
            address: self.address.to_owned(),
            reason: reason.into(),
        }
    }

    /// A reply `to` an option does not take, named by its type alone: its
    /// payload is the server's to fill (up to 16 MiB), and is shown to
    /// nobody.
    fn unexpected(&self, reply: &OptionReplyBody, to: impl std::fmt::Display) -> Error {
        self.protocol(format!(
            "unexpected reply type {:#x} to {to}",
            reply.reply_type()
        ))
    }

    fn bad_snapshot_answer(&self, source: SnapshotReplyError) -> Error {
        Error::SnapshotAnswer {
            address: self.address.to_owned(),
            source,
        }
    }

    fn bad_message(&self, source: impl Into<HandshakeError>) -> Error {
        Error::Handshake {
            address: self.address.to_owned(),
            source: source.into(),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.io.write_all(bytes).map_err(|e| self.io_error(e))
    }

    fn receive(&mut self, len: usize) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0; len];
        self.io.read_exact(&mut buf).map_err(|e| self.io_error(e))?;
        Ok(buf)
    }

    fn greeting(&mut self) -> Result<Greeting, Error> {
        let raw = self.receive(GREETING_LEN)?;
        Greeting::from_bytes(&raw).map_err(|e| self.bad_message(e))
    }

    fn request(&mut self, request: &OptionRequest) -> Result<(), Error> {
        self.send(&request.to_bytes())
    }

    /// Reads one reply to `option`.
    fn reply(&mut self, option: u32) -> Result<OptionReplyBody, Error> {
        let raw = self.receive(OPTION_REPLY_HEADER_LEN)?;
        let header = OptionReplyHeader::from_bytes(&raw).map_err(|e| self.bad_message(e))?;
        if header.option != option {
            return Err(self.protocol(format!(
                "reply to option {} while option {option} was pending",
                header.option
            )));
        }
        if header.len > MAX_OPTION_DRAIN {
            return Err(self.protocol(format!("option reply of {} bytes", header.len)));
        }
        let payload = self.receive(header.len as usize)?;
        OptionReplyBody::decode(header.reply_type, &mut Reader::new(&payload))
            .map_err(|e| self.bad_message(e))
    }

    /// Sends an option that is either acknowledged or refused; returns
    /// whether it was acknowledged.
    fn toggle(&mut self, request: OptionRequest) -> Result<bool, Error> {
        let option = request.option();
        self.request(&request)?;
        match self.reply(option)? {
            OptionReplyBody::Ack => Ok(true),
            OptionReplyBody::Error { code, message } => {
                debug!(option, code, reason = %shown(&message), "option refused");
                Ok(false)
            }
            other => Err(self.unexpected(&other, format_args!("option {option}"))),
        }
    }

    fn refused(&self, option: &'static str, code: u32, message: String) -> Error {
        Error::Refused {
            address: self.address.to_owned(),
            export: self.export.to_owned(),
            option,
            code,
            message,
        }
    }

    /// `OPT_SCRATCHD_FROM`: the disk GO makes starts as snapshot `from`. A
    /// server that does not know the option refuses it like any other.
    fn start_from(&mut self, from: &str) -> Result<(), Error> {
        let mut data = Vec::new();
        encode_from(from, &mut data);
        let option = OPT_SCRATCHD_FROM;
        self.request(&OptionRequest::Other { option, data })?;
        self.scratchd_answer(option, AnswerReader::start_from())
            .map(drop)
    }

    /// Reads the answer to scratchd's `option`, whose request was sent:
    /// every reply goes through `reader`, the one bounded decoder of those
    /// answers, which shows the server's bytes only as a listing's checked
    /// names; an error reply is [`Error::Refused`], whose message is shown
    /// clipped and escaped. Nothing the server sends reaches a person
    /// another way.
    fn scratchd_answer(
        &mut self,
        option: u32,
        mut reader: AnswerReader,
    ) -> Result<SnapshotAnswer, Error> {
        loop {
            let read = match self.reply(option)? {
                OptionReplyBody::Error { code, message } => {
                    return Err(self.refused(option_name(option), code, message))
                }
                OptionReplyBody::Other { reply_type, data } => reader.reply(reply_type, &data),
                // Known types carry nothing a scratchd answer takes: the
                // reader refuses them by their type.
                other => reader.reply(other.reply_type(), &[]),
            };
            if let Some(answer) = read.map_err(|source| self.bad_snapshot_answer(source))? {
                return Ok(answer);
            }
        }
    }

    fn select_base_allocation(&mut self) -> Result<Option<u32>, Error> {
        self.request(&OptionRequest::SetMetaContext(MetaContextRequest {
            export: self.export.to_owned(),
            queries: vec![BASE_ALLOCATION.to_owned()],
        }))?;
        let mut id = None;
        loop {
            match self.reply(OPT_SET_META_CONTEXT)? {
                OptionReplyBody::MetaContext { id: i, name } if name == BASE_ALLOCATION => {
                    id = Some(i)
                }
                OptionReplyBody::MetaContext { .. } => {}
                OptionReplyBody::Ack => return Ok(id),
                OptionReplyBody::Error { code, message } => {
                    debug!(code, reason = %shown(&message), "SET_META_CONTEXT refused");
                    return Ok(None);
                }
                other => return Err(self.unexpected(&other, "SET_META_CONTEXT")),
            }
        }
    }

    /// GO; `None` when the server does not know the option.
    fn go(&mut self) -> Result<Option<Found>, Error> {
        self.request(&OptionRequest::Go(InfoRequest {
            name: self.export.to_owned(),
            info_requests: vec![INFO_BLOCK_SIZE],
        }))?;
        let mut export = None;
        let mut block_size = None;
        loop {
            match self.reply(OPT_GO)? {
                OptionReplyBody::Info(InfoReply::Export { size, flags }) => {
                    export = Some((size, flags))
                }
                OptionReplyBody::Info(InfoReply::BlockSize(b)) => block_size = Some(b),
                OptionReplyBody::Info(_) => {}
                OptionReplyBody::Ack => break,
                OptionReplyBody::Error { code, .. } if code == OptError::Unsup as u32 => {
                    return Ok(None)
                }
                OptionReplyBody::Error { code, message } => {
                    return Err(Error::Refused {
                        address: self.address.to_owned(),
                        export: self.export.to_owned(),
                        option: "GO",
                        code,
                        message,
                    })
                }
                other => return Err(self.unexpected(&other, "GO")),
            }
        }
        match export {
            Some((size, flags)) => Ok(Some((size, flags, block_size))),
            None => Err(self.protocol("GO acknowledged without NBD_INFO_EXPORT")),
        }
    }

    /// The pre-GO way in: no reply header, and a refusal is a hang-up.
    fn export_name(&mut self, no_zeroes: bool) -> Result<Found, Error> {
        self.request(&OptionRequest::ExportName(self.export.to_owned()))?;
        let len = EXPORT_NAME_REPLY_LEN
            + if no_zeroes {
                0
            } else {
                EXPORT_NAME_REPLY_ZEROES
            };
        let raw = self.receive(len)?;
        let reply = ExportNameReply::decode(&mut Reader::new(&raw), no_zeroes)
            .map_err(|e| self.bad_message(e))?;
        Ok((reply.size, reply.flags, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scratchd_proto::options::put_option_error;
    use scratchd_proto::options::OptionReply;
    use scratchd_proto::snapshots::{
        SnapshotEntry, MAX_LISTED, OPT_SCRATCHD_SNAPSHOT, OPT_SCRATCHD_SNAPSHOTS,
        REP_SCRATCHD_SNAPSHOT,
    };

    /// A scripted server: what it sends is fixed up front, what the client
    /// sends is recorded.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn reply(option: u32, body: OptionReplyBody, out: &mut Vec<u8>) {
        OptionReply { option, body }.encode(out);
    }

    fn export(size: u64) -> OptionReplyBody {
        OptionReplyBody::Info(InfoReply::Export {
            size,
            flags: TransmissionFlags(TransmissionFlags::HAS_FLAGS),
        })
    }

    fn run(server: Vec<u8>, want: Replies) -> (Result<ExportInfo, Error>, Vec<u8>) {
        let mut s = Script {
            input: io::Cursor::new(server),
            output: Vec::new(),
        };
        let r = greet(&mut s, "test", "disk").and_then(|no_zeroes| {
            let want = Wanted {
                replies: want,
                block_status: true,
                from: None,
            };
            negotiate(&mut s, "test", "disk", no_zeroes, &want)
        });
        (r, s.output)
    }

    fn greeting(flags: u16) -> Vec<u8> {
        Greeting { flags }.to_bytes()
    }

    #[test]
    fn snapshot_requests_read_their_listing_and_refusals_are_typed() {
        let entry = SnapshotEntry {
            name: "base".into(),
            published: true,
            size: 1 << 20,
            bytes: 4096,
            clones: 2,
            age_ms: 5,
        };
        let mut server = Vec::new();
        let mut data = Vec::new();
        entry.encode(&mut data);
        let option = OPT_SCRATCHD_SNAPSHOTS;
        let listed = OptionReplyBody::Other {
            reply_type: REP_SCRATCHD_SNAPSHOT,
            data,
        };
        reply(option, listed, &mut server);
        reply(option, OptionReplyBody::Ack, &mut server);
        let mut s = Script {
            input: io::Cursor::new(server),
            output: Vec::new(),
        };
        let answer = snapshot_request(&mut s, "test", &SnapshotRequest::List).unwrap();
        assert_eq!(answer, SnapshotAnswer::Listing(vec![entry]));
        // The request, then ABORT.
        let sent = OptionRequest::Other {
            option,
            data: vec![],
        };
        let mut want = sent.to_bytes();
        want.extend(OptionRequest::Abort.to_bytes());
        assert_eq!(s.output, want);

        let mut server = Vec::new();
        let option = OPT_SCRATCHD_SNAPSHOT;
        put_option_error(&mut server, option, OptError::Unknown, "no disk \"root\"");
        let mut s = Script {
            input: io::Cursor::new(server),
            output: Vec::new(),
        };
        let take = SnapshotRequest::Take {
            disk: "root".into(),
            name: "base".into(),
        };
        let err = snapshot_request(&mut s, "test", &take).unwrap_err();
        assert_eq!(err.refusal(), Some(OptError::Unknown));
        assert!(err.to_string().contains("no disk"), "{err}");
    }

    /// A server that sends `first`, then `replies` (option, type, payload).
    fn scripted(first: Vec<u8>, replies: &[(u32, u32, Vec<u8>)]) -> Script {
        let mut server = first;
        for (option, reply_type, data) in replies {
            let body = OptionReplyBody::Other {
                reply_type: *reply_type,
                data: data.clone(),
            };
            reply(*option, body, &mut server);
        }
        Script {
            input: io::Cursor::new(server),
            output: Vec::new(),
        }
    }

    /// The answer of a scripted server to `request`, whose replies to
    /// `option` are `replies` (type, payload).
    fn snapshot_answer(
        request: &SnapshotRequest,
        replies: &[(u32, u32, Vec<u8>)],
    ) -> Result<SnapshotAnswer, Error> {
        let mut s = scripted(Vec::new(), replies);
        snapshot_request(&mut s, "test", request)
    }

    fn listed(name: &str) -> Vec<u8> {
        let mut data = Vec::new();
        SnapshotEntry {
            name: name.into(),
            published: false,
            size: 1,
            bytes: 0,
            clones: 0,
            age_ms: 0,
        }
        .encode(&mut data);
        data
    }

    /// A hostile server's answers to snapshot requests: each a clear error
    /// of its own kind, none a panic, a hang or a listing without end.
    #[test]
    fn hostile_snapshot_answers_are_refused() {
        let list = SnapshotRequest::List;
        let take = SnapshotRequest::Take {
            disk: "root".into(),
            name: "base".into(),
        };
        let (snaps, snap) = (OPT_SCRATCHD_SNAPSHOTS, OPT_SCRATCHD_SNAPSHOT);
        let entry = (snaps, REP_SCRATCHD_SNAPSHOT, listed("base"));
        let ack = |option| (option, REP_ACK, Vec::new());
        // Too many entries: refused at the first past the bound.
        let flood: Vec<_> = std::iter::repeat_n(entry.clone(), MAX_LISTED + 1)
            .chain([ack(snaps)])
            .collect();
        // Not `expect_err`, which would print the whole listing.
        let Err(err) = snapshot_answer(&list, &flood) else {
            panic!("a listing past the bound was taken");
        };
        assert!(
            matches!(
                &err,
                Error::SnapshotAnswer {
                    source: SnapshotReplyError::TooMany,
                    ..
                }
            ),
            "{err}"
        );
        // A truncated entry, an over-long one, a name with an escape.
        let whole = listed("base");
        for bad in [
            whole[..whole.len() - 2].to_vec(),
            [whole.clone(), vec![0]].concat(),
            listed("\x1b[2J"),
        ] {
            let err = snapshot_answer(&list, &[(snaps, REP_SCRATCHD_SNAPSHOT, bad), ack(snaps)])
                .unwrap_err();
            assert!(
                matches!(
                    &err,
                    Error::SnapshotAnswer {
                        source: SnapshotReplyError::Entry(_),
                        ..
                    }
                ),
                "{err}"
            );
        }
        // A listing to a take; another reply type; a reply to another option.
        let err = snapshot_answer(&take, &[(snap, REP_SCRATCHD_SNAPSHOT, listed("x"))]);
        assert!(err.unwrap_err().to_string().contains("malformed answer"));
        let err = snapshot_answer(&take, &[(snap, REP_SERVER, vec![0, 0, 0, 0])]).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::SnapshotAnswer {
                    source: SnapshotReplyError::UnexpectedReply { .. },
                    ..
                }
            ),
            "{err}"
        );
        let err = snapshot_answer(&take, &[ack(snaps)]).unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err}");
        // A refusal whose message would drive a terminal and fill a screen.
        let mut message = b"\x1b]0;owned\x07".to_vec();
        message.extend(std::iter::repeat_n(b'x', 100_000));
        let err = snapshot_answer(&take, &[(snap, OptError::Unsup as u32, message)]).unwrap_err();
        let shown = err.to_string();
        assert!(
            !shown.contains('\x1b') && shown.contains("\\u{1b}"),
            "{shown:?}"
        );
        assert!(shown.len() < 2048, "{} bytes", shown.len());
        // A server that hangs up mid-listing.
        let err = snapshot_answer(&list, &[entry]).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn a_snapshot_to_start_from_is_named_before_go_and_a_refusal_stops() {
        let mut server = greeting(FLAG_FIXED_NEWSTYLE);
        put_option_error(&mut server, OPT_SCRATCHD_FROM, OptError::Unsup, "what?");
        let mut s = Script {
            input: io::Cursor::new(server),
            output: Vec::new(),
        };
        let err = greet(&mut s, "test", "disk")
            .and_then(|no_zeroes| {
                let want = Wanted {
                    replies: Replies::Simple,
                    block_status: false,
                    from: Some("base"),
                };
                negotiate(&mut s, "test", "disk", no_zeroes, &want)
            })
            .unwrap_err();
        assert_eq!(err.refusal(), Some(OptError::Unsup));
        let mut data = Vec::new();
        encode_from("base", &mut data);
        let from = OptionRequest::Other {
            option: OPT_SCRATCHD_FROM,
            data,
        };
        assert!(s.output.ends_with(&from.to_bytes()), "FROM was sent first");
    }

    /// The error of a negotiation that starts from snapshot "base" with a
    /// server that sends `replies` (option, type, payload) after its
    /// greeting.
    fn start_from_answer(replies: &[(u32, u32, Vec<u8>)]) -> Error {
        let mut s = scripted(greeting(FLAG_FIXED_NEWSTYLE), replies);
        let want = Wanted {
            replies: Replies::Simple,
            block_status: false,
            from: Some("base"),
        };
        let Err(err) = greet(&mut s, "test", "disk")
            .and_then(|no_zeroes| negotiate(&mut s, "test", "disk", no_zeroes, &want))
        else {
            panic!("a hostile answer to SCRATCHD_FROM was taken");
        };
        err
    }

    /// An error and its causes, as a command shows them.
    fn shown(err: &Error) -> String {
        let mut text = err.to_string();
        let mut cause = std::error::Error::source(err);
        while let Some(c) = cause {
            text = format!("{text}: {c}");
            cause = c.source();
        }
        text
    }

    /// SCRATCHD_FROM's replies go through the snapshot answers' decoder:
    /// whatever the server sends, the error says it in a short line.
    #[test]
    fn hostile_answers_to_a_start_from_are_refused_within_bounds() {
        let from = OPT_SCRATCHD_FROM;
        let huge = vec![0x1b; 1 << 20];
        let server_reply = [&[0, 0, 0, 4][..], b"\x1b[2J", &huge].concat();
        for (reply_type, data) in [(REP_SCRATCHD_SNAPSHOT, huge), (REP_SERVER, server_reply)] {
            let err = start_from_answer(&[(from, reply_type, data), (from, REP_ACK, vec![])]);
            assert!(matches!(err, Error::SnapshotAnswer { .. }), "{err:?}");
            let shown = shown(&err);
            assert!(shown.contains("to SCRATCHD_FROM"), "{shown}");
            assert!(shown.len() < 300, "{} bytes", shown.len());
        }
        // A refusal's message is shown as every refusal's: clipped, escaped.
        let message = [b"\x1b]0;owned\x07".as_slice(), &[b'x'; 100_000]].concat();
        let err = start_from_answer(&[(from, OptError::Unknown as u32, message)]);
        assert_eq!(err.refusal(), Some(OptError::Unknown));
        let shown = err.to_string();
        assert!(shown.contains("SCRATCHD_FROM") && shown.contains("\\u{1b}]0;owned"));
        assert!(!shown.contains('\x1b') && shown.len() < 2048, "{shown:?}");
        // A reply to another option; a hang-up mid-answer.
        let err = start_from_answer(&[(OPT_GO, REP_ACK, vec![])]);
        assert!(matches!(err, Error::Protocol { .. }), "{err}");
        let err = start_from_answer(&[]);
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn old_servers_get_structured_replies_and_export_name() {
        let mut server = greeting(FLAG_FIXED_NEWSTYLE);
        put_option_error(&mut server, OPT_EXTENDED_HEADERS, OptError::Unsup, "");
        reply(OPT_STRUCTURED_REPLY, OptionReplyBody::Ack, &mut server);
        put_option_error(&mut server, OPT_SET_META_CONTEXT, OptError::Unsup, "");
        put_option_error(&mut server, OPT_GO, OptError::Unsup, "");
        ExportNameReply {
            size: 1 << 20,
            flags: TransmissionFlags(1),
        }
        .encode(false, &mut server);
        let (info, sent) = run(server, Replies::Extended);
        let info = info.unwrap();
        assert_eq!(info.mode, ReplyMode::Structured);
        assert_eq!((info.size, info.base_allocation), (1 << 20, None));
        // Client flags without NO_ZEROES, which was not offered; the last
        // request is EXPORT_NAME "disk".
        assert_eq!(&sent[..4], &[0, 0, 0, 1]);
        assert!(sent.ends_with(b"IHAVEOPT\0\0\0\x01\0\0\0\x04disk"));
    }

    #[test]
    fn simple_replies_ask_for_nothing_but_go() {
        let mut server = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        reply(OPT_GO, export(4096), &mut server);
        reply(
            OPT_GO,
            OptionReplyBody::Info(InfoReply::BlockSize(BlockSize {
                min: 1,
                preferred: 4096,
                max: 1 << 20,
            })),
            &mut server,
        );
        reply(OPT_GO, OptionReplyBody::Ack, &mut server);
        let (info, sent) = run(server, Replies::Simple);
        let info = info.unwrap();
        assert_eq!(info.mode, ReplyMode::Simple);
        assert_eq!(info.max_payload(), 1 << 20);
        let go = OptionRequest::Go(InfoRequest {
            name: "disk".into(),
            info_requests: vec![INFO_BLOCK_SIZE],
        });
        assert_eq!(sent, [&[0, 0, 0, 3][..], &go.to_bytes()].concat());
    }

    #[test]
    fn refusals_name_the_export() {
        let mut server = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        reply(OPT_EXTENDED_HEADERS, OptionReplyBody::Ack, &mut server);
        reply(
            OPT_SET_META_CONTEXT,
            OptionReplyBody::MetaContext {
                id: 7,
                name: BASE_ALLOCATION.into(),
            },
            &mut server,
        );
        reply(OPT_SET_META_CONTEXT, OptionReplyBody::Ack, &mut server);
        put_option_error(&mut server, OPT_GO, OptError::Unknown, "no such export");
        let err = run(server, Replies::Extended).0.unwrap_err();
        assert_eq!(err.refusal(), Some(OptError::Unknown));
        assert!(err.to_string().contains("\"disk\""), "{err}");
        assert!(err.to_string().contains("no such export"), "{err}");
    }

    #[test]
    fn misbehaving_servers_are_reported() {
        let (r, _) = run(b"NOTNBD-AT-ALL-----".to_vec(), Replies::Simple);
        assert!(matches!(r, Err(Error::Handshake { .. })), "{r:?}");
        let (r, _) = run(greeting(0), Replies::Simple);
        assert!(matches!(r, Err(Error::Protocol { .. })), "{r:?}");
        // A reply to another option.
        let mut server = greeting(FLAG_FIXED_NEWSTYLE);
        reply(OPT_LIST, OptionReplyBody::Ack, &mut server);
        let (r, _) = run(server, Replies::Simple);
        assert!(matches!(r, Err(Error::Protocol { .. })), "{r:?}");
        // GO acknowledged without the export's size.
        let mut server = greeting(FLAG_FIXED_NEWSTYLE);
        reply(OPT_GO, OptionReplyBody::Ack, &mut server);
        let (r, _) = run(server, Replies::Simple);
        assert!(r.unwrap_err().to_string().contains("NBD_INFO_EXPORT"));
        // The server hangs up mid-handshake.
        let (r, _) = run(greeting(FLAG_FIXED_NEWSTYLE), Replies::Simple);
        match r {
            Err(Error::Io { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof)
            }
            other => panic!("{other:?}"),
        }
    }
}
