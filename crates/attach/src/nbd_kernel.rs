//! The kernel's nbd driver as an attach front end, configured over generic
//! netlink: our client negotiates N sockets, the kernel gets them with one
//! `NBD_CMD_CONNECT` and answers with the index of its `/dev/nbdN`.
//!
//! Where it applies: hosts with the `nbd` module (`modprobe nbd`; many
//! containers and VMs, and the machine this was written on, have none, and
//! fall back to [`crate::fuse`] + [`crate::loopdev`]). Unlike the old ioctl
//! interface (`NBD_SET_SOCK`, `NBD_DO_IT`), netlink needs no thread of ours
//! parked in the kernel: after `connect` returns, the kernel owns the
//! sockets and serves the device by itself.
//!
//! The wire format, from the kernel's `include/uapi/linux/nbd-netlink.h`
//! (family `"nbd"`, version 1, no family header) and the attribute policy in
//! `drivers/block/nbd.c` (`nbd_attr_policy`, `nbd_sock_policy`):
//!
//! ```text
//! NBD_CMD_CONNECT (1)
//!   NBD_ATTR_INDEX (1)              u32, optional: a given /dev/nbdN
//!   NBD_ATTR_SIZE_BYTES (2)         u64, required
//!   NBD_ATTR_BLOCK_SIZE_BYTES (3)   u64, power of two in 512..=PAGE_SIZE
//!   NBD_ATTR_TIMEOUT (4)            u64 seconds per request
//!   NBD_ATTR_SERVER_FLAGS (5)       u64: the export's transmission flags
//!   NBD_ATTR_CLIENT_FLAGS (6)       u64: NBD_CFLAG_* (include/uapi/linux/nbd.h)
//!   NBD_ATTR_SOCKETS (7)            nested, required
//!     NBD_SOCK_ITEM (1)             nested, once per socket
//!       NBD_SOCK_FD (1)             u32: a descriptor of the sending process
//!   NBD_ATTR_DEAD_CONN_TIMEOUT (8)  u64 seconds to wait for a reconnect
//! reply: NBD_CMD_CONNECT carrying NBD_ATTR_INDEX, then the ACK
//! NBD_CMD_DISCONNECT (2)            NBD_ATTR_INDEX, required
//! NBD_CMD_RECONFIGURE (3)           NBD_ATTR_INDEX, and what changes
//! NBD_CMD_LINK_DEAD (4)             multicast: a connection died
//! NBD_CMD_STATUS (5)                reply: NBD_ATTR_DEVICE_LIST (9)
//! ```
//!
//! Framing, the generic netlink header and the family lookup
//! (`CTRL_CMD_GETFAMILY`) come from the rust-netlink crates
//! (`netlink-packet-core`, `netlink-packet-generic`, `netlink-sys`); only
//! the nbd attributes above are written here.
//!
//! Choices for a throw-away disk:
//! - no `NBD_CFLAG_DESTROY_ON_DISCONNECT` (client flags 0, as nbd-client
//!   sends): the kernel would delete the device at disconnect, and the
//!   devices made at module load (`/dev/nbd0..15`) belong to the host, not
//!   to us; after sixteen runs `qemu-nbd -c` and `nbd-client` found none.
//!   A device the connect itself creates (all sixteen busy) stays too, as
//!   with nbd-client;
//! - `NBD_CFLAG_DISCONNECT_ON_CLOSE` is *not* set at connect: udev opens and
//!   closes a new device to probe it, and that close would disconnect it
//!   before we mount it. [`NbdDevice::disconnect_on_close`] sets it with
//!   `NBD_CMD_RECONFIGURE` once a mount holds the device, so that the end
//!   of the mount (even when a killed run's namespace tears it down)
//!   disconnects the device;
//! - a long `NBD_ATTR_TIMEOUT` (the caller's, see [`Config::timeout`]):
//!   without one the block layer's 30 s applies, and with several
//!   connections the kernel marks a connection dead for good whenever one
//!   of its requests is older than that (a server stalled for 30 s lost
//!   half of its connections); with one connection and no timeout, a
//!   request to a vanished server waits for ever. The kernel fails a
//!   request that is still in flight on a dead connection only when its
//!   timeout fires, so the timeout is also how long such a request waits;
//! - TCP keepalive and `TCP_USER_TIMEOUT` on the sockets
//!   ([`TCP_DEAD_AFTER`]): a server whose host vanished (no RST, no FIN)
//!   is found dead by TCP itself, the kernel's receive thread sees the
//!   error and marks the connection dead, and new I/O fails once the
//!   dead-connection timeout passes instead of waiting for the request
//!   timeout. A stopped server process is not dead to TCP: its host's
//!   kernel still acknowledges;
//! - the sockets lose the read/write timeouts of the handshake before they
//!   are handed over: the kernel's receive thread honours `SO_RCVTIMEO`,
//!   and an idle device would otherwise see its connections "time out".

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netlink_packet_core::{
    parse_string, parse_u32, parse_u64, DecodeError, DefaultNla, Emitable, NetlinkBuffer,
    NetlinkDeserializable, NetlinkMessage, NetlinkPayload, Nla, NlaBuffer, NlasIterator, Parseable,
    ParseableParametrized, NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};
