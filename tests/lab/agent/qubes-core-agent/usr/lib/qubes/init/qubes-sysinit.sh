#!/bin/bash
# Build /run/qubes-service at boot. Reproduces vm-systemd/qubes-sysinit.sh of
# QubesOS/qubes-core-agent-linux v4.2.47 (Qubes 4.2): the default services of the qube
# type, then every /qubes-service/NAME key ("1" enables, "0" disables), then
# /run/qubes-service-environment as the "finished" mark that qsvc waits for.
# Like Qubes, the folder is built once per boot and later QubesDB changes do not
# reach it.
#
# Left out: waiting for xenbus, the grant-table tweak and SELinux labels.
set -euf

# shellcheck source=functions
. /usr/lib/qubes/init/functions

# Default service sets per qube type, as listed in the Qubes 4.2 script.
DEFAULT_ENABLED_NETVM="network-manager qubes-network qubes-update-check qubes-updates-proxy meminfo-writer qubes-firewall software-rendering"
DEFAULT_ENABLED_PROXYVM="qubes-network qubes-firewall qubes-update-check meminfo-writer software-rendering"
DEFAULT_ENABLED_APPVM="qubes-update-check meminfo-writer tracker evolution-data-server software-rendering"
DEFAULT_ENABLED_TEMPLATEVM="$DEFAULT_ENABLED_APPVM updates-proxy-setup software-rendering"
DEFAULT_ENABLED="meminfo-writer software-rendering"

mkdir -p /run/qubes /run/qubes-service
chgrp qubes /run/qubes
chmod 0775 /run/qubes

vm_type=$(qubes_vm_type) || vm_type=
case $vm_type in
AppVM)
    DEFAULT_ENABLED=$DEFAULT_ENABLED_APPVM
    touch /run/qubes/this-is-appvm
    ;;
NetVM)
    DEFAULT_ENABLED=$DEFAULT_ENABLED_NETVM
    touch /run/qubes/this-is-netvm
    ;;
ProxyVM)
    DEFAULT_ENABLED=$DEFAULT_ENABLED_PROXYVM
    touch /run/qubes/this-is-proxyvm
    ;;
TemplateVM)
    DEFAULT_ENABLED=$DEFAULT_ENABLED_TEMPLATEVM
    touch /run/qubes/this-is-templatevm
    ;;
DispVM) ;;
*)
    echo "qubes-sysinit: invalid qube type '$vm_type' in QubesDB key /qubes-vm-type (expected AppVM, NetVM, ProxyVM, TemplateVM or DispVM)" >&2
    exit 1
    ;;
esac

persistence=$(qubesdb-read /qubes-vm-persistence) || persistence=
case $persistence in
full) touch /run/qubes/persistent-full ;;
rw-only) touch /run/qubes/persistent-rw-only ;;
none) touch /run/qubes/persistent-none ;;
*)
    echo "qubes-sysinit: invalid persistence '$persistence' in QubesDB key /qubes-vm-persistence (expected full, rw-only or none)" >&2
    exit 1
    ;;
esac

for service in $DEFAULT_ENABLED; do
    touch "/run/qubes-service/$service"
done

# qubesdb-multiread prints "NAME = VALUE" per key; names that are not plain service
# names and values other than 0/1 are skipped, as Qubes does.
while IFS= read -r line; do
    if [[ $line =~ ^([[:alnum:]_][[:alnum:]._-]*)\ =\ ([01])$ ]]; then
        if [ "${BASH_REMATCH[2]}" = 1 ]; then
            touch "/run/qubes-service/${BASH_REMATCH[1]}"
        else
            rm -f "/run/qubes-service/${BASH_REMATCH[1]}"
        fi
    fi
done < <(qubesdb-multiread /qubes-service/)

echo >/run/qubes-service-environment
