#!/bin/sh
# Configure the uplink during boot. Reproduces vm-systemd/network-uplink-wait.sh of
# QubesOS/qubes-core-agent-linux v4.2.47 (Qubes 4.2): when the qube has a netvm and
# its interface exists, start qubes-network-uplink@IFACE.service and wait for it.
# In the lab the interface exists at boot only when the runtime moved the veth end
# into the namespace before starting the container. Otherwise the runtime runs
# `/usr/lib/qubes-lab/event uplink-changed` later, as udev would in Qubes.

# shellcheck source=/dev/null
. /usr/lib/qubes/init/functions

iface=$(get_qubes_managed_iface)
if [ -n "$iface" ]; then
    systemctl start "qubes-network-uplink@$iface.service"
fi
