//! The NBD wire protocol, without any I/O.
//!
//! Everything here turns bytes into typed values and back, and decides what a
//! server answers; sockets, threads and storage live in other crates. That
//! keeps every rule of the protocol testable with plain byte slices (and
//! fuzzable), and lets the same code serve Unix, TCP, TLS and stdio streams.
//!
//! Layout, in the order a connection uses them:
//! - [`codec`]: bounded big-endian reader and writer helpers.
//! - [`handshake`]: greeting, client flags, option request/reply framing.
//! - [`negotiation`]: the option-haggling state machine (LIST, INFO, GO,
//!   STRUCTURED_REPLY, EXTENDED_HEADERS, meta contexts, ...).
//! - [`request`]: transmission request headers and their validation.
//! - [`reply`]: simple, structured and extended reply encoding.
//! - [`consts`]: magic numbers, flags and error codes from the spec.

pub mod codec;
pub mod consts;
pub mod handshake;
pub mod negotiation;
pub mod reply;
pub mod request;

pub use consts::{Errno, TransmissionFlags};
