#!/bin/sh
# Print what qubes-sysdns-formula needs to know about this sys-dns, read-only, one fact
# per line: "file SHA256 NAME" for each file in /rw/config/sysdns, then the state of
# dnscrypt-proxy, of the formula's nft tables and of its accept rules in custom-input.
# For each loaded table, a line says whether it still matches the digest recorded
# when it was loaded: "ruleset" for inet sysdns (recorded by apply-firewall) and
# "guard-ruleset" for inet sysdns_guard (recorded by sysdns-guard.service). Each is
# "as-loaded", "modified", "unrecorded", or "missing" without the table.
conf=/rw/config/sysdns
record=/run/sysdns/ruleset.sha256
guard_record=/run/sysdns/guard.sha256

# Print how a digest compares with the one recorded in a file.
compare_record() {
    if [ ! -s "$2" ]; then
        echo unrecorded
    elif [ "$1" = "$(cat "$2")" ]; then
        echo as-loaded
    else
        echo modified
    fi
}

if [ -d "$conf" ]; then
    for path in "$conf"/*; do
        [ -f "$path" ] || continue
        sum=$(sha256sum <"$path")
        printf 'file %s %s\n' "${sum%% *}" "${path##*/}"
    done
fi

printf 'service %s\n' "$(systemctl is-active dnscrypt-proxy.service 2>/dev/null || true)"

if listing=$(nft -s list table inet sysdns 2>/dev/null); then
    echo "firewall loaded"
    # The same canonical form as apply-firewall's: the listing without counter
    # values, with one final newline.
    sum=$(printf '%s\n' "$listing" | sha256sum)
    echo "ruleset $(compare_record "${sum%% *}" "$record")"
else
    echo "firewall missing"
    echo "ruleset missing"
fi

if nft list table inet sysdns_guard >/dev/null 2>&1; then
    echo "guard loaded"
    # The form sysdns-guard.service records: sha256sum's whole output line.
    echo "guard-ruleset $(compare_record "$(nft -s list table inet sysdns_guard | sha256sum)" "$guard_record")"
else
    echo "guard missing"
    echo "guard-ruleset missing"
fi

# apply-firewall inserts two accept rules (TCP and UDP) in each custom-input chain
# that exists; ip6 qubes exists only with IPv6 enabled.
accept=present
for family in ip ip6; do
    if ! listing=$(nft list chain "$family" qubes custom-input 2>/dev/null); then
        [ "$family" = ip6 ] || accept=missing
        continue
    fi
    count=$(printf '%s\n' "$listing" | grep -c 'comment "sysdns"')
    if [ "$count" -eq 0 ] && [ "$family" = ip ]; then
        accept=missing
    elif [ "$count" -ne 2 ] && [ "$accept" = present ]; then
        accept=incomplete
    fi
done
echo "input-accept $accept"
exit 0
