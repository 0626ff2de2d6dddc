#!/usr/bin/env python3
"""Soak test: one scratchd serving mixed create/write/verify/destroy cycles
for a long time, its RSS, threads, descriptors and live exports sampled every
10 s, plotted to a PNG with gnuplot. Not part of CI.

    bench/soak.py                         # 30 minutes, 6 workers
    bench/soak.py --minutes 10 --out docs/soak

Each worker loops: a new build name (so its disk is created, formatted with
the server's default mkfs, and destroyed when the cycle ends), then one of
  - fio, 1-4 connections, random writes of mixed sizes verified by crc32c;
  - nbdcopy of a random file into the build and back out, compared;
  - fio against a build another worker holds open, on its own range
    (several clients on one disk, then the disk outlives one of them);
Failures are counted, never retried. At the end: a CSV and a PNG
(`OUT.csv`, `OUT.png`) and a summary; the curves must be flat (RSS and
descriptors at the end within a small margin of their values after the first
minutes). Needs fio, nbdcopy, nbdinfo, gnuplot (apt-get install fio
libnbd-bin gnuplot-nox).
"""

import argparse
import filecmp
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from serverproc import export_names, sample, wait_listening

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def exports(sock):
    """How many exports the server has; -1 when it cannot be asked."""
    names = export_names(sock)
    return -1 if names is None else len(names)


