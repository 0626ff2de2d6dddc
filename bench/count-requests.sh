#!/usr/bin/env bash
# What an unmodified client sends a server during the install phase: the
# requests nbdfuse + a buffered loop device + ext4 make of dpkg's install,
# counted by nbdkit's stats filter in a proxy (`nbdkit --filter=stats nbd`)
# between nbdfuse and the server. The proxy only counts; the seconds it
# prints include its own hop, so compare counts here and times with
# bench/run-workload.sh.
#
#   bench/count-requests.sh                 # scratchd's tmpdisk, then nbdkit's
#   SERVERS=scratchd bench/count-requests.sh
#   TMPDISK_ARGS="command='mkfs -t ext4 -q -F -O ^has_journal \$disk'" SERVERS=scratchd bench/count-requests.sh
#
# SERVERS: "scratchd nbdkit" (default). scratchd: `scratchd serve tmpdisk
# size=20G pool=1 $TMPDISK_ARGS` (SCRATCHD, default target/release/scratchd);
# nbdkit: `nbdkit tmpdisk size=20G`, its disk in /dev/shm. Needs root, nbdkit,
# nbdfuse, debootstrap and the tarball bench/run-workload.sh makes
# (DEB_TARBALL, default /var/tmp/debootstrap-minbase-bookworm.tgz).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
SCRATCHD=${SCRATCHD:-$here/../target/release/scratchd}
SERVERS=${SERVERS:-"scratchd nbdkit"}
DEB_TARBALL=${DEB_TARBALL:-/var/tmp/debootstrap-minbase-bookworm.tgz}
die() { echo "count-requests: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (loop devices, mounts)"
for tool in nbdkit nbdfuse debootstrap losetup; do
  command -v "$tool" >/dev/null || die "needs $tool"
done
[ -f "$DEB_TARBALL" ] || die "no $DEB_TARBALL (bench/run-workload.sh makes it)"

work=$(mktemp -d /dev/shm/count-requests.XXXXXX)
pids=() loopdev="" mounted=""
cleanup() {
  [ -n "$mounted" ] && { umount "$work/mnt/root/dev" 2>/dev/null || true; umount "$work/mnt" || true; }
  [ -n "$loopdev" ] && losetup -d "$loopdev"
  mountpoint -q "$work/fuse" && fusermount3 -u "$work/fuse"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
wait_for() { # socket
  for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
  die "no socket $1"
}

for server in $SERVERS; do
  mkdir -p "$work/fuse" "$work/mnt" "$work/disk"
  case $server in
    scratchd)
      # shellcheck disable=SC2086
      eval "set -- ${TMPDISK_ARGS:-}"
      "$SCRATCHD" serve -U "$work/server.sock" tmpdisk size=20G pool=1 "$@" 2>"$work/server.log" &
      export_name=bench ;;
    nbdkit)
      TMPDIR="$work/disk" nbdkit -f -U "$work/server.sock" tmpdisk size=20G 2>"$work/server.log" &
      export_name= ;;
    *) die "unknown server '$server' (scratchd nbdkit)" ;;
  esac
  pids+=($!)
  wait_for "$work/server.sock"
  nbdkit -f -U "$work/proxy.sock" --filter=stats nbd socket="$work/server.sock" export="$export_name" \
    statsfile="$work/stats" statsappend=false &
  pids+=($!)
  wait_for "$work/proxy.sock"
  nbdfuse "$work/fuse/disk" "nbd+unix:///?socket=$work/proxy.sock" &
  for _ in $(seq 200); do [ -e "$work/fuse/disk" ] && break; sleep 0.05; done
  loopdev=$(losetup --find --show "$work/fuse/disk")
  mount -o noatime "$loopdev" "$work/mnt"; mounted=1
  # As in bench/run-workload.sh: a /dev of its own, no device-node check.
  mkdir -p "$work/mnt/root/dev"
  mount -t tmpfs -o mode=755,size=1M bench-dev "$work/mnt/root/dev"
  sync
  container=lxc debootstrap --variant=minbase --unpack-tarball="$DEB_TARBALL" bookworm "$work/mnt/root" \
    >"$work/debootstrap.log" 2>&1 || { cat "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  umount "$work/mnt/root/dev"; umount "$work/mnt"; mounted=""
  losetup -d "$loopdev"; loopdev=""
  fusermount3 -u "$work/fuse"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  echo "== $server: requests during the install"
  grep -E '^[a-z]+:' "$work/stats"
  rm -rf "$work/fuse" "$work/mnt" "$work/disk" "$work/stats" "$work"/*.sock
done
