//! The mapping, piece by piece, then a registry served end to end.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use scratchd_proto::TransmissionFlags as F;
use scratchd_scratch::device::{ClaimError, ScratchDevice};
use scratchd_scratch::disk::{CreateError, DiskFactory};
use scratchd_scratch::registry::DiskKey;
use scratchd_scratch::Settings;
use scratchd_server::identity::{Credentials, Fingerprint};
use scratchd_server::transport::Control;
use scratchd_store::memory::NarrowError;
use scratchd_store::{Capabilities, MemoryDevice};

use super::*;

/// Makes blank 1 MiB memory disks.
struct Blank;

impl DiskFactory for Blank {
    fn create(&self) -> Result<ScratchDevice, CreateError> {
        Ok(ScratchDevice::memory(MemoryDevice::new(1 << 20).unwrap()))
    }
    fn size(&self) -> u64 {
        1 << 20
    }
    fn capabilities(&self) -> Capabilities {
        ScratchDevice::memory(MemoryDevice::new(0).unwrap()).capabilities()
    }
}

fn unix(uid: u32, gid: u32) -> Identity {
    Identity::Unix(Credentials { uid, gid, pid: 1 })
}

fn served(settings: Settings) -> (ScratchExports, Arc<Registry>) {
    let registry = Arc::new(Registry::new(settings, Arc::new(Blank)).unwrap());
    (ScratchExports::new(registry.clone()), registry)
}

fn settings() -> Settings {
    Settings::new(Duration::from_secs(5))
}

#[test]
fn identities_become_peers() {
    assert_eq!(peer_of(&unix(7, 8)), Peer::Unix { uid: 7, gid: 8 });
    let cert = Identity::Certificate(Fingerprint([3; 32]));
    assert_eq!(peer_of(&cert), Peer::Certificate([3; 32]));
    assert_eq!(peer_of(&Identity::Anonymous), Peer::Anonymous);
}

#[test]
fn refusals_become_policy_errors_failures_platform_errors() {
    let name = scratchd_scratch::names::NamePolicy::default()
        .check("../x")
        .unwrap_err();
    let share = ClaimError {
        kind: "memory",
        source: NarrowError::NotWithin,
    };
    let create = CreateError::Load(std::io::Error::other("boom"));
    let cases = [
        (OpenError::Name(name), "policy"),
        (OpenError::TooMany { max: 3 }, "policy"),
        (OpenError::TooManyOfOwner { max: 2 }, "policy"),
        (OpenError::Share(Arc::new(share)), "policy"),
        (OpenError::Create(Arc::new(create)), "platform"),
        (OpenError::CreateTimeout, "platform"),
        (OpenError::Stopping, "shutdown"),
        (OpenError::NoSnapshot("base".into()), "unknown"),
    ];
    for (e, kind) in cases {
        let message = e.to_string();
        let (got, text) = match lookup_error(e) {
            LookupError::Policy(m) => ("policy", m),
            LookupError::Platform(m) => ("platform", m),
            LookupError::Shutdown(m) => ("shutdown", m),
            LookupError::Unknown(m) => ("unknown", m),
        };
        assert_eq!((got, text.as_str()), (kind, message.as_str()));
    }
}

#[test]
fn disk_info_becomes_export_info_with_the_servers_flags() {
    let caps = Capabilities {
        durable_flush: true,
        ..Blank.capabilities()
    };
    let info = |read_only| DiskInfo {
        name: "build".into(),
        size: 1 << 20,
        caps,
        read_only,
        description: Some("scratch".into()),
    };
    let rw = export_info(info(false));
    assert_eq!(rw.flags, flags_for(caps, false));
    assert_eq!((rw.name.as_str(), rw.size), ("build", 1 << 20));
    assert_eq!(rw.description.as_deref(), Some("scratch"));
    assert_eq!(rw.block_size, BLOCK_SIZE);
    let has = |info: &ExportInfo, flag: u16| info.flags.0 & flag != 0;
    assert!(has(&rw, F::CAN_MULTI_CONN) && has(&rw, F::SEND_TRIM));
    assert!(has(&rw, F::SEND_WRITE_ZEROES) && !has(&rw, F::READ_ONLY));
    let ro = export_info(info(true));
    assert!(has(&ro, F::READ_ONLY) && !has(&ro, F::SEND_WRITE_ZEROES));
}

/// A disk whose flush makes nothing durable advertises no FLUSH and no
/// FUA: how clients tell a throw-away disk (write-behind's `auto`).
#[test]
fn a_disk_without_durable_flush_advertises_no_flush_or_fua() {
    let caps = Capabilities {
        durable_flush: false,
        ..Blank.capabilities()
    };
    let info = export_info(DiskInfo {
        name: "build".into(),
        size: 1 << 20,
        caps,
        read_only: false,
        description: None,
    });
    let has = |flag: u16| info.flags.0 & flag != 0;
    assert!(!has(F::SEND_FLUSH) && !has(F::SEND_FUA));
    assert!(has(F::CAN_MULTI_CONN) && has(F::SEND_WRITE_ZEROES));
    assert_eq!(
        info.flags.0 | F::SEND_FLUSH | F::SEND_FUA,
        flags_for(caps, false).0
    );
}

