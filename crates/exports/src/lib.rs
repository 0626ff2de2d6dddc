//! The exports layer: scratch disks served as NBD exports.
//!
//! The protocol server asks an [`Exports`] registry for names; the scratch
//! [`Registry`] knows disks, owners and budgets, not NBD. [`ScratchExports`]
//! joins the two, and is the only place that knows both:
//! - who asks: the server's [`Identity`] becomes the registry's [`Peer`]
//!   ([`peer_of`]), which the registry's `owner=` policy turns into an
//!   [`Owner`];
//! - what a name is: the registry's [`DiskInfo`] becomes an [`ExportInfo`]
//!   ([`export_info`]), with the transmission flags the server derives
//!   from a backend's capabilities ([`flags_for`]) and its block sizes
//!   ([`BLOCK_SIZE`]);
//! - why not: the registry's [`OpenError`] becomes the protocol's
//!   [`LookupError`] ([`lookup_error`]), which decides the option reply the
//!   client gets;
//! - who holds a disk: each connection gets its own [`Members`], which the
//!   disk's lease ends when the operator drops the disk (`scratchd ctl
//!   drop`), and the disk's error counts, which the connection charges.
//!
//! Dependencies point into this crate from both sides (`server` and
//! `scratch` know nothing of each other); only the binary's serve code uses
//! it.

use std::sync::Arc;

use scratchd_proto::negotiation::{ExportInfo, ExportListing, LookupError};
use scratchd_proto::snapshots::{SnapshotAnswer, SnapshotEntry, SnapshotRequest};
use scratchd_proto::TransmissionFlags;
use scratchd_scratch::registry::{SnapshotError, SnapshotView};
use scratchd_scratch::{DiskInfo, OpenDisk, OpenError, Owner, Peer, Registry};
use scratchd_server::export::{flags_for, BLOCK_SIZE};
use scratchd_server::shutdown::Members;
use scratchd_server::{Exports, Identity, OpenExport};
use scratchd_store::BlockDevice;

/// A scratch [`Registry`] as the server's export registry.
pub struct ScratchExports {
    registry: Arc<Registry>,
}

impl ScratchExports {
    /// Serves `registry`'s disks (the operator's side keeps a handle on it
    /// too, for `ctl` and the metrics).
    pub fn new(registry: Arc<Registry>) -> ScratchExports {
        ScratchExports { registry }
    }

    /// The owner whose disks `peer` reaches.
    fn owner(&self, peer: &Identity) -> Owner {
        self.registry.owner_of(peer_of(peer))
    }
}

/// Every question is answered within the asking peer's owner (see
/// [`scratchd_scratch::registry`]).
impl Exports for ScratchExports {
    fn list(&self, peer: &Identity) -> Vec<ExportListing> {
        let description = self.registry.description().map(str::to_owned);
        self.registry
            .list(self.owner(peer))
            .into_iter()
            .map(|name| ExportListing {
                name,
                description: description.clone(),
            })
            .collect()
    }

    fn info(&self, name: &str, peer: &Identity) -> Result<ExportInfo, LookupError> {
        let info = self.registry.info(name, self.owner(peer));
        info.map(export_info).map_err(lookup_error)
    }

    fn open(&self, name: &str, peer: &Identity) -> Result<OpenExport, LookupError> {
        let open = self.registry.open(name, self.owner(peer));
        open.map(open_export).map_err(lookup_error)
    }

    fn open_from(
        &self,
        name: &str,
        peer: &Identity,
        from: &str,
    ) -> Result<OpenExport, LookupError> {
        let open = self.registry.open_from(name, self.owner(peer), Some(from));
        open.map(open_export).map_err(lookup_error)
    }

    /// Within the peer's owner, as every other question: it snapshots its
    /// own disks, lists its own snapshots and the published ones, deletes
    /// its own.
    fn snapshots(
        &self,
        request: &SnapshotRequest,
        peer: &Identity,
    ) -> Result<SnapshotAnswer, LookupError> {
        let owner = self.owner(peer);
        let done = match request {
            SnapshotRequest::Take { disk, name } => self
                .registry
                .take_snapshot(owner, disk, name)
                .map(|_| SnapshotAnswer::Done),
            SnapshotRequest::List => Ok(SnapshotAnswer::Listing(
                self.registry
                    .snapshots_of(owner)
                    .iter()
                    .map(snapshot_entry)
                    .collect(),
            )),
            SnapshotRequest::Delete { name } => self
                .registry
                .delete_snapshot(Some(owner), name)
                .map(|()| SnapshotAnswer::Done),
        };
        done.map_err(snapshot_error)
    }
}

