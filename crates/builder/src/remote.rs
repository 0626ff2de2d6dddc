//! Our NBD client to a disk on a server, as both front ends open it.

use scratchd_client::{Client, Handshaken, Options, Replies, Target};
use scratchd_store::BlockDevice;

use crate::id::fingerprint;

/// Connects our client to the disk `target` names, over up to
/// `connections` connections (several only when the server allows
/// multi-conn).
pub fn connect(target: &Target, connections: usize) -> Result<Client, scratchd_client::Error> {
    let client = Client::connect_with(target, &options(connections))?;
    // The export's name is the disk's key: its fingerprint at info level.
    let server = Target {
        export: String::new(),
        ..target.clone()
    };
    tracing::info!(
        %server,
        disk = %fingerprint(&target.export),
        connections = client.connection_count(),
        size = client.size(),
        "connected"
    );
    Ok(client)
}

/// Makes the disk `target` names start as the snapshot `from` (when the
/// server makes it now: an existing disk is opened as it is), and holds it
/// open with one idle, negotiated connection until the result is dropped,
/// so that the front end's own connections find it. No thread is started:
/// a run still enters its mount namespace after this.
///
/// # Errors
///
/// When the server cannot be reached or refuses (no such snapshot; a
/// server without snapshots refuses the option).
pub fn seed(target: &Target, from: &str) -> Result<Handshaken, scratchd_client::Error> {
    let options = Options {
        connections: 1,
        replies: Replies::Simple,
        block_status: false,
        from: Some(from.to_owned()),
        ..Default::default()
    };
    let seed = Client::handshake_only(target, &options)?;
    tracing::info!(disk = %fingerprint(&target.export), size = seed.info.size, "disk started as a snapshot");
    Ok(seed)
}

/// The client's options for up to `connections` connections (at least one).
pub fn options(connections: usize) -> Options {
    Options {
        connections: connections.max(1),
        ..Default::default()
    }
}

/// Disconnects cleanly (DISC), so that the server knows the disk is let go
/// (its linger starts), if nothing else holds the client; otherwise only
/// drops this reference.
pub fn close(client: std::sync::Arc<Client>) {
    match std::sync::Arc::try_unwrap(client) {
        Ok(client) => {
            if let Err(e) = client.close() {
                tracing::warn!(error = %e, "disconnecting from the server");
            }
        }
        // A health check holds it for an instant: dropping disconnects as
        // well, without the errors.
        Err(client) => drop(client),
    }
}
