//! scratchd's NBD client: an export on any NBD server (scratchd, nbdkit,
//! qemu-nbd, nbd-server) as a [`BlockDevice`], for the front ends that put
//! a disk in front of a build (FUSE, the kernel's nbd driver) and for a
//! future proxy backend.
//!
//! It is built on `scratchd_proto`, the codec the server uses, in its other
//! role: option requests and transmission requests are encoded, option
//! replies and reply chunks decoded with the same types.
//!
//! ```no_run
//! use scratchd_client::{BlockDevice, Client, Options, Target};
//!
//! let target = Target::parse("nbd+unix:///build-1?socket=/run/scratchd.sock")?;
//! let client = Client::connect_with(&target, &Options { connections: 4, ..Options::default() })?;
//! client.write(0, b"hello", false)?;
//! let mut buf = [0; 5];
//! client.read(0, &mut buf)?;
//! client.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Layout:
//! - [`uri`]: [`Target`], parsed from `nbd://` and `nbd+unix://` URIs.
//! - [`tls`]: STARTTLS and rustls sessions for `nbds://` targets.
//! - [`transport`]: Unix and TCP streams, split for transmission (where
//!   TLS will slot in).
//! - [`handshake`]: the fixed-newstyle negotiation: extended headers or
//!   structured replies, `base:allocation`, GO with block sizes.
//! - [`connection`]: one connection in transmission: requests from many
//!   threads, a reply thread dispatching by cookie, a bound on requests in
//!   flight, every waiter failed when the connection breaks.
//! - [`client`]: [`Client`]: multi-conn, splitting, the [`BlockDevice`]
//!   implementation.
//! - [`write_behind`]: [`WriteBehind`]: writes acknowledged once sent,
//!   within a bounded window, their errors latched.
//! - [`error`]: [`Error`] for connecting, errno mapping for requests.
//!
//! `docs/CLIENT.md` describes the design at more length.

#![forbid(unsafe_code)]

pub mod client;
pub mod connection;
pub mod error;
pub mod handshake;
pub mod tls;
pub mod transport;
pub mod uri;
pub mod write_behind;

pub use client::{snapshot_request, Client, Handshaken, Options};
pub use error::{errno, nbd_error, Error, Lost};
pub use handshake::{ExportInfo, Replies};
pub use scratchd_proto::negotiation::{BlockSize, ReplyMode};
pub use scratchd_proto::snapshots::{SnapshotAnswer, SnapshotEntry, SnapshotRequest};
pub use scratchd_store::{BlockDevice, Capabilities, Extent, ExtentKind, ZeroFlags};
pub use transport::Stream;
pub use uri::{Address, Target, UriError};
pub use write_behind::{Window, WriteBehind};
