//! systemd's readiness protocol (`sd_notify`): with `Type=notify`, systemd
//! starts units ordered after scratchd only once it says `READY=1`, and
//! shows `STATUS=` lines in `systemctl status`.
//!
//! The protocol is one datagram per message to the Unix socket named by
//! `NOTIFY_SOCKET` (a path, or an abstract name written with a leading
//! `@`), so a few lines here replace a dependency. Without the variable
//! (not under systemd) every message is a no-op; a failed send is logged
//! and otherwise ignored, as libsystemd's `sd_notify` does.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

use tracing::warn;

/// Where readiness messages go, taken from the environment once.
#[derive(Clone)]
pub struct Notifier {
    /// The value of `NOTIFY_SOCKET`, if systemd set it.
    socket: Option<OsString>,
}

impl Notifier {
    /// Takes `NOTIFY_SOCKET` out of the environment, so that a `--run`
    /// command or a format command does not think it is the service.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty());
        std::env::remove_var("NOTIFY_SOCKET");
        Notifier { socket }
    }

    /// Sends `state` (`READY=1`, `STOPPING=1`, `STATUS=...`; several
    /// separated by newlines).
    pub fn notify(&self, state: &str) {
        let Some(socket) = &self.socket else {
            return;
        };
        if let Err(e) = send(socket, state) {
            warn!(socket = ?socket, error = %e, "cannot notify systemd");
        }
    }
}

fn send(socket: &OsString, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?
        }
        None => sock.send_to(state.as_bytes(), socket)?,
    };
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "message cut short",
        ));
    }
    Ok(())
}
