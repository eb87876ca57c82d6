#!/bin/sh
# Stop forwarding. Reproduces vm-systemd/network-proxy-stop.sh of
# QubesOS/qubes-core-agent-linux v4.2.47 (Qubes 4.2).

echo 0 >/proc/sys/net/ipv4/ip_forward
if [ -w /proc/sys/net/ipv6/conf/all/forwarding ]; then
    echo 0 >/proc/sys/net/ipv6/conf/all/forwarding
fi
