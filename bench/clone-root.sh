#!/usr/bin/env bash
# Time to a ready, mounted build root (issue 19), three ways side by side in
# one run, each on a fresh disk of a `scratchd serve` tmpdisk:
#   install  `scratchd run --server` on a fresh disk (mkfs, mount) then
#            `debootstrap --variant=minbase --unpack-tarball=DEB_TARBALL` of
#            the suite's root (bench/run-workload.sh's install phase)
#   untar    the same fresh disk, then `tar -xf` of a tarball of that root
#            (what mock's root_cache does; the tarball is uncompressed and in
#            the page cache, which favours untar: mock's is compressed)
#   clone    `scratchd run --server --from base`: a clone of a snapshot of
#            the installed root (no mkfs, nothing copied)
# Each sample is the wall time from starting `scratchd run` until the
# command inside it has the root ready (`root/usr/bin/dpkg` runs) and
# prints the time; the configurations alternate within each round (the
# order rotates) and the medians are printed with the ratios.
#
#   bench/clone-root.sh                 # 3 rounds
#   ROUNDS=5 bench/clone-root.sh
#
# debootstrap refuses to install into a nodev mount, and every scratchd
# mount is nosuid,nodev: install and the preparation bind-mount root/ with
# `dev` inside the run's private namespace first (untimed difference: one
# mount).
# Setup (untimed): a server (`tmpdisk size=SIZE`, SIZE default 4G), the
# root installed once on disk `root`, a tarball of it made from inside
# that run ($WORK/root.tar), and the disk snapshotted as `base` from
# inside it too, its file system frozen meanwhile (`scratchd snapshot take
# --freeze`). Disks go with their runs; the snapshot stays.
# Knobs: SCRATCHD (default target/release/scratchd, or
# $CARGO_TARGET_DIR/release/scratchd), DEB_TARBALL (default
# /var/tmp/debootstrap-minbase-SUITE.tgz, made as bench/run-workload.sh
# makes it), SIZE. Needs root, /dev/fuse, loop devices, debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-4G}
SCRATCHD=${SCRATCHD:-${CARGO_TARGET_DIR:-target}/release/scratchd}
. /etc/os-release
SUITE=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
DEB_TARBALL=${DEB_TARBALL:-/var/tmp/debootstrap-minbase-$SUITE.tgz}
[ -x "$SCRATCHD" ] || { echo "no $SCRATCHD: cargo build --release --locked first" >&2; exit 1; }
[ -r "$DEB_TARBALL" ] || { echo "no $DEB_TARBALL: run bench/run-workload.sh PHASES=install once, or debootstrap --make-tarball" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "needs debootstrap" >&2; exit 1; }

WORK=$(mktemp -d /var/tmp/scratchd-clone-bench.XXXXXX)
SERVER_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
SOCK=$WORK/nbd.sock
"$SCRATCHD" serve -U "$SOCK" tmpdisk "size=$SIZE" >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.05; done
URI="nbd+unix:///?socket=$SOCK"
export DEB_TARBALL SUITE WORK SCRATCHD URI

now() { date +%s.%N; }

# debootstrap refuses a nodev mount (every scratchd mount is nosuid,nodev):
# inside the run's private namespace, root/ is bind-mounted with dev.
DEV_ROOT='mkdir "$SCRATCH_DIR/root" && mount --bind "$SCRATCH_DIR/root" "$SCRATCH_DIR/root" &&
  mount -o remount,bind,dev "$SCRATCH_DIR/root"'
export DEV_ROOT

# The root, once: installed, tarred, snapshotted (frozen) while mounted.
SCRATCHD_NAME=root "$SCRATCHD" run --server "$URI" -- sh -c '
  set -e
  eval "$DEV_ROOT"
  debootstrap --variant=minbase --unpack-tarball="$DEB_TARBALL" "$SUITE" "$SCRATCH_DIR/root" >"$WORK/prepare.log" 2>&1
  tar -C "$SCRATCH_DIR/root" -cf "$WORK/root.tar" .
  du -sh "$SCRATCH_DIR/root" | cut -f1 >"$WORK/root.size"
  "$SCRATCHD" snapshot take "$URI" --name root --freeze "$SCRATCH_DIR" base >/dev/null' 
[ -s "$WORK/root.tar" ] || { echo "preparing the root failed: $(tail -3 "$WORK/prepare.log")" >&2; exit 1; }
cat "$WORK/root.tar" >/dev/null
echo "root: $(cat "$WORK/root.size") ($(du -h "$WORK/root.tar" | cut -f1) tarred); snapshot:" >&2
"$SCRATCHD" snapshot list "$URI" >&2

# One sample of CONFIG in round ROUND: prints the seconds to a ready root.
sample() {
  local config=$1 name="b-$1-$2" t0 ready
  t0=$(now)
  case $config in
    install)
      ready=$(SCRATCHD_NAME=$name "$SCRATCHD" run --server "$URI" -- sh -c '
        set -e
        eval "$DEV_ROOT"
        debootstrap --variant=minbase --unpack-tarball="$DEB_TARBALL" "$SUITE" "$SCRATCH_DIR/root" >/dev/null 2>&1
        "$SCRATCH_DIR/root/usr/bin/dpkg" --version >/dev/null && date +%s.%N') ;;
    untar)
      ready=$(SCRATCHD_NAME=$name "$SCRATCHD" run --server "$URI" -- sh -c '
        set -e
        mkdir "$SCRATCH_DIR/root" && tar -xf "$WORK/root.tar" -C "$SCRATCH_DIR/root"
        "$SCRATCH_DIR/root/usr/bin/dpkg" --version >/dev/null && date +%s.%N') ;;
    clone)
      ready=$(SCRATCHD_NAME=$name "$SCRATCHD" run --server "$URI" --from base -- sh -c '
        "$SCRATCH_DIR/root/usr/bin/dpkg" --version >/dev/null && date +%s.%N') ;;
  esac
  case $ready in
    [0-9]*.[0-9]*) echo "$ready - $t0" | bc ;;
    *) echo "$config: the root was not ready ('$ready')" >&2; exit 1 ;;
  esac
}

CONFIGS=(install untar clone)
: >"$WORK/results"
for round in $(seq "$ROUNDS"); do
  for i in 0 1 2; do
    c=${CONFIGS[$(( (i + round) % 3 ))]}
    s=$(sample "$c" "$round")
    printf 'result\t%s\t%s\t%s\n' "$round" "$c" "$s" | tee -a "$WORK/results"
  done
done

median() { sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
for c in "${CONFIGS[@]}"; do
  printf '%s %s\n' "$c" "$(awk -F'\t' -v c="$c" '$3==c {print $4}' "$WORK/results" | median)"
done >"$WORK/medians"
clone=$(awk '$1=="clone" {print $2}' "$WORK/medians")
printf '\n%-8s %10s %10s\n' config median_s vs_clone
while read -r c m; do
  printf '%-8s %10.4f %9.0fx\n' "$c" "$m" "$(echo "$m / $clone" | bc -l)"
done <"$WORK/medians"