#[test]
fn each_peer_sees_its_owners_disks() {
    let (exports, _) = served(Settings {
        description: Some("scratch".into()),
        ..settings()
    });
    let (alice, bob) = (unix(1000, 1000), unix(2000, 2000));
    let a = exports.open("build", &alice).unwrap();
    assert_eq!(a.info.size, 1 << 20);
    assert!(a.info.flags.0 & F::CAN_MULTI_CONN != 0);
    let listed = exports.list(&alice);
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].name.as_str(), listed[0].description.as_deref()),
        ("build", Some("scratch"))
    );
    assert!(exports.list(&bob).is_empty());
    assert!(exports.list(&Identity::Anonymous).is_empty());
    let b = exports.open("build", &bob).unwrap();
    assert!(!Arc::ptr_eq(&a.device, &b.device), "another owner's disk");
    assert_eq!(exports.info("build", &bob).unwrap().name, "build");
    match exports.open("../x", &alice) {
        Err(LookupError::Policy(m)) => assert!(m.contains("'/'"), "{m}"),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("../x was opened"),
    }
}

/// `ctl drop` reaches the connection through the members the exports
/// layer gave it: its socket stops reading. It counts the connections that
/// were transmitting (members), not those still negotiating.
#[test]
fn each_peer_snapshots_and_clones_within_its_owner() {
    use scratchd_proto::snapshots::{SnapshotAnswer, SnapshotRequest};
    let (exports, registry) = served(settings());
    let (alice, bob) = (unix(1000, 1000), unix(2000, 2000));
    let disk = exports.open("root", &alice).unwrap();
    disk.device.write(0, b"alice", false).unwrap();
    let take = |disk: &str| SnapshotRequest::Take {
        disk: disk.into(),
        name: "base".into(),
    };
    assert_eq!(
        exports.snapshots(&take("root"), &alice),
        Ok(SnapshotAnswer::Done)
    );
    assert!(matches!(
        exports.snapshots(&take("root"), &alice),
        Err(LookupError::Policy(m)) if m.contains("exists")
    ));
    // Bob has no disk "root" and no snapshot "base".
    assert!(matches!(
        exports.snapshots(&take("root"), &bob),
        Err(LookupError::Unknown(_))
    ));
    assert!(matches!(
        exports.open_from("x", &bob, "base").err(),
        Some(LookupError::Unknown(_))
    ));
    let Ok(SnapshotAnswer::Listing(bobs)) = exports.snapshots(&SnapshotRequest::List, &bob) else {
        panic!("bob lists")
    };
    assert!(bobs.is_empty());
    let clone = exports.open_from("build", &alice, "base").unwrap();
    let mut buf = [0; 5];
    clone.device.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"alice");
    let Ok(SnapshotAnswer::Listing(alices)) = exports.snapshots(&SnapshotRequest::List, &alice)
    else {
        panic!("alice lists")
    };
    assert_eq!((alices[0].name.as_str(), alices[0].clones), ("base", 1));
    let delete = SnapshotRequest::Delete {
        name: "base".into(),
    };
    assert!(matches!(
        exports.snapshots(&delete, &bob),
        Err(LookupError::Unknown(_))
    ));
    assert_eq!(exports.snapshots(&delete, &alice), Ok(SnapshotAnswer::Done));
    assert!(registry.snapshots().is_empty());
}

#[test]
fn dropping_a_disk_ends_its_connections() {
    let (exports, registry) = served(settings());
    let alice = unix(1000, 1000);
    let open = exports.open("build", &alice).unwrap();
    let not_yet_transmitting = exports.open("build", &alice).unwrap();
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let membership = open
        .members
        .as_ref()
        .unwrap()
        .join(Control::Unix(ours.try_clone().unwrap()));
    let key = DiskKey {
        owner: Owner::Uid(1000),
        name: "build".into(),
    };
    assert_eq!(registry.drop_disk(&key), Ok(1));
    let mut buf = [0u8; 1];
    assert_eq!((&ours).read(&mut buf).unwrap(), 0, "reading has stopped");
    open.device.write(0, b"x", false).unwrap();
    drop((membership, open, not_yet_transmitting));
    assert_eq!(registry.status().destroyed, 1);
}

/// The registry speaks no NBD: the scratch crate depends on neither the
/// server nor the protocol (the build holds the code to this; this holds
/// the manifest).
#[test]
fn the_scratch_crate_depends_on_neither_server_nor_protocol() {
    let manifest = include_str!("../../scratch/Cargo.toml");
    for dependency in ["scratchd-server", "scratchd-proto"] {
        assert!(!manifest.contains(dependency), "{dependency}");
    }
}
