#!/bin/bash
# Print the state of this sys-dns for `qubesctl sysdns.status`, read-only, one fact
# per line. The lines of the report helper come first (files, service, tables).
# Then follow "version", "clock" (seconds since the epoch), and the named nft
# counters of the formula's tables between "begin counters TABLE" and "end counters
# TABLE". Next come dnscrypt-proxy's journal lines about its servers since it last
# started, each as "log LINE". Last, for each DNSCrypt server read on standard input
# as "NAME IP PORT PROVIDER-NAME", one "certificate NAME HEX" line, or
# "certificate NAME none REASON" when the fetch failed.
#
# The certificate of a DNSCrypt server is fetched as dnscrypt-proxy fetches it: a
# TXT query for the provider name sent over UDP to the server's own address and
# port. The query and the answer are plaintext but carry only the public
# provider name and certificate. dom0 sends no line for a resolver that
# dnscrypt-proxy reaches only through anonymizing relays, whose certificate it
# also fetches through the relay.
# Installed into the template by qubes-sysdns-formula.
set -u

helpers=/usr/lib/sysdns
fetch_timeout=${SYSDNS_CERT_TIMEOUT:-5}

# Send one DNS query over UDP to IP PORT for the TXT record of NAME and print the
# first datagram that comes back as hexadecimal bytes. dnscrypt-proxy 2.1.8 sends
# this query over UDP first (dnscrypt_certs.go), and the lab's dnsdist 1.7.3 sent
# an empty reply to it over TCP. The caller bounds the wait with timeout(1).
fetch_certificate() {
    local ip=$1 port=$2 name=$3
    local id message label
    id=$((RANDOM % 65536))
    # Header: the ID, flags 0 (no recursion desired), one question.
    message=$(printf '\\x%02x\\x%02x\\x00\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00' $((id >> 8)) $((id & 255)))
    IFS=. read -ra labels <<<"${name%.}"
    for label in "${labels[@]}"; do
        message+=$(printf '\\x%02x' "${#label}")$label
    done
    # Root label, QTYPE TXT (16), QCLASS IN.
    message+='\x00\x00\x10\x00\x01'

    exec 3<>"/dev/udp/$ip/$port" || return 1
    # shellcheck disable=SC2059 # the format string is the message, written as \x escapes
    printf "$message" >&3
    # One read(2) of a UDP socket returns one whole datagram.
    dd bs=65535 count=1 status=none <&3 | od -An -tx1 -v | tr -d ' \n'
}

if [ "${1:-}" = "--fetch-certificate" ]; then
    fetch_certificate "$2" "$3" "$4"
    exit
fi

"$helpers/report"

version=$(dnscrypt-proxy -version 2>/dev/null) || version=unknown
printf 'version %s\n' "${version:-unknown}"
printf 'clock %s\n' "$(date +%s)"

for table in sysdns sysdns_guard; do
    echo "begin counters inet $table"
    nft list counters table inet "$table" 2>/dev/null
    echo "end counters inet $table"
done

# The lines dnscrypt-proxy 2.1.8 logs at its default level about its servers
# (serversInfo.go, proxy.go, dnscrypt_certs.go), each as "[TIME] [LEVEL] MESSAGE":
# "[NAME] OK (DNSCrypt) - rtt: ...", the "Sorted latencies:" block and "Server with
# the lowest initial latency: ..." after each refresh, "live servers", and every
# warning or error.
invocation=$(systemctl show -p InvocationID --value dnscrypt-proxy.service 2>/dev/null)
if [ -n "$invocation" ]; then
    journalctl -q -o cat "_SYSTEMD_INVOCATION_ID=$invocation" 2>/dev/null |
        grep -E '\] \[(WARNING|ERROR|CRITICAL|FATAL)\] |OK \(|live servers|Sorted latencies|\] - +[0-9]+ms |lowest initial latency|[Cc]ertificate' |
        tail -n 400 | sed 's/^/log /'
fi

# One fetch per server in parallel, each bounded by the timeout, so servers that
# do not reply cost at most fetch_timeout seconds in total.
results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
count=0
while read -r name ip port provider; do
    case "$name $ip $port $provider" in
        *[!A-Za-z0-9.:_\ -]*)
            echo "status: invalid server line '$name $ip $port $provider', skipped" >&2
            continue
            ;;
    esac
    count=$((count + 1))
    (
        if hex=$(timeout "$fetch_timeout" "$0" --fetch-certificate "$ip" "$port" "$provider" 2>/dev/null) &&
            [ -n "$hex" ]; then
            printf 'certificate %s %s\n' "$name" "$hex"
        else
            printf 'certificate %s none no answer from %s port %s within %s s\n' "$name" "$ip" "$port" "$fetch_timeout"
        fi
    ) >"$results/$count" &
done
wait
for ((i = 1; i <= count; i++)); do
    cat "$results/$i"
done
exit 0
