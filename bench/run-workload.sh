#!/usr/bin/env bash
# Build phases on a disk attached by `scratchd run`, side by side with the
# ceiling and with nbdkit, in one run: the configurations alternate within
# each round (the order rotates every round) and medians are printed.
#
#   bench/run-workload.sh                       # 3 rounds, every configuration and phase
#   ROUNDS=1 CONFIGS="ceiling run-local" PHASES="attach extract rm" bench/run-workload.sh
#
# Configurations (CONFIGS, default all seven, in this order):
#   ceiling     ext4 on a loop device (buffered) over a sparse 20G image in
#               /dev/shm, made with scratchd's default mkfs options (ext4
#               with a 64 MiB journal, -b 4096 -m 0, lazy init, discard: inode
#               tables flagged zeroed; see
#               crates/scratch/src/format.rs), mounted noatime
#   tmpfs       a tmpfs (size=20G) mounted on the directory: no block device at all
#   local-disk  a directory on /var/tmp (this machine's own disk), bind-mounted
#   nbdkit      `nbdkit -f -U SOCK tmpdisk size=20G` (its default mkfs: ext4 WITH
#               journal), TMPDIR=/dev/shm so its disk is in RAM as ours; attached
#               as a new user would: `nbdfuse DIR/disk URI`, `losetup --find
#               --show` (buffered loop), mount -o noatime
#   nbdfuse-scratchd  the same client (nbdfuse, 4 connections with multi-conn,
#               buffered loop) against `scratchd serve -U SOCK tmpdisk
#               size=20G pool=1`: our server under a client nobody here wrote
#               (NBDFUSE_ARGS: more nbdfuse options for both, e.g. "-C 1";
#               SERVE_ARGS: more `scratchd serve` options for every scratchd
#               server, e.g. "--busy-poll 0")
#   run-local   `scratchd run --size 20G -- CMD`: a private disk (a FUSE file
#               calling the store directly, direct-I/O loop), mounted noatime
#   run-server  `scratchd serve -U SOCK tmpdisk size=20G pool=1` and `scratchd run
#               --server nbd+unix:///?socket=SOCK -- CMD` (scratchd's NBD client,
#               4 connections, FUSE, direct-I/O loop)
#   run-server-sync  run-server with `--write-behind off`: every write waits
#               for the server's reply (before issue 21's write-behind)
#   run-tcp     the same over TCP loopback: `scratchd serve -i 127.0.0.1 -p PORT
#               tmpdisk size=20G pool=1`, `scratchd run --server nbd://127.0.0.1:PORT`
#
# Phases (PHASES, default "attach install extract rpm rm"):
#   attach   run-*: the whole of `scratchd run ... -- true` (attach + mkfs +
#            mount + detach; the mission's target is < 100 ms); nbdkit:
#            nbdfuse + losetup + mount + umount + losetup -d + FUSE unmount
#            (with a running server; its tmpdisk runs mkfs on connect);
#            ceiling: truncate + mkfs + losetup + mount + umount + losetup -d
#            + rm. ATTACH_TRIES (default 3) samples per configuration and round.
#   install  package installation: `debootstrap --variant=minbase
#            --unpack-tarball=DEB_TARBALL SUITE DIR` (dpkg unpacking and
#            configuring ~90 packages, fsync-heavy), the tarball made once with
#            --make-tarball from the system's Debian mirror (untimed, cached in
#            $DEB_TARBALL)
#   extract  `tar -xf` of the Linux 6.1 source tree (decompressed once to $TAR,
#            read once so it is in the page cache) + `sync`
#   rpm      `rpmbuild --nodeps -ba bench/rpm/hello.spec` (GNU hello from
#            Debian's orig tarball: configure, make, make check, make install,
#            packages), _topdir and _tmppath on the disk; the rpmbuild alone
#   rm       `rm -rf` of the extracted tree + `sync` (needs extract)
# install, extract, rpm and rm run in this order on one fresh disk per configuration
# and round, by the same phase script (this file, `phases` mode: it times
# each phase with `date +%s.%N` inside the mounted disk and prints
# `phase NAME SECONDS`); a `sync` (untimed) precedes each phase.
#
# Output (stdout): one `result ROUND CONFIG PHASE SECONDS` line per
# measurement (tab-separated) as they come, then a table: per phase and
# configuration the median, min and max seconds, the ratio of the median to
# the ceiling's and to nbdkit's, and the mission's target where it has one
# (run-local within 5% of the ceiling, run-server and run-tcp within 10%,
# extract and rm at most 0.75x nbdkit, attach < 100 ms). `total` = the sum of
# the disk phases of one round. New kernel messages that look like trouble are shown at the end.
#
# DELAY_US=N puts bench/delay-proxy between the NBD clients and servers (nbdkit,
# run-server, run-server-sync, run-tcp): the clients connect over TCP to the proxy, which adds
# N/2 microseconds each way (N of round trip) and forwards to the server's
# socket. DELAY_US=0 goes through the proxy without delay (the baseline for
# the others: the proxy costs some latency of its own). bench/delay-workload.sh
# runs this over several delays. DELAY_PROXY: the proxy's binary (default:
# built with `cargo build --release --locked -p delay-proxy`).
#
# Other knobs: SCRATCHD (binary; default: target/release/scratchd, built with
# `cargo build --release --locked` first), TAR (default
# /var/tmp/linux-source-6.1.tar), SRC_DIR (where hello_*.orig.tar.gz is kept,
# default /var/tmp), DEB_TARBALL (default
# /var/tmp/debootstrap-minbase-SUITE.tgz), KEEP_LOGS=1 (keep the work directory with every log),
# SCRATCH_MKFS (mkfs.ext4 options of the ceiling's image; when not scratchd's
# default, scratchd's tmpdisk servers get `command=mkfs.ext4 SCRATCH_MKFS $disk`
# too, e.g. "-F -q -b 4096 -m 0 -E lazy_itable_init=1,lazy_journal_init=1,discard -O ^has_journal"
# for ext4 without a journal, the default before 2026-12-07; run-local's
# private disk keeps scratchd's own options).
#
# Needs root, /dev/fuse and loop devices. Installs what is missing with
# apt-get: nbdkit, libnbd-bin (nbdfuse), fuse3, e2fsprogs, rpm, gcc, make,
# xz-utils, linux-source-6.1, debootstrap; for hello's source it adds a deb-src entry
# (/etc/apt/sources.list.d/scratchd-bench-deb-src.sources, mirroring the
# system's deb entry) when none exists. Cleans up on every path: mounts, loop
# devices, FUSE mounts, servers, runs and temporary directories.
set -euo pipefail

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f\n", b - a }'; }

