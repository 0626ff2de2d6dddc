#!/usr/bin/env python3
# Vendored from the project's shared benchmark helpers (shared/bench/compare.py);
# extended here with TCP servers ({port}), client URI templates (--uri), for TLS, and more
# candidates than one (--also).
"""Compare two NBD servers on the same fio workloads, alternating A B B A ... in one run.

    compare.py --a 'nbdkit -f -U {sock} memory 4G' \
               --b 'target/release/scratchd serve -U {sock} memory size=4G' [--rounds 3]

    compare.py --uri 'nbds://127.0.0.1:{port}/?tls-certificates=PKI' \
               --a 'nbdkit -f -i 127.0.0.1 -p {port} --tls=require --tls-certificates=PKI memory 4G' \
               --b 'target/release/scratchd serve -i 127.0.0.1 -p {port} --tls=require ...'

Each round starts a fresh server from each template ({sock} is replaced by a private Unix socket
path, {port} by a free TCP port of 127.0.0.1), waits for the socket (or for the port to accept
when the template has {port}), connects fio to --uri (same placeholders; default: the socket), runs every
workload with fio's nbd engine, records throughput and the server's CPU time per operation (user+sys
of the whole process), then stops the server with SIGTERM. It prints medians per workload and the
ratio B/A for IOPS and for CPU per op.

    compare.py --qd 1 --a 'nbdkit ...' --b 'scratchd serve ... memory ...' \
               --also 'tmpdisk=scratchd serve -U {sock} tmpdisk size=4G type=none' \
               --also-uri 'tmpdisk=nbd+unix:///build-1?socket={sock}'

--also adds more candidates (LABEL=TEMPLATE, repeatable), measured in the same rotation; a
second table then gives every server's figures and ratios to A. The load average is printed
with the figures. Alternating servers in one run keeps the comparison fair on a
noisy machine; quote the ratios, not the absolute figures.
"""
import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HZ = os.sysconf("SC_CLK_TCK")
DEFAULT_WORKLOADS = "randwrite:4k randread:4k write:1M read:1M"


