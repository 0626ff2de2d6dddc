//! scratchd's NBD server: everything between a socket and a storage backend.
//!
//! Layout:
//! - [`export`]: the export registry (names → disks) seen by connections.
//! - [`identity`]: who a connection's peer is (Unix credentials, later TLS
//!   certificates), for ownership of exports.
//! - [`transport`]: the byte streams a connection runs over (Unix, TCP, stdio).
//! - [`listener`]: listening sockets, socket activation, accept loops,
//!   connection limits.
//! - [`access`]: who may connect over TCP: `--allow` ranges, connections
//!   per peer address.
//! - [`busy_poll`]: spinning briefly for a client's next request before
//!   sleeping, where requests come quickly.
//! - [`connection`]: one client: the handshake, then the transmission loop.
//! - [`deadline`]: the whole-handshake deadline, one watchdog thread for
//!   every connection still in its handshake.
//! - [`error`]: [`ConnectionError`], why a connection ended, for the
//!   counters and the log.
//! - [`input`]: the connection's input buffer, requests parsed in place.
//! - [`replies`]: where a connection's replies leave, and how much may
//!   wait to leave (the in-flight and byte budgets, the flusher).
//! - [`counters`]: event counters for the metrics (errors by errno, for
//!   the server and per export; handshake failures, TLS handshakes), owned
//!   by the server instance ([`ServerContext::counters`]).
//! - [`executor`]: runs a validated request against a backend and encodes
//!   its reply.
//! - [`shutdown`]: graceful stop: end reading everywhere, finish in-flight
//!   requests, wait for connections to close.
//! - [`tls`]: STARTTLS with rustls: certificates, the shared session
//!   behind a connection's two halves.
//! - [`workers`]: the thread pool that runs requests for backends that may
//!   block, so a slow request never holds up fast ones.
//!
//! The unit tests of the connection loop, the reply queue and the executor
//! share `testing` (tests only): a client speaking raw NBD bytes over a
//! socket pair, and a device that can block, fail or hold calls.

pub mod access;
pub mod busy_poll;
pub mod connection;
pub mod counters;
pub mod deadline;
pub mod error;
pub mod executor;
pub mod export;
pub mod identity;
pub mod input;
pub mod listener;
pub mod replies;
pub mod shutdown;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod transport;
pub mod workers;

pub use access::Cidr;
pub use connection::serve;
pub use error::ConnectionError;
pub use export::{Exports, OpenExport, PeerCatalog, SingleExport};
pub use identity::Identity;
pub use listener::{ConnectionLimit, Listener, ServerContext};
pub use transport::Transport;