# ---------------------------------------------------------------------------
# `phases [MNT]`: the phase script, run with the disk mounted on MNT (default
# $SCRATCHD_MOUNT, set by scratchd run). Environment: RW_PHASES, RW_TAR,
# RW_HELLO (the tarball), RW_HELLO_VERSION, RW_SPEC, RW_LOGDIR, RW_DEB_TARBALL,
# RW_SUITE.
if [ "${1:-}" = phases ]; then
  mnt=${2:-${SCRATCHD_MOUNT:-}}
  fail() { echo "phases: $*" >&2; exit 1; }
  { [ -n "$mnt" ] && mountpoint -q "$mnt"; } || fail "no file system mounted on '${mnt}'"
  for p in $RW_PHASES; do
    sync
    case $p in
      install)
        # scratchd mounts every disk nodev, where device nodes cannot be
        # opened: the target's /dev is a tmpfs of its own (in every
        # configuration alike), and container=lxc skips debootstrap's
        # check that nodes on the target itself work.
        mkdir -p "$mnt/root/dev"
        mount -t tmpfs -o mode=755,size=1M bench-dev "$mnt/root/dev"
        t0=$(now)
        if ! container=lxc debootstrap --variant=minbase --unpack-tarball="$RW_DEB_TARBALL" "$RW_SUITE" "$mnt/root" \
          >"$RW_LOGDIR/debootstrap.log" 2>&1; then
          umount -l "$mnt/root/dev"
          fail "debootstrap failed: see debootstrap.log (KEEP_LOGS=1 keeps it whole)"
        fi
        t1=$(now)
        umount "$mnt/root/dev"
        [ -x "$mnt/root/usr/bin/dpkg" ] || fail "debootstrap installed no dpkg"
        ;;
      extract)
        mkdir "$mnt/src"
        t0=$(now)
        tar -xf "$RW_TAR" -C "$mnt/src"
        sync
        t1=$(now) ;;
      rpm)
        top=$mnt/rpmbuild
        mkdir -p "$top/SOURCES" "$top/SPECS" "$top/tmp"
        cp "$RW_HELLO" "$top/SOURCES/"
        cp "$RW_SPEC" "$top/SPECS/hello.spec"
        sync
        t0=$(now)
        if ! rpmbuild --define "_topdir $top" --define "_tmppath $top/tmp" \
          --define "hello_version $RW_HELLO_VERSION" --nodeps -ba "$top/SPECS/hello.spec" \
          >"$RW_LOGDIR/rpmbuild.log" 2>&1; then
          fail "rpmbuild failed: see rpmbuild.log (KEEP_LOGS=1 keeps it whole)"
        fi
        t1=$(now)
        ls "$top"/RPMS/*/hello-"$RW_HELLO_VERSION"-*.rpm >/dev/null 2>&1 || fail "rpmbuild made no binary package"
        ;;
      rm)
        [ -d "$mnt/src" ] || fail "rm needs the extract phase before it"
        t0=$(now)
        rm -rf "$mnt/src"
        sync
        t1=$(now) ;;
      *) fail "unknown phase $p" ;;
    esac
    echo "phase $p $(elapsed "$t0" "$t1")"
  done
  exit 0
fi

# ---------------------------------------------------------------------------
# The driver.
cd "$(dirname "$0")/.."
SELF=$PWD/bench/run-workload.sh
SPEC=$PWD/bench/rpm/hello.spec
ROUNDS=${ROUNDS:-3}
CONFIGS=${CONFIGS:-"ceiling tmpfs local-disk nbdkit run-local run-server run-tcp"}
PHASES=${PHASES:-"attach install extract rpm rm"}
ATTACH_TRIES=${ATTACH_TRIES:-3}
TAR=${TAR:-/var/tmp/linux-source-6.1.tar}
XZ=${XZ:-/usr/src/linux-source-6.1.tar.xz}
SRC_DIR=${SRC_DIR:-/var/tmp}
# shellcheck disable=SC1091
SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
DEB_TARBALL=${DEB_TARBALL:-/var/tmp/debootstrap-minbase-$SUITE.tgz}
SIZE=20G
# scratchd's default ext4 options (crates/scratch/src/format.rs, mkfs_options)
SCRATCH_MKFS_DEFAULT="-F -q -b 4096 -m 0 -E lazy_itable_init=1,lazy_journal_init=1,discard -J size=64"
SCRATCH_MKFS=${SCRATCH_MKFS:-$SCRATCH_MKFS_DEFAULT}
# scratchd servers format their own disks; another SCRATCH_MKFS is given to
# them as their format command, so that the ceiling and they stay alike
tmpdisk_format=()
if [ "$SCRATCH_MKFS" != "$SCRATCH_MKFS_DEFAULT" ]; then
  tmpdisk_format=("command=mkfs.ext4 $SCRATCH_MKFS \$disk")
fi

die() { echo "run-workload: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (losetup, mount, scratchd run)"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive number, not '$ROUNDS'"
[[ $ATTACH_TRIES =~ ^[1-9][0-9]*$ ]] || die "ATTACH_TRIES must be a positive number"
read -r -a cfgs <<<"$CONFIGS"
read -r -a phases <<<"$PHASES"
[ ${#cfgs[@]} -gt 0 ] || die "CONFIGS is empty"
[ ${#phases[@]} -gt 0 ] || die "PHASES is empty"
for c in "${cfgs[@]}"; do
  case $c in
    ceiling | tmpfs | local-disk | nbdkit | nbdfuse-scratchd | run-local | run-server | run-server-sync | run-tcp) ;;
    *) die "unknown configuration '$c' (ceiling tmpfs local-disk nbdkit nbdfuse-scratchd run-local run-server run-server-sync run-tcp)" ;;
  esac
done
want_attach="" disk_phases=""
for p in "${phases[@]}"; do
  case $p in
    attach) want_attach=1 ;;
    install | extract | rpm | rm) disk_phases+="$p " ;;
    *) die "unknown phase '$p' (attach install extract rpm rm)" ;;
  esac
done
# install, extract, rpm, rm always run in this order on one disk
disk_phases=$(for p in install extract rpm rm; do case " $disk_phases " in *" $p "*) printf '%s ' "$p" ;; esac; done)
disk_phases=${disk_phases% }
case " $disk_phases " in *" rm "*) case " $disk_phases " in *" extract "*) ;; *) die "phase rm needs phase extract" ;; esac ;; esac
has_cfg() { case " ${cfgs[*]} " in *" $1 "*) return 0 ;; esac; return 1; }
has_phase() { case " $disk_phases " in *" $1 "*) return 0 ;; esac; return 1; }

[ -c /dev/fuse ] || die "needs /dev/fuse (modprobe fuse)"
[ -e /dev/loop-control ] || die "needs loop devices (/dev/loop-control; modprobe loop)"

# --- install what is missing ------------------------------------------------
missing=()
need() { # command package
  command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}
need mkfs.ext4 e2fsprogs
need losetup mount
need awk gawk
need python3 python3
if has_cfg nbdkit; then need nbdkit nbdkit; fi
if has_cfg nbdkit || has_cfg nbdfuse-scratchd; then need nbdfuse libnbd-bin; need fusermount3 fuse3; fi
if has_phase extract; then need xz xz-utils; [ -s "$TAR" ] || [ -f "$XZ" ] || missing+=(linux-source-6.1); fi
if has_phase rpm; then need rpmbuild rpm; need gcc gcc; need make make; fi
if has_phase install; then need debootstrap debootstrap; fi
apt_install() {
  command -v apt-get >/dev/null || die "missing: $* (and no apt-get to install them)"
  echo "installing: $*" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "$@" >&2 || { apt-get update -q >&2 && apt-get install -y -q "$@" >&2; } ||
    die "could not install: $*"
}
if [ ${#missing[@]} -gt 0 ]; then
  read -r -a missing <<<"$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')"
  apt_install "${missing[@]}"
fi
if has_cfg nbdkit; then
  nbdkit tmpdisk --dump-plugin >/dev/null 2>&1 || die "nbdkit has no tmpdisk plugin (apt-get install nbdkit)"
fi

# --- scratchd ------------------------------------------------------------------
if has_cfg run-local || has_cfg run-server || has_cfg run-server-sync || has_cfg run-tcp || has_cfg nbdfuse-scratchd; then
  if [ -z "${SCRATCHD:-}" ]; then
    command -v cargo >/dev/null || die "cargo is needed to build scratchd (or set SCRATCHD=/path/to/scratchd)"
    echo "cargo build --release --locked" >&2
    cargo build --release --locked -q || die "cargo build failed"
    SCRATCHD=${CARGO_TARGET_DIR:-$PWD/target}/release/scratchd
  fi
  [ -x "$SCRATCHD" ] || die "no scratchd binary at $SCRATCHD"
  "$SCRATCHD" run --help >/dev/null 2>&1 || die "$SCRATCHD has no 'run' command"
fi

DELAY_US=${DELAY_US:-}
if [ -n "$DELAY_US" ]; then
  [[ $DELAY_US =~ ^[0-9]+$ ]] || die "DELAY_US must be a whole number of microseconds, not '$DELAY_US'"
  if [ -z "${DELAY_PROXY:-}" ]; then
    cargo build --release --locked -q -p delay-proxy || die "cargo build -p delay-proxy failed"
    DELAY_PROXY=${CARGO_TARGET_DIR:-$PWD/target}/release/delay-proxy
  fi
  [ -x "$DELAY_PROXY" ] || die "no delay-proxy binary at $DELAY_PROXY"
fi

# --- inputs (untimed, once) ----------------------------------------------------
if has_phase extract; then
  if [ ! -s "$TAR" ]; then
    [ -f "$XZ" ] || die "$XZ missing (apt-get install linux-source-6.1 did not provide it?)"
    echo "decompressing $XZ to $TAR (once, untimed)" >&2
    xz -dc -T0 "$XZ" >"$TAR.part" || { rm -f "$TAR.part"; die "cannot decompress $XZ"; }
    mv "$TAR.part" "$TAR"
  fi
  cat "$TAR" >/dev/null # into the page cache
fi

debian_mirror() { # the system's Debian mirror, from its deb entries
  local uri
  uri=$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ { print $2; exit }' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  echo "$uri"
}
if has_phase install && [ ! -s "$DEB_TARBALL" ]; then
  [ -n "$SUITE" ] || die "no VERSION_CODENAME in /etc/os-release; set DEB_TARBALL to a debootstrap --make-tarball"
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || die "no Debian mirror in /etc/apt; set DEB_TARBALL to a debootstrap --make-tarball"
  echo "making $DEB_TARBALL (once, untimed): debootstrap --variant=minbase --make-tarball $SUITE $mirror" >&2
  mk=$(mktemp -d /var/tmp/run-workload-deb.XXXXXX)
  if ! debootstrap --variant=minbase --make-tarball="$DEB_TARBALL.part" "$SUITE" "$mk" "$mirror" >&2; then
    rm -rf "$mk" "$DEB_TARBALL.part"; die "debootstrap --make-tarball failed"
  fi
  rm -rf "$mk"
  mv "$DEB_TARBALL.part" "$DEB_TARBALL"
fi

hello="" hello_version=""
find_hello() { # newest $SRC_DIR/hello_*.orig.tar.gz
  hello=$(find "$SRC_DIR" -maxdepth 1 -name 'hello_*.orig.tar.gz' 2>/dev/null | sort -V | tail -n 1 || true)
}
add_deb_src() { # a deb-src entry mirroring the system's Debian deb entry, when there is none
  if grep -qsE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; then
    return 0
  fi
  local uri codename keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  uri=$(debian_mirror)
  [ -n "$uri" ] || die "no Debian 'deb' entry in /etc/apt to mirror as deb-src; put hello_VERSION.orig.tar.gz into $SRC_DIR"
  # shellcheck disable=SC1091
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ -n "$codename" ] || die "no VERSION_CODENAME in /etc/os-release; put hello_VERSION.orig.tar.gz into $SRC_DIR"
  echo "adding /etc/apt/sources.list.d/scratchd-bench-deb-src.sources (deb-src $uri $codename main)" >&2
  {
    echo "Types: deb-src"
    echo "URIs: $uri"
    echo "Suites: $codename"
    echo "Components: main"
    [ -f "$keyring" ] && echo "Signed-By: $keyring"
  } >/etc/apt/sources.list.d/scratchd-bench-deb-src.sources
  apt-get update -q >&2 || die "apt-get update failed after adding the deb-src entry"
}
if has_phase rpm; then
  [ -f "$SPEC" ] || die "$SPEC missing"
  find_hello
  if [ -z "$hello" ]; then
    command -v apt-get >/dev/null || die "no $SRC_DIR/hello_*.orig.tar.gz and no apt-get to fetch it"
    add_deb_src
    dl=$(mktemp -d "$SRC_DIR/run-workload-src.XXXXXX")
    echo "fetching hello's source: apt-get source --download-only hello" >&2
    if ! (cd "$dl" && apt-get source -q --download-only hello >&2); then
      rm -rf "$dl"; die "apt-get source --download-only hello failed"
    fi
    mv "$dl"/hello_*.orig.tar.gz "$SRC_DIR"/ 2>/dev/null || { rm -rf "$dl"; die "apt-get source gave no hello_*.orig.tar.gz"; }
    rm -rf "$dl"
    find_hello
  fi
  [ -n "$hello" ] || die "no hello_*.orig.tar.gz in $SRC_DIR"
  hello_version=${hello##*/hello_}
  hello_version=${hello_version%.orig.tar.gz}
  tar -tzf "$hello" "hello-$hello_version/configure" >/dev/null 2>&1 || die "$hello has no hello-$hello_version/configure"
