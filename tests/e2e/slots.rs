//! No unauthenticated client holds a slot (issue 16, item 5), against the
//! real binary over TCP: a handshake dripped one byte a second is cut off
//! at the handshake deadline while a healthy client is served, and one
//! address opening connection after connection reaches its own cap while
//! another address still connects.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use crate::util::{free_port, Server};

/// A memory server on the Unix socket and on 127.0.0.1:`port`.
fn tcp_server(port: u16, args: &[&str]) -> Server {
    let port = port.to_string();
    let mut all = vec!["-i", "127.0.0.1", "-p", &port];
    all.extend_from_slice(args);
    all.extend_from_slice(&["memory", "size=1M"]);
    Server::start(&all)
}

/// A TCP connection to 127.0.0.1:`port` from the local address `from`
/// (any address of 127.0.0.0/8 is the loopback interface's own).
fn connect_from(from: Ipv4Addr, port: u16) -> TcpStream {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    rustix::net::bind(&fd, &SocketAddrV4::new(from, 0)).unwrap();
    rustix::net::connect(&fd, &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).unwrap();
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Whether the server greets this connection (a refused one is closed
/// before any byte).
fn greeted(s: &mut TcpStream) -> bool {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).is_ok() && &greeting[..8] == b"NBDMAGIC"
}

/// A whole handshake (EXPORT_NAME "") on a greeted connection: the
/// export's size.
fn open_default(s: &mut TcpStream) -> u64 {
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut option = b"IHAVEOPT".to_vec();
    option.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    option.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&option).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    u64::from_be_bytes(reply[..8].try_into().unwrap())
}

/// One byte a second never lets a read time out, yet the client is cut
/// off once the whole handshake has taken `--handshake-timeout`; a
/// client connecting meanwhile is served.
#[test]
fn a_dripped_handshake_is_cut_off_at_the_deadline() {
    let port = free_port();
    let mut server = tcp_server(port, &["--handshake-timeout", "3s"]);
    let started = Instant::now();
    let mut drip = connect_from(Ipv4Addr::LOCALHOST, port);
    assert!(greeted(&mut drip));
    let mut sent = 0;
    let message = b"\0\0\0\x03IHAVEOPT\0\0\0\x01\0\0\x10\0";
    let (cut, how) = loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still open after {sent} bytes"
        );
        if let Err(e) = drip.write_all(&message[sent % message.len()..][..1]) {
            break (started.elapsed(), format!("write: {e}"));
        }
        sent += 1;
        if sent == 2 {
            let mut healthy = connect_from(Ipv4Addr::LOCALHOST, port);
            assert!(greeted(&mut healthy), "a healthy client is greeted");
            assert_eq!(open_default(&mut healthy), 1 << 20);
        }
        // A closed connection shows on a read first.
        drip.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut byte = [0u8; 1];
        match drip.read(&mut byte) {
            Ok(0) => break (started.elapsed(), "end of stream".to_owned()),
            // EINTR (after this process was stopped and continued) is no end.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => break (started.elapsed(), format!("read: {e}")),
            Ok(_) => panic!("the server answered a half option"),
        }
    };
    // A server that died also ends the connection: say so first.
    server.assert_alive();
    assert!(
        (Duration::from_secs(2)..Duration::from_secs(6)).contains(&cut),
        "cut after {cut:?} ({how}), {sent} bytes; the deadline was 3 s"
    );
}

/// By default one TCP address may hold a sixteenth of `--max-connections`:
/// with 32, the third connection from 127.0.0.1 is closed at accept while
/// 127.0.0.2 still connects and is served.
#[test]
fn one_address_cannot_take_every_slot() {
    let port = free_port();
    let mut server = tcp_server(port, &["--max-connections", "32"]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from(Ipv4Addr::LOCALHOST, port);
        assert!(greeted(&mut s), "within the address's cap");
        held.push(s);
    }
    let mut third = connect_from(Ipv4Addr::LOCALHOST, port);
    assert!(!greeted(&mut third), "past the address's cap");
    let mut other = connect_from(Ipv4Addr::new(127, 0, 0, 2), port);
    assert!(greeted(&mut other), "another address is still greeted");
    assert_eq!(open_default(&mut other), 1 << 20);
    server.assert_alive();
}
