//! The bodies of scratchd's fuzz targets, one function per target.
//!
//! `fuzz/` (its own workspace, built with cargo-fuzz on a nightly-enabled
//! compiler) wraps each function in `fuzz_target!`; this crate's test
//! (`tests/corpus.rs`) feeds every file of the committed seed corpus
//! (`fuzz/seeds/TARGET/`) and every past crash (`fuzz/regressions/TARGET/`)
//! through the same functions on the stable toolchain, so the normal test
//! suite keeps what the fuzzer learnt. A function panics when it finds a bug;
//! any other input returns normally.
//!
//! Targets:
//! - [`negotiation`]: option streams through the server's option state
//!   machine; every reply must be well framed and end in exactly one final
//!   reply.
//! - [`request`]: transmission request headers (compact and extended):
//!   decoding, payload plans and validation.
//! - [`decode`]: every wire decoder, both directions, on raw bytes.
//! - [`reply`]: replies written with the server's `put_*` encoders must read
//!   back, as a client reads them, to what was written; arbitrary bytes read
//!   as a reply stream from an untrusted server must be refused cleanly.
//! - [`storage()`]: operations on each backend (memory, memory within a
//!   budget, file) checked against a `Vec<u8>` model by the store's own model
//!   suite.

#![forbid(unsafe_code)]

mod input;
mod protocol;
mod storage;

pub use input::Input;
pub use protocol::{decode, negotiation, reply, request};
pub use storage::storage;

/// A fuzz target's body: panics on a bug, returns on anything else.
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/` and the corpus directories call them.
pub const TARGETS: &[(&str, Target)] = &[
    ("negotiation", negotiation),
    ("request", request),
    ("decode", decode),
    ("reply", reply),
    ("storage", storage),
];