fi

# --- state and cleanup ---------------------------------------------------------
work=$(mktemp -d /var/tmp/run-workload.XXXXXX)
shm=$(mktemp -d /dev/shm/run-workload.XXXXXX)
mnt=$work/mnt fusedir=$work/fuse logdir=$work/logs
mkdir -p "$mnt" "$fusedir" "$logdir"
server_pid="" proxy_pid="" fuse_pid="" loopdev="" mounted="" fuse_mounted="" child_pid=""
# run-tcp's port: one free now (the kernel's choice)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
# with DELAY_US: the delay proxy's port, which the NBD clients connect to
proxy_port=$(free_port)
dmesg_start=$(dmesg 2>/dev/null | wc -l || echo 0)

stop_pid() { # pid [seconds [group]]: stop a process we started (with 'group': its
  # process group, made by setsid) with SIGTERM, SIGKILL after the seconds
  # (default 10); wait for it
  local pid=$1 target=$1 tries=$((${2:-10} * 20))
  [ -n "$pid" ] || return 0
  [ "${3:-}" = group ] && target=-$pid
  kill -TERM -- "$target" 2>/dev/null || true
  for _ in $(seq "$tries"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -KILL -- "$target" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
exited() { # pid seconds: wait for a process to end by itself
  for _ in $(seq $(($2 * 20))); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.05; done
  return 1
}
unmount() { # dir: unmount, retrying while busy; lazily as a last resort
  for _ in $(seq 50); do umount "$1" 2>/dev/null && return 0; mountpoint -q "$1" || return 0; sleep 0.1; done
  echo "run-workload: $1 still busy; unmounting lazily" >&2
  umount -l "$1" 2>/dev/null || true
}
teardown() { # everything one measurement set up, in reverse order; never fails
  # a scratchd run unmounts (writing its dirty data back) before it exits
  stop_pid "$child_pid" 60 group; child_pid=""
  if [ -n "$mounted" ]; then unmount "$mnt"; fi
  mounted=""
  if [ -n "$loopdev" ]; then losetup -d "$loopdev" 2>/dev/null || true; fi
  loopdev=""
  if [ -n "$fuse_mounted" ]; then unmount "$fusedir"; fi
  fuse_mounted=""
  if [ -n "$fuse_pid" ]; then exited "$fuse_pid" 5 || true; fi # nbdfuse ends when unmounted
  stop_pid "$fuse_pid"; fuse_pid=""
  rm -f "$shm/ext4.img"
  rm -rf "$work/local"
}
stop_server() {
  stop_pid "$proxy_pid"; proxy_pid=""
  stop_pid "$server_pid"; server_pid=""; rm -f "$work/sock"
}
start_proxy() { # target (HOST:PORT or unix:PATH): the delay proxy in front of the server
  [ -n "$DELAY_US" ] || return 0
  setsid "$DELAY_PROXY" "127.0.0.1:$proxy_port" "$1" $((DELAY_US / 2)) >"$logdir/delay-proxy.log" 2>&1 &
  proxy_pid=$!
  for _ in $(seq 400); do
    (: <"/dev/tcp/127.0.0.1/$proxy_port") 2>/dev/null && return 0
    kill -0 "$proxy_pid" 2>/dev/null || break
    sleep 0.05
  done
  die "delay-proxy did not start"
}
# the URI an NBD client uses for the server on $work/sock (or, run-tcp, $port)
client_uri() { # config
  # scratchd's tmpdisk wants an export name (the build's); nbdkit's takes any
  local name=
  [ "$1" = nbdfuse-scratchd ] && name=bench
  if [ -n "$DELAY_US" ]; then echo "nbd://127.0.0.1:$proxy_port/$name"; return; fi
  case $1 in
    run-tcp) echo "nbd://127.0.0.1:$port/$name" ;;
    *) echo "nbd+unix:///$name?socket=$work/sock" ;;
  esac
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  teardown
  stop_server
  rm -rf "$shm"
  if [ -n "${KEEP_LOGS:-}" ]; then
    rmdir "$mnt" "$fusedir" 2>/dev/null || true
    echo "logs kept in $work" >&2
  elif [ $rc -ne 0 ] && [ $rc -ne 129 ] && [ $rc -ne 130 ] && [ $rc -ne 143 ]; then
    # a failure: keep nothing but show the last log lines that may say why
    for f in "$logdir"/*; do
      [ -s "$f" ] || continue
      echo "--- last lines of $(basename "$f") ---" >&2; tail -n 30 "$f" >&2
    done
    rm -rf "$work"
  else
    rm -rf "$work"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

start_server() { # name command...: start a server on $work/sock -> server_pid
  local name=$1; shift
  rm -f "$work/sock"
  setsid "$@" >"$logdir/$name.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 400); do
    [ -S "$work/sock" ] && return 0
    # a TCP server: listening on $port
    [ "$name" = scratchd-serve-tcp ] && (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.05
  done
  die "$name did not start: $*"
}

# ceiling: image, mkfs, loop, mount
ceiling_up() {
  truncate -s "$SIZE" "$shm/ext4.img"
  # shellcheck disable=SC2086
  mkfs.ext4 $SCRATCH_MKFS "$shm/ext4.img"
  loopdev=$(losetup --find --show "$shm/ext4.img")
  mount -o noatime "$loopdev" "$mnt"
  mounted=1
}
# tmpfs: a tmpfs of the same size
tmpfs_up() {
  mount -t tmpfs -o "size=$SIZE,nr_inodes=0,mode=755" scratchd-bench "$mnt"
  mounted=1
}
# local-disk: a fresh directory on /var/tmp, bind-mounted (the phases want a mount)
local_up() {
  mkdir "$work/local"
  mount --bind "$work/local" "$mnt"
  mounted=1
}
# nbdkit, nbdfuse-scratchd: nbdfuse DIR/disk URI, loop (buffered), mount
nbdfuse_up() { # config
  rm -f "$work/nbdfuse.pid"
  # shellcheck disable=SC2086
  setsid nbdfuse ${NBDFUSE_ARGS:-} -P "$work/nbdfuse.pid" "$fusedir/disk" "$(client_uri "$1")" >>"$logdir/nbdfuse.log" 2>&1 &
  fuse_pid=$! fuse_mounted=1
  for _ in $(seq 400); do
    [ -s "$work/nbdfuse.pid" ] && break
    kill -0 "$fuse_pid" 2>/dev/null || break
    sleep 0.01
  done
  [ -s "$work/nbdfuse.pid" ] || die "nbdfuse did not start"
  loopdev=$(losetup --find --show "$fusedir/disk")
  mount -o noatime "$loopdev" "$mnt"
  mounted=1
}
down() { # unmount, detach and stop what *_up made (timed in attach)
  umount "$mnt"; mounted=""
  if [ -n "$loopdev" ]; then losetup -d "$loopdev"; loopdev=""; fi
  if [ -n "$fuse_mounted" ]; then
    unmount "$fusedir"; fuse_mounted=""
    exited "$fuse_pid" 10 || die "nbdfuse did not exit after its unmount"
    wait "$fuse_pid" 2>/dev/null || true; fuse_pid=""
  fi
  rm -f "$shm/ext4.img"
  rm -rf "$work/local"
}
run_args() { # config -> run_cmd: the scratchd run command line, up to '--'
  case $1 in
    run-local) run_cmd=("$SCRATCHD" run --size "$SIZE") ;;
    run-server | run-tcp) run_cmd=("$SCRATCHD" run --server "$(client_uri "$1")") ;;
    run-server-sync) run_cmd=("$SCRATCHD" run --write-behind off --server "$(client_uri "$1")") ;;
  esac
}

results=$work/results.tsv
: >"$results"
record() { # round config phase seconds
  printf 'result\t%s\t%s\t%s\t%s\n' "$@"
  printf '%s\t%s\t%s\t%s\n' "$@" >>"$results"
}

measure_attach() { # round config
  local r=$1 c=$2 t0 t1
  for _ in $(seq "$ATTACH_TRIES"); do
    case $c in
      ceiling) t0=$(now); ceiling_up; down; t1=$(now) ;;
      tmpfs) t0=$(now); tmpfs_up; down; t1=$(now) ;;
      local-disk) t0=$(now); local_up; down; t1=$(now) ;;
      nbdkit | nbdfuse-scratchd) t0=$(now); nbdfuse_up "$c"; down; t1=$(now) ;;
      run-*)
        run_args "$c"
        t0=$(now)
        "${run_cmd[@]}" -- true >>"$logdir/scratchd-run.log" 2>&1 || die "$c: scratchd run -- true failed"
        t1=$(now) ;;
    esac
    record "$r" "$c" attach "$(elapsed "$t0" "$t1")"
  done
}

measure_disk() { # round config: extract, rpm, rm on one fresh disk
  local r=$1 c=$2 rc=0 out=$work/phases.out
  export RW_DEB_TARBALL="$DEB_TARBALL" RW_SUITE="$SUITE" RW_PHASES="$disk_phases" RW_TAR="$TAR" RW_HELLO="$hello" RW_HELLO_VERSION="$hello_version" \
    RW_SPEC="$SPEC" RW_LOGDIR="$logdir"
  case $c in
    ceiling) ceiling_up ;;
    tmpfs) tmpfs_up ;;
    local-disk) local_up ;;
    nbdkit | nbdfuse-scratchd) nbdfuse_up "$c" ;;
  esac
  case $c in
    ceiling | tmpfs | local-disk | nbdkit | nbdfuse-scratchd) setsid bash "$SELF" phases "$mnt" >"$out" 2>"$logdir/phases.log" & ;;
    run-*) run_args "$c"; setsid "${run_cmd[@]}" -- bash "$SELF" phases >"$out" 2>"$logdir/phases.log" & ;;
  esac
  child_pid=$!
  wait "$child_pid" || rc=$?
  child_pid=""
  if [ $rc -ne 0 ]; then
    die "$c round $r: the phases failed (exit status $rc; their log follows)"
  fi
  case $c in ceiling | tmpfs | local-disk | nbdkit | nbdfuse-scratchd) down ;; esac
  local p s n=0
  while read -r tag p s; do
    [ "$tag" = phase ] || continue
    record "$r" "$c" "$p" "$s"
    n=$((n + 1))
  done <"$out"
  [ "$n" = "$(wc -w <<<"$disk_phases")" ] || { cat "$out" "$logdir/phases.log" >&2; die "$c round $r: expected $disk_phases, got $n results"; }
}

# --- the run -----------------------------------------------------------------------
echo "# machine: $(nproc) cores, $(uname -r), $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg)"
has_cfg nbdkit && echo "# nbdkit $(nbdkit --version | awk '{print $2}'), $(nbdfuse --version 2>&1 | head -n 1)"
[ -n "${SCRATCHD:-}" ] && echo "# scratchd: $SCRATCHD ($(git -C "$PWD" describe --always --dirty 2>/dev/null || echo '?'))"
has_phase extract && echo "# tree: $TAR ($(du -h "$TAR" | cut -f1))"
has_phase rpm && echo "# rpm: $hello, rpmbuild $(rpmbuild --version | awk '{print $NF}')"
[ -n "$DELAY_US" ] && echo "# delay-proxy: $DELAY_US us of round trip added ($((DELAY_US / 2)) us each way) for nbdkit, run-server, run-tcp"
echo "# rounds=$ROUNDS configs=\"${cfgs[*]}\" phases=\"${phases[*]}\" attach tries=$ATTACH_TRIES"
printf 'result\tround\tconfig\tphase\tseconds\n'
for r in $(seq "$ROUNDS"); do
  shift_by=$(((r - 1) % ${#cfgs[@]}))
  order=("${cfgs[@]:shift_by}" "${cfgs[@]:0:shift_by}")
  for c in "${order[@]}"; do
    echo "round $r: $c" >&2
    case $c in
      nbdkit) start_server nbdkit env TMPDIR="$shm" nbdkit -f -U "$work/sock" tmpdisk size="$SIZE" ;;
      run-server | run-server-sync | nbdfuse-scratchd) start_server scratchd-serve "$SCRATCHD" serve ${SERVE_ARGS:-} -U "$work/sock" tmpdisk size="$SIZE" pool=1 "${tmpdisk_format[@]}" ;;
      run-tcp) start_server scratchd-serve-tcp "$SCRATCHD" serve ${SERVE_ARGS:-} -i 127.0.0.1 -p "$port" tmpdisk size="$SIZE" pool=1 "${tmpdisk_format[@]}" ;;
    esac
    case $c in
      nbdkit | nbdfuse-scratchd | run-server | run-server-sync) start_proxy "unix:$work/sock" ;;
      run-tcp) start_proxy "127.0.0.1:$port" ;;
    esac
    sync
    if [ -n "$want_attach" ]; then measure_attach "$r" "$c"; fi
    if [ -n "$disk_phases" ]; then measure_disk "$r" "$c"; fi
    teardown
    stop_server
  done
done

# --- the table -----------------------------------------------------------------------
python3 - "$results" "$ROUNDS" "${cfgs[*]}" "${phases[*]}" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines() if l]
rounds, cfgs, phases = int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
acc, per_round = {}, {}
for r, c, p, s in rows:
    acc.setdefault((p, c), []).append(float(s))
    if p in ("install", "extract", "rpm", "rm"):
        per_round.setdefault((c, r), {})[p] = float(s)
work = [p for p in ("install", "extract", "rpm", "rm") if p in phases]
if len(work) > 1:
    for (c, r), d in per_round.items():
        if len(d) == len(work):
            acc.setdefault(("total", c), []).append(sum(d.values()))
    phases = phases + ["total"]
target = {  # (config, phase) -> (what, test on (median, x ceiling, x nbdkit))
}
for c, limit in (("run-local", 1.05), ("run-server", 1.10), ("run-tcp", 1.10)):
    for p in ("install", "extract", "rpm", "rm", "total"):
        target[(c, p, "ceil")] = limit
    for p in ("extract", "rm"):
        target[(c, p, "nbdkit")] = 0.75
    target[(c, "attach", "abs")] = 0.100
# issue 21: our server under nbdfuse, against nbdkit under nbdfuse
target[("nbdfuse-scratchd", "install", "nbdkit")] = 0.95
print(f"\nmedians of {rounds} round(s), seconds; 'x ceiling' / 'x nbdkit' = median / that configuration's median")
hdr = f"{'phase':<8} {'configuration':<16} {'n':>2} {'median':>8} {'min':>8} {'max':>8} {'x ceiling':>10} {'x nbdkit':>9}  target"
print(hdr)
print("-" * len(hdr))
for p in phases:
    med = {c: statistics.median(acc[(p, c)]) for c in cfgs if (p, c) in acc}
    for c in cfgs:
        if c not in med:
            continue
        v = acc[(p, c)]
        m = med[c]
        xc = m / med["ceiling"] if med.get("ceiling") else None
        xn = m / med["nbdkit"] if med.get("nbdkit") else None
        notes = []
        if (c, p, "abs") in target:
            t = target[(c, p, "abs")]
            notes.append(f"< {t * 1000:.0f} ms {'met' if m < t else 'MISSED'}")
        if (c, p, "ceil") in target and xc is not None:
            t = target[(c, p, "ceil")]
            notes.append(f"<= {t:.2f}x ceiling {'met' if xc <= t else 'MISSED'}")
        if (c, p, "nbdkit") in target and xn is not None:
            t = target[(c, p, "nbdkit")]
            notes.append(f"<= {t:.2f}x nbdkit {'met' if xn <= t else 'MISSED'}")
        fx = lambda x: f"{x:.2f}x" if x is not None else "-"
        print(f"{p:<8} {c:<16} {len(v):>2} {m:>8.3f} {min(v):>8.3f} {max(v):>8.3f} {fx(xc):>10} {fx(xn):>9}  {'; '.join(notes)}")
PY

# --- kernel messages that look like trouble --------------------------------------
if new=$(dmesg 2>/dev/null | tail -n +$((dmesg_start + 1))); then
  odd=$(grep -iE 'error|fail|warn|hung|blocked|BUG|Call Trace|I/O' <<<"$new" || true)
  if [ -n "$odd" ]; then
    echo
    echo "# new kernel messages that may matter ($(wc -l <<<"$odd") of $(wc -l <<<"$new") new lines; first 20):"
    head -n 20 <<<"$odd" | sed 's/^/#   /'
  fi
fi
