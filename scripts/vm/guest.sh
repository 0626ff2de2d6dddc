#!/usr/bin/env bash
# Runs one command inside a real Linux kernel under qemu and passes back
# its output and exit status.
#
#   scripts/vm/guest.sh [--timeout SECS] FLAVOUR -- COMMAND [ARG...]
#   scripts/vm/guest.sh --fetch FLAVOUR...   (download and prepare only)
#
# FLAVOUR is `6.1` (Debian 12's default kernel, the dependency of
# linux-image-amd64), `6.12` (the 6.12 kernel Debian 12 also ships, the
# dependency of linux-image-6.12-amd64) or a package name
# (linux-image-VERSION-amd64).
#
# The kernel package is fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` into a cache directory (SCRATCHD_VM_CACHE, by default
# $CARGO_TARGET_DIR/vm-kernels or target/vm-kernels of the checkout), reused
# between runs; nothing is installed into the host's /boot or /lib/modules.
#
# The guest sees the host's root read-only over 9p, with tmpfs on /tmp,
# /run, /var/tmp, /root and /mnt, the package's /lib/modules in place of the
# host's (so `modprobe` and the kernel's module autoload find the guest
# kernel's modules), `nbd`, `loop`, `fuse` and `ext4` loaded, and loopback
# networking only. The command runs as root in the current directory with
# PATH, HOME=/root and TERM=dumb; pass more variables with `env VAR=...`.
# Its stdout and stderr are printed here after it ends (stdout first), then
# the script exits with its status. Exit status 124 means the guest did not
# finish within the timeout (default 600 s) and was killed; 125 a failure
# of the harness itself (no kernel package, qemu missing, no boot), with the
# reason on stderr.
#
# Accelerator: TCG, unless SCRATCHD_VM_ACCEL=kvm (nested KVM on some
# machines hangs at boot, and that cannot be told from outside in advance).
# SCRATCHD_VM_CPUS (default 2) and SCRATCHD_VM_MEM (MiB, default 2048) size
# the guest. SCRATCHD_VM_KEEP=1 keeps the run directory (console log,
# dmesg) and prints its path; SCRATCHD_VM_KEEP_FAILED=DIR copies it to DIR
# if the command fails, with the guest's nbd trace (the driver's trace
# events of each request sent and reply received).
set -euo pipefail

fail() {
  echo "guest.sh: $*" >&2
  exit 125
}

timeout_secs=600
fetch_only=
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) timeout_secs=$2; shift 2 ;;
    --fetch) fetch_only=1; shift; break ;;
    --) shift; break ;;
    -*) fail "unknown option $1" ;;
    *) [ -z "${flavour:-}" ] || fail "more than one flavour"; flavour=$1; shift ;;
  esac
done
if [ -n "$fetch_only" ]; then
  [ $# -gt 0 ] || fail "--fetch: no flavour given"
  for flavour in "$@"; do
    "$0" --timeout 0 "$flavour" -- fetch-only || exit $?
  done
  exit 0
fi
[ -n "${flavour:-}" ] || fail "usage: guest.sh [--timeout SECS] FLAVOUR -- COMMAND [ARG...]"
[ $# -gt 0 ] || fail "no command given"

repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=${SCRATCHD_VM_CACHE:-${CARGO_TARGET_DIR:-$repo/target}/vm-kernels}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

for tool in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio \
            depmod:kmod modprobe:kmod apt-get:apt dpkg-deb:dpkg xz:xz-utils; do
  command -v "${tool%%:*}" >/dev/null 2>&1 \
    || fail "${tool%%:*} is missing: install ${tool##*:} (scripts/test.sh installs it)"
done
busybox_path=$(command -v busybox)
# The initramfs has no libraries: busybox must be the static one.
! ldd "$busybox_path" >/dev/null 2>&1 || fail "$busybox_path is not static: install busybox-static"

# The package a flavour stands for, by the meta package that depends on it
# (so that a newer Debian point release is picked up).
package_of() {
  local meta
  case "$1" in
    6.1) meta=linux-image-amd64 ;;
    6.12) meta=linux-image-6.12-amd64 ;;
    linux-image-*) echo "$1"; return ;;
    *) fail "unknown kernel flavour $1 (6.1, 6.12 or a linux-image-* package)" ;;
  esac
  apt-cache depends "$meta" 2>/dev/null | awk '/^ *Depends: linux-image-/ { print $2; exit }'
}

package=$(package_of "$flavour")
if [ -z "$package" ]; then
  # A fresh machine has no package lists yet.
  apt-get update -qq >/dev/null 2>&1 || true
  package=$(package_of "$flavour")
fi
[ -n "$package" ] || fail "cannot tell which package kernel $flavour is: apt-cache knows no \
linux-image-amd64 / linux-image-6.12-amd64 (no Debian package lists; run apt-get update)"

