//! A reduced version of the load test `bench/load.py` (100 builds × 4
//! connections): 10 builds × 4 connections at once, each writing and
//! verifying its own data, then the server back to idle.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::{eventually, require, stdout, Json, Server};

/// (RSS KiB, threads, open descriptors) of process `pid`.
fn sample(pid: u32) -> (u64, u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (field("VmRSS:"), field("Threads:"), fds)
}

/// Ten fio processes, one per build, four connections each, write random
/// blocks of mixed sizes to their own build's disk and verify every one by
/// crc32c (each with its own random seed, so a block that landed on another
/// build's disk would fail verification). Afterwards no disk is left and
/// the server's threads and descriptors are back to their idle counts, its
/// memory within a few MiB of idle.
#[test]
fn ten_builds_of_four_connections_verify_their_data_and_leave_nothing() {
    require("fio");
    require("nbdinfo");
    let server = Server::start(&["tmpdisk", "size=16M", "type=none"]);
    let pid = server.pid();
    let idle = sample(pid);
    let builds: Vec<_> = (0..10)
        .map(|b| {
            Command::new("fio")
                .args([
                    &format!("--name=build-{b}"),
                    "--ioengine=nbd",
                    &format!("--uri={}", server.uri_for(&format!("build-{b}"))),
                    "--thread",
                    "--rw=randwrite",
                    "--bsrange=4k-64k",
                    "--numjobs=4",
                    "--iodepth=8",
                    "--size=2M",
                    "--offset_increment=2M",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--verify_fatal=1",
                    "--verify_state_save=0",
                    &format!("--randseed={}", b + 1),
                    "--output-format=json",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run fio")
        })
        .collect();
    for (b, fio) in builds.into_iter().enumerate() {
        let out = fio.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "build {b}: fio failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = stdout(&out);
        let j = Json::parse(&text[text.find('{').expect("fio JSON")..]);
        assert_eq!(j.len("jobs"), 4, "build {b}: jobs");
        for i in 0..4 {
            let job = |k: &str| j.int(&format!("jobs.{i}.{k}"));
            assert_eq!(job("error"), 0, "build {b} job {i}: error");
            assert_eq!(job("write.io_bytes"), 2 << 20, "build {b} job {i}: written");
            assert_eq!(job("read.io_bytes"), 2 << 20, "build {b} job {i}: verified");
        }
    }
    let uri = server.uri();
    eventually(
        "every build's disk to be destroyed",
        Duration::from_secs(10),
        || {
            let out = crate::util::run(Command::new("nbdinfo").args(["--list", "--json", &uri]));
            Json::parse(&stdout(&out)).len("exports") == 0
        },
    );
    // Memory: within 32 MiB of idle (what the allocator keeps after 40
    // connections' buffers, 10-21 MiB measured, docs/RELIABILITY.md); a
    // leak of the builds' data (80 MiB written) would not fit.
    let back = crate::util::poll(Duration::from_secs(10), || {
        let now = sample(pid);
        (now.1 <= idle.1 && now.2 <= idle.2 && now.0 < idle.0 + 32 * 1024).then_some(())
    });
    assert!(
        back.is_some(),
        "threads, descriptors and memory not back to idle: idle (RSS KiB, threads, fds) = {idle:?}, now {:?}",
        sample(pid)
    );
}
