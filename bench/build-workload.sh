#!/usr/bin/env bash
# The build-like workload of issue 3: unpack a Linux source tree onto a
# fresh 20G ext4 scratch disk, `sync`, then `rm -rf` it and `sync`. The NBD
# disks are used the way a build host without the nbd kernel module uses
# them: `nbdfuse DIR/disk URI`, `losetup --find --show DIR/disk`, `mount`.
#
#   bench/build-workload.sh                    # the four configurations below, 3 rounds
#   ROUNDS=5 CONFIGS="scratchd tmpfs" bench/build-workload.sh
#
# Configurations (CONFIGS, in this order; each round rotates the order):
#   scratchd        scratchd serve tmpdisk size=20G (its default mkfs: ext4 with a
#                   64 MiB journal, -m 0, lazy init); nbdfuse with multi-conn (4 connections)
#   nbdkit          nbdkit tmpdisk size=20G (its default mkfs: ext4 WITH journal, the
#                   disk a sparse file in $TMPDIR=/var/tmp); nbdfuse -C 1 (nbdkit's
#                   tmpdisk gives each connection its own disk, and does not advertise
#                   multi-conn)
#   tmpfs           the ceiling: ext4 on a loop device over /dev/shm/…/ext4.img, made with
#                   the SAME mkfs options as scratchd's default
#   tmpfs-default   the same with plain `mkfs.ext4 -F -q` (journal; nbdkit's choice)
# Extra configurations (not run by default; for analysis):
#   nbdkit-shm      nbdkit tmpdisk with TMPDIR=/dev/shm (disk in RAM, as scratchd's)
#   nbdkit-nojournal  nbdkit tmpdisk, TMPDIR=/dev/shm, command= scratchd's mkfs options (named when those had no journal)
#   nbdkit-memory   nbdkit memory 20G, multi-conn (4), formatted with scratchd's options
#   scratchd-c1     scratchd tmpdisk, nbdfuse -C 1
#   scratchd-dio    scratchd tmpdisk, `losetup --direct-io=on` (loop submits requests
#                   asynchronously instead of one buffered write at a time)
#   tmpfs-dio       the ceiling with `losetup --direct-io=on`
#
# Setup (untimed): the tarball /usr/src/linux-source-6.1.tar.xz (apt-get install
# linux-source-6.1) is decompressed once to $TAR (default
# /var/tmp/linux-source-6.1.tar) and read once so it is in the page cache.
# Each measurement gets a fresh server (or image), a fresh build name, a fresh
# filesystem and mount; a `sync` precedes each timed step. Prints medians.
# Needs root, /dev/fuse, loop devices, nbdfuse, nbdkit, e2fsprogs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
CONFIGS=${CONFIGS:-"scratchd nbdkit tmpfs tmpfs-default"}
TAR=${TAR:-/var/tmp/linux-source-6.1.tar}
XZ=${XZ:-/usr/src/linux-source-6.1.tar.xz}
# scratchd's default ext4 options (crates/scratch/src/format.rs, mkfs_options)
SCRATCH_MKFS="-F -q -m 0 -E lazy_itable_init=1,lazy_journal_init=1,discard -J size=64"

[ "$(id -u)" = 0 ] || { echo "needs root (losetup, mount)" >&2; exit 1; }
[ -e /dev/fuse ] || { echo "needs /dev/fuse" >&2; exit 1; }
for tool in nbdfuse nbdkit mkfs.ext4 losetup; do
  command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done
cargo build --release --locked -q
SCRATCHD=$PWD/target/release/scratchd

if [ ! -s "$TAR" ]; then
  [ -f "$XZ" ] || { echo "$XZ missing: apt-get install -y linux-source-6.1" >&2; exit 1; }
  echo "decompressing $XZ to $TAR (once, untimed)" >&2
  xz -dc -T0 "$XZ" >"$TAR.part" && mv "$TAR.part" "$TAR"
fi
cat "$TAR" >/dev/null # into the page cache

