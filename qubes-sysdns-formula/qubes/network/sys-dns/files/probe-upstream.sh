#!/bin/bash
# Ask dnscrypt-proxy in this qube, over TCP on 127.0.0.1 port 53, for the A record of
# each name read on standard input (one per line, at most 5), and print "rcode N" per
# name with the response code of the answer (0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN), or
# "rcode none" when no answer came. It stops at the first NOERROR or NXDOMAIN.
# The tests SLS sends random names that no cache holds, so NOERROR or NXDOMAIN proves
# that dnscrypt-proxy got an answer from an upstream server; dnscrypt-proxy answers
# SERVFAIL, or closes the connection, when the upstream exchange failed. A later name
# gives one failed exchange (a lost packet, a dropped TCP session) another chance.
# Bash's /dev/tcp and od build and read the DNS message, since a minimal template has
# no DNS client.
# Installed into the template by qubes-sysdns-formula.
set -eu

timeout_s=${SYSDNS_PROBE_TIMEOUT:-15}

# Query one name; print its "rcode" line and set $rcode (empty when no answer came).
probe() {
    local name=$1 id message length label header
    local -a labels
    rcode=
    case "$name" in
        "" | *[!a-z0-9._-]* | .* | *..*)
            echo "probe-upstream: invalid name '$name': expected lowercase letters, digits, '-', '_' and '.'" >&2
            return 2
            ;;
    esac

    # Header: a random ID, flags 0x0100 (recursion desired), one question.
    id=$((RANDOM % 65536))
    message=$(printf '\\x%02x\\x%02x\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00' $((id >> 8)) $((id & 255)))
    length=12
    IFS=. read -ra labels <<<"${name%.}"
    for label in "${labels[@]}"; do
        message+=$(printf '\\x%02x' "${#label}")$label
        length=$((length + 1 + ${#label}))
    done
    # Root label, QTYPE A, QCLASS IN.
    message+='\x00\x00\x01\x00\x01'
    length=$((length + 5))

    # A refused connection means that nothing listens on port 53: no answer.
    if ! exec 3<>/dev/tcp/127.0.0.1/53; then
        echo "rcode none"
        return 0
    fi
    # DNS over TCP prefixes the message with its length (RFC 1035, 4.2.2).
    # shellcheck disable=SC2059 # the format string is the message, written as \x escapes
    printf "$(printf '\\x%02x\\x%02x' $((length >> 8)) $((length & 255)))${message}" >&3 || true

    # Bytes 0-1: length prefix, 2-3: ID, 4-5: flags; RCODE is the low 4 bits of byte 5.
    header=$(timeout "$timeout_s" head -c 6 <&3 | od -An -tu1) || true
    exec 3>&-
    # shellcheck disable=SC2086 # split the od output into one positional parameter per byte
    set -- $header
    if [ "$#" -lt 6 ]; then
        echo "rcode none"
        return 0
    fi
    rcode=$(($6 & 15))
    echo "rcode $rcode"
}

count=0
while read -r name && [ "$count" -lt 5 ]; do
    count=$((count + 1))
    probe "$name" || exit
    case "$rcode" in
        0 | 3) exit 0 ;;
    esac
done
if [ "$count" -eq 0 ]; then
    echo "probe-upstream: no name on standard input: expected one name per line" >&2
    exit 2
fi
