//! The NBD wire protocol, without any I/O.
//!
//! Everything here turns bytes into typed values and back, and decides what a
//! server answers; sockets, threads and storage live in other crates. That
//! keeps every rule of the protocol testable with plain byte slices (and
//! fuzzable), and lets the same code serve Unix, TCP, TLS and stdio streams.
//!
//! Both directions are first-class: every wire type can be encoded and
//! decoded, so a client can be built on the same types as the server. All
//! decoding goes through one bounded reader, [`codec::Reader`]: lengths are
//! checked before anything is read, nested messages are bounded by their
//! declared length, and trailing bytes are refused, so no input can make
//! decoding panic or misread a neighbouring message.
//!
//! Layout, in the order a connection uses them:
//! - [`codec`]: the bounded reader, the [`Codec`] trait, big-endian
//!   writer helpers, and the string limit (`clip`, `lossy`).
//! - [`session`]: what both sides agree on and every phase uses: the
//!   export's description, block sizes, the reply mode, the session.
//! - [`handshake`]: greeting, client flags, option request/reply framing,
//!   the EXPORT_NAME reply.
//! - [`options`]: option payloads: INFO/GO and meta-context requests, the
//!   option request a client sends, and every option reply (errors too).
//! - [`negotiation`]: the server's option-haggling state machine (LIST, INFO,
//!   GO, STRUCTURED_REPLY, EXTENDED_HEADERS, meta contexts, ...).
//! - [`snapshots`]: scratchd's own options (snapshots, disks that start
//!   as one), beside the spec's.
//! - [`request`]: transmission request headers and their validation.
//! - [`reply`]: simple, structured and extended replies and chunk payloads.
//! - [`consts`]: magic numbers, flags and error codes from the spec.

#![forbid(unsafe_code)]

pub mod codec;
pub mod consts;
pub mod handshake;
pub mod negotiation;
pub mod options;
pub mod reply;
pub mod request;
pub mod session;
pub mod snapshots;

pub use codec::{Codec, DecodeError, Reader};
pub use consts::{Errno, TransmissionFlags};
