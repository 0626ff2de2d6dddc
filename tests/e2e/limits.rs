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
