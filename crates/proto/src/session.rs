//! What the two sides of a connection agree on in the handshake and use
//! for the rest of it: the export's description ([`ExportInfo`], with its
//! [`BlockSize`]), how replies are framed ([`ReplyMode`]), and the
//! [`Session`] that carries both into transmission.
//!
//! These types have a module of their own because every phase uses them:
//! option payloads ([`crate::options`]) carry block sizes, the negotiator
//! ([`crate::negotiation`]) produces a session, requests
//! ([`crate::request`]) are checked against it and replies
//! ([`crate::reply`]) framed by its mode. Keeping them here lets those
//! modules depend on this one, and never on each other for a type.

use crate::consts::TransmissionFlags;

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// What a client learns about an export before transmission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export's canonical name (the default export "" resolves to it).
    pub name: String,
    pub size: u64,
    /// Flags as the export would have them with structured replies on; the
    /// negotiator drops those the session cannot use.
    pub flags: TransmissionFlags,
    pub block_size: BlockSize,
    pub description: Option<String>,
}

/// How transmission replies are framed, fixed when transmission starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    Simple,
    Structured,
    Extended,
}

/// Everything transmission needs from the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub export: ExportInfo,
    pub mode: ReplyMode,
    /// Context id for `base:allocation`, when the client selected it for
    /// this export; BLOCK_STATUS is refused otherwise.
    pub base_allocation: Option<u32>,
}