use tracing::{debug, warn};

/// `NBD_GENL_FAMILY_NAME` and `NBD_GENL_VERSION` (nbd-netlink.h).
pub const FAMILY_NAME: &str = "nbd";
pub const FAMILY_VERSION: u8 = 1;

/// Commands: the `NBD_CMD_*` enum of nbd-netlink.h (not the NBD protocol's
/// request types, which share the prefix).
pub mod cmd {
    pub const CONNECT: u8 = 1;
    pub const DISCONNECT: u8 = 2;
    pub const RECONFIGURE: u8 = 3;
    pub const LINK_DEAD: u8 = 4;
    pub const STATUS: u8 = 5;
}

/// Top-level attributes: the `NBD_ATTR_*` enum of nbd-netlink.h.
pub mod attr {
    pub const INDEX: u16 = 1;
    pub const SIZE_BYTES: u16 = 2;
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    pub const TIMEOUT: u16 = 4;
    pub const SERVER_FLAGS: u16 = 5;
    pub const CLIENT_FLAGS: u16 = 6;
    pub const SOCKETS: u16 = 7;
    pub const DEAD_CONN_TIMEOUT: u16 = 8;
    pub const DEVICE_LIST: u16 = 9;
    pub const BACKEND_IDENTIFIER: u16 = 10;
    /// `NBD_SOCK_ITEM`, inside [`SOCKETS`].
    pub const SOCK_ITEM: u16 = 1;
    /// `NBD_SOCK_FD`, inside [`SOCK_ITEM`].
    pub const SOCK_FD: u16 = 1;
}

/// `NBD_CFLAG_*` of include/uapi/linux/nbd.h.
pub mod client_flags {
    /// Delete the device when it is disconnected.
    pub const DESTROY_ON_DISCONNECT: u64 = 1 << 0;
    /// Disconnect the device when its last opener closes it.
    pub const DISCONNECT_ON_CLOSE: u64 = 1 << 1;
}

/// How long a TCP connection to the server may go without an answer
/// (unacknowledged data, or unanswered keepalive probes on an idle one)
/// before TCP gives it up: `TCP_USER_TIMEOUT`, with keepalive probes from
/// [`TCP_KEEPIDLE`] of silence every [`TCP_KEEPINTVL`].
pub const TCP_DEAD_AFTER: Duration = Duration::from_secs(30);
/// Silence before the first keepalive probe.
pub const TCP_KEEPIDLE: Duration = Duration::from_secs(10);
/// Between keepalive probes.
pub const TCP_KEEPINTVL: Duration = Duration::from_secs(5);

