#!/bin/bash
# Set the hostname from QubesDB /name. Reproduces vm-systemd/qubes-early-vm-config.sh
# of QubesOS/qubes-core-agent-linux v4.2.47 (Qubes 4.2): hostname, /etc/hostname and
# the 127.0.1.1 and ::1 lines of /etc/hosts, unless /etc/hostname is a protected file.
#
# Left out: the timezone (the lab boots with systemd-nspawn --timezone=off).

# shellcheck source=functions
. /usr/lib/qubes/init/functions

if ! is_protected_file /etc/hostname; then
    name=$(qubesdb-read /name 2>/dev/null) || name=
    # Qubes accepts only such names (qubes/vm/__init__.py validate_name), so they
    # are safe in the sed expression below.
    if [ -n "$name" ] && ! [[ $name =~ ^[a-zA-Z][a-zA-Z0-9_-]*$ ]]; then
        echo "qubes-early-vm-config: invalid qube name '$name' in QubesDB key /name" >&2
        exit 1
    fi
    if [ -n "$name" ]; then
        echo "$name" >/etc/hostname
        hostname "$name"
        # Debian maps the hostname to 127.0.1.1. As in Qubes, the last name on the
        # 127.0.1.1 and ::1 lines becomes the qube name.
        sed -i -e "s/^\(127\.0\.1\.1[[:space:]]\(.*[[:space:]]\)\?\)[^[:space:]]*\$/\1$name/" \
            -e "s/^\(::1[[:space:]]\(.*[[:space:]]\)\?\)[^[:space:]]*\$/\1$name/" /etc/hosts
    fi
fi
