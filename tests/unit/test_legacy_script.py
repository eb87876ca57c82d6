"""
legacy-artifacts.sh against the nft rules of the original hand-written sys-dns
design, in a network namespace of its own.
"""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "qubes-sysdns-formula/qubes/network/sys-dns/files/legacy-artifacts.sh"
# Files the script removes when it finds them; the host must hold none of them.
HOST_PATHS = ("/rw", "/etc/dnscrypt-proxy", "/etc/systemd/system/dnscrypt-nft.service")

QUBES_NAT = """table ip qubes {
    chain dnat-dns {
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 10.139.1.1 udp dport 53 dnat to 10.139.1.1
        udp dport 53 dnat to 127.0.0.1
        tcp dport 53 dnat to 127.0.0.1
    }
}
"""

pytestmark = pytest.mark.skipif(
    any(Path(path).exists() for path in HOST_PATHS), reason="the host holds files the script would remove"
)


def run_in_netns(ruleset, *modes):
    script = 'nft -f - <<"EOF"\n' + ruleset + "EOF\n"
    for mode in modes:
        script += f'echo "== {mode}"; sh {SCRIPT} {mode} || echo "exit $?"\n'
    script += "echo '== ruleset'; nft list ruleset\n"
    return subprocess.run(
        ["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout


def test_remove_keeps_qubes_rules_and_fails_closed():
    output = run_in_netns(QUBES_NAT, "list", "remove", "remove")
    listed, removed, again, ruleset = output.split("== ")[1:]
    assert listed.splitlines()[1:] == [
        "present nft rule in ip qubes dnat-dns: udp dport 53 dnat to 127.0.0.1",
        "present nft rule in ip qubes dnat-dns: tcp dport 53 dnat to 127.0.0.1",
    ]
    assert removed.splitlines()[1:] == [
        "removed nft rule in ip qubes dnat-dns: udp dport 53 dnat to 127.0.0.1",
        "removed nft rule in ip qubes dnat-dns: tcp dport 53 dnat to 127.0.0.1",
    ]
    assert again.splitlines()[1:] == []
    assert "ip daddr 10.139.1.1 udp dport 53 dnat to 10.139.1.1" in ruleset
    assert "dnat to 127.0.0.1" not in ruleset
    # Forwarded DNS is dropped until the qube restarts on the formula's template.
    assert "table inet sysdns_guard" in ruleset
    assert "th dport 53 drop" in ruleset


def test_remove_without_runtime_rules_loads_no_guard():
    output = run_in_netns(
        QUBES_NAT.replace("        udp dport 53 dnat to 127.0.0.1\n", "").replace(
            "        tcp dport 53 dnat to 127.0.0.1\n", ""
        ),
        "remove",
    )
    assert "sysdns_guard" not in output