def cpu_ticks(pid):
    """User+system ticks of a process and its reaped children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime=14, stime=15, cutime=16, cstime=17
    return sum(int(fields[i - 3]) for i in (14, 15, 16, 17))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(sock, port):
    """Whether the server is ready: its Unix socket exists, or its TCP port accepts."""
    if port is None:
        return os.path.exists(sock)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def fill(template, sock, port):
    return template.replace("{sock}", sock).replace("{port}", str(port))


def start(template, sock, port):
    cmd = fill(template, sock, port)
    proc = subprocess.Popen(shlex.split(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    tcp = port if "{port}" in template else None
    for _ in range(200):
        if listening(sock, tcp):
            return proc
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")
            sys.exit(f"server exited early: {cmd}\n{err}")
        time.sleep(0.05)
    stop(proc)
    sys.exit(f"server did not listen on {sock if tcp is None else tcp}: {cmd}")


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_fio(uri, rw, bs, args):
    cmd = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={args.qd}", f"--numjobs={args.jobs}", "--group_reporting",
           f"--size={args.size}", f"--runtime={args.runtime}", "--time_based",
           "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    ops = job["read"]["total_ios"] + job["write"]["total_ios"]
    iops = job["read"]["iops"] + job["write"]["iops"]
    mbps = (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / 1e6
    return ops, iops, mbps


def measure(template, uri_template, workloads, args):
    results = {}
    with tempfile.TemporaryDirectory() as d:
        sock, port = os.path.join(d, "sock"), free_port()
        proc = start(template, sock, port)
        uri = fill(uri_template, sock, port) if uri_template else f"nbd+unix:///{args.export}?socket={sock}"
        try:
            for w in workloads:
                rw, bs = w.split(":")
                t0 = cpu_ticks(proc.pid)
                ops, iops, mbps = run_fio(uri, rw, bs, args)
                t1 = cpu_ticks(proc.pid)
                us_per_op = (t1 - t0) / HZ * 1e6 / ops if ops else float("nan")
                results[w] = (iops, mbps, us_per_op)
        finally:
            stop(proc)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="server A command template (the anchor)")
    p.add_argument("--b", required=True, help="server B command template (the candidate)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=int, default=5, help="seconds per workload")
    p.add_argument("--qd", type=int, default=32)
    p.add_argument("--jobs", type=int, default=1, help="fio jobs, one NBD connection each")
    p.add_argument("--size", default="1G")
    p.add_argument("--export", default="", help="export name to connect to")
    p.add_argument("--uri", help="the URI fio connects to ({sock}, {port}); default: the socket")
    p.add_argument("--uri-b", help="B's URI when it differs from A's (e.g. plain against TLS)")
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    p.add_argument("--also", action="append", default=[], metavar="LABEL=TEMPLATE",
                   help="another candidate server (repeatable)")
    p.add_argument("--also-uri", action="append", default=[], metavar="LABEL=URI",
                   help="the URI for an --also server when it differs from --uri")
    args = p.parse_args()
    workloads = args.workloads.split()
    also_uri = dict(u.split("=", 1) for u in args.also_uri)
    servers = [("A", args.a, args.uri), ("B", args.b, args.uri_b or args.uri)]
    for a in args.also:
        label, tmpl = a.split("=", 1)
        servers.append((label, tmpl, also_uri.get(label, args.uri)))
    runs = {name: {w: [] for w in workloads} for name, _, _ in servers}
    loads = [load()]
    for r in range(args.rounds):
        # ABBA (ABC CBA ...): no server always goes first
        for name, tmpl, uri in (servers if r % 2 == 0 else servers[::-1]):
            for w, v in measure(tmpl, uri, workloads, args).items():
                runs[name][w].append(v)
        loads.append(load())
        print(f"round {r + 1}/{args.rounds} done, load {loads[-1]}", file=sys.stderr)
    print(f"load average (1 min) before and after each round: {' '.join(loads)}")
    print(f"A = {args.a}\nB = {args.b}\nmedians of {args.rounds} rounds, qd={args.qd} jobs={args.jobs}")
    print(f"{'workload':<14}{'A IOPS':>10}{'B IOPS':>10}{'B/A':>7}{'A us/op':>10}{'B us/op':>10}{'B/A':>7}"
          f"{'A MB/s':>9}{'B MB/s':>9}")
    for w in workloads:
        a = [statistics.median(x) for x in zip(*runs["A"][w])]
        b = [statistics.median(x) for x in zip(*runs["B"][w])]
        print(f"{w:<14}{a[0]:>10.0f}{b[0]:>10.0f}{b[0] / a[0]:>7.2f}{a[2]:>10.2f}{b[2]:>10.2f}"
              f"{b[2] / a[2]:>7.2f}{a[1]:>9.0f}{b[1]:>9.0f}")
    if len(servers) > 2:
        print_all(servers, runs, workloads)


def load():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def print_all(servers, runs, workloads):
    """Every server's medians, with ratios to A's."""
    print()
    for name, tmpl, _ in servers:
        print(f"{name} = {tmpl}")
    print(f"{'workload':<14}{'server':<12}{'IOPS':>10}{'x A':>7}{'us/op':>9}{'x A':>7}{'MB/s':>9}")
    for w in workloads:
        a = [statistics.median(x) for x in zip(*runs["A"][w])]
        for name, _, _ in servers:
            m = [statistics.median(x) for x in zip(*runs[name][w])]
            print(f"{w:<14}{name:<12}{m[0]:>10.0f}{m[0] / a[0]:>7.2f}{m[2]:>9.2f}{m[2] / a[2]:>7.2f}{m[1]:>9.0f}")


if __name__ == "__main__":
    main()