/// How long to wait for the kernel's answer to one request: it answers at
/// once, unless a device of the same index is still being destroyed.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the kernel's nbd driver could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(
        "the kernel has no nbd driver (no \"nbd\" generic netlink family): \
         load it with `modprobe nbd`, or use --attach fuse"
    )]
    NoModule,
    #[error(
        "the kernel's nbd driver refused {command}: permission denied \
         (needs root or CAP_SYS_ADMIN)"
    )]
    Permission { command: &'static str },
    #[error("the kernel's nbd driver refused {command}: {source}")]
    Refused {
        command: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot talk to the kernel over generic netlink: {0}")]
    Netlink(#[source] io::Error),
    #[error("the kernel did not answer {command} within {REPLY_TIMEOUT:?}")]
    Timeout { command: &'static str },
    #[error("malformed netlink message from the kernel: {0}")]
    Malformed(String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "/dev/nbd{index}: {running} of the kernel's {connections} receive works run after \
         {waited:?}: requests on the others would go unanswered"
    )]
    ReceiversStarved {
        index: u32,
        running: usize,
        connections: usize,
        waited: Duration,
    },
}

/// One attribute of an nbd message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAttr {
    Index(u32),
    SizeBytes(u64),
    BlockSizeBytes(u64),
    /// Seconds.
    Timeout(u64),
    ServerFlags(u64),
    ClientFlags(u64),
    /// Descriptors, each in its own `NBD_SOCK_ITEM`.
    Sockets(Vec<u32>),
    /// Seconds.
    DeadConnTimeout(u64),
    /// Sent NUL-terminated (`NLA_STRING`).
    BackendIdentifier(String),
    /// Anything else, kept as it came (`NBD_ATTR_DEVICE_LIST`, ...).
    Other(DefaultNla),
}

impl Nla for NbdAttr {
    fn value_len(&self) -> usize {
        match self {
            NbdAttr::Index(_) => 4,
            NbdAttr::SizeBytes(_)
            | NbdAttr::BlockSizeBytes(_)
            | NbdAttr::Timeout(_)
            | NbdAttr::ServerFlags(_)
            | NbdAttr::ClientFlags(_)
            | NbdAttr::DeadConnTimeout(_) => 8,
            NbdAttr::Sockets(fds) => sock_items(fds).as_slice().buffer_len(),
            NbdAttr::BackendIdentifier(s) => s.len() + 1,
            NbdAttr::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            NbdAttr::Index(_) => attr::INDEX,
            NbdAttr::SizeBytes(_) => attr::SIZE_BYTES,
            NbdAttr::BlockSizeBytes(_) => attr::BLOCK_SIZE_BYTES,
            NbdAttr::Timeout(_) => attr::TIMEOUT,
            NbdAttr::ServerFlags(_) => attr::SERVER_FLAGS,
            NbdAttr::ClientFlags(_) => attr::CLIENT_FLAGS,
            NbdAttr::Sockets(_) => attr::SOCKETS | NLA_F_NESTED,
            NbdAttr::DeadConnTimeout(_) => attr::DEAD_CONN_TIMEOUT,
            NbdAttr::BackendIdentifier(_) => attr::BACKEND_IDENTIFIER,
            NbdAttr::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            NbdAttr::Index(v) => buffer[..4].copy_from_slice(&v.to_ne_bytes()),
            NbdAttr::SizeBytes(v)
            | NbdAttr::BlockSizeBytes(v)
            | NbdAttr::Timeout(v)
            | NbdAttr::ServerFlags(v)
            | NbdAttr::ClientFlags(v)
            | NbdAttr::DeadConnTimeout(v) => buffer[..8].copy_from_slice(&v.to_ne_bytes()),
            NbdAttr::Sockets(fds) => sock_items(fds).as_slice().emit(buffer),
            NbdAttr::BackendIdentifier(s) => {
                buffer[..s.len()].copy_from_slice(s.as_bytes());
                buffer[s.len()] = 0;
            }
            NbdAttr::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for NbdAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let value = buf.value();
        Ok(match buf.kind() {
            attr::INDEX => NbdAttr::Index(parse_u32(value)?),
            attr::SIZE_BYTES => NbdAttr::SizeBytes(parse_u64(value)?),
            attr::BLOCK_SIZE_BYTES => NbdAttr::BlockSizeBytes(parse_u64(value)?),
            attr::TIMEOUT => NbdAttr::Timeout(parse_u64(value)?),
            attr::SERVER_FLAGS => NbdAttr::ServerFlags(parse_u64(value)?),
            attr::CLIENT_FLAGS => NbdAttr::ClientFlags(parse_u64(value)?),
            attr::DEAD_CONN_TIMEOUT => NbdAttr::DeadConnTimeout(parse_u64(value)?),
            attr::SOCKETS => NbdAttr::Sockets(parse_sockets(value)?),
            attr::BACKEND_IDENTIFIER => NbdAttr::BackendIdentifier(parse_string(value)?),
            _ => NbdAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// `NBD_SOCK_ITEM { NBD_SOCK_FD }` for one descriptor.
struct SockItem(u32);

impl Nla for SockItem {
    fn value_len(&self) -> usize {
        SockFd(self.0).buffer_len()
    }
    fn kind(&self) -> u16 {
        attr::SOCK_ITEM | NLA_F_NESTED
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        SockFd(self.0).emit(buffer)
    }
}

/// `NBD_SOCK_FD`: a u32 (`nbd_sock_policy`).
struct SockFd(u32);

impl Nla for SockFd {
    fn value_len(&self) -> usize {
        4
    }
    fn kind(&self) -> u16 {
        attr::SOCK_FD
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        buffer[..4].copy_from_slice(&self.0.to_ne_bytes())
    }
}

fn sock_items(fds: &[u32]) -> Vec<SockItem> {
    fds.iter().copied().map(SockItem).collect()
}

/// The descriptors of a nested `NBD_ATTR_SOCKETS`.
fn parse_sockets(value: &[u8]) -> Result<Vec<u32>, DecodeError> {
    let mut fds = Vec::new();
    for item in NlasIterator::new(value) {
        let item = item?;
        if item.kind() != attr::SOCK_ITEM {
            return Err(format!("socket list holds attribute {}", item.kind()).into());
        }
        for inner in NlasIterator::new(item.value()) {
            let inner = inner?;
            if inner.kind() == attr::SOCK_FD {
                fds.push(parse_u32(inner.value())?);
            }
        }
    }
    Ok(fds)
}

/// A message of the nbd family: a command and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdMessage {
    pub cmd: u8,
    pub attrs: Vec<NbdAttr>,
}

impl NbdMessage {
    /// `NBD_CMD_DISCONNECT` of `/dev/nbd<index>`.
    pub fn disconnect(index: u32) -> NbdMessage {
        NbdMessage {
            cmd: cmd::DISCONNECT,
            attrs: vec![NbdAttr::Index(index)],
        }
    }

    /// The `NBD_ATTR_INDEX` this message carries.
    pub fn index(&self) -> Option<u32> {
        self.attrs.iter().find_map(|a| match a {
            NbdAttr::Index(i) => Some(*i),
            _ => None,
        })
    }
}

impl GenlFamily for NbdMessage {
    fn family_name() -> &'static str {
        FAMILY_NAME
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        FAMILY_VERSION
    }
}

impl Emitable for NbdMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NbdMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|nla| NbdAttr::parse(&nla)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NbdMessage {
            cmd: header.cmd,
            attrs,
        })
    }
}

/// What `NBD_CMD_CONNECT` asks for, besides the sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// A given `/dev/nbdN`, or `None` for the first free one.
    pub index: Option<u32>,
    /// The export's size in bytes.
    pub size: u64,
    /// The device's logical block size (see [`choose_block_size`]).
    pub block_size: u32,
    /// The export's transmission flags, as the handshake gave them: the
    /// kernel reads read-only, flush, FUA, trim and multi-conn from them
    /// (it never sends write-zeroes).
    pub server_flags: u16,
    /// Per-request timeout (`NBD_ATTR_TIMEOUT`): a request older than this
    /// marks its connection dead and is retried on another, or fails once
    /// none is left and the dead-connection timeout passes. `None`: the
    /// kernel's default, the block layer's 30 s (see the module docs for
    /// why that is too short).
    pub timeout: Option<Duration>,
    /// How long I/O waits for a reconnect (`NBD_CMD_RECONFIGURE` with new
    /// sockets) when every connection is dead; zero: fail it at once.
    pub dead_conn_timeout: Duration,
    /// `NBD_ATTR_BACKEND_IDENTIFIER` (Linux 5.18 and later show it in
    /// `/sys/block/nbdN/backend`; older kernels ignore it): tells our
    /// device from another's before a disconnect by index.
    pub backend: Option<String>,
}

