#!/usr/bin/env bash
# How long `scratchd attach` + `scratchd detach` take against a tmpdisk
# server with a pool of formatted disks: the time a Koji builder waits to
# get a build's disk mounted and to give it back.
#
#   bench/attach-latency.sh                     # 30 cycles, FUSE + loop
#   CYCLES=100 CONNECTIONS=1 bench/attach-latency.sh
#
# Each cycle attaches a fresh export name (taken from the pool: no mkfs
# waited for) at one directory and detaches it:
#   attach   `scratchd attach --attach fuse --mount DIR URI`: the stale
#            sweep, the holder process started, connections, FUSE file,
#            direct-I/O loop device, mount; returns once mounted
#   detach   `scratchd detach DIR`: unmount, SIGTERM to the holder, which
#            lets the loop device go, unmounts the FUSE file and
#            disconnects; returns once the holder has exited
# After each cycle the script waits PAUSE seconds (default 0.2) so that the
# server refills its pool, as it would between builds.
#
# Output: one `cycle N ATTACH_MS DETACH_MS` line per cycle, then the
# median, minimum and maximum of attach, detach and their sum in ms (the
# issue's target: attach + mount + unmount + detach under 100 ms).
#
# Knobs: SCRATCHD (binary; default target/release/scratchd, built with
# `cargo build --release --locked` first), CYCLES (30), CONNECTIONS (4),
# POOL (2), SIZE (20G), PAUSE (0.2). Needs root, /dev/fuse and loop
# devices; cleans up on every path (server, attachments, directories).
set -euo pipefail
cd "$(dirname "$0")/.."

CYCLES=${CYCLES:-30}
CONNECTIONS=${CONNECTIONS:-4}
POOL=${POOL:-2}
SIZE=${SIZE:-20G}
PAUSE=${PAUSE:-0.2}
if [ -z "${SCRATCHD:-}" ]; then
  cargo build --release --locked -q
  SCRATCHD=target/release/scratchd
fi

work=$(mktemp -d)
server=""
export SCRATCHD_STATE_DIR="$work/state"
cleanup() {
  "$SCRATCHD" detach --all 2>/dev/null || true
  "$SCRATCHD" detach --stale 2>/dev/null || true
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$SCRATCHD" serve -U "$work/sock" tmpdisk "size=$SIZE" "pool=$POOL" &
server=$!
for _ in $(seq 100); do [ -S "$work/sock" ] && break; sleep 0.05; done
mkdir "$work/mnt"
sleep 1 # the pool's first disks

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

results="$work/results"
for i in $(seq "$CYCLES"); do
  uri="nbd+unix:///bench-$i?socket=$work/sock"
  t0=$(date +%s%N)
  "$SCRATCHD" attach --attach fuse --connections "$CONNECTIONS" --mount "$work/mnt" "$uri" >/dev/null
  attach=$(ms_since "$t0")
  t1=$(date +%s%N)
  "$SCRATCHD" detach "$work/mnt"
  detach=$(ms_since "$t1")
  echo "cycle $i $attach $detach" | tee -a "$results"
  sleep "$PAUSE"
done

stats() { # column of $results -> "median min max"
  awk -v c="$1" '{ print (c == "sum") ? $3 + $4 : $c }' "$results" | sort -n |
    awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2;
                             printf "%s %s %s", m, v[1], v[NR] }'
}
printf '\n%-16s %8s %8s %8s   (ms, %d cycles, %d connections, pool=%d)\n' \
  what median min max "$CYCLES" "$CONNECTIONS" "$POOL"
for what in attach:3 detach:4 attach+detach:sum; do
  read -r med min max <<<"$(stats "${what#*:}")"
  printf '%-16s %8s %8s %8s\n' "${what%%:*}" "$med" "$min" "$max"
done
