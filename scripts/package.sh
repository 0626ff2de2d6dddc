#!/usr/bin/env bash
# Builds scratchd's packages from this checkout: a .deb for Debian hosts and
# RPMs (scratchd, scratchd-mock) for Fedora/RHEL hosts, then checks each by
# installing it into a scratch root (never into this host) and running
# `scratchd --version` from there.
#
#   scripts/package.sh                 # release build, packages in target/package/
#   scripts/package.sh --profile dev   # package the debug binary (what the
#                                      # test suite does: it checks the
#                                      # recipes without a second build)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    *) echo "usage: $0 [--profile release|dev]" >&2; exit 2 ;;
  esac
done
# A debug binary is over 100 MiB: checking its packages is not worth
# minutes of xz, so it gets the fastest compression.
case "$profile" in
  release) bindir=${CARGO_TARGET_DIR:-target}/release deb_z=(-Zxz) rpm_z=() ;;
  dev) bindir=${CARGO_TARGET_DIR:-target}/debug deb_z=(-Zgzip -z1) rpm_z=(--define "_binary_payload w1.gzdio") ;;
  *) echo "$0: unknown profile $profile" >&2; exit 2 ;;
esac

for tool in dpkg-deb:dpkg rpmbuild:rpm objdump:binutils; do
  command -v "${tool%%:*}" >/dev/null || { echo "$0: needs ${tool%%:*} (apt-get install ${tool##*:})" >&2; exit 1; }
done

cargo build --locked --profile "$profile" --bin scratchd
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
out=target/package
rm -rf "$out"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One staged tree, laid out once, packed by both formats.
staged="$work/staged"
mkdir -p "$staged/man" "$staged/completions"
cp "$bindir/scratchd" "$staged/scratchd"
"$staged/scratchd" generate man "$staged/man" >/dev/null
for shell in bash zsh fish; do
  "$staged/scratchd" generate completions "$shell" "$staged/completions" >/dev/null
done
cp -r contrib docs README.md "$staged/"

# Runs a command with its output kept aside, shown only if it fails.
quietly() {
  if ! "$@" > "$work/quiet.log" 2>&1; then
    cat "$work/quiet.log" >&2
    echo "$0: failed: $*" >&2
    return 1
  fi
}

build_deb() {
  local root="$work/deb" arch glibc
  arch=$(dpkg --print-architecture)
  # The newest glibc symbol version the binary needs is its libc6 floor.
  glibc=$(objdump -T "$staged/scratchd" | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -n1)
  install -D -m 0755 "$staged/scratchd" "$root/usr/bin/scratchd"
  install -d "$root/usr/share/man/man1"
  for page in "$staged"/man/*.1; do gzip -9n < "$page" > "$root/usr/share/man/man1/$(basename "$page").gz"; done
  install -D -m 0644 "$staged/completions/scratchd.bash" "$root/usr/share/bash-completion/completions/scratchd"
  install -D -m 0644 "$staged/completions/_scratchd" "$root/usr/share/zsh/vendor-completions/_scratchd"
  install -D -m 0644 "$staged/completions/scratchd.fish" "$root/usr/share/fish/vendor_completions.d/scratchd.fish"
  install -d "$root/lib/systemd/system"
  install -m 0644 "$staged"/contrib/systemd/*.service "$staged"/contrib/systemd/*.socket "$root/lib/systemd/system/"
  install -D -m 0644 "$staged/contrib/scratchd.toml" "$root/etc/scratchd/scratchd.toml"
  install -D -m 0644 "$staged/contrib/tmpfiles.d/scratchd.conf" "$root/usr/lib/tmpfiles.d/scratchd.conf"
  install -D -m 0644 "$staged/contrib/mock/scratchd_root.py" "$root/usr/share/scratchd/mock/scratchd_root.py"
  install -d "$root/usr/share/doc/scratchd"
  install -m 0644 "$staged/README.md" "$staged"/docs/*.md "$root/usr/share/doc/scratchd/"
  install -d "$root/DEBIAN"
  sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" \
      -e "s/@DEPENDS@/libc6 (>= ${glibc#GLIBC_}), libgcc-s1/" \
      packaging/deb/control.in > "$root/DEBIAN/control"
  echo /etc/scratchd/scratchd.toml > "$root/DEBIAN/conffiles"
  dpkg-deb --root-owner-group "${deb_z[@]}" --build "$root" "$out/scratchd_${version}_${arch}.deb" >/dev/null
}

build_rpm() {
  local top="$work/rpm"
  mkdir -p "$top"/{BUILD,RPMS,SOURCES,SPECS,SRPMS,BUILDROOT}
  # Debian's rpm runs Fedora's post-install scripts (brp-*) with dash,
  # which they do not support; the staged files are final already.
  rpmbuild -bb --quiet \
    --define "__os_install_post %{nil}" \
    --define "_topdir $top" \
    --define "prebuilt_root $work" \
    --define "crate_version $version" \
    --define "_build_id_links none" \
    "${rpm_z[@]}" \
    packaging/rpm/scratchd.spec
  find "$top/RPMS" -name '*.rpm' -exec cp {} "$out/" \;
}

check_deb() {
  local root="$work/deb-root" deb
  deb=$(ls "$out"/scratchd_*.deb)
  mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates"
  : > "$root/var/lib/dpkg/status"
  # A scratch root with an empty package database: dependencies are the
  # host's business, so they are not checked there.
  quietly dpkg --root="$root" --force-depends --force-script-chrootless -i "$deb"
  dpkg --root="$root" -L scratchd | grep -qx /usr/bin/scratchd
  echo "deb: $(basename "$deb") installs; $("$root/usr/bin/scratchd" --version)"
}

check_rpm() {
  local root="$work/rpm-root" rpm mock
  rpm=$(ls "$out"/scratchd-"$version"-*.rpm | grep -v -- -mock-)
  mock=$(ls "$out"/scratchd-mock-*.rpm)
  rpm --root "$root" --initdb
  # (Debian's rpm warns that it is not the system's package manager.)
  quietly rpm --root "$root" -i --nodeps --noscripts --nosignature "$rpm" "$mock"
  rpm --root "$root" -ql scratchd-mock | grep -q '/mockbuild/plugins/scratchd_root.py$'
  echo "rpm: $(basename "$rpm") $(basename "$mock") install; $("$root/usr/bin/scratchd" --version)"
}

build_deb
build_rpm
check_deb
check_rpm
ls -1 "$out"
