//! TLS for `nbds://` targets: STARTTLS, then a rustls client session.
//!
//! Certificates come from one directory, as for libnbd and nbdkit:
//! `ca-cert.pem` checks the server; `client-cert.pem` and `client-key.pem`,
//! when both are there, identify the client (servers that verify peers
//! require them). The server's name is the URI's host (`localhost` for Unix
//! sockets).
//!
//! After the handshake the session is shared by the connection's two
//! halves: the reply thread reads records from the socket without the lock
//! and takes it only to decrypt; a writer encrypts under the lock and sends
//! the records after releasing it (the connection's writer lock keeps
//! records in order), so a writer waiting for a full socket never keeps the
//! reply thread from draining the replies the server is waiting to send.

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::transport::{Closer, ReadHalf, Stream, WriteHalf};

/// Plaintext encrypted per write: bounds the records built under the lock.
const CHUNK: usize = 64 * 1024;

fn lock(conn: &Mutex<ClientConnection>) -> MutexGuard<'_, ClientConnection> {
    conn.lock().unwrap_or_else(PoisonError::into_inner)
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

fn read_pem<T>(
    path: &Path,
    parse: impl FnOnce(BufReader<std::fs::File>) -> Result<T, String>,
) -> io::Result<T> {
    let file = std::fs::File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    parse(BufReader::new(file)).map_err(|e| invalid(format!("{}: {e}", path.display())))
}

/// The client configuration for the certificates in `dir`.
pub fn config(dir: &Path) -> io::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    let cas = read_pem(&dir.join("ca-cert.pem"), |r| {
        CertificateDer::pem_reader_iter(r)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    })?;
    for ca in cas {
        roots.add(ca).map_err(invalid)?;
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(invalid)?
        .with_root_certificates(roots);
    let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    let config = if cert.exists() && key.exists() {
        let chain = read_pem(&cert, |r| {
            CertificateDer::pem_reader_iter(r)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())
        })?;
        let key = read_pem(&key, |r| {
            PrivateKeyDer::from_pem_reader(r).map_err(|e| e.to_string())
        })?;
        builder.with_client_auth_cert(chain, key).map_err(invalid)?
    } else {
        builder.with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// A TLS session over a socket.
#[derive(Debug)]
pub struct TlsStream {
    conn: Arc<Mutex<ClientConnection>>,
    socket: Box<Stream>,
    /// Records read from the socket and not yet given to the session.
    raw: Vec<u8>,
    start: usize,
    end: usize,
}

impl TlsStream {
    /// Runs the TLS handshake on `socket` (blocking, within its timeouts).
    pub fn connect(config: Arc<ClientConfig>, host: &str, mut socket: Stream) -> io::Result<Self> {
        let name = ServerName::try_from(host.to_owned()).map_err(invalid)?;
        let mut conn = ClientConnection::new(config, name).map_err(invalid)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut socket)?;
        }
        Ok(TlsStream {
            conn: Arc::new(Mutex::new(conn)),
            socket: Box::new(socket),
            raw: vec![0; 18 * 1024],
            start: 0,
            end: 0,
        })
    }

    pub(crate) fn socket(&self) -> &Stream {
        &self.socket
    }

    /// A read half (the reply thread's), a write half and a closer.
    pub(crate) fn split(self) -> io::Result<(ReadHalf, WriteHalf, Closer)> {
        let closer = self.socket.try_clone_socket()?;
        let writer = TlsWriter {
            conn: self.conn.clone(),
            socket: self.socket.try_clone_socket()?,
        };
        Ok((
            ReadHalf(Box::new(self)),
            WriteHalf(Box::new(writer)),
            Closer(closer),
        ))
    }

    /// Plaintext from records already read, if there is any.
    fn decrypt(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut conn = lock(&self.conn);
        loop {
            match conn.reader().read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.start == self.end {
                return Ok(None);
            }
            let mut records = &self.raw[self.start..self.end];
            self.start += conn.read_tls(&mut records)?;
            conn.process_new_packets().map_err(invalid)?;
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(n) = self.decrypt(buf)? {
                return Ok(n);
            }
            let n = self.socket.read(&mut self.raw)?;
            if n == 0 {
                return Ok(0);
            }
            (self.start, self.end) = (0, n);
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        encrypt_and_send(&self.conn, &mut self.socket, buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let buf = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
        self.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writing half: encrypts under the session's lock, sends without it.
struct TlsWriter {
    conn: Arc<Mutex<ClientConnection>>,
    socket: Stream,
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        encrypt_and_send(&self.conn, &mut self.socket, buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // Gather small pieces (a request header and its payload) into one
        // record run, as a plain socket's writev would send them together.
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut joined = Vec::with_capacity(total.min(CHUNK));
        for b in bufs {
            if joined.len() + b.len() > CHUNK && !joined.is_empty() {
                break;
            }
            let room = CHUNK - joined.len();
            joined.extend_from_slice(&b[..b.len().min(room)]);
        }
        self.write(&joined)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn encrypt_and_send(
    conn: &Mutex<ClientConnection>,
    socket: &mut Stream,
    buf: &[u8],
) -> io::Result<usize> {
    let n = buf.len().min(CHUNK);
    let mut records = Vec::with_capacity(n + 256);
    {
        let mut conn = lock(conn);
        conn.writer().write_all(&buf[..n])?;
        while conn.wants_write() {
            conn.write_tls(&mut records)?;
        }
    }
    socket.write_all(&records)?;
    Ok(n)
}
