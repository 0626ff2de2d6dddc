//! The proxy against a real echo server, through the real binary: a round
//! trip takes at least the two delays, and requests in flight together are
//! delayed together, not one after another. Bounds are loose (lower bounds
//! exact, upper bounds a large fraction of the serialised time), so a
//! loaded machine cannot make them fail.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const DELAY: Duration = Duration::from_millis(20);
const MESSAGE: &[u8; 16] = b"0123456789abcdef";

/// A TCP server that sends back whatever it gets, as soon as it gets it.
fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => conn.write_all(&buf[..n]).unwrap(),
                    }
                }
            });
        }
    });
    addr
}

/// The proxy, killed when dropped.
struct Proxy {
    child: Child,
    addr: String,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proxy(listen: &str, target: &str) -> Proxy {
    let delay_us = DELAY.as_micros().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_delay-proxy"))
        .args([listen, target, &delay_us])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    Proxy { child, addr }
}

/// Sends one message and waits for it to come back; how long that took.
fn round_trip(conn: &mut (impl Read + Write)) -> Duration {
    let started = Instant::now();
    conn.write_all(MESSAGE).unwrap();
    let mut back = [0u8; 16];
    conn.read_exact(&mut back).unwrap();
    assert_eq!(&back, MESSAGE);
    started.elapsed()
}

/// Sends `n` messages 1 ms apart (each its own chunk) from another thread
/// while reading the echoes; how long until the last came back.
fn pipelined<S: Read + Write + Send + 'static>(mut conn: S, mut writer: S, n: usize) -> Duration {
    let started = Instant::now();
    let sender = thread::spawn(move || {
        for _ in 0..n {
            writer.write_all(MESSAGE).unwrap();
            thread::sleep(Duration::from_millis(1));
        }
    });
    let mut back = vec![0u8; n * MESSAGE.len()];
    conn.read_exact(&mut back).unwrap();
    sender.join().unwrap();
    assert!(back.chunks(16).all(|m| m == MESSAGE));
    started.elapsed()
}

fn check_delays<S: Read + Write + Send + 'static>(mut conn: S, writer: S) {
    for _ in 0..3 {
        let took = round_trip(&mut conn);
        assert!(took >= 2 * DELAY, "a round trip took only {took:?}");
    }
    let n = 50;
    let serialised = 2 * DELAY * n as u32;
    let took = pipelined(conn, writer, n);
    assert!(
        took >= 2 * DELAY,
        "{n} pipelined messages took only {took:?}"
    );
    assert!(
        took < serialised / 4,
        "{n} pipelined messages took {took:?}: delays were serialised ({serialised:?})"
    );
}

#[test]
fn tcp_round_trips_take_both_delays_and_pipelined_ones_overlap() {
    let proxy = proxy("127.0.0.1:0", &echo_server());
    let conn = TcpStream::connect(&proxy.addr).unwrap();
    let writer = conn.try_clone().unwrap();
    check_delays(conn, writer);
}

#[test]
fn a_unix_listener_forwards_to_tcp_with_the_same_delays() {
    let dir = std::env::temp_dir().join(format!("delay-proxy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("sock");
    let _ = std::fs::remove_file(&sock);
    let proxy = proxy(&format!("unix:{}", sock.display()), &echo_server());
    let conn = UnixStream::connect(proxy.addr.strip_prefix("unix:").unwrap()).unwrap();
    let writer = conn.try_clone().unwrap();
    check_delays(conn, writer);
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_end_of_a_stream_is_passed_on() {
    let proxy = proxy("127.0.0.1:0", &echo_server());
    let mut conn = TcpStream::connect(&proxy.addr).unwrap();
    round_trip(&mut conn);
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(conn.read_to_end(&mut rest).unwrap(), 0);
}
