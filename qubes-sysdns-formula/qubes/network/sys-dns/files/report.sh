#!/bin/sh
# Print what qubes-sysdns-formula needs to know about this sys-dns, read-only, one fact
# per line: "file SHA256 NAME" for each file in /rw/config/sysdns, then the state of
# dnscrypt-proxy, of the formula's nft tables and of its accept rule in custom-input,
# and whether the loaded table inet sysdns still matches the digest that
# apply-firewall recorded when it loaded the table ("ruleset as-loaded", "modified",
# "unrecorded", or "missing" without the table).
conf=/rw/config/sysdns
record=/run/sysdns/ruleset.sha256

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
    if [ ! -s "$record" ]; then
        echo "ruleset unrecorded"
    elif [ "${sum%% *}" = "$(cat "$record")" ]; then
        echo "ruleset as-loaded"
    else
        echo "ruleset modified"
    fi
else
    echo "firewall missing"
    echo "ruleset missing"
fi

if nft list table inet sysdns_guard >/dev/null 2>&1; then
    echo "guard loaded"
else
    echo "guard missing"
fi

if nft list chain ip qubes custom-input 2>/dev/null | grep -q 'comment "sysdns"'; then
    echo "input-accept present"
else
    echo "input-accept missing"
fi
exit 0
