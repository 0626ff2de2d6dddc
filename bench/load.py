#!/usr/bin/env python3
"""Load test: many builds at once against one scratchd, each with several
connections writing and verifying its own data; then everything must be back
to idle. Not part of CI (the e2e suite runs a reduced version,
tests/e2e/load.rs).

    bench/load.py                         # 100 builds x 4 connections, 8 MiB per connection
    bench/load.py --builds 10 --per-conn 2M --backing dir:/var/tmp

Each build is one fio process (--thread, one NBD connection per job) on its
own export name of a `tmpdisk` server: random writes of mixed block sizes,
then every block read back and checked by crc32c (--verify_fatal). Each
build has its own --randseed, so a block that landed on another build's disk
would fail that build's verification (no cross-talk). While they run, the
server's RSS, threads and open descriptors are sampled every 100 ms;
afterwards the export list must be empty and threads, descriptors and RSS
back to their idle values. Prints a summary and exits non-zero on any error.
Needs fio and nbdinfo (apt-get install fio libnbd-bin).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from serverproc import export_names, sample, wait_listening

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def size_bytes(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def run_wave(a, sock, per, tmp):
    """One wave of builds; returns (failures, bytes written, bytes verified)."""
    procs = []
    for b in range(a.builds):
        uri = f"nbd+unix:///build-{b}?socket={sock}"
        procs.append(subprocess.Popen(
            ["fio", f"--name=build-{b}", "--ioengine=nbd", f"--uri={uri}", "--thread",
             "--rw=randwrite", "--bsrange=4k-64k", "--bs_unaligned=0",
             f"--numjobs={a.conns}", "--iodepth=8", f"--size={per}",
             f"--offset_increment={per}", "--verify=crc32c", "--do_verify=1",
             "--verify_fatal=1", "--verify_state_save=0", f"--randseed={b + 1}",
             "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp))
    failures = []
    written = verified = 0
    for b, proc in enumerate(procs):
        out, err = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"build {b}: fio exit {proc.returncode}: {err.strip()[-300:]}")
            continue
        # fio logs connections on stdout before the JSON.
        doc = json.loads(out[out.index("{"):])
        for job in doc["jobs"]:
            w, r = job["write"]["io_bytes"], job["read"]["io_bytes"]
            written += w
            verified += r
            if job["error"] or w != per or r != per:
                failures.append(
                    f"build {b} job {job['jobname']}: error {job['error']}, wrote {w}, verified {r}")
    return failures, written, verified


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--builds", type=int, default=100)
    p.add_argument("--conns", type=int, default=4, help="connections (fio jobs) per build")
    p.add_argument("--per-conn", default="8M", help="bytes each connection writes and verifies")
    p.add_argument("--disk", default="64M", help="size of each build's disk")
    p.add_argument("--backing", default="memory", help="tmpdisk backing= (memory, dir:PATH)")
    p.add_argument("--type", default="none", help="tmpdisk type= (none: no mkfs)")
    p.add_argument("--server", default=os.path.join(ROOT, "target/release/scratchd"))
    p.add_argument("--rounds", type=int, default=1,
                   help="waves of builds against the same server (after-values per wave)")
    p.add_argument("--no-build", action="store_true", help="do not run cargo build --release")
    p.add_argument("--json", help="write the summary as JSON to this file too")
    a = p.parse_args()
    for tool in ("fio", "nbdinfo"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (apt-get install fio libnbd-bin)")
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT, check=True)
    per = size_bytes(a.per_conn)
    assert per * a.conns <= size_bytes(a.disk), "connections' ranges must fit the disk"

    tmp = tempfile.mkdtemp(prefix="scratchd-load-")
    sock = os.path.join(tmp, "nbd.sock")
    server = subprocess.Popen(
        [a.server, "serve", "-U", sock, "tmpdisk", f"size={a.disk}", f"type={a.type}",
         f"backing={a.backing}"],
        stdin=subprocess.DEVNULL)
    try:
        wait_listening(sock, server)
        time.sleep(0.5)
        idle = sample(server.pid)[:3]
        peak = list(idle)
        stop = threading.Event()

        def sampler():
            while not stop.is_set():
                try:
                    for i, v in enumerate(sample(server.pid)[:3]):
                        peak[i] = max(peak[i], v)
                except OSError:
                    return
                time.sleep(0.1)

        t = threading.Thread(target=sampler)
        t.start()
        start = time.monotonic()
        failures = []
        written = verified = 0
        afters = []
        for wave in range(a.rounds):
            f, w, v = run_wave(a, sock, per, tmp)
            failures += f
            written += w
            verified += v
            if a.rounds > 1:
                time.sleep(3)
                afters.append(sample(server.pid)[:3])
                with open(f"/proc/{server.pid}/status") as f:
                    kinds = " ".join(l.split(":")[0] + "=" + l.split()[1] for l in f
                                     if l.startswith(("RssAnon", "RssShmem", "RssFile")))
                print(f"wave {wave}: (RSS KiB, threads, fds) after {afters[-1]} ({kinds} KiB)",
                      flush=True)
        elapsed = time.monotonic() - start
        stop.set()
        t.join()

        # Back to idle: no exports, and threads, descriptors, RSS as before.
        deadline = time.monotonic() + 20
        while True:
            left = export_names(sock)
            if left is None:
                sys.exit("nbdinfo --list failed: is the server still there?")
            now = sample(server.pid)[:3]
            back = (not left and now[1] <= idle[1] and now[2] <= idle[2]
                    and now[0] <= idle[0] + 16 * 1024)
            if back or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not back:
            failures.append(f"not back to idle after 20 s: exports {left[:5]}..., "
                            f"(RSS KiB, threads, fds) {now} vs idle {idle}")
        if server.poll() is not None:
            failures.append(f"scratchd died: {server.returncode}")
        summary = {
            "builds": a.builds, "connections": a.builds * a.conns,
            "per_connection_bytes": per, "backing": a.backing,
            "written_bytes": written, "verified_bytes": verified,
            "seconds": round(elapsed, 1),
            "idle": {"rss_kib": idle[0], "threads": idle[1], "fds": idle[2]},
            "peak": {"rss_kib": peak[0], "threads": peak[1], "fds": peak[2]},
            "after": {"rss_kib": now[0], "threads": now[1], "fds": now[2], "exports": len(left)},
            "after_each_wave": afters,
            "failures": failures,
        }
        print(f"{a.builds} builds x {a.conns} connections, {per >> 20} MiB each "
              f"({written >> 20} MiB written, {verified >> 20} MiB verified) in {elapsed:.1f} s")
        print(f"{'':10}{'RSS MiB':>10}{'threads':>10}{'fds':>10}")
        for name, (rss, th, fd) in (("idle", idle), ("peak", peak), ("after", now)):
            print(f"{name:10}{rss / 1024:>10.1f}{th:>10}{fd:>10}")
        print(f"exports left: {len(left)}; failures: {len(failures)}")
        for f in failures[:20]:
            print("  " + f)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(summary, f, indent=1)
        return 1 if failures else 0
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
