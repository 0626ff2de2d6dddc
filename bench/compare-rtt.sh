#!/usr/bin/env bash
# Issue 21's figures: one connection, 4k random, side by side with nbdkit's
# memory plugin (A) in one run (bench/compare.py alternates the servers):
# scratchd's memory backend (B), a tmpdisk in memory and a tmpdisk in files
# (backing=dir:), over a Unix socket and over TCP loopback; first at queue
# depth 1 (IOPS: round trips), then at queue depth 32 (server CPU per op).
#   bench/compare-rtt.sh                       # 5 rounds of 5 s
#   ROUNDS=3 RUNTIME=4 TRANSPORTS=unix QDS=1 bench/compare-rtt.sh
# Needs: nbdkit, fio. A tmpdisk disk lives as long as its connection, so
# each fio run sees a fresh one (reads read holes there, as they do on a
# fresh memory disk of either server).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5} RUNTIME=${RUNTIME:-5} SIZE=${SIZE:-1G}
DIR=${DIR:-/var/tmp}
if [ -z "${SCRATCHD:-}" ]; then
  cargo build --release --locked -q
  SCRATCHD=${CARGO_TARGET_DIR:-target}/release/scratchd
fi
for tool in nbdkit fio; do
  command -v "$tool" >/dev/null || { echo "$tool is needed: apt-get install $tool" >&2; exit 1; }
done
echo "machine: $(nproc) cores, $(uname -r), nbdkit $(nbdkit --version | awk '{print $2}'), $(fio --version)"
echo "scratchd: $SCRATCHD ($(git describe --always --dirty 2>/dev/null || echo '?'))"
for qd in ${QDS:-1 32}; do
  for transport in ${TRANSPORTS:-unix tcp}; do
    case $transport in
      unix) listen="-U {sock}" nbdkit_listen="-U {sock}"
            uri="nbd+unix:///?socket={sock}" tmp_uri="nbd+unix:///build-1?socket={sock}" ;;
      tcp) listen="-i 127.0.0.1 -p {port}" nbdkit_listen="-i 127.0.0.1 -p {port}"
           uri="nbd://127.0.0.1:{port}/" tmp_uri="nbd://127.0.0.1:{port}/build-1" ;;
    esac
    echo "== queue depth $qd, $transport, load $(cut -d' ' -f1-3 /proc/loadavg)"
    python3 bench/compare.py --rounds "$ROUNDS" --runtime "$RUNTIME" --size "$SIZE" --qd "$qd" \
      --workloads "randwrite:4k randread:4k" --uri "$uri" \
      --a "nbdkit -f $nbdkit_listen memory 4G" \
      --b "$SCRATCHD serve $listen memory size=4G" \
      --also "tmpdisk=$SCRATCHD serve $listen tmpdisk size=4G type=none" \
      --also-uri "tmpdisk=$tmp_uri" \
      --also "tmpdisk-dir=$SCRATCHD serve $listen tmpdisk size=4G type=none backing=dir:$DIR" \
      --also-uri "tmpdisk-dir=$tmp_uri"
    echo
  done
done
