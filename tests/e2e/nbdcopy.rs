//! libnbd's `nbdcopy`: bulk copies in and out over several connections,
//! sparse copies, and the file backend's backing file.

use std::path::Path;
use std::process::Command;

use crate::util::{
    assert_files_equal, data, hole, nbdinfo_map, nbdinfo_test, random_file, require, run,
    sparse_file, Server,
};

const MIB: u64 = 1 << 20;

/// `nbdcopy [ARGS...] FROM TO`; returns its stderr.
fn nbdcopy(
    args: &[&str],
    from: impl AsRef<std::ffi::OsStr>,
    to: impl AsRef<std::ffi::OsStr>,
) -> String {
    require("nbdcopy");
    let out = run(Command::new("nbdcopy").args(args).arg(from).arg(to));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Copies the export out to a new file and asserts it equals `src` byte for
/// byte.
fn assert_export_equals(server: &Server, src: &Path) {
    let back = server.dir.path().join("back.img");
    nbdcopy(&[], server.uri(), &back);
    assert_files_equal(src, &back);
}

/// 256 MiB of random data copied in over nbdcopy's default multi-conn (the
/// server advertises it, nbdcopy opens 4 connections) and back out is
/// byte-for-byte the same, and the disk is all data.
#[test]
fn nbdcopy_round_trip_256m_multi_conn_bytes_equal() {
    let server = Server::start(&["memory", "size=256M"]);
    let uri = server.uri();
    assert_eq!(
        nbdinfo_test("--can", "multi-conn", &uri),
        0,
        "multi-conn not advertised"
    );
    let src = server.dir.path().join("src.img");
    random_file(&src, 256 * MIB as usize, 0x256);
    // --threads: nbdcopy opens no more connections than threads (2 cores here).
    let log = nbdcopy(&["--verbose", "--threads=4"], &src, &uri);
    let setup = log
        .lines()
        .find(|l| l.starts_with("nbdcopy: connections="))
        .expect("nbdcopy setup line");
    assert!(setup.starts_with("nbdcopy: connections=4 "), "{setup}");
    assert_export_equals(&server, &src);
    assert_eq!(nbdinfo_map(&uri), [data(0, 256 * MIB)]);
}

/// A sparse file copied over a fully written disk leaves data only where
/// the file has it: nbdcopy zeroes the rest and the zeroes become holes.
#[test]
fn nbdcopy_sparse_source_leaves_holes_on_memory_disk() {
    let server = Server::start(&["memory", "size=8M"]);
    let uri = server.uri();
    let full = server.dir.path().join("full.img");
    random_file(&full, 8 * MIB as usize, 1);
    nbdcopy(&[], &full, &uri);
    assert_eq!(nbdinfo_map(&uri), [data(0, 8 * MIB)]);
    let src = server.dir.path().join("sparse.img");
    sparse_file(&src, 8 * MIB, &[(MIB, 4096), (5 * MIB + 100, 300)]);
    nbdcopy(&[], &src, &uri);
    assert_eq!(
        nbdinfo_map(&uri),
        [
            hole(0, MIB),
            data(MIB, 4096),
            hole(MIB + 4096, 4 * MIB - 4096),
            data(5 * MIB, 4096),
            hole(5 * MIB + 4096, 3 * MIB - 4096),
        ]
    );
    assert_export_equals(&server, &src);
}

/// Copied into a `file` export, the backing file holds exactly the source,
/// and the source's zero run stays unallocated there.
#[test]
fn nbdcopy_into_file_backend_writes_backing_file_exactly() {
    use std::os::unix::fs::MetadataExt;
    let (server, backing) = Server::on_file(16 * MIB);
    let src = server.dir.path().join("src.img");
    sparse_file(
        &src,
        16 * MIB,
        &[(0, 4 * MIB as usize), (8 * MIB, 8 * MIB as usize)],
    );
    nbdcopy(&[], &src, server.uri());
    assert_files_equal(&src, &backing);
    let allocated = std::fs::metadata(&backing).unwrap().blocks() * 512;
    assert!(
        allocated <= 12 * MIB + 64 * 1024,
        "{allocated} bytes allocated for 12 MiB of data"
    );
    assert_eq!(
        nbdinfo_map(&server.uri()),
        [
            data(0, 4 * MIB),
            hole(4 * MIB, 4 * MIB),
            data(8 * MIB, 8 * MIB)
        ]
    );
    assert_export_equals(&server, &src);
}