impl Config {
    /// The `NBD_CMD_CONNECT` message for these settings and `sockets`
    /// (descriptors of the sending process); no client flags (see the
    /// module docs).
    pub fn message(&self, sockets: &[u32]) -> NbdMessage {
        let mut attrs = Vec::with_capacity(9);
        if let Some(index) = self.index {
            attrs.push(NbdAttr::Index(index));
        }
        attrs.push(NbdAttr::SizeBytes(self.size));
        attrs.push(NbdAttr::BlockSizeBytes(u64::from(self.block_size)));
        if let Some(t) = self.timeout {
            attrs.push(NbdAttr::Timeout(t.as_secs().max(1)));
        }
        attrs.push(NbdAttr::ServerFlags(u64::from(self.server_flags)));
        // Explicitly none: also clears a destroy-on-disconnect left on a
        // reused device by an older scratchd.
        attrs.push(NbdAttr::ClientFlags(0));
        if !self.dead_conn_timeout.is_zero() {
            attrs.push(NbdAttr::DeadConnTimeout(
                self.dead_conn_timeout.as_secs().max(1),
            ));
        }
        attrs.push(NbdAttr::Sockets(sockets.to_vec()));
        if let Some(backend) = &self.backend {
            attrs.push(NbdAttr::BackendIdentifier(backend.clone()));
        }
        NbdMessage {
            cmd: cmd::CONNECT,
            attrs,
        }
    }
}

