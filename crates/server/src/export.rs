//! The export registry: how a connection finds the disk behind a name.
//!
//! [`Exports`] separates looking (LIST, INFO and meta-context queries, which
//! must never create anything) from opening (GO/EXPORT_NAME, which may
//! create a disk and holds it while connected). Every question carries the
//! asking connection's [`Identity`], so that a registry can show each peer
//! only what is its own (scratch disks do); [`PeerCatalog`] binds the two
//! into the [`Catalog`] the negotiator asks.

use std::sync::Arc;

use scratchd_proto::negotiation::{BlockSize, Catalog, ExportInfo, ExportListing, LookupError};
use scratchd_proto::request::MAX_PAYLOAD;
use scratchd_proto::snapshots::{SnapshotAnswer, SnapshotRequest};
use scratchd_proto::TransmissionFlags;
use scratchd_store::{BlockDevice, Capabilities};

use crate::counters::ErrorCounts;
use crate::identity::Identity;
use crate::shutdown::Members;

/// An export held open by one connection.
pub struct OpenExport {
    pub info: ExportInfo,
    pub device: Arc<dyn BlockDevice>,
    /// Dropped when the connection (and all its in-flight requests) is done;
    /// registries that count users (scratch disks) hang their guard here.
    pub lease: Option<Box<dyn Send + Sync>>,
    /// The export's connections, which this one joins while it transmits,
    /// for registries that can disconnect an export's clients.
    pub members: Option<Arc<Members>>,
    /// The export's error replies by errno, charged by every connection
    /// that has it open (the per-export metrics).
    pub errors: Arc<ErrorCounts>,
}

/// Names → disks, shared by every connection of a server. `peer` is who
/// asks; a registry may answer each peer differently.
pub trait Exports: Send + Sync {
    /// The exports `peer` may know of (`NBD_OPT_LIST`).
    fn list(&self, peer: &Identity) -> Vec<ExportListing>;
    /// Describes `name` for `peer` without creating anything.
    fn info(&self, name: &str, peer: &Identity) -> Result<ExportInfo, LookupError>;
    /// Opens `name` for transmission, creating its disk if the registry does
    /// that; the returned lease keeps it alive.
    fn open(&self, name: &str, peer: &Identity) -> Result<OpenExport, LookupError>;
    /// Opens `name` like [`Exports::open`], but a disk made now starts as
    /// the snapshot `from` (scratchd's `OPT_SCRATCHD_FROM`). Exports
    /// without snapshots know none.
    fn open_from(
        &self,
        name: &str,
        peer: &Identity,
        from: &str,
    ) -> Result<OpenExport, LookupError> {
        let _ = (name, peer);
        Err(LookupError::Unknown(format!(
            "no snapshot {from:?}: this server keeps no snapshots"
        )))
    }
    /// Carries out a snapshot request for `peer`. Exports without
    /// snapshots refuse it.
    fn snapshots(
        &self,
        request: &SnapshotRequest,
        peer: &Identity,
    ) -> Result<SnapshotAnswer, LookupError> {
        let _ = (request, peer);
        Err(LookupError::Policy(
            "this server keeps no snapshots".to_owned(),
        ))
    }
}

/// One connection's view of the exports: the [`Catalog`] its negotiator
/// asks, answering as the registry answers this peer.
pub struct PeerCatalog<'a> {
    pub exports: &'a dyn Exports,
    pub peer: &'a Identity,
}

impl Catalog for PeerCatalog<'_> {
    fn list(&self) -> Vec<ExportListing> {
        self.exports.list(self.peer)
    }

    fn info(&self, name: &str) -> Result<ExportInfo, LookupError> {
        self.exports.info(name, self.peer)
    }
}

/// Block sizes every scratchd export advertises: any alignment is served,
/// 4 KiB is what backends like best, payloads up to 32 MiB.
pub const BLOCK_SIZE: BlockSize = BlockSize {
    min: 1,
    preferred: 4096,
    max: MAX_PAYLOAD,
};

/// Transmission flags for a backend's capabilities.
pub fn flags_for(caps: Capabilities, read_only: bool) -> TransmissionFlags {
    type F = TransmissionFlags;
    let mut f = F::HAS_FLAGS | F::SEND_FLUSH | F::SEND_FUA | F::SEND_DF | F::SEND_CACHE;
    if read_only || caps.read_only {
        f |= F::READ_ONLY;
    } else {
        f |= F::SEND_WRITE_ZEROES;
        if caps.trim {
            f |= F::SEND_TRIM;
        }
        if caps.fast_zero {
            f |= F::SEND_FAST_ZERO;
        }
    }
    if caps.multi_conn {
        f |= F::CAN_MULTI_CONN;
    }
    TransmissionFlags(f)
}

/// One device served under one name (`-e NAME`, default ""), as qemu-nbd and
/// nbd-server do: the empty default name also reaches it, any other name is
/// unknown.
pub struct SingleExport {
    name: String,
    description: Option<String>,
    device: Arc<dyn BlockDevice>,
    read_only: bool,
    /// Error replies of every connection, for the operator.
    errors: Arc<ErrorCounts>,
}

impl SingleExport {
    pub fn new(
        name: String,
        description: Option<String>,
        device: Arc<dyn BlockDevice>,
        read_only: bool,
    ) -> Self {
        SingleExport {
            name,
            description,
            device,
            read_only,
            errors: Arc::default(),
        }
    }

    /// The export's error replies by errno.
    pub fn errors(&self) -> Arc<ErrorCounts> {
        self.errors.clone()
    }

    fn lookup(&self, name: &str) -> Result<ExportInfo, LookupError> {
        if name != self.name && !name.is_empty() {
            return Err(LookupError::Unknown(format!(
                "no export named {name:?} (this server exports {:?})",
                self.name
            )));
        }
        Ok(ExportInfo {
            name: self.name.clone(),
            size: self.device.size(),
            flags: flags_for(self.device.capabilities(), self.read_only),
            block_size: BLOCK_SIZE,
            description: self.description.clone(),
        })
    }
}

/// A single export is the operator's to share: every peer sees it.
impl Exports for SingleExport {
    fn list(&self, _peer: &Identity) -> Vec<ExportListing> {
        vec![ExportListing {
            name: self.name.clone(),
            description: self.description.clone(),
        }]
    }

    fn info(&self, name: &str, _peer: &Identity) -> Result<ExportInfo, LookupError> {
        self.lookup(name)
    }

    fn open(&self, name: &str, _peer: &Identity) -> Result<OpenExport, LookupError> {
        Ok(OpenExport {
            info: self.lookup(name)?,
            device: self.device.clone(),
            lease: None,
            members: None,
            errors: self.errors.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use scratchd_proto::Errno;

    use std::sync::Arc;

    use crate::counters::{errno_name, ErrorCounts, ErrorSink};

    /// The per-export counts live in the store, which knows errno numbers
    /// and names but not NBD: each NBD error must land under its own name.
    #[test]
    fn every_nbd_errno_is_counted_under_its_name() {
        for errno in Errno::ALL {
            let counts = Arc::new(ErrorCounts::new());
            ErrorSink::new(Arc::default(), counts.clone()).error_replied(errno);
            let counted: Vec<_> = counts.by_errno().into_iter().filter(|e| e.1 > 0).collect();
            assert_eq!(counted, [(errno_name(errno), 1)], "{errno:?}");
        }
    }
}