class Soak:
    def __init__(self, a, sock, tmp):
        self.a, self.sock, self.tmp = a, sock, tmp
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts = {"fio": 0, "nbdcopy": 0, "shared": 0, "failures": 0}
        self.errors = []
        self.held = []  # (name, process) of builds held open by a worker

    def uri(self, name):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def fail(self, what):
        with self.lock:
            self.counts["failures"] += 1
            self.errors.append(what)

    def count(self, kind):
        with self.lock:
            self.counts[kind] += 1

    def fio(self, name, jobs, per, offset=0, seed=1):
        out = subprocess.run(
            ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={self.uri(name)}", "--thread",
             "--rw=randwrite", "--bsrange=4k-128k", f"--numjobs={jobs}", "--iodepth=8",
             f"--size={per}", f"--offset={offset}", f"--offset_increment={per}",
             "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
             f"--randseed={seed}", "--output-format=json"],
            capture_output=True, text=True, cwd=self.tmp)
        if out.returncode != 0:
            return f"fio exit {out.returncode}: {out.stderr.strip()[-200:]}"
        doc = json.loads(out.stdout[out.stdout.index("{"):])
        for job in doc["jobs"]:
            if job["error"] or job["write"]["io_bytes"] != per or job["read"]["io_bytes"] != per:
                return f"fio job {job['jobname']}: {job['error']}"
        return None

    def worker(self, w):
        rng = random.Random(w)
        cycle = 0
        src = os.path.join(self.tmp, f"src-{w}")
        back = os.path.join(self.tmp, f"back-{w}")
        while not self.stop.is_set():
            cycle += 1
            name = f"w{w}-c{cycle}"
            kind = rng.choice(["fio", "fio", "nbdcopy", "shared"])
            if kind == "fio":
                err = self.fio(name, rng.randint(1, 4), rng.choice([1, 2, 4, 8]) * MIB,
                               seed=rng.randint(1, 1 << 30))
            elif kind == "nbdcopy":
                with open(src, "wb") as f:
                    f.write(os.urandom(rng.choice([1, 4, 16]) * MIB))
                # One process holds the disk while nbdcopy goes in and out.
                holder = subprocess.Popen(
                    ["/usr/bin/python3", "-c",
                     "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
                     "print('ready',flush=True)\nsys.stdin.read()", self.uri(name)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                err = None
                if holder.stdout.readline().strip() != "ready":
                    err = "holder did not connect"
                for cmd in ([src, self.uri(name)], [self.uri(name), back]):
                    if err is None:
                        r = subprocess.run(["nbdcopy", "--connections=2"] + cmd,
                                           capture_output=True, text=True)
                        if r.returncode != 0:
                            err = f"nbdcopy: {r.stderr.strip()[-200:]}"
                if err is None:
                    # The disk is 64M; the copy out is the whole disk.
                    n = os.path.getsize(src)
                    with open(src, "rb") as a, open(back, "rb") as b:
                        if a.read() != b.read(n):
                            err = "nbdcopy round trip differs"
                holder.stdin.close()
                holder.wait()
            else:
                # Two fio runs on one disk, on disjoint ranges, one after
                # the other while a holder keeps the disk.
                holder = subprocess.Popen(
                    ["/usr/bin/python3", "-c",
                     "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
                     "print('ready',flush=True)\nsys.stdin.read()", self.uri(name)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                err = None if holder.stdout.readline().strip() == "ready" else "holder"
                for part in range(2):
                    if err is None:
                        err = self.fio(name, 2, 4 * MIB, offset=part * 16 * MIB, seed=part + 7)
                holder.stdin.close()
                holder.wait()
            if err:
                self.fail(f"worker {w} cycle {cycle} ({kind}): {err}")
            else:
                self.count(kind)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--interval", type=float, default=10, help="seconds between samples")
    p.add_argument("--out", default="soak", help="OUT.csv and OUT.png are written")
    p.add_argument("--server", default=os.path.join(ROOT, "target/release/scratchd"))
    p.add_argument("--no-build", action="store_true")
    a = p.parse_args()
    for tool in ("fio", "nbdcopy", "nbdinfo", "gnuplot"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (apt-get install fio libnbd-bin gnuplot-nox)")
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="scratchd-soak-")
    sock = os.path.join(tmp, "nbd.sock")
    server = subprocess.Popen([a.server, "serve", "-U", sock, "tmpdisk", "size=64M"],
                              stdin=subprocess.DEVNULL)
    try:
        wait_listening(sock, server)
        soak = Soak(a, sock, tmp)
        workers = [threading.Thread(target=soak.worker, args=(w,)) for w in range(a.workers)]
        for t in workers:
            t.start()
        rows = []
        start = time.monotonic()
        end = start + a.minutes * 60
        while True:
            t = time.monotonic() - start
            rss, threads, fds, anon, shmem = sample(server.pid)
            with soak.lock:
                done = sum(v for k, v in soak.counts.items() if k != "failures")
                failures = soak.counts["failures"]
            rows.append((t, rss, threads, fds, exports(sock), done, failures, anon, shmem))
            print(f"{t:7.0f} s  RSS {rss / 1024:7.1f} MiB (anon {anon / 1024:6.1f})  "
                  f"threads {threads:4}  fds {fds:4}  "
                  f"exports {rows[-1][4]:3}  cycles {done}  failures {failures}", flush=True)
            if time.monotonic() >= end:
                break
            time.sleep(max(0, min(a.interval, end - time.monotonic())))
        soak.stop.set()
        for t in workers:
            t.join()
        time.sleep(3)
        rss, threads, fds, anon, shmem = sample(server.pid)
        rows.append((time.monotonic() - start, rss, threads, fds, exports(sock),
                     rows[-1][5], soak.counts["failures"], anon, shmem))
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait()
    with open(a.out + ".csv", "w") as f:
        f.write("seconds,rss_kib,threads,fds,exports,cycles,failures,rss_anon_kib,rss_shmem_kib\n")
        for r in rows:
            f.write(",".join(str(round(v, 1)) for v in r) + "\n")
    plot = f"""
set terminal pngcairo size 900,560 noenhanced
set output '{a.out}.png'
set datafile separator ','
set key below
set xlabel 'minutes'
set ylabel 'RSS (MiB)'
set y2label 'threads, descriptors, exports'
set ytics nomirror
set y2tics
set yrange [0:*]
set y2range [0:*]
set title 'scratchd soak: {a.minutes:g} min, {a.workers} workers, {rows[-1][5]} cycles, {soak.counts["failures"]} failures'
plot '{a.out}.csv' every ::1 using ($1/60):($2/1024) with lines lw 2 title 'RSS (MiB)', \\
     '' every ::1 using ($1/60):($8/1024) with lines lw 2 title 'of which anonymous: disks and buffers (MiB)', \\
     '' every ::1 using ($1/60):4 axes x1y2 with lines title 'descriptors', \\
     '' every ::1 using ($1/60):3 axes x1y2 with lines title 'threads', \\
     '' every ::1 using ($1/60):5 axes x1y2 with steps title 'live exports'
"""
    subprocess.run(["gnuplot"], input=plot, text=True, check=True)
    shutil.rmtree(tmp, ignore_errors=True)
    # Flat: the last in-load samples against those after the first minutes.
    loaded = [r for r in rows[:-1] if r[0] >= 60] or rows[:-1]
    first, last = loaded[: max(1, len(loaded) // 4)], loaded[-max(1, len(loaded) // 4):]
    mean = lambda rs, i: sum(r[i] for r in rs) / len(rs)
    print(f"cycles {rows[-1][5]} ({soak.counts}), failures {soak.counts['failures']}")
    print(f"RSS MiB: first quarter mean {mean(first, 1) / 1024:.1f}, last quarter mean "
          f"{mean(last, 1) / 1024:.1f}, max {max(r[1] for r in rows) / 1024:.1f}")
    print(f"anonymous (RssAnon: disks, buffers) MiB: first quarter mean {mean(first, 7) / 1024:.1f}, "
          f"last quarter mean {mean(last, 7) / 1024:.1f}, max {max(r[7] for r in rows) / 1024:.1f}")
    print(f"fds: first quarter mean {mean(first, 3):.1f}, last quarter mean {mean(last, 3):.1f}, "
          f"max {max(r[3] for r in rows)}")
    print(f"after the load: RSS {rss / 1024:.1f} MiB (anon {anon / 1024:.1f}, shmem "
          f"{shmem / 1024:.1f}), threads {threads}, fds {fds}, "
          f"exports {rows[-1][4]}; server alive: {alive}")
    for e in soak.errors[:10]:
        print("  " + e)
    print(f"wrote {a.out}.csv and {a.out}.png")
    return 1 if soak.counts["failures"] or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