work=$(mktemp -d /var/tmp/build-workload.XXXXXX)
shm=$(mktemp -d /dev/shm/build-workload.XXXXXX)
mnt=$work/mnt fusedir=$work/fuse
mkdir -p "$mnt" "$fusedir"
server_pid="" fuse_pid="" loopdev="" mounted="" fuse_mounted=""

stop_pid() { # stop one process we started, by pid; wait for it
  local pid=$1
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
teardown() { # everything one measurement set up, in reverse order; never fails
  if [ -n "$mounted" ]; then umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true; fi
  mounted=""
  if [ -n "$loopdev" ]; then losetup -d "$loopdev" 2>/dev/null || true; fi
  loopdev=""
  if [ -n "$fuse_mounted" ]; then umount "$fusedir" 2>/dev/null || umount -l "$fusedir" 2>/dev/null || true; fi
  fuse_mounted=""
  stop_pid "$fuse_pid"; fuse_pid=""
  stop_pid "$server_pid"; server_pid=""
  rm -f "$shm/ext4.img"
}
cleanup() {
  teardown
  rm -rf "$work" "$shm"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() { echo "$*" >&2; exit 1; }

start_server() { # log-file command... -> server_pid, sock
  local log=$1; shift
  sock=$work/sock
  rm -f "$sock"
  "$@" >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 200); do [ -S "$sock" ] && return 0; sleep 0.05; done
  cat "$log" >&2; die "server did not start: $*"
}

fuse_attach() { # uri connections [losetup-option] -> loopdev (nbdfuse file on a loop device)
  rm -f "$work/nbdfuse.pid"
  nbdfuse -C "$2" -P "$work/nbdfuse.pid" "$fusedir/disk" "$1" >"$work/nbdfuse.log" 2>&1 &
  fuse_pid=$! fuse_mounted=1
  for _ in $(seq 200); do [ -s "$work/nbdfuse.pid" ] && break; sleep 0.05; done
  [ -s "$work/nbdfuse.pid" ] || { cat "$work/nbdfuse.log" >&2; die "nbdfuse did not start"; }
  loopdev=$(losetup ${3:+"$3"} --find --show "$fusedir/disk")
}

setup() { # config round -> a fresh ext4 mounted on $mnt
  local name="build-$2"
  case $1 in
    scratchd | scratchd-c1 | scratchd-dio)
      start_server "$work/scratchd.log" "$SCRATCHD" serve -v -U "$work/sock" tmpdisk size=20G
      case $1 in
        scratchd) fuse_attach "nbd+unix:///$name?socket=$sock" 4 ;;
        scratchd-c1) fuse_attach "nbd+unix:///$name?socket=$sock" 1 ;;
        scratchd-dio) fuse_attach "nbd+unix:///$name?socket=$sock" 4 --direct-io=on ;;
      esac ;;
    nbdkit)
      start_server "$work/nbdkit.log" nbdkit -f -U "$work/sock" tmpdisk size=20G
      fuse_attach "nbd+unix:///$name?socket=$sock" 1 ;;
    nbdkit-shm)
      start_server "$work/nbdkit.log" env TMPDIR="$shm" nbdkit -f -U "$work/sock" tmpdisk size=20G
      fuse_attach "nbd+unix:///$name?socket=$sock" 1 ;;
    nbdkit-nojournal)
      # shellcheck disable=SC2016 # $disk and $size are for nbdkit's shell
      start_server "$work/nbdkit.log" env TMPDIR="$shm" nbdkit -f -U "$work/sock" tmpdisk size=20G \
        command="truncate -s \$size \$disk && mkfs -t ext4 $SCRATCH_MKFS \$disk"
      fuse_attach "nbd+unix:///$name?socket=$sock" 1 ;;
    nbdkit-memory)
      start_server "$work/nbdkit.log" nbdkit -f -U "$work/sock" memory 20G
      fuse_attach "nbd+unix:///$name?socket=$sock" 4
      # shellcheck disable=SC2086
      mkfs -t ext4 $SCRATCH_MKFS "$loopdev" ;;
    tmpfs | tmpfs-default | tmpfs-dio)
      truncate -s 20G "$shm/ext4.img"
      # shellcheck disable=SC2086
      if [ "$1" = tmpfs-default ]; then mkfs.ext4 -F -q "$shm/ext4.img"; else mkfs.ext4 $SCRATCH_MKFS "$shm/ext4.img"; fi
      if [ "$1" = tmpfs-dio ]; then
        loopdev=$(losetup --direct-io=on --find --show "$shm/ext4.img")
      else
        loopdev=$(losetup --find --show "$shm/ext4.img")
      fi ;;
    *) die "unknown configuration $1" ;;
  esac
  mount "$loopdev" "$mnt"
  mounted=1
}