/// A whole netlink request: header (with `family`, the id the controller
/// gave "nbd", and `seq`), generic netlink header, attributes.
pub fn encode(message: NbdMessage, family: u16, seq: u32) -> Vec<u8> {
    let mut genl = GenlMessage::from_payload(message);
    genl.set_resolved_family_id(family);
    encode_request(genl, seq)
}

fn encode_request<F>(genl: GenlMessage<F>, seq: u32) -> Vec<u8>
where
    F: GenlFamily + Emitable + std::fmt::Debug,
{
    let mut message = NetlinkMessage::from(genl);
    message.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    message.header.sequence_number = seq;
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// The answer to one request, read from one datagram's worth of messages.
#[derive(Debug, PartialEq, Eq)]
enum NetlinkAnswer<F> {
    /// Messages of the family, then the ACK.
    Done(Vec<F>),
    /// `NLMSG_ERROR` with this errno.
    Errno(i32),
    /// Not yet complete: read on (the messages so far are kept).
    More(Vec<F>),
}

/// Parses the netlink messages in `buf` that answer request `seq`;
/// messages of other sequence numbers (stale answers) are skipped.
fn parse_answer<F>(buf: &[u8], seq: u32) -> Result<NetlinkAnswer<F>, Error>
where
    GenlMessage<F>: NetlinkDeserializable,
    <GenlMessage<F> as NetlinkDeserializable>::Error: std::fmt::Display,
{
    let mut replies = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let frame =
            NetlinkBuffer::new_checked(rest).map_err(|e| Error::Malformed(e.to_string()))?;
        let len = frame.length() as usize;
        let message = NetlinkMessage::<GenlMessage<F>>::deserialize(&rest[..len])
            .map_err(|e| Error::Malformed(e.to_string()))?;
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        if message.header.sequence_number != seq {
            continue;
        }
        match message.payload {
            NetlinkPayload::InnerMessage(genl) => replies.push(genl.payload),
            NetlinkPayload::Error(e) => match e.code {
                Some(code) => return Ok(NetlinkAnswer::Errno(code.get().saturating_abs())),
                None => return Ok(NetlinkAnswer::Done(replies)),
            },
            NetlinkPayload::Done(_) => return Ok(NetlinkAnswer::Done(replies)),
            _ => {}
        }
    }
    Ok(NetlinkAnswer::More(replies))
}

/// A generic netlink socket that sends one request at a time and waits for
/// its answer.
struct Genl {
    socket: Socket,
    seq: u32,
}

impl Genl {
    fn open() -> Result<Genl, Error> {
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(Error::Netlink)?;
        socket.bind_auto().map_err(Error::Netlink)?;
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Recv,
            Some(REPLY_TIMEOUT),
        )
        .map_err(|e| Error::Netlink(e.into()))?;
        Ok(Genl { socket, seq: 0 })
    }

    /// Sends `request` (built by `encode` with the sequence number given to
    /// it) and returns the family's messages in the answer, or the errno.
    fn call<F>(
        &mut self,
        command: &'static str,
        request: impl FnOnce(u32) -> Vec<u8>,
    ) -> Result<Result<Vec<F>, i32>, Error>
    where
        GenlMessage<F>: NetlinkDeserializable,
        <GenlMessage<F> as NetlinkDeserializable>::Error: std::fmt::Display,
    {
        self.seq = self.seq.wrapping_add(1);
        let bytes = request(self.seq);
        let kernel = SocketAddr::new(0, 0);
        self.socket
            .send_to(&bytes, &kernel, 0)
            .map_err(Error::Netlink)?;
        let mut replies = Vec::new();
        loop {
            let (buf, _) = self.socket.recv_from_full().map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout { command },
                _ => Error::Netlink(e),
            })?;
            match parse_answer::<F>(&buf, self.seq)? {
                NetlinkAnswer::Done(mut more) => {
                    replies.append(&mut more);
                    return Ok(Ok(replies));
                }
                NetlinkAnswer::Errno(errno) => return Ok(Err(errno)),
                NetlinkAnswer::More(mut more) => replies.append(&mut more),
            }
        }
    }

    /// The id the generic netlink controller gave the nbd family.
    fn resolve_nbd(&mut self) -> Result<u16, Error> {
        let answer = self.call::<GenlCtrl>("CTRL_CMD_GETFAMILY", |seq| {
            encode_request(
                GenlMessage::from_payload(GenlCtrl {
                    cmd: GenlCtrlCmd::GetFamily,
                    nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY_NAME.to_owned())],
                }),
                seq,
            )
        })?;
        match answer {
            Ok(replies) => replies
                .iter()
                .flat_map(|r| &r.nlas)
                .find_map(|a| match a {
                    GenlCtrlAttrs::FamilyId(id) => Some(*id),
                    _ => None,
                })
                .ok_or_else(|| Error::Malformed("family reply without an id".to_owned())),
            Err(libc::ENOENT) => Err(Error::NoModule),
            Err(errno) => Err(Error::Refused {
                command: "CTRL_CMD_GETFAMILY",
                source: io::Error::from_raw_os_error(errno),
            }),
        }
    }

    /// Sends an nbd command; returns the messages of its answer.
    fn nbd(
        &mut self,
        family: u16,
        command: &'static str,
        message: NbdMessage,
    ) -> Result<Vec<NbdMessage>, Error> {
        match self.call::<NbdMessage>(command, |seq| encode(message, family, seq))? {
            Ok(replies) => Ok(replies),
            Err(libc::EPERM) | Err(libc::EACCES) => Err(Error::Permission { command }),
            Err(errno) => Err(Error::Refused {
                command,
                source: io::Error::from_raw_os_error(errno),
            }),
        }
    }
}

