#!/bin/sh
# Install the Debian 12 packages the offline lab and the tests need. Run as root.
set -eu

packages="nftables tcpdump iproute2 debootstrap systemd-container dnsdist unbound
dnsperf knot-dnsutils dnsutils openssl dpkg-dev apt-utils gnupg ca-certificates
python3 python3-venv shellcheck rpm"

missing=""
for package in $packages; do
    if ! dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $package"
    fi
done
if [ -n "$missing" ]; then
    apt-get update -q
    # The lab starts dnsdist and unbound itself, inside its uplink namespace.
    # shellcheck disable=SC2086 # $missing is a space-separated list of package names
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
