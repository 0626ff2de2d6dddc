//! `delay-proxy`: a benchmark tool that stands for a network between an NBD
//! client and server on a machine whose kernel has no netem.
//!
//! ```text
//! delay-proxy LISTEN TARGET DELAY_US
//!   LISTEN, TARGET: HOST:PORT (TCP) or unix:PATH
//!   DELAY_US: one-way delay added to each direction, in microseconds
//! ```
//!
//! Every accepted connection gets a connection to TARGET, and each
//! direction is pumped by two threads: a reader that stamps every chunk it
//! receives with the time it may leave (now + delay) and hands it on at
//! once, and a writer that sends each chunk when its time comes. Bytes are
//! delayed, not serialised: a client with 32 requests in flight sees each
//! of them delayed once, as on a wire, not 32 delays in a row. Prints
//! `listening on ADDR` on standard output once ready (with the port the
//! kernel chose for `HOST:0`), then runs until killed.
//!
//! The proxy adds latency of its own (two thread wake-ups per chunk and
//! direction, tens of microseconds), so a baseline should go through it
//! with a delay of 0, not around it. Writers run with a timer slack of 1 ns
//! so that sleeps of tens of microseconds end on time.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Bytes one read may take: a 1 MiB NBD request moves in a few chunks.
const CHUNK: usize = 256 * 1024;

/// Where to listen or connect.
#[derive(Clone, Debug)]
enum Addr {
    Tcp(String),
    Unix(String),
}

impl Addr {
    fn parse(s: &str) -> Addr {
        match s.strip_prefix("unix:") {
            Some(path) => Addr::Unix(path.to_owned()),
            None => Addr::Tcp(s.to_owned()),
        }
    }

    fn connect(&self) -> io::Result<Stream> {
        Ok(match self {
            Addr::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                // The delay is ours to add; Nagle would add its own.
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Addr::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        })
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn bind(addr: &Addr) -> io::Result<(Listener, String)> {
        Ok(match addr {
            Addr::Tcp(a) => {
                let l = TcpListener::bind(a)?;
                let local = l.local_addr()?.to_string();
                (Listener::Tcp(l), local)
            }
            Addr::Unix(p) => (Listener::Unix(UnixListener::bind(p)?), format!("unix:{p}")),
        })
    }

    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
        })
    }
}

/// One end of a proxied connection.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes on their way, and when they may leave; `None` for end of stream.
type Chunk = (Instant, Option<Vec<u8>>);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, target, delay] = &args[..] else {
        eprintln!("usage: delay-proxy LISTEN TARGET DELAY_US  (HOST:PORT or unix:PATH)");
        return ExitCode::from(2);
    };
    let Ok(delay_us) = delay.parse::<u64>() else {
        eprintln!("delay-proxy: DELAY_US must be a whole number of microseconds, not {delay:?}");
        return ExitCode::from(2);
    };
    let delay = Duration::from_micros(delay_us);
    let target = Addr::parse(target);
    let (listener, local) = match Listener::bind(&Addr::parse(listen)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("delay-proxy: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening on {local}");
    let _ = io::stdout().flush();
    loop {
        match listener.accept() {
            Ok(client) => {
                let target = target.clone();
                thread::spawn(move || {
                    if let Err(e) = proxy(client, &target, delay) {
                        eprintln!("delay-proxy: connection to {target:?} failed: {e}");
                    }
                });
            }
            Err(e) => eprintln!("delay-proxy: accept failed: {e}"),
        }
    }
}

/// Connects `client` to `target` and pumps both directions, each delayed.
fn proxy(client: Stream, target: &Addr, delay: Duration) -> io::Result<()> {
    let server = target.connect()?;
    pump(client.try_clone()?, server.try_clone()?, delay)?;
    pump(server, client, delay)
}

/// Moves bytes from `from` to `to`, each chunk `delay` after it arrived,
/// on a reader and a writer thread; passes end of stream on the same way.
fn pump(mut from: Stream, mut to: Stream, delay: Duration) -> io::Result<()> {
    let (tx, rx) = mpsc::channel::<Chunk>();
    thread::Builder::new().spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let (at, bytes) = match from.read(&mut buf) {
                Ok(0) | Err(_) => (Instant::now() + delay, None),
                Ok(n) => (Instant::now() + delay, Some(buf[..n].to_vec())),
            };
            let end = bytes.is_none();
            if tx.send((at, bytes)).is_err() || end {
                return;
            }
        }
    })?;
    thread::Builder::new().spawn(move || {
        precise_sleeps();
        for (at, bytes) in rx {
            let now = Instant::now();
            if at > now {
                thread::sleep(at - now);
            }
            match bytes {
                Some(b) if to.write_all(&b).is_ok() => {}
                // The peer is gone, or this direction ended: pass it on.
                _ => {
                    to.shutdown(Shutdown::Write);
                    return;
                }
            }
        }
    })?;
    Ok(())
}

/// Asks the kernel to end this thread's sleeps on time: by default it may
/// let them run 50 µs long to batch wake-ups, as much as the delays we add.
fn precise_sleeps() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only changes
    // the calling thread's timer slack; no memory is passed.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}
