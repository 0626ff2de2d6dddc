//! Against scratchd's own server (memory backend), in this process.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use scratchd_client::{BlockDevice, Client, Error, Handshaken, Replies, ReplyMode, Target};
use scratchd_proto::consts::{OptError, CMD_READ, SIMPLE_REPLY_MAGIC};
use scratchd_proto::request::RequestHeader;

use crate::checks::{self, errno_of};
use crate::util::{connect, options, Scratchd};

const MIB: u64 = 1 << 20;

#[test]
fn four_connections_over_unix_with_extended_headers() {
    let server = Scratchd::default().start();
    let client = connect(&server.target, 4, Replies::Extended);
    assert_eq!(client.connection_count(), 4);
    assert_eq!(client.info().mode, ReplyMode::Extended);
    assert!(client.info().base_allocation.is_some());
    let caps = client.capabilities();
    assert!(caps.multi_conn && caps.trim && caps.may_block && !caps.read_only);
    checks::round_trip(&client, 0, 8, 2 * MIB, 40);
    checks::holes(&client, 24 * MIB);
    checks::trim_zero_extents(&client, 32 * MIB, true);
    assert_eq!(client.in_flight(), 0);
    client.close().unwrap();
}

#[test]
fn structured_and_simple_replies() {
    for (replies, mode) in [
        (Replies::Structured, ReplyMode::Structured),
        (Replies::Simple, ReplyMode::Simple),
    ] {
        let server = Scratchd::default().start();
        let client = connect(&server.target, 2, replies);
        assert_eq!(client.info().mode, mode);
        assert_eq!(
            client.info().base_allocation.is_some(),
            mode != ReplyMode::Simple
        );
        checks::round_trip(&client, 0, 4, 2 * MIB, 30);
        checks::holes(&client, 16 * MIB);
        checks::trim_zero_extents(&client, 24 * MIB, true);
    }
}

#[test]
fn tcp_transport() {
    let server = Scratchd {
        tcp: true,
        ..Scratchd::default()
    }
    .start();
    let uri = server.target.to_string();
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    let client = Client::connect(&uri).unwrap();
    assert_eq!(client.connection_count(), 1);
    checks::round_trip(&client, 0, 4, MIB, 30);
    let client = connect(&server.target, 3, Replies::Extended);
    assert_eq!(client.connection_count(), 3);
    checks::round_trip(&client, 8 * MIB, 6, MIB, 30);
}

#[test]
fn requests_beyond_the_maximum_payload_are_split() {
    let server = Scratchd::default().start();
    let client = connect(&server.target, 2, Replies::Extended);
    assert_eq!(client.info().max_payload(), 32 << 20);
    let mut data = vec![0u8; (40 * MIB + 123) as usize];
    crate::util::Rng::new(5).fill(&mut data);
    client.write(7, &data, true).unwrap();
    assert!(client.read_vec(7, data.len()).unwrap() == data);
}

#[test]
fn a_refused_export_name_is_a_typed_error() {
    let server = Scratchd {
        name: "build-1",
        ..Scratchd::default()
    }
    .start();
    let mut target = server.target.clone();
    target.export = "build-2".into();
    let err = Client::connect_with(&target, &options(1, Replies::Extended)).unwrap_err();
    assert!(matches!(err, Error::Refused { .. }), "{err:?}");
    assert_eq!(err.refusal(), Some(OptError::Unknown));
    assert!(err.to_string().contains("\"build-2\""), "{err}");
    // The right name, and the default export, work.
    connect(&server.target, 1, Replies::Simple);
    target.export = String::new();
    connect(&target, 1, Replies::Simple);
}

#[test]
fn read_only_exports_refuse_writes_with_eperm() {
    let server = Scratchd {
        read_only: true,
        ..Scratchd::default()
    }
    .start();
    let client = connect(&server.target, 1, Replies::Extended);
    assert!(client.capabilities().read_only);
    assert_eq!(errno_of(client.write(0, b"x", false)), libc::EPERM);
    assert_eq!(errno_of(client.trim(0, 4096, false)), libc::EPERM);
    let zf = scratchd_client::ZeroFlags::default();
    assert_eq!(errno_of(client.zero(0, 4096, zf, false)), libc::EPERM);
    let mut buf = [1u8; 512];
    client.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0; 512]);
}

/// ENOSPC comes from the server (its memory budget), in every framing.
#[test]
fn server_errors_map_to_errnos() {
    for replies in [Replies::Extended, Replies::Structured, Replies::Simple] {
        let server = Scratchd {
            budget: Some(MIB),
            ..Scratchd::default()
        }
        .start();
        let client = connect(&server.target, 1, replies);
        assert_eq!(
            errno_of(client.write(0, &vec![1u8; 2 * MIB as usize], false)),
            libc::ENOSPC,
            "{replies:?}"
        );
        // The connection goes on.
        client.write(0, b"fits", false).unwrap();
        assert_eq!(client.read_vec(0, 4).unwrap(), b"fits");
        // Out of range is refused before anything is sent.
        assert_eq!(errno_of(client.read(64 * MIB, &mut [0; 1])), libc::EINVAL);
    }
}

/// The kernel path: negotiated sockets handed over, simple replies.
#[test]
fn handshake_only_hands_over_working_sockets() {
    let server = Scratchd::default().start();
    let client = connect(&server.target, 1, Replies::Extended);
    client.write(4096, b"from the client", true).unwrap();
    let mut opts = options(3, Replies::Simple);
    opts.block_status = false;
    let Handshaken { info, streams } = Client::handshake_only(&server.target, &opts).unwrap();
    assert_eq!(info.mode, ReplyMode::Simple);
    assert_eq!(streams.len(), 3);
    let fds = Handshaken { info, streams }
        .into_fds()
        .expect("plain sockets");
    for fd in fds {
        let mut sock = UnixStream::from(fd);
        let mut req = Vec::new();
        RequestHeader {
            flags: 0,
            kind: CMD_READ,
            cookie: 42,
            offset: 4096,
            length: 15,
        }
        .encode(ReplyMode::Simple, &mut req);
        sock.write_all(&req).unwrap();
        let mut reply = [0u8; 16 + 15];
        sock.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&reply[4..8], &[0; 4]);
        assert_eq!(&reply[8..16], &42u64.to_be_bytes());
        assert_eq!(&reply[16..], b"from the client");
    }
}

#[test]
fn uris_reach_the_server() {
    let server = Scratchd::default().start();
    let uri = server.target.to_string();
    assert!(uri.starts_with("nbd+unix:///disk?socket="), "{uri}");
    assert_eq!(Target::parse(&uri).unwrap(), server.target);
    let client = Client::connect(&uri).unwrap();
    assert_eq!(client.size(), 64 * MIB);
    assert_eq!(client.info().name, "disk");
    let err = Client::connect("nbd+unix:///disk?socket=/nonexistent/nbd.sock").unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    // TLS needs the certificates' directory.
    let err = Client::connect("nbds://localhost/disk").unwrap_err();
    assert!(err.to_string().contains("tls-certificates"), "{err}");
}
