//! The memory budget of the plain `memory` backend: a full budget answers
//! ENOSPC, never takes the server down, and trimming gives the room back.

use crate::util::{libnbd, Server};

/// With `--memory-limit 1M`, a 2 MiB disk takes 1 MiB of writes; the next
/// write fails with ENOSPC (and changes nothing), reads and the rest of the
/// protocol keep working, and after a trim the write succeeds.
#[test]
fn full_memory_budget_is_enospc_and_trim_makes_room() {
    let server = Server::start(&["--memory-limit", "1M", "memory", "size=2M"]);
    libnbd(
        &server.uri(),
        r#"
h = connect()
h.pwrite(b"a" * (1 << 20), 0)
fails("ENOSPC", h.pwrite, b"b" * 4096, 1 << 20)
eq(h.pread(4096, 1 << 20), bytes(4096), "failed write left its range untouched")
eq(h.pread(4096, 0), b"a" * 4096, "earlier data intact")
h.trim(1 << 20, 0)
h.pwrite(b"b" * 4096, 1 << 20)
eq(h.pread(4096, 1 << 20), b"b" * 4096, "write after trim")
"#,
        &[],
    );
}

/// With `--max-connections 2`, a third client is closed at once while two
/// are open (before any handshake), the two keep working, and once one of
/// them leaves a new client is served.
#[test]
fn clients_past_max_connections_are_closed_until_one_leaves() {
    let server = Server::start(&["--max-connections", "2", "memory", "size=1M"]);
    libnbd(
        &server.uri(),
        r#"
import time

def admitted():
    """A client, retried while slots of clients that just left are freed
    (the server's readiness probe is one)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return connect()
        except nbd.Error:
            assert time.monotonic() < deadline, "no room for a client"
            time.sleep(0.05)

a, b = admitted(), admitted()
try:
    connect()
    raise AssertionError("a third client was served")
except nbd.Error as e:
    print("third client:", e)
a.pwrite(b"a" * 512, 0)
eq(b.pread(512, 0), b"a" * 512, "the two admitted clients work")
a.shutdown()
del a
c = admitted()
eq(c.pread(512, 0), b"a" * 512, "a client admitted after one left")
"#,
        &[],
    );
}