/// A snapshot as the client lists it.
pub fn snapshot_entry(view: &SnapshotView) -> SnapshotEntry {
    SnapshotEntry {
        name: view.key.name.clone(),
        published: view.key.owner.is_none(),
        size: view.size,
        bytes: view.bytes,
        clones: u32::try_from(view.clones).unwrap_or(u32::MAX),
        age_ms: u64::try_from(view.age.as_millis()).unwrap_or(u64::MAX),
    }
}

/// Why a snapshot request failed, as an option error: a name unknown to
/// the client (another owner's is unknown too), a refusal of its request,
/// or the server failing to make it. The message is the registry's.
pub fn snapshot_error(e: SnapshotError) -> LookupError {
    let message = e.to_string();
    match e {
        SnapshotError::NoDisk(_) | SnapshotError::NoSnapshot(_) => LookupError::Unknown(message),
        SnapshotError::Name(_)
        | SnapshotError::Exists(_)
        | SnapshotError::TooMany { .. }
        | SnapshotError::Creating(_) => LookupError::Policy(message),
        _ => LookupError::Platform(message),
    }
}

/// A connection's open disk: the connection joins its own [`Members`],
/// which the disk's lease ends if the operator drops the disk.
fn open_export(open: OpenDisk) -> OpenExport {
    let OpenDisk {
        info,
        device,
        mut lease,
    } = open;
    let members = Arc::new(Members::default());
    let on_drop = members.clone();
    // Counts the connection only while it transmits, as `ctl drop` reports.
    lease.on_drop(move || on_drop.disconnect());
    OpenExport {
        info: export_info(info),
        errors: device.errors(),
        device: device as Arc<dyn BlockDevice>,
        lease: Some(Box::new(lease)),
        members: Some(members),
    }
}

/// What the server's transport proved, in the registry's terms.
pub fn peer_of(identity: &Identity) -> Peer {
    match identity {
        Identity::Unix(c) => Peer::Unix {
            uid: c.uid,
            gid: c.gid,
        },
        Identity::Certificate(fp) => Peer::Certificate(fp.0),
        Identity::Anonymous => Peer::Anonymous,
    }
}

/// A name's description as NBD's export info: the server's flags for the
/// disk's capabilities and the registry's `--readonly`, less FLUSH and FUA
/// for a disk whose flush makes nothing durable (every scratch disk).
///
/// That absence is how a client tells a throw-away disk: nothing is
/// promised beyond a write's reply, so the client need not wait for that
/// either (our client's write-behind, docs/CLIENT.md), and a kernel or
/// nbdfuse client sends no flushes that would each cost a round trip for
/// nothing.
pub fn export_info(info: DiskInfo) -> ExportInfo {
    let mut flags = flags_for(info.caps, info.read_only);
    if !info.caps.durable_flush {
        flags.0 &= !(TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA);
    }
    ExportInfo {
        name: info.name,
        size: info.size,
        flags,
        block_size: BLOCK_SIZE,
        description: info.description,
    }
}

/// Why a name was refused, as the kind of option error the client gets:
/// the client's request (a name, a cap, a share) is a policy refusal, a
/// disk that cannot be made the platform's failure, a stopping registry a
/// shutdown. The message is the registry's.
pub fn lookup_error(e: OpenError) -> LookupError {
    let message = e.to_string();
    match e {
        OpenError::Name(_)
        | OpenError::TooMany { .. }
        | OpenError::TooManyOfOwner { .. }
        | OpenError::Share(_) => LookupError::Policy(message),
        OpenError::Create(_) | OpenError::CreateTimeout => LookupError::Platform(message),
        OpenError::Stopping => LookupError::Shutdown(message),
        OpenError::NoSnapshot(_) => LookupError::Unknown(message),
    }
}

#[cfg(test)]
mod tests;
