#!/bin/sh
# Start serving downstream qubes. Reproduces vm-systemd/network-proxy-setup.sh of
# QubesOS/qubes-core-agent-linux v4.2.47 (Qubes 4.2), run by qubes-network.service
# when the qubes-network service is enabled and the qube provides network
# (/qubes-netvm-network set): writes /run/qubes/qubes-ns, rewrites `ip qubes dnat-dns`
# and turns on IPv4 forwarding, and IPv6 forwarding when /qubes-netvm-gateway6 is set.
#
# Left out: loading the Xen netback module.

network=$(qubesdb-read /qubes-netvm-network 2>/dev/null)
if [ -n "$network" ]; then
    gateway=$(qubesdb-read /qubes-netvm-gateway)
    gateway6=$(qubesdb-read /qubes-netvm-gateway6 2>/dev/null) || gateway6=
    primary_dns=$(qubesdb-read /qubes-netvm-primary-dns 2>/dev/null || echo "$gateway")
    secondary_dns=$(qubesdb-read /qubes-netvm-secondary-dns)
    mkdir -p /run/qubes
    echo "NS1=$primary_dns" >/run/qubes/qubes-ns
    echo "NS2=$secondary_dns" >>/run/qubes/qubes-ns
    /usr/lib/qubes/qubes-setup-dnat-to-ns
    echo 1 >/proc/sys/net/ipv4/ip_forward
    if [ -n "$gateway6" ]; then
        echo 1 >/proc/sys/net/ipv6/conf/all/forwarding
    fi
fi
