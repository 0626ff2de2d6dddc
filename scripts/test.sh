#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs the real NBD
# clients the tests drive (when missing), then runs formatting, lint and
# doc-link checks, unit/property tests and the end-to-end suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in nbdinfo:libnbd-bin nbdsh:python3-libnbd nbdfuse:nbdfuse qemu-img:qemu-utils \
            fio:fio nbdkit:nbdkit mkfs.ext4:e2fsprogs openssl:openssl losetup:mount \
            systemd-analyze:systemd curl:curl ip:iproute2 ss:iproute2 groff:groff-base \
            rpmbuild:rpm objdump:binutils \
            qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio depmod:kmod; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
# A fresh machine may carry qemu-utils from bookworm-backports (10.0), whose
# files clash with Debian 12's qemu-system (7.2): apt would remove it and
# with it qemu-img and qemu-nbd. Take both from Debian 12 itself.
case " ${need[*]} " in *" qemu-system-x86 "*) need+=(qemu-utils/bookworm) ;; esac
if [ ${#need[@]} -gt 0 ]; then
  echo "installing test clients: ${need[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --allow-downgrades \
    "${need[@]}" >/dev/null
fi

# The kernels the guest tests boot (tests/e2e/kernel_vm.rs), fetched while
# the build runs; the tests wait for it through guest.sh's lock.
vm_log=$(mktemp)
scripts/vm/guest.sh --fetch 6.1 6.12 >"$vm_log" 2>&1 &
vm_fetch=$!
log=
trap 'kill "$vm_fetch" 2>/dev/null || true; rm -f "$vm_log" ${log:+"$log"}' EXIT

# What this run proves is only as good as the peers it ran against: name them.
first_line() { "$@" 2>&1 | head -n1 || true; }
echo "peers: kernel $(uname -r)"
echo "peers: $(first_line qemu-nbd --version)"
echo "peers: $(first_line nbdkit --version)"
echo "peers: libnbd $(first_line nbdinfo --version | awk '{print $2}')"
echo "peers: $(first_line fio --version)"
echo "peers: $(first_line rustc --version)"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Doc comments link to what they name; a broken link fails the run.
RUSTDOCFLAGS="-D warnings -A rustdoc::private-intra-doc-links" \
  cargo doc --workspace --no-deps --document-private-items --locked -q
log=$(mktemp)
if ! wait "$vm_fetch"; then
  echo "cannot fetch the guest kernels (the kernel_vm tests will fail):" >&2
  cat "$vm_log" >&2
fi
sed 's/^/peers: /' "$vm_log"
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
# Real kernels under qemu (tests/e2e/kernel_vm.rs), on their own: two TCG
# guests keep both cores busy, and the suite above times some clients.
known=${CARGO_TARGET_DIR:-target}/tmp/kernel-vm/known-failures
rm -f "$known"
cargo test --locked --test e2e kernel_vm:: -- --ignored 2>&1 | tee -a "$log"
# Known intermittent guest failures pass the run; say each one that happened.
[ ! -f "$known" ] || sed 's/^/kernel_vm: /' "$known"
# The packages' recipes (deb, RPM with the mock plugin), built around the
# binary the tests just used and installed into scratch roots.
scripts/package.sh --profile dev
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
