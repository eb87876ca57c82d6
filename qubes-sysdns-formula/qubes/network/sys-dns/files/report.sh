#!/bin/sh
# Print what qubes-sysdns-formula needs to know about this sys-dns, read-only, one fact
# per line: "file SHA256 NAME" for each file in /rw/config/sysdns, then the state of
# dnscrypt-proxy, of the formula's nft tables and of its accept rule in custom-input.
conf=/rw/config/sysdns

if [ -d "$conf" ]; then
    for path in "$conf"/*; do
        [ -f "$path" ] || continue
        sum=$(sha256sum <"$path")
        printf 'file %s %s\n' "${sum%% *}" "${path##*/}"
    done
fi

printf 'service %s\n' "$(systemctl is-active dnscrypt-proxy.service 2>/dev/null || true)"

if nft list table inet sysdns >/dev/null 2>&1; then
    echo "firewall loaded"
else
    echo "firewall missing"
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