now() { date +%s.%N; }
results=$work/results.tsv
: >"$results"
notes=""

echo "machine: $(nproc) cores, $(uname -r), $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo)," \
  "nbdkit $(nbdkit --version | awk '{print $2}'), $(nbdfuse --version | head -1)"
echo "tree: $TAR ($(du -h "$TAR" | cut -f1), $(tar -tf "$TAR" | wc -l) entries); rounds=$ROUNDS"
read -r -a cfgs <<<"$CONFIGS"
for r in $(seq "$ROUNDS"); do
  shift_by=$(((r - 1) % ${#cfgs[@]}))
  order=("${cfgs[@]:shift_by}" "${cfgs[@]:0:shift_by}")
  for c in "${order[@]}"; do
    setup "$c" "$r"
    if [ "${c##*-}" = dio ]; then
      notes+="$c: loop direct I/O = $(losetup --list -n -O DIO "$loopdev" | tr -d ' ')"$'\n'
    fi
    sync
    # tar -xf && sync, timed as one step; tsync notes when tar ended (how
    # much of the step was the sync, i.e. the writeback through the stack)
    t0=$(now); tar -xf "$TAR" -C "$mnt" && tsync=$(now) && sync; t1=$(now)
    rm -rf "${mnt:?}"/* && sync; t2=$(now)
    if [ "${c%%-*}" = scratchd ]; then
      conns=$(grep -c 'transmission started.*export.*build-' "$work/scratchd.log" || true)
      notes+="$c round $r: nbdfuse made $conns connection(s) to scratchd"$'\n'
    fi
    teardown
    x=$(echo "$t1 - $t0" | bc) xs=$(echo "$t1 - $tsync" | bc) rmt=$(echo "$t2 - $t1" | bc)
    printf '%s\t%s\t%s\t%s\n' "$c" "$x" "$xs" "$rmt" >>"$results"
    printf '  round %d %-18s extract+sync %6.2f s (sync %5.2f)  rm+sync %6.2f s\n' "$r" "$c" "$x" "$xs" "$rmt" >&2
  done
done
printf '%s' "$notes" | sort -u

python3 - "$results" "$ROUNDS" "$CONFIGS" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
acc = {}
for c, x, xs, r in rows:
    acc.setdefault(c, []).append((float(x), float(xs), float(r)))
cfgs = sys.argv[3].split()
med = {c: [statistics.median(v) for v in zip(*acc[c])] for c in cfgs}
ceil = med["tmpfs"][0] + med["tmpfs"][2] if "tmpfs" in med else None
print(f"\nmedians of {sys.argv[2]} rounds, seconds; '(sync)' = the part of extract+sync after tar "
      f"returned; 'vs ceiling' = total / tmpfs's total")
w = max(len(c) for c in cfgs) + 2
print(f"{'configuration':<{w}}{'extract+sync':>13}{'(sync)':>8}{'rm+sync':>9}{'total':>8}{'vs ceiling':>12}")
for c in cfgs:
    x, xs, r = med[c]
    rel = f"{(x + r) / ceil:.2f}x" if ceil else "-"
    print(f"{c:<{w}}{x:>13.2f}{xs:>8.2f}{r:>9.2f}{x + r:>8.2f}{rel:>12}")
PY
