#!/usr/bin/env bash
# Queue-depth-1 4 KiB write latency through the FUSE front end
# (issue 21's write-behind): fio on a file in a disk mounted by `scratchd
# attach` over a Unix socket, with --write-behind on (auto, a tmpdisk) and
# off, beside the ceiling (ext4 on a buffered loop device over a file in
# /dev/shm, scratchd's mkfs options). Configurations alternate within each
# round; one line per measurement, then medians.
#
#   bench/write-behind-qd1.sh              # 3 rounds of 15 s each
#   ROUNDS=5 RUNTIME=10 RW=randwrite bench/write-behind-qd1.sh
#
# fio: --ioengine=psync --direct=1 --bs=4k --rw=$RW (default randwrite)
# --size=256M --runtime=$RUNTIME --time_based, on DIR/f. Needs root, fio,
# /dev/fuse, loop devices; SCRATCHD (default target/release/scratchd).
set -euo pipefail
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-15}
RW=${RW:-randwrite}
SCRATCHD=${SCRATCHD:-target/release/scratchd}
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
work=$(mktemp -d /dev/shm/wb-qd1.XXXXXX)
# A state directory only root may write (attach refuses others).
export SCRATCHD_STATE_DIR=$(mktemp -d /run/wb-qd1-state.XXXXXX)
server_pid=""
cleanup() {
  "$SCRATCHD" detach --all >/dev/null 2>&1 || true
  umount "$work/ceiling" 2>/dev/null || true
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work" "$SCRATCHD_STATE_DIR"
}
trap cleanup EXIT
mkdir -p "$work/mnt" "$work/ceiling"
"$SCRATCHD" serve -U "$work/sock" tmpdisk size=20G pool=1 2>"$work/serve.log" &
server_pid=$!
for _ in $(seq 100); do [ -S "$work/sock" ] && break; sleep 0.1; done

fio_on() { # dir -> "IOPS CLAT_MEAN_US"
  fio --name=qd1 --filename="$1/f" --size=256M --ioengine=psync --direct=1 --bs=4k \
    --rw="$RW" --runtime="$RUNTIME" --time_based --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["write"]; print("%.0f %.1f" % (j["iops"], j["clat_ns"]["mean"]/1000))'
}
measure() { # round config
  case $2 in
    ceiling)
      truncate -s 20G "$work/ext4.img"
      mkfs.ext4 -q -F -J size=64 -b 4096 -m 0 -E lazy_itable_init=1,lazy_journal_init=1,discard "$work/ext4.img"
      mount -o loop,noatime "$work/ext4.img" "$work/ceiling"
      out=$(fio_on "$work/ceiling")
      umount "$work/ceiling"; rm -f "$work/ext4.img" ;;
    wb-on | wb-off)
      "$SCRATCHD" attach --write-behind "${2#wb-}" --mount "$work/mnt" "nbd+unix:///qd1-$1-$2?socket=$work/sock" >/dev/null
      out=$(fio_on "$work/mnt")
      "$SCRATCHD" detach "$work/mnt" ;;
  esac
  printf 'result\t%s\t%s\t%s\n' "$1" "$2" "$out"
}
configs=(ceiling wb-on wb-off)
for r in $(seq "$ROUNDS"); do
  shift_by=$(((r - 1) % ${#configs[@]}))
  for c in "${configs[@]:shift_by}" "${configs[@]:0:shift_by}"; do measure "$r" "$c"; done
done | tee "$work/results"
python3 - "$work/results" <<'PY'
import statistics, sys
acc = {}
for line in open(sys.argv[1]):
    _, r, c, iops, clat = line.split()
    acc.setdefault(c, []).append((float(iops), float(clat)))
print(f"\nmedians ({len(next(iter(acc.values())))} rounds)\nconfig    IOPS   clat mean (us)")
for c, v in acc.items():
    print(f"{c:<8} {statistics.median(i for i, _ in v):6.0f} {statistics.median(l for _, l in v):8.1f}")
PY
