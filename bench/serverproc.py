"""What the load and soak benchmarks watch of a running `scratchd serve`:
its process's memory, threads and descriptors, and its exports."""
import json
import os
import socket
import subprocess
import sys
import time


def sample(pid):
    """(RSS KiB, threads, open descriptors, RssAnon KiB, RssShmem KiB) of
    process `pid`. RssAnon holds the memory disks' data (anonymous mappings)
    and the server's heap and stacks; RssShmem, memfds being formatted."""
    v = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in ("VmRSS", "Threads", "RssAnon", "RssShmem"):
                v[k] = int(rest.split()[0])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return (v["VmRSS"], v["Threads"], fds, v["RssAnon"], v["RssShmem"])


def export_names(sock):
    """The server's exports (nbdinfo --list), or None when it cannot be asked."""
    out = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return [e["export-name"] for e in json.loads(out.stdout).get("exports", [])]


def wait_listening(sock, server, timeout=10):
    """Returns once the server accepts on `sock`; exits if it dies or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"scratchd exited with {server.returncode}")
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit("scratchd never listened")