kdir=$cache/$package
# One unpacking at a time: tests boot guests in parallel.
exec 9>"$cache/.lock"
flock 9
if [ ! -e "$kdir/.ready" ]; then
  rm -rf "$kdir" "$kdir.tmp"
  mkdir -p "$kdir.tmp"
  (cd "$kdir.tmp" && apt-get download -q "$package" >download.log 2>&1) \
    || fail "cannot download kernel package $package (is Debian's package registry reachable?): \
$(tail -n 3 "$kdir.tmp/download.log" 2>/dev/null)"
  deb=$(ls "$kdir.tmp"/*.deb)
  dpkg-deb -x "$deb" "$kdir.tmp/root"
  rm -f "$deb"
  mv "$kdir.tmp" "$kdir"
  touch "$kdir/.ready"
fi
root=$kdir/root
version=$(ls "$root/lib/modules")
vmlinuz=$root/boot/vmlinuz-$version
[ -f "$vmlinuz" ] || fail "no kernel image in $package"

# The initramfs: busybox, the modules that mount the host's root over 9p
# (in dependency order, decompressed for busybox's insmod) and /init.
initramfs=$kdir/initramfs.cpio
if [ ! -e "$initramfs" ] || [ "$initramfs" -ot "$repo/scripts/vm/init" ]; then
  depmod -b "$root" "$version"
  staging=$(mktemp -d)
  mkdir -p "$staging"/{bin,modules,dev,proc,sys,newroot,out}
  cp "$busybox_path" "$staging/bin/busybox"
  cp "$repo/scripts/vm/init" "$staging/init"
  chmod 755 "$staging/init"
  n=0
  for module in virtio_pci 9pnet_virtio 9p; do
    modprobe -d "$root" -S "$version" --show-depends "$module"
  done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' | while read -r ko; do
    n=$((n + 1))
    name=$(printf '%02d-%s' "$n" "$(basename "${ko%.xz}")")
    case "$ko" in
      *.xz) xz -dc "$ko" >"$staging/modules/$name" ;;
      *) cp "$ko" "$staging/modules/$name" ;;
    esac
  done
  (cd "$staging" && find . | cpio -o -H newc --quiet) >"$initramfs.tmp"
  mv "$initramfs.tmp" "$initramfs"
  rm -rf "$staging"
fi
flock -u 9
if [ "$timeout_secs" = 0 ] && [ "$*" = fetch-only ]; then
  echo "guest kernel: $package ($kdir)"
  exit 0
fi

run=$(mktemp -d "${TMPDIR:-/tmp}/scratchd-vm.XXXXXX")
cleanup() {
  local status=$?
  if [ "${SCRATCHD_VM_KEEP:-}" = 1 ]; then
    echo "guest.sh: run directory kept: $run" >&2
    return
  fi
  if [ "$status" != 0 ] && [ -n "${SCRATCHD_VM_KEEP_FAILED:-}" ]; then
    mkdir -p "$SCRATCHD_VM_KEEP_FAILED"
    cp -r "$run"/. "$SCRATCHD_VM_KEEP_FAILED"/
    echo "guest.sh: the failed run's directory (dmesg, nbd trace) kept in $SCRATCHD_VM_KEEP_FAILED" >&2
  fi
  rm -rf "$run"
}
trap cleanup EXIT

# What the guest's init reads: where things are, and the command.
{
  printf 'KDIR=%q\nKVERSION=%q\nOUT=%q\nCWD=%q\n' "$root" "$version" "$run" "$PWD"
  printf 'GUEST_PATH=%q\n' "$PATH"
  printf 'MODULES=%q\n' "${SCRATCHD_VM_MODULES-nbd loop fuse ext4}"
} >"$run/guest.env"
printf '%q ' "$@" >"$run/command"

# thread=single: one host thread runs every vCPU in turn. With a thread per
# vCPU (qemu 7.2's default), a vCPU can still run code another has just
# patched through int3 (the kernel's text_poke_bp), and 6.12 then dies of an
# "Oops: int3" (seen with two guests at once on this 2-core host).
accel=tcg,thread=single
[ "${SCRATCHD_VM_ACCEL:-}" != kvm ] || accel=kvm
started=$(date +%s%N)
set +e
# --foreground: qemu stays in this process group, so a caller that kills
# the group takes qemu with it.
# nice: a guest under TCG keeps a host core busy, and the host's own
# tests, some of which time their clients, run beside it.
# no_timer_check: under TCG on a busy host the kernel's early check of
# the IO-APIC timer can miss its ticks and panic the boot ("IO-APIC + timer
# doesn't work", seen with 6.1).
timeout --foreground -k 5 "$timeout_secs" nice -n 19 qemu-system-x86_64 \
  -accel "$accel" -cpu max -smp "${SCRATCHD_VM_CPUS:-2}" -m "${SCRATCHD_VM_MEM:-2048}" \
  -nographic -no-reboot -nic none \
  -kernel "$vmlinuz" -initrd "$initramfs" \
  -append "console=ttyS0 quiet loglevel=4 panic=-1 no_timer_check rdinit=/init" \
  -virtfs local,path=/,mount_tag=root,security_model=passthrough,readonly=on,multidevs=remap \
  -virtfs "local,path=$run,mount_tag=out,security_model=passthrough" \
  </dev/null >"$run/console.log" 2>&1
qemu_status=$?
set -e
elapsed=$(( ($(date +%s%N) - started) / 1000000000 ))

[ -f "$run/stdout" ] && cat "$run/stdout"
[ -f "$run/stderr" ] && cat "$run/stderr" >&2
if [ -f "$run/status" ]; then
  status=$(cat "$run/status")
  echo "guest.sh: $package: exit status $status after ${elapsed}s" >&2
  exit "$status"
fi
if [ "$qemu_status" -eq 124 ] || [ "$qemu_status" -eq 137 ]; then
  echo "guest.sh: $package: no result within ${timeout_secs}s: qemu killed; console:" >&2
  tail -n 40 "$run/console.log" >&2
  [ -f "$run/dmesg" ] && tail -n 40 "$run/dmesg" >&2
  exit 124
fi
echo "guest.sh: $package: the guest stopped (qemu status $qemu_status) without a result; console:" >&2
tail -n 60 "$run/console.log" >&2
exit 125
