#!/bin/sh
# Replace the configuration of sys-dns in /rw/config/sysdns by the files of a
# base64-encoded tar archive read on standard input, then reload the firewall and
# restart dnscrypt-proxy. The new files replace the old ones only after
# `dnscrypt-proxy -check` and `nft -c` have accepted them, so a rejected configuration
# leaves the running one in place. With SYSDNS_STORE_ONLY set (in a disposable
# template) the files are only stored. Installed into the template by qubes-sysdns-formula.
set -eu

conf=/rw/config/sysdns
ready_timeout=${SYSDNS_READY_TIMEOUT:-30}

mkdir -p /rw/config
stage=$(mktemp -d /rw/config/.sysdns-new.XXXXXX)
trap 'rm -rf "$stage"' EXIT

base64 -d | tar -x -f - -C "$stage" --no-same-owner

if ! dnscrypt-proxy -check -config "$stage/dnscrypt-proxy.toml" >"$stage/.check.log" 2>&1; then
    echo "install-config: dnscrypt-proxy rejected the new configuration; the old one stays:" >&2
    cat "$stage/.check.log" >&2
    exit 3
fi
rm -f "$stage/.check.log"
if ! nft -c -f "$stage/sysdns.nft"; then
    echo "install-config: nft rejected the new ruleset; the old one stays" >&2
    exit 3
fi

mkdir -p "$conf"
manifest=$(mktemp)
trap 'rm -rf "$stage" "$manifest"' EXIT
(cd "$stage" && ls -A) >"$manifest"
while read -r name; do
    mv -f "$stage/$name" "$conf/$name"
done <"$manifest"
# Remove the files that the new configuration no longer uses (rule files turned off).
for old in "$conf"/* "$conf"/.[!.]*; do
    [ -e "$old" ] || continue
    grep -qxF -- "${old##*/}" "$manifest" || rm -f -- "$old"
done

if [ -n "${SYSDNS_STORE_ONLY:-}" ]; then
    # A disposable template only stores the configuration for its named disposable.
    exit 0
fi

# The guard is fixed in the template; loading it again restores it if it was removed.
systemctl restart sysdns-guard.service
/usr/lib/sysdns/apply-firewall

systemctl restart dnscrypt-proxy.service
invocation=$(systemctl show -p InvocationID --value dnscrypt-proxy.service)

# dnscrypt-proxy runs as Type=simple: it listens at once but answers only after it has
# reached an upstream server, which it logs as "dnscrypt-proxy is ready"
# (dnscrypt-proxy/proxy.go, 2.1.8).
waited=0
while [ "$waited" -lt "$((ready_timeout * 10))" ]; do
    if journalctl -q -o cat "_SYSTEMD_INVOCATION_ID=$invocation" 2>/dev/null |
        grep -q "dnscrypt-proxy is ready"; then
        exit 0
    fi
    if ! systemctl -q is-active dnscrypt-proxy.service; then
        break
    fi
    sleep 0.1
    waited=$((waited + 1))
done
echo "install-config: dnscrypt-proxy did not report ready within ${ready_timeout} s; its log:" >&2
journalctl -q -o cat -n 20 "_SYSTEMD_INVOCATION_ID=$invocation" >&2 || true
exit 4
