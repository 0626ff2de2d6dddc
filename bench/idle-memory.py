#!/usr/bin/python3
"""Server memory per connection, busy and idle.

    bench/idle-memory.py [CONNS] [SERVER...]

Starts `SERVER` (default: target/release/scratchd serve -U {sock} memory
size=1G; {sock} is replaced by a private socket path), opens CONNS (default
200) libnbd connections, has each write and read 256 KiB at its own offset,
and prints the server's resident memory (VmRSS) at each step: at start,
with the connections open, right after their I/O, and after 3 s of
silence (scratchd gives idle connections' buffer pages back after 2 s).
"Per connection" is (RSS - RSS at start - data stored) / CONNS.
"""
import os
import subprocess
import sys
import tempfile
import time

import nbd

conns = int(sys.argv[1]) if len(sys.argv) > 1 else 200
template = sys.argv[2:] or "target/release/scratchd serve -U {sock} memory size=1G".split()
sock = os.path.join(tempfile.mkdtemp(), "sock")
server = subprocess.Popen([a.replace("{sock}", sock) for a in template])
try:
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)

    def rss_kib():
        with open(f"/proc/{server.pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

    start = rss_kib()
    handles = []
    for _ in range(conns):
        h = nbd.NBD()
        h.connect_unix(sock)
        handles.append(h)
    opened = rss_kib()
    data = os.urandom(256 * 1024)
    for i, h in enumerate(handles):
        h.pwrite(data, i * len(data))
        h.pread(len(data), i * len(data))
    busy = rss_kib()
    time.sleep(3)
    idle = rss_kib()
    stored = conns * len(data) // 1024
    for what, kib, data_kib in [("open, no I/O", opened, 0), ("after 256 KiB I/O each", busy, stored),
                                ("after 3 s idle", idle, stored)]:
        per = (kib - start - data_kib) / conns
        print(f"{what:24} RSS {kib:8} KiB   per connection {per:7.1f} KiB")
    for h in handles:
        h.shutdown()
    del handles
finally:
    server.terminate()
    server.wait()
