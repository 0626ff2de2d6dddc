//! Against qemu-nbd serving a sparse raw image (multi-conn only with `-e N`,
//! N > 1). Debian 12's qemu-nbd (7.2) offers structured replies at best,
//! 8.2 and later extended headers: the tests ask the installed one which it
//! is and hold the client to exactly that.

use scratchd_client::{BlockDevice, Client, Error, Replies, ReplyMode};
use scratchd_proto::consts::OptError;

use crate::checks::{self, errno_of};
use crate::util::{connect, options, qemu_nbd, qemu_nbd_best_replies, qemu_nbd_version};

const MIB: u64 = 1 << 20;

#[test]
fn shared_image_with_the_best_framing_and_multi_conn() {
    let best = qemu_nbd_best_replies();
    eprintln!("qemu-nbd {:?} offers {best:?}", qemu_nbd_version());
    let server = qemu_nbd(64 * MIB, &["-e", "4", "--discard=unmap"]);
    let client = connect(&server.target(""), 4, Replies::Extended);
    assert_eq!(client.info().mode, best);
    assert!(client.info().multi_conn());
    assert_eq!(client.connection_count(), 4);
    assert!(client.info().base_allocation.is_some());
    checks::round_trip(&client, 0, 8, 2 * MIB, 40);
    checks::holes(&client, 24 * MIB);
    // Zeroing may deallocate only with --discard=unmap (qemu-nbd ignores
    // discards by default); a file system may still keep trimmed data.
    checks::trim_zero_extents(&client, 32 * MIB, false);
    client.close().unwrap();
}

#[test]
fn without_multi_conn_one_connection_is_used() {
    let server = qemu_nbd(16 * MIB, &[]);
    let client = connect(&server.target(""), 4, Replies::Extended);
    assert!(!client.info().multi_conn());
    assert_eq!(client.connection_count(), 1);
    checks::round_trip(&client, 0, 4, MIB, 30);
}

#[test]
fn structured_and_simple_replies() {
    for (replies, mode) in [
        (Replies::Structured, ReplyMode::Structured),
        (Replies::Simple, ReplyMode::Simple),
    ] {
        let server = qemu_nbd(16 * MIB, &["-e", "2", "--discard=unmap"]);
        let client = connect(&server.target(""), 2, replies);
        assert_eq!(client.info().mode, mode);
        checks::round_trip(&client, 0, 4, MIB, 30);
        checks::holes(&client, 4 * MIB);
        checks::trim_zero_extents(&client, 8 * MIB, false);
    }
}

#[test]
fn read_only_and_refused_names() {
    let server = qemu_nbd(16 * MIB, &["-r", "-x", "build-1"]);
    let mut target = server.target("build-1");
    let client = connect(&target, 1, Replies::Extended);
    assert!(client.capabilities().read_only);
    assert_eq!(errno_of(client.write(0, b"x", false)), libc::EPERM);
    client.read(0, &mut [0; 4096]).unwrap();
    drop(client);
    target.export = "build-2".into();
    let err = Client::connect_with(&target, &options(1, Replies::Extended)).unwrap_err();
    assert!(matches!(err, Error::Refused { .. }), "{err:?}");
    assert_eq!(err.refusal(), Some(OptError::Unknown), "{err}");
    assert!(err.to_string().contains("build-2"), "{err}");
}
