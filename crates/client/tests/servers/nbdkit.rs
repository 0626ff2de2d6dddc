//! Against nbdkit (1.32 here: structured replies, no extended headers),
//! with filters for errors, delays and block size limits.

use std::io;
use std::time::{Duration, Instant};

use scratchd_client::{BlockDevice, Client, Replies, ReplyMode, ZeroFlags};

use crate::checks::{self, errno_of};
use crate::util::{connect, nbdkit, options};

const MIB: u64 = 1 << 20;

#[test]
fn memory_with_multi_conn() {
    let server = nbdkit(&["memory", "64M"]);
    let client = connect(&server.target(""), 4, Replies::Extended);
    assert_eq!(client.info().mode, ReplyMode::Structured);
    assert!(client.info().multi_conn());
    assert_eq!(client.connection_count(), 4);
    checks::round_trip(&client, 0, 8, 2 * MIB, 40);
    checks::holes(&client, 24 * MIB);
    checks::trim_zero_extents(&client, 32 * MIB, true);
    client.close().unwrap();
}

#[test]
fn memory_with_simple_replies_only() {
    let server = nbdkit(&["--no-sr", "memory", "64M"]);
    let client = connect(&server.target(""), 2, Replies::Extended);
    assert_eq!(client.info().mode, ReplyMode::Simple);
    assert_eq!(client.info().base_allocation, None);
    checks::round_trip(&client, 0, 4, 2 * MIB, 30);
    checks::holes(&client, 16 * MIB);
    checks::trim_zero_extents(&client, 24 * MIB, true);
}

#[test]
fn server_errors_map_to_errnos() {
    for no_sr in [false, true] {
        let mut args = vec![];
        if no_sr {
            args.push("--no-sr");
        }
        args.extend([
            "--filter=error",
            "memory",
            "16M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            "error-pwrite=EPERM",
            "error-pwrite-rate=100%",
            "error-zero=ENOSPC",
            "error-zero-rate=100%",
            "error-trim=EINVAL",
            "error-trim-rate=100%",
        ]);
        let server = nbdkit(&args);
        let client = connect(&server.target(""), 1, Replies::Extended);
        let what = format!("no_sr={no_sr}");
        assert_eq!(errno_of(client.read(0, &mut [0; 512])), libc::EIO, "{what}");
        assert_eq!(
            errno_of(client.write(0, &[1; 512], false)),
            libc::EPERM,
            "{what}"
        );
        let zf = ZeroFlags::default();
        assert_eq!(
            errno_of(client.zero(0, 512, zf, false)),
            libc::ENOSPC,
            "{what}"
        );
        assert_eq!(errno_of(client.trim(0, 512, false)), libc::EINVAL, "{what}");
        // Errors end requests, not the connection.
        client.flush().unwrap();
    }
}

#[test]
fn a_small_maximum_block_size_splits_requests() {
    let server = nbdkit(&[
        "--filter=blocksize-policy",
        "memory",
        "16M",
        "blocksize-maximum=64K",
        "blocksize-error-policy=error",
    ]);
    let client = connect(&server.target(""), 2, Replies::Extended);
    assert_eq!(client.info().max_payload(), 64 << 10);
    let mut data = vec![0u8; (MIB + 3) as usize];
    crate::util::Rng::new(9).fill(&mut data);
    client.write(12_345, &data, false).unwrap();
    assert!(client.read_vec(12_345, data.len()).unwrap() == data);
    checks::round_trip(&client, 4 * MIB, 4, MIB, 20);
}

/// nbdkit killed while reads wait in its delay filter: every waiter gets
/// an error within moments, none hangs.
#[test]
fn a_killed_server_fails_every_waiting_request() {
    let mut server = nbdkit(&["--filter=delay", "memory", "16M", "delay-read=30"]);
    let client = connect(&server.target(""), 2, Replies::Extended);
    let started = Instant::now();
    let errors: Vec<io::Error> = std::thread::scope(|s| {
        let waiters: Vec<_> = (0..8)
            .map(|i| {
                let client = &client;
                s.spawn(move || client.read(i * 4096, &mut [0; 4096]).unwrap_err())
            })
            .collect();
        while client.in_flight() < 8 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "requests never went out"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server.kill();
        waiters.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "waiters took {:?}",
        started.elapsed()
    );
    for e in &errors {
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
        assert_eq!(scratchd_client::errno(e), libc::EIO);
    }
    let e = client.write(0, b"x", false).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
}

#[test]
fn a_stalled_server_times_out() {
    let server = nbdkit(&["--filter=delay", "memory", "16M", "delay-read=20"]);
    let mut opts = options(1, Replies::Extended);
    opts.request_timeout = Some(Duration::from_millis(500));
    let client = Client::connect_with(&server.target(""), &opts).unwrap();
    client.write(0, b"quick", false).unwrap();
    let started = Instant::now();
    let e = client.read(0, &mut [0; 5]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert_eq!(scratchd_client::errno(&e), libc::ETIMEDOUT);
    assert!(started.elapsed() < Duration::from_secs(5));
}
