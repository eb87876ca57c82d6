#!/bin/sh
# Install the packages sys-dns needs into this template and enable the units of
# qubes-sysdns-formula. Run as root inside the template by the formula, after it has
# unpacked its unit files, helpers, apt pin and /etc/sysdns/packages.
set -eu

packages=/etc/sysdns/packages

if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    # Finish an installation that an earlier run left half done (the template was
    # killed or shut down during dpkg), which apt-get refuses to work on otherwise.
    dpkg --configure -a
    apt-get update -q
    # One package name per line; xargs passes them as arguments without a shell.
    xargs -r apt-get install -y -q --no-install-recommends <"$packages"
elif command -v dnf >/dev/null 2>&1; then
    # NOTE: the dnf path has not run in the offline lab, which has no Fedora template.
    xargs -r dnf install -y <"$packages"
else
    echo "setup-template: neither apt-get nor dnf found in this template" >&2
    exit 1
fi

systemctl daemon-reload
systemctl enable dnscrypt-proxy.service sysdns-firewall.service

# Fail here, in the template, rather than at the first boot of sys-dns.
dnscrypt-proxy -version
nft --version

# The formula records the template as configured only after it has read this line,
# so a run cut short cannot pass for a finished one.
echo "sysdns: template setup complete"