/// Whether the kernel's nbd driver can be used: its generic netlink family
/// resolves, or the module is loaded (`/sys/module/nbd`). From Linux 6.5
/// on, asking for the family loads the module when it is absent (the
/// module's `net-pf-16-proto-16-family-nbd` alias): there, a host with the
/// module installed always has it.
pub fn kernel_nbd_available() -> bool {
    match Genl::open().and_then(|mut g| g.resolve_nbd()) {
        Ok(_) => true,
        Err(e) => {
            debug!(error = %e, "no nbd generic netlink family");
            Path::new("/sys/module/nbd").exists()
        }
    }
}

/// The device's logical block size for an export with these constraints
/// (`(min, max)`; `None`: the server gave none): the largest power of two
/// from 512 up to `largest` (at most 4096, the page size the kernel's
/// limit is assumed to be) that the export allows.
pub fn choose_block_size(constraints: Option<(u32, u32)>, largest: u32) -> Result<u32, Error> {
    let (min, max) = constraints.unwrap_or((1, 0));
    let max = if max == 0 { u32::MAX } else { max };
    [4096, 2048, 1024, 512]
        .into_iter()
        .find(|&b| b <= largest && b >= min && b <= max)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "the export's block sizes ({min} to {max} bytes) do not fit the kernel's \
                 (512 to {}); use --attach fuse",
                largest.clamp(512, 4096)
            ))
        })
}

/// Hands the negotiated sockets `fds` to the kernel's nbd driver: one
/// `NBD_CMD_CONNECT` with every socket and `config`.
///
/// The kernel holds its own references to the sockets: ours are closed
/// when this returns, whatever the outcome.
pub fn connect(fds: Vec<OwnedFd>, config: &Config) -> Result<NbdDevice, Error> {
    if fds.is_empty() {
        return Err(Error::Invalid("no socket to hand to the kernel".to_owned()));
    }
    if !config.block_size.is_power_of_two() || config.block_size < 512 {
        return Err(Error::Invalid(format!("block size {}", config.block_size)));
    }
    // The kernel refuses it too (EINVAL), saying nothing of why.
    if !config.size.is_multiple_of(u64::from(config.block_size)) {
        return Err(Error::Invalid(format!(
            "the export's size ({} bytes) is not a multiple of the device's block size \
             ({} bytes), which the kernel's nbd driver needs; use --attach fuse",
            config.size, config.block_size
        )));
    }
    let mut genl = Genl::open()?;
    let family = genl.resolve_nbd()?;
    let mut sockets = Vec::with_capacity(fds.len());
    for fd in &fds {
        // The kernel's receive thread would honour the handshake's
        // timeouts (see the module docs).
        prepare_socket(fd.as_fd())
            .map_err(|e| Error::Invalid(format!("cannot prepare a socket: {e}")))?;
        let raw = u32::try_from(fd.as_raw_fd())
            .map_err(|_| Error::Invalid(format!("descriptor {}", fd.as_raw_fd())))?;
        sockets.push(raw);
    }
    let replies = genl.nbd(family, "NBD_CMD_CONNECT", config.message(&sockets))?;
    drop(fds);
    let index = replies
        .iter()
        .find_map(NbdMessage::index)
        .ok_or_else(|| Error::Malformed("connect reply without NBD_ATTR_INDEX".to_owned()))?;
    debug!(index, "kernel nbd device connected");
    Ok(NbdDevice {
        index,
        family,
        backend: config.backend.clone(),
        connected: true,
        on_close: false,
    })
}

