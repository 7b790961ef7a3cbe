#!/usr/bin/env bash
# Builds the Debian package of the agent: /usr/bin/edgewise, /etc/edgewise/edgewise.toml (a
# conffile), /lib/systemd/system/edgewise.service, and the maintainer scripts in packaging/.
#
#   scripts/package-deb.sh [TARGET]        # TARGET: a Rust target triple, default the host's
#   scripts/package-deb.sh aarch64-unknown-linux-gnu     # Pi 3/4/5 on 64-bit Raspberry Pi OS
#   scripts/package-deb.sh armv7-unknown-linux-gnueabihf # Pi 2/3/4 on 32-bit Raspberry Pi OS
#
# With cargo-deb installed and [package.metadata.deb] in agent/Cargo.toml, cargo-deb builds it.
# Otherwise the package is assembled here (same layout) and built with dpkg-deb. Environment:
#   EDGEWISE_BIN  use this binary instead of building one (e.g. from `cross build`, see
#                 cross.toml); it must be built for TARGET
#   DEB_OUT       output directory (default: <target dir>/debian)
#   DEB_REVISION  Debian revision (default 1)
# Prints the path of the .deb on the last line of stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-}"
target_dir="${CARGO_TARGET_DIR:-target}"
revision="${DEB_REVISION:-1}"

# Debian's architecture for a Rust target triple.
deb_arch() {
    case "$1" in
        x86_64-*) echo amd64 ;;
        aarch64-*) echo arm64 ;;
        armv7-*gnueabihf | armv7-*musleabihf | arm-*gnueabihf | arm-*musleabihf) echo armhf ;;
        arm-*gnueabi | arm-*musleabi | armv5te-*) echo armel ;;
        i686-* | i586-*) echo i386 ;;
        riscv64gc-*) echo riscv64 ;;
        *) echo "package-deb: no Debian architecture known for $1" >&2; return 1 ;;
    esac
}

host="$(rustc -vV | sed -n 's/^host: //p')"
arch="$(deb_arch "${target:-$host}")"

if [ -z "${EDGEWISE_BIN:-}" ] && command -v cargo-deb >/dev/null 2>&1 \
    && grep -q '^\[package.metadata.deb\]' agent/Cargo.toml; then
    args=(-p edgewise --deb-revision "$revision")
    if [ -n "$target" ]; then args+=(--target "$target"); fi
    if [ -n "${DEB_OUT:-}" ]; then mkdir -p "$DEB_OUT"; args+=(--output "$DEB_OUT"); fi
    cargo deb "${args[@]}" -- --locked | tail -n 1
    exit 0
fi

# --- without cargo-deb: stage the tree and build with dpkg-deb --------------------------------
if [ -n "${EDGEWISE_BIN:-}" ]; then
    bin="$EDGEWISE_BIN"
else
    if [ -n "$target" ]; then
        cargo build --release --locked -p edgewise --target "$target" >&2
        bin="$target_dir/$target/release/edgewise"
    else
        cargo build --release --locked -p edgewise >&2
        bin="$target_dir/release/edgewise"
    fi
fi
[ -x "$bin" ] || { echo "package-deb: no binary at $bin" >&2; exit 1; }

version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)"
[ -n "$version" ] || { echo "package-deb: no version in Cargo.toml" >&2; exit 1; }
deb_version="${version//-/\~}-$revision"   # 1.2.0-rc.1 -> 1.2.0~rc.1 (sorts before 1.2.0)

out="${DEB_OUT:-$target_dir/debian}"
mkdir -p "$out"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/edgewise_${deb_version}_$arch"

install -D -m 0755 "$bin" "$root/usr/bin/edgewise"
install -D -m 0644 packaging/edgewise.toml "$root/etc/edgewise/edgewise.toml"
install -D -m 0644 packaging/edgewise.service "$root/lib/systemd/system/edgewise.service"
install -d -m 0755 "$root/usr/share/doc/edgewise"
cat >"$root/usr/share/doc/edgewise/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edgewise
Source: https://example.invalid/edgewise

Files: *
Copyright: the edgewise authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
chmod 0644 "$root/usr/share/doc/edgewise/copyright"

# Depends: what the binary links (as cargo-deb's $auto / dpkg-shlibdeps would find), read with
# readelf so that it works for a foreign architecture too; a static (musl) binary needs nothing.
depends="adduser"
needed="$(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')"
if [ -n "$needed" ]; then
    glibc="$(readelf -V "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1)"
    depends="libc6${glibc:+ (>= $glibc)}, $depends"
    for lib in $needed; do
        case "$lib" in
            libc.so.* | libm.so.* | libdl.so.* | libpthread.so.* | librt.so.* | ld-linux*) ;;
            libgcc_s.so.1) depends="libgcc-s1, $depends" ;;
            *) echo "package-deb: unexpected shared library $lib; add its package to Depends" >&2
               exit 1 ;;
        esac
    done
fi

install -d -m 0755 "$root/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/$script" "$root/DEBIAN/$script"
done
echo /etc/edgewise/edgewise.toml >"$root/DEBIAN/conffiles"
(cd "$root" && find usr etc lib -type f -exec md5sum {} + | sort -k 2) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"
installed_size="$(du -sk --exclude=DEBIAN "$root" | cut -f 1)"
cat >"$root/DEBIAN/control" <<EOF
Package: edgewise
Version: $deb_version
Architecture: $arch
Maintainer: edgewise maintainers <edgewise@example.invalid>
Installed-Size: $installed_size
Depends: $depends
Section: net
Priority: optional
Homepage: https://example.invalid/edgewise
Description: Event aggregation agent for edge and IoT gateways
 edgewise reads sensor readings from MQTT, serial lines or a simulator,
 journals them durably on the gateway, evaluates alert rules (thresholds,
 rates, flatlines, missing data, windows, anomaly scores) and one-minute
 summaries, and forwards alerts and summaries to an HTTP or MQTT backend with
 retries, batching and a bounded on-disk outbox that survives outages.
 .
 The package runs the agent as the system user "edgewise" under a hardened
 systemd unit (Type=notify with a watchdog); its configuration is
 /etc/edgewise/edgewise.toml and its store lives in /var/lib/edgewise.
EOF

deb="$out/edgewise_${deb_version}_$arch.deb"
dpkg-deb --build --root-owner-group -Zxz "$root" "$deb" >&2
echo "$deb"
