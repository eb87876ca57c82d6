#!/bin/sh
# Fetch the dnscrypt-proxy binary from Debian trixie's .deb into the lab's tool cache
# so that unit tests can run `dnscrypt-proxy -check`. The package is only unpacked
# (dpkg-deb -x): nothing is installed or started on the host.
#
# Usage: tests/tools/fetch-dnscrypt-proxy.sh [CACHE_DIR]
#   CACHE_DIR defaults to /var/cache/sysdns-lab. The binary ends up at
#   CACHE_DIR/tools/dnscrypt-proxy. Set DEBIAN_MIRROR to use another mirror URI.
set -eu

cache_dir=${1:-/var/cache/sysdns-lab}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
tools_dir=$cache_dir/tools
target=$tools_dir/dnscrypt-proxy

if [ -x "$target" ] && [ "$("$target" -version 2>/dev/null)" = 2.1.8 ]; then
    echo "dnscrypt-proxy $("$target" -version) already at $target"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

# A private apt state so that the host's sources and package lists stay untouched.
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb" "$work/parts"
printf 'deb %s trixie main\n' "$mirror" >"$work/sources.list"
apt_options="-o Dir::Etc::sourcelist=$work/sources.list -o Dir::Etc::sourceparts=$work/parts
 -o Dir::State::Lists=$work/lists -o Dir::Cache=$work/cache
 -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root"

# shellcheck disable=SC2086
apt-get $apt_options -q update
# shellcheck disable=SC2086
(cd "$work/deb" && apt-get $apt_options -q download dnscrypt-proxy)

deb=$(find "$work/deb" -name 'dnscrypt-proxy_*.deb' | head -n 1)
if [ -z "$deb" ]; then
    echo "error: apt-get download produced no dnscrypt-proxy .deb" >&2
    exit 1
fi

dpkg-deb -x "$deb" "$work/root"
mkdir -p "$tools_dir"
install -m 0755 "$work/root/usr/sbin/dnscrypt-proxy" "$target.new"
mv "$target.new" "$target"
# Keep the .deb beside the binary: its units are what the formula replaces.
cp "$deb" "$tools_dir/"
version=$("$target" -version)
echo "dnscrypt-proxy $version installed at $target (from $(basename "$deb"))"
if [ "$version" != 2.1.8 ]; then
    echo "warning: the formula targets dnscrypt-proxy 2.1.8, trixie now has $version" >&2
fi