/// Readies a negotiated socket for the kernel: no handshake timeouts (the
/// kernel's receive thread would honour them), and on TCP keepalive and
/// `TCP_USER_TIMEOUT` (see [`TCP_DEAD_AFTER`]).
fn prepare_socket(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use rustix::net::{sockopt, AddressFamily};
    for which in [sockopt::Timeout::Recv, sockopt::Timeout::Send] {
        sockopt::set_socket_timeout(fd, which, None)?;
    }
    let domain = sockopt::socket_domain(fd)?;
    if domain != AddressFamily::INET && domain != AddressFamily::INET6 {
        return Ok(());
    }
    sockopt::set_socket_keepalive(fd, true)?;
    sockopt::set_tcp_keepidle(fd, TCP_KEEPIDLE)?;
    sockopt::set_tcp_keepintvl(fd, TCP_KEEPINTVL)?;
    // With TCP_USER_TIMEOUT set, it decides when unanswered probes kill
    // the connection; the count only has to be large enough not to first.
    sockopt::set_tcp_keepcnt(fd, 10)?;
    let millis = u32::try_from(TCP_DEAD_AFTER.as_millis()).unwrap_or(u32::MAX);
    sockopt::set_tcp_user_timeout(fd, millis)?;
    Ok(())
}

/// Waits until each of `/dev/nbd<index>`'s `connections` sockets has a
/// running receive work, for at most `limit`.
///
/// Why: the driver reads each socket's replies in a work item that runs as
/// long as the connection, queued on the device's `nbdN-recv` workqueue
/// when it connects (`nbd_start_device`, drivers/block/nbd.c). That
/// workqueue has a rescuer (`WQ_MEM_RECLAIM`), and when the system cannot
/// start a worker within 10 ms (a loaded host) the rescuer takes every
/// work item still queued and runs them one after the other
/// (`rescuer_thread`, kernel/workqueue.c): the first receive work never
/// ends, so the sockets of the others are never read. Their requests then
/// wait for the request timeout, and the driver retries them on another
/// connection. Seen under TCG on a loaded 2-core host, in the nbd driver's
/// trace: a request sent whole and answered by the server at once, its
/// reply read only 120 s later.
///
/// A running work shows in its thread's name (see [`Receivers::among`]).
/// The rescuer running one while fewer than `connections` run is starvation
/// for sure, and is reported at once; otherwise the works may only be slow
/// to start, and get until `limit`.
///
/// In a PID namespace of its own (a container) the kernel's threads are
/// not in `/proc`: nothing can be checked there, and it returns at once
/// rather than count nothing for `limit` and fall back to one connection.
pub fn wait_for_receivers(index: u32, connections: usize, limit: Duration) -> Result<(), Error> {
    // A lone receive work has no other to wait behind.
    if connections <= 1 {
        return Ok(());
    }
    let kthreadd = std::fs::read_to_string("/proc/2/comm").ok();
    if !shows_kernel_threads(kthreadd.as_deref()) {
        debug!(
            index,
            "the kernel's threads are not in /proc: receive works not checked"
        );
        return Ok(());
    }
    let started = Instant::now();
    loop {
        let receivers = Receivers::now(index);
        if receivers.running >= connections {
            return Ok(());
        }
        // The rescuer running one while some never started: it took them
        // all, and the rest wait behind the one that never ends.
        let waited = started.elapsed();
        if receivers.rescuer || waited >= limit {
            return Err(Error::ReceiversStarved {
                index,
                running: receivers.running,
                connections,
                waited,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether this `/proc` shows the kernel's threads: given the name of PID
/// 2, which is the kernel's thread creator (`kthreadd`) in the first PID
/// namespace and something else, or nothing, in any other.
fn shows_kernel_threads(pid_2_name: Option<&str>) -> bool {
    pid_2_name.is_some_and(|name| name.trim_end() == "kthreadd")
}

/// Whether `/proc/PID/stat` is a kernel thread's: `PF_KTHREAD`
/// (include/linux/sched.h) in its flags, the ninth field, which no process
/// can set for itself. The name (second field, in parentheses) may hold
/// spaces and parentheses: the fields are counted after its last `)`.
fn is_kernel_thread(stat: &str) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(6))
        .and_then(|flags| flags.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// The threads running a receive work of one device.
#[derive(Debug, Default, PartialEq, Eq)]
struct Receivers {
    running: usize,
    /// Whether the workqueue's rescuer is one of them.
    rescuer: bool,
}

impl Receivers {
    /// `/dev/nbd<index>`'s, from every thread's name in `/proc`.
    fn now(index: u32) -> Receivers {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Receivers::default();
        };
        let names = entries
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            // Any process may name itself like a worker (PR_SET_NAME):
            // only kernel threads count.
            .filter(|e| {
                std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| is_kernel_thread(&s))
            })
            .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok());
        Receivers::among(names, index)
    }

    /// From thread names (`/proc/PID/comm`): a workqueue worker running a
    /// work item shows `+` and the workqueue's name after its own,
    /// `kworker/u5:1+nbd0-recv`; the rescuer's own name is the workqueue's,
    /// `nbd0-recv` (`kworker/R-nbd0-recv` from Linux 6.9).
    fn among(names: impl Iterator<Item = String>, index: u32) -> Receivers {
        let queue = format!("nbd{index}-recv");
        let mut receivers = Receivers::default();
        for name in names {
            let Some((thread, work)) = name.trim_end().split_once('+') else {
                continue;
            };
            if work != queue {
                continue;
            }
            receivers.running += 1;
            let rescuer = thread.strip_prefix("kworker/R-").unwrap_or(thread) == queue;
            receivers.rescuer |= rescuer;
        }
        receivers
    }
}

/// `NBD_CMD_DISCONNECT` of `/dev/nbd<index>`: the kernel sends the server
/// `NBD_CMD_DISC` and fails what is in flight; the device stays, free.
pub fn disconnect(index: u32) -> Result<(), Error> {
    let mut genl = Genl::open()?;
    let family = genl.resolve_nbd()?;
    genl.nbd(family, "NBD_CMD_DISCONNECT", NbdMessage::disconnect(index))
        .map(drop)
}

/// The backend identifier of `/dev/nbd<index>`, where the kernel shows it.
pub fn backend_of(index: u32) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/backend"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// A `/dev/nbdN` configured by [`connect`]; disconnected on drop.
#[derive(Debug)]
pub struct NbdDevice {
    index: u32,
    /// The nbd family's id, resolved at connect.
    family: u16,
    /// The identifier given at connect, to check the index is still ours.
    backend: Option<String>,
    /// Whether drop still has to disconnect.
    connected: bool,
    /// Whether the kernel disconnects it by itself when it is closed (after
    /// [`NbdDevice::disconnect_on_close`]).
    on_close: bool,
}

impl NbdDevice {
    pub fn index(&self) -> u32 {
        self.index
    }

    /// `/dev/nbd<index>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{}", self.index))
    }

    /// Makes the kernel disconnect the device when its last opener closes
    /// it (`NBD_CMD_RECONFIGURE` with `NBD_CFLAG_DISCONNECT_ON_CLOSE`): call
    /// it once a mount holds the device, so that the mount's end, even in a
    /// killed process's namespace, disconnects it.
    pub fn disconnect_on_close(&mut self) -> Result<(), Error> {
        let mut genl = Genl::open()?;
        let mut attrs = vec![
            NbdAttr::Index(self.index),
            NbdAttr::ClientFlags(client_flags::DISCONNECT_ON_CLOSE),
        ];
        // A device with a backend identifier refuses a reconfigure without it.
        if let Some(backend) = &self.backend {
            attrs.push(NbdAttr::BackendIdentifier(backend.clone()));
        }
        let message = NbdMessage {
            cmd: cmd::RECONFIGURE,
            attrs,
        };
        genl.nbd(self.family, "NBD_CMD_RECONFIGURE", message)?;
        self.on_close = true;
        Ok(())
    }

    /// Disconnects now, unless the index no longer names our device: once
    /// the kernel may have disconnected and destroyed it by itself (see
    /// [`NbdDevice::disconnect_on_close`]), another process may have been
    /// given the same index.
    pub fn disconnect(mut self) -> Result<(), Error> {
        self.connected = false;
        self.disconnect_if_ours()
    }

    fn disconnect_if_ours(&self) -> Result<(), Error> {
        let ours = match (backend_of(self.index), &self.backend) {
            (Some(shown), Some(ours)) => shown == *ours,
            // No identifier shown: an older kernel, or the device is gone.
            _ => !self.on_close,
        };
        if !ours {
            debug!(index = self.index, "nbd device already gone");
            return Ok(());
        }
        disconnect(self.index)
    }

    /// Leaves the device connected (for a caller that detaches it later
    /// with [`disconnect`]); returns its index.
    pub fn keep(mut self) -> u32 {
        self.connected = false;
        self.index
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        if self.connected {
            self.connected = false;
            if let Err(e) = self.disconnect_if_ours() {
                warn!(index = self.index, error = %e, "cannot disconnect nbd device");
            }
        }
    }
}

#[cfg(test)]
mod tests;
