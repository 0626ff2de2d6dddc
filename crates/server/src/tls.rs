//! TLS for connections that ask for it with `NBD_OPT_STARTTLS` (rustls).
//!
//! Certificates come from one directory in the layout nbdkit and qemu use
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`), so existing
//! deployments carry over. With `verify_peer`, a client must present a
//! certificate signed by that CA.
//!
//! After STARTTLS a connection's two halves share one rustls session:
//! - [`TlsReader`] reads records from the socket without holding the
//!   session's lock (a read may wait for the client for a long time), then
//!   takes the lock to decrypt them;
//! - [`TlsWriter`] encrypts under the lock and sends the records with
//!   `MSG_DONTWAIT`, like every socket write (see [`crate::transport`]):
//!   records the socket does not take stay in the session, bounded by one
//!   plaintext chunk, and are sent by the next write or
//!   [`TlsWriter::try_flush`].
//!
//! TLS-PSK is not offered: rustls has no external pre-shared keys for TLS
//! 1.3 (see `docs/SECURITY.md`).

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use scratchd_store::sync;

use crate::identity::Fingerprint;

/// Plaintext encrypted per write call: bounds what the session holds when
/// the client is slow to read.
const CHUNK: usize = 64 * 1024;

/// `--tls`: whether clients may, or must, use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Offered; clients choose.
    On,
    /// Required: every option but STARTTLS and ABORT is refused until TLS
    /// is up.
    Require,
}

/// Why the TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verification: {0}")]
    Verifier(String),
}

/// A server's TLS setup, shared by its connections.
pub struct TlsConfig {
    pub mode: TlsMode,
    config: Arc<ServerConfig>,
}

impl TlsConfig {
    /// Loads `dir/server-cert.pem`, `dir/server-key.pem`, and with
    /// `verify_peer` also `dir/ca-cert.pem` for client certificates.
    pub fn load(dir: &Path, mode: TlsMode, verify_peer: bool) -> Result<Self, TlsConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = if verify_peer {
            let mut roots = RootCertStore::empty();
            for cert in certificates(&dir.join("ca-cert.pem"))? {
                roots.add(cert)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key_path = dir.join("server-key.pem");
        let key =
            PrivateKeyDer::from_pem_reader(open(&key_path)?).map_err(|e| TlsConfigError::Pem {
                path: key_path.clone(),
                reason: e.to_string(),
            })?;
        let config = builder.with_single_cert(certificates(&dir.join("server-cert.pem"))?, key)?;
        Ok(TlsConfig {
            mode,
            config: Arc::new(config),
        })
    }

    /// Runs the server side of a TLS handshake on `socket` (blocking, within
    /// the socket's read timeout) and splits the session into its halves;
    /// with them, the SHA-256 of the client's certificate when it presented
    /// one (verified, with `verify_peer`).
    pub fn accept(
        &self,
        socket: OwnedFd,
    ) -> io::Result<(TlsReader, TlsWriter, Option<Fingerprint>)> {
        let conn = ServerConnection::new(self.config.clone()).map_err(invalid)?;
        let mut stream = SocketIo(socket);
        let mut conn = conn;
        while conn.is_handshaking() {
            conn.complete_io(&mut stream)?;
        }
        let fingerprint = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|cert| fingerprint(cert.as_ref()));
        let shared = Arc::new(Session {
            conn: Mutex::new(conn),
            socket: stream.0,
        });
        Ok((
            TlsReader {
                session: shared.clone(),
                raw: vec![0; 18 * 1024],
                start: 0,
                end: 0,
            },
            TlsWriter { session: shared },
            fingerprint,
        ))
    }
}

/// SHA-256 of a certificate, with the hash of the provider's own suite.
fn fingerprint(der: &[u8]) -> Fingerprint {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let hash = suite.tls13().expect("a TLS 1.3 suite").common.hash_provider;
    let mut out = [0u8; 32];
    out.copy_from_slice(hash.hash(der).as_ref());
    Fingerprint(out)
}

fn open(path: &Path) -> Result<BufReader<File>, TlsConfigError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| TlsConfigError::Read {
            path: path.to_owned(),
            source,
        })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_reader_iter(open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

/// One connection's TLS session and its socket.
struct Session {
    conn: Mutex<ServerConnection>,
    socket: OwnedFd,
}

/// A socket read and written with plain system calls (blocking reads,
/// sends that never wait).
struct SocketIo(OwnedFd);

impl Read for SocketIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_socket(self.0.as_fd(), buf)
    }
}

impl Write for SocketIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send_now(self.0.as_fd(), buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn read_socket(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match rustix::io::read(fd, &mut *buf) {
            Err(rustix::io::Errno::INTR) => {}
            r => return r.map_err(io::Error::from),
        }
    }
}

fn send_now(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
    loop {
        match rustix::net::send(fd, buf, flags) {
            Err(rustix::io::Errno::INTR) => {}
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Sends the session's pending records as far as the socket takes them;
/// `WouldBlock` when some remain.
fn flush(conn: &mut ServerConnection, fd: BorrowedFd<'_>) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(&mut Sender(fd))?;
    }
    Ok(())
}

struct Sender<'a>(BorrowedFd<'a>);

impl Write for Sender<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send_now(self.0, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The reading half of a TLS connection.
pub struct TlsReader {
    session: Arc<Session>,
    /// Records read from the socket and not yet given to the session
    /// (`raw[start..end]`): it takes them only while no plaintext waits.
    raw: Vec<u8>,
    start: usize,
    end: usize,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(n) = self.decrypt(buf)? {
                return Ok(n);
            }
            // Waits for the client without the lock: the other half may be
            // sending replies meanwhile. Timeouts pass through (idleness).
            let n = read_socket(self.session.socket.as_fd(), &mut self.raw)?;
            if n == 0 {
                return Ok(0);
            }
            (self.start, self.end) = (0, n);
        }
    }
}

impl TlsReader {
    /// Plaintext from records already read, if there is any.
    fn decrypt(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut conn = sync::lock(&self.session.conn);
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
            // Alerts or key updates to answer; a full socket keeps them for
            // the next write.
            match flush(&mut conn, self.session.socket.as_fd()) {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
    }
}

/// The writing half of a TLS connection.
pub struct TlsWriter {
    session: Arc<Session>,
}

impl TlsWriter {
    /// Encrypts and sends as much of `buf` as the socket takes now (at most
    /// one chunk), after records still pending; `WouldBlock` when those
    /// could not all go.
    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut conn = sync::lock(&self.session.conn);
        let fd = self.session.socket.as_fd();
        flush(&mut conn, fd)?;
        let n = buf.len().min(CHUNK);
        conn.writer().write_all(&buf[..n])?;
        match flush(&mut conn, fd) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    /// Sends records still pending; `WouldBlock` when some remain.
    pub fn try_flush(&mut self) -> io::Result<()> {
        let mut conn = sync::lock(&self.session.conn);
        flush(&mut conn, self.session.socket.as_fd())
    }

    /// Whether encrypted records wait for the socket.
    pub fn pending(&self) -> bool {
        sync::lock(&self.session.conn).wants_write()
    }

    pub fn socket(&self) -> BorrowedFd<'_> {
        self.session.socket.as_fd()
    }
}
