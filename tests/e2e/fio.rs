//! fio's nbd engine (one connection per job, many requests in flight):
//! random writes verified by reading them back.

use std::process::Command;

use crate::util::{require, run, stdout, Json, Server};

const MIB: u64 = 1 << 20;

/// Runs `jobs` fio jobs against `uri`, each writing its own `per_job` MiB
/// slice (jobs share one disk, so their ranges must not overlap) in random
/// 4 KiB blocks with `iodepth` in flight, then verifying every block by
/// crc32c. Asserts every job's exact byte counts and no errors.
pub fn fio_randwrite_verify(uri: &str, jobs: u64, per_job: u64, iodepth: u32) {
    require("fio");
    let size = format!("{}M", per_job / MIB);
    let out = run(Command::new("fio").args([
        "--name=scratch",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        &format!("--numjobs={jobs}"),
        &format!("--iodepth={iodepth}"),
        &format!("--size={size}"),
        &format!("--offset_increment={size}"),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        // Otherwise fio leaves NAME-N-verify.state files in the working directory.
        "--verify_state_save=0",
        "--output-format=json",
    ]));
    // fio logs each connection, on stdout before the JSON when not on a tty.
    let log = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    let connections = log.matches("connected to NBD server").count();
    assert_eq!(connections as u64, jobs, "one NBD connection per job");
    let j = Json::parse(&stdout(&out));
    assert_eq!(j.len("jobs") as u64, jobs);
    for i in 0..jobs {
        let job = |k: &str| j.int(&format!("jobs.{i}.{k}"));
        assert_eq!(job("error"), 0, "job {i} error");
        assert_eq!(job("write.io_bytes"), per_job, "job {i} bytes written");
        assert_eq!(job("write.total_ios"), per_job / 4096, "job {i} writes");
        assert_eq!(job("read.io_bytes"), per_job, "job {i} bytes verified");
    }
}

/// Four fio jobs (four connections, 16 requests in flight each) write 64 MiB
/// each to one memory disk and read every block back intact.
#[test]
fn fio_four_connections_randwrite_verify_on_memory_disk() {
    let server = Server::start(&["memory", "size=256M"]);
    fio_randwrite_verify(&server.uri(), 4, 64 * MIB, 16);
}

/// Two fio jobs write 16 MiB each to a file-backed export and read every
/// block back intact.
#[test]
fn fio_two_connections_randwrite_verify_on_file_backend() {
    let (server, _) = Server::on_file(32 * MIB);
    fio_randwrite_verify(&server.uri(), 2, 16 * MIB, 8);
}
