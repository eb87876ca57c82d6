#!/bin/sh
# Run the user's start-up scripts. Reproduces vm-systemd/misc-post.sh of
# QubesOS/qubes-core-agent-linux v4.2.47 (Qubes 4.2): the executable files
# /rw/config/rc.local.d/*.rc in glob order, then /rw/config/rc.local when executable.
# A failing script does not stop the others; as in Qubes, the unit fails when the
# last script run fails.
#
# Left out: update-proxy-configs and ldconfig for /usr/local.

status=0
for rc in /rw/config/rc.local.d/*.rc /rw/config/rc.local; do
    [ -f "$rc" ] || continue
    [ -x "$rc" ] || continue
    "$rc"
    status=$?
    if [ "$status" != 0 ]; then
        echo "misc-post: $rc exited with status $status" >&2
    fi
done
exit "$status"
