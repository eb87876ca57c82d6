#!/bin/sh
# List or remove, in sys-dns, what the original hand-written sys-dns design left
# behind: its DNAT script in /rw/config, the unit that runs it, its nft table, its
# DNAT rules in Qubes' nat chains, and its dnscrypt-proxy files in /etc.
#
# Usage: legacy-artifacts.sh list|remove
# Prints one line per artifact: "present ID" (list) or "removed ID" (remove).
#
# qubes-sysdns-formula sends this script on the standard input of
# `qvm-run -p -u root sys-dns 'sh -s MODE'`, because a sys-dns built by hand may run
# on a template that lacks the formula's helpers. Each artifact is identified
# exactly, so nothing of Qubes or of the formula is touched:
# - the script: /rw/config/nft-dnscrypt.sh when it DNATs to 127.0.0.1;
# - the unit: dnscrypt-nft.service in /etc/systemd/system (file or enable link);
# - the nft table `ip dnscrypt` (the formula's tables are `inet sysdns*`);
# - in `ip qubes dnat-dns` and `ip qubes prerouting`, only rules whose whole text is
#   "udp|tcp dport 53 dnat to 127.0.0.1": rules that Qubes' qubes-setup-dnat-to-ns
#   writes always match a destination address first (`ip daddr 10.139.1.x`);
# - /etc/dnscrypt-proxy/dnscrypt-proxy.toml when it listens on exactly
#   127.0.0.1:53 (Debian's package ships `listen_addresses = []`, and the formula's
#   configuration lives in /rw/config/sysdns), and
#   /etc/dnscrypt-proxy/forwarding-rules.txt, which Debian's package does not ship.
set -eu

mode=${1:-}
case "$mode" in
    list | remove) ;;
    *)
        echo "legacy-artifacts: invalid mode '$mode': expected list or remove" >&2
        exit 2
        ;;
esac

script=/rw/config/nft-dnscrypt.sh
unit=dnscrypt-nft.service
unit_file=/etc/systemd/system/$unit
unit_link=/etc/systemd/system/multi-user.target.wants/$unit
toml=/etc/dnscrypt-proxy/dnscrypt-proxy.toml
forwarding=/etc/dnscrypt-proxy/forwarding-rules.txt

report() {
    if [ "$mode" = list ]; then
        printf 'present %s\n' "$1"
    else
        printf 'removed %s\n' "$1"
    fi
}

has_nft() {
    command -v nft >/dev/null 2>&1
}

# Print "HANDLE PROTOCOL" for each rule of the original design in chain ip qubes $1.
legacy_rule_handles() {
    nft -a list chain ip qubes "$1" 2>/dev/null |
        sed -n -E 's/^[[:space:]]*(udp|tcp) dport 53 dnat (ip )?to 127\.0\.0\.1 # handle ([0-9]+)$/\3 \1/p'
}

if [ -f "$script" ] && grep -q 'dnat to 127\.0\.0\.1' "$script"; then
    if [ "$mode" = remove ]; then
        rm -f -- "$script"
    fi
    report "$script"
fi

if [ -e "$unit_file" ] || [ -L "$unit_file" ] || [ -L "$unit_link" ]; then
    if [ "$mode" = remove ]; then
        # The unit is a oneshot without ExecStop: stopping it changes no rule, the
        # nft removals below do.
        systemctl disable --now "$unit" >/dev/null 2>&1 || true
        rm -f -- "$unit_file" "$unit_link"
        systemctl daemon-reload
        systemctl reset-failed "$unit" >/dev/null 2>&1 || true
    fi
    report "unit $unit"
fi

# Removing the original design's DNAT rules hands downstream DNS back to Qubes'
# dnat-dns, which forwards it in plaintext to sys-net. Until the build restarts this
# qube on the formula's template, whose guard unit replaces this table, drop
# forwarded port-53 traffic instead: clients fail closed for those seconds.
if [ "$mode" = remove ] && has_nft && {
    nft list table ip dnscrypt >/dev/null 2>&1 ||
        [ -n "$(legacy_rule_handles dnat-dns)$(legacy_rule_handles prerouting)" ]
}; then
    nft -f - <<'GUARD'
table inet sysdns_guard
delete table inet sysdns_guard
table inet sysdns_guard {
    chain forward {
        type filter hook forward priority filter - 5; policy accept;
        meta l4proto { tcp, udp } th dport 53 drop
    }
}
GUARD
fi

if has_nft && nft list table ip dnscrypt >/dev/null 2>&1; then
    if [ "$mode" = remove ]; then
        nft delete table ip dnscrypt
    fi
    report "nft table ip dnscrypt"
fi

if has_nft; then
    for chain in dnat-dns prerouting; do
        # The original script adds the same pair again at every run, so a chain may
        # hold several copies: each protocol is reported once, every copy removed.
        handles=$(legacy_rule_handles "$chain")
        [ -n "$handles" ] || continue
        for protocol in udp tcp; do
            matching=$(printf '%s\n' "$handles" | sed -n "s/^\\([0-9]*\\) $protocol\$/\\1/p")
            [ -n "$matching" ] || continue
            if [ "$mode" = remove ]; then
                for handle in $matching; do
                    nft delete rule ip qubes "$chain" handle "$handle"
                done
            fi
            report "nft rule in ip qubes $chain: $protocol dport 53 dnat to 127.0.0.1"
        done
    done
fi

if [ -f "$toml" ] && grep -q '^[[:space:]]*listen_addresses[[:space:]]*=[[:space:]]*\[[[:space:]]*"127\.0\.0\.1:53"[[:space:]]*\]' "$toml"; then
    if [ "$mode" = remove ]; then
        rm -f -- "$toml"
    fi
    report "$toml"
fi

if [ -f "$forwarding" ]; then
    if [ "$mode" = remove ]; then
        rm -f -- "$forwarding"
    fi
    report "$forwarding"
fi
exit 0
