#!/bin/bash
# Collect, read-only, what `qubesctl sysdns.diagnose` in dom0 needs from sys-dns, one
# fact per line (the dom0 side parses them and names the causes):
#   clock EPOCH                     this qube's clock
#   file SHA256 NAME                each file in /rw/config/sysdns, as report.sh prints it
#   files listed                    after the file lines, so none means an empty directory
#   forward ZONE SERVERS            each rule of the forwarding-rules file the toml names
#   address IP                      each address of this qube, loopback included
#   service ACTIVE SUB PID RESTARTS state of dnscrypt-proxy.service
#   listen PROTO ADDRESS PROCESS    each socket bound to port 53
#   table NAME present|missing      nft tables inet sysdns and inet sysdns_guard
#   redirect-chain present|missing  chain redirect_downstream of inet sysdns
#   redirect-rule present|missing   its redirect rule
#   input-accept present|missing    the formula's accept rule in ip qubes custom-input
#   uplink IFACE up|down|missing    eth0, the link to the netvm
#   route default present|missing
#   probe rcode N|none              answer of dnscrypt-proxy for a random name
#   cert SERVER HEX|none            raw DNS answer of a DNSCrypt certificate query
#   log EPOCH MESSAGE               last lines of dnscrypt-proxy's journal this boot
# Standard input holds the requests: "probe NAME" and
# "cert SERVER ADDRESS PORT QUERY_HEX" (a TXT query built in dom0).
# Installed into the template by qubes-sysdns-formula.
set -u

timeout_s=${SYSDNS_DIAGNOSE_TIMEOUT:-5}

echo "clock $(date +%s)"

# dom0 compares the digests with what the pillar renders: a hand-edited file is
# repaired by the build, not by reloading it.
for path in /rw/config/sysdns/*; do
    [ -f "$path" ] || continue
    sum=$(sha256sum <"$path")
    printf 'file %s %s\n' "${sum%% *}" "${path##*/}"
done
echo "files listed"

# A forwarding rule whose server is an address of this qube makes dnscrypt-proxy
# forward to itself: its own queries to port 53 are redirected back to it.
toml=/rw/config/sysdns/dnscrypt-proxy.toml
rules=$(sed -n 's/^[[:space:]]*forwarding_rules[[:space:]]*=[[:space:]]*["'"'"']\([^"'"'"']*\)["'"'"'].*/\1/p' "$toml" 2>/dev/null | head -n 1)
if [ -n "$rules" ] && [ -f "$rules" ]; then
    sed 's/#.*//' "$rules" | awk 'NF >= 2 { print "forward", $1, $2 }'
fi
ip -o addr show 2>/dev/null | awk '{ split($4, parts, "/"); print "address", parts[1] }'

show=$(systemctl show -p ActiveState -p SubState -p MainPID -p NRestarts dnscrypt-proxy.service 2>/dev/null)
value() { printf '%s\n' "$show" | sed -n "s/^$1=//p"; }
echo "service $(value ActiveState) $(value SubState) $(value MainPID) $(value NRestarts)"

# ss prints "PROTO STATE RECV SEND LOCAL PEER PROCESS"; keep port-53 sockets only.
ss -Hlnup 2>/dev/null | awk '$4 ~ /:53$/ { print "listen udp", $4, $6 }'
ss -Hlntp 2>/dev/null | awk '$4 ~ /:53$/ { print "listen tcp", $4, $6 }'

for table in sysdns sysdns_guard; do
    if nft list table inet "$table" >/dev/null 2>&1; then
        echo "table $table present"
    else
        echo "table $table missing"
    fi
done

if chain=$(nft list chain inet sysdns redirect_downstream 2>/dev/null); then
    echo "redirect-chain present"
    if printf '%s\n' "$chain" | grep -q 'th dport 53 .*redirect'; then
        echo "redirect-rule present"
    else
        echo "redirect-rule missing"
    fi
else
    echo "redirect-chain missing"
    echo "redirect-rule missing"
fi

if nft list chain ip qubes custom-input 2>/dev/null | grep -q 'comment "sysdns"'; then
    echo "input-accept present"
else
    echo "input-accept missing"
fi

if [ ! -e /sys/class/net/eth0 ]; then
    echo "uplink eth0 missing"
elif ip -o link show dev eth0 | grep -q 'state DOWN'; then
    echo "uplink eth0 down"
else
    echo "uplink eth0 up"
fi
if [ -n "$(ip route show default 2>/dev/null)" ]; then
    echo "route default present"
else
    echo "route default missing"
fi

# Send a TXT query to a DNSCrypt server over UDP, as dnscrypt-proxy fetches its
# certificates, and print the answer in hex. dd reads one datagram. Runs under timeout
# in its own bash, so an unreachable server costs at most that long.
# shellcheck disable=SC2016 # expanded by the inner bash, from its arguments
fetch_cert='
set -eu
exec 4<>"/dev/udp/$1/$2"
# shellcheck disable=SC2059 # the format string is the message, written as \x escapes
printf "$(printf "%s" "$3" | sed "s/../\\\\x&/g")" >&4
timeout "$4" dd bs=65536 count=1 status=none <&4 | od -An -tx1 -v | tr -d " \n"
'

while read -r kind first address port query; do
    case "$kind" in
        probe)
            if ! result=$(printf '%s\n' "$first" | /usr/lib/sysdns/probe-upstream); then
                result="rcode none"
            fi
            echo "probe $result"
            ;;
        cert)
            case "$first $address $port $query" in
                *[!A-Za-z0-9.:_\ -]*)
                    echo "diagnose: invalid cert request for '$first'" >&2
                    continue
                    ;;
            esac
            if answer=$(timeout $((timeout_s + 1)) bash -c "$fetch_cert" fetch-cert \
                "$address" "$port" "$query" "$timeout_s" </dev/null 2>/dev/null) && [ -n "$answer" ]; then
                echo "cert $first $answer"
            else
                echo "cert $first none"
            fi
            ;;
        "") ;;
        *) echo "diagnose: unknown request '$kind'" >&2 ;;
    esac
done

journalctl -u dnscrypt-proxy.service -b -n 200 -o short-unix --no-pager 2>/dev/null |
    sed -n 's/^\([0-9][0-9]*\)\.[0-9]* [^ ]* [^:]*: /log \1 /p'
exit 0
