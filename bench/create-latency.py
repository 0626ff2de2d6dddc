#!/usr/bin/python3
# Connect-to-GO latency for new export names: bench/create-latency.py SOCK COUNT PAUSE
# (system python: it needs libnbd's bindings, python3-libnbd). See docs/PERFORMANCE.md.
import nbd, statistics, sys, time
sock, count, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
times = []
for i in range(count):
    h = nbd.NBD()
    h.set_export_name(f"build-{i}")
    t = time.monotonic()
    h.connect_unix(sock)            # the whole handshake, up to the GO reply
    times.append((time.monotonic() - t) * 1e3)
    h.shutdown()
    del h
    time.sleep(pause)
times.sort()
print(f"median {statistics.median(times):.1f} ms  p90 {times[int(len(times)*0.9)]:.1f} ms  "
      f"min {times[0]:.1f} ms  max {times[-1]:.1f} ms")
