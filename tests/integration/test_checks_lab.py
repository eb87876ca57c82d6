"""
Each check of the tests SLS fails when its claim is false and passes on a correct
build: proven in one built lab by breaking one thing at a time and putting it back.
"""

import pytest

from tests.integration.formula_lab import apply_sls, built_lab

pytestmark = pytest.mark.lab

TESTS = "qubes.tests.sys-dns"
CHAIN = "qubes.tests.sys-dns - chain through sys-dns"
RESOLVE = "qubes.tests.sys-dns - clients resolve"
PLAINTEXT = "qubes.tests.sys-dns - no plaintext DNS leaves sys-dns"
UPSTREAM = "qubes.tests.sys-dns - encrypted upstream sessions"
SUMMARY = "qubes.tests.sys-dns - summary"
CHECKS = (CHAIN, RESOLVE, PLAINTEXT, UPSTREAM)

# A fault in sys-dns that lets plaintext queries out: the redirect is emptied, so
# downstream queries follow Qubes' dnat-dns to sys-net, the fail-closed guard's
# forward chain is emptied, and an accept ahead of the uplink guard's drop lets them
# leave. Reloading both tables undoes it.
LEAK_RULES = (
    "nft flush chain inet sysdns redirect_downstream && "
    "nft flush chain inet sysdns_guard forward && "
    "nft insert rule inet sysdns guard_uplink meta l4proto udp th dport 53 accept"
)
RESTORE_TABLE = "systemctl restart sysdns-guard.service && /usr/lib/sysdns/apply-firewall"

# A fault in sys-net: it drops every packet forwarded to the lab's resolvers on their
# encrypted ports, as an unreachable upstream would.
UPSTREAM_BLOCK = (
    "nft add table ip labfault && "
    "nft add chain ip labfault forward '{ type filter hook forward priority -50; }' && "
    "nft add rule ip labfault forward ip daddr 192.0.2.0/24 meta l4proto { tcp, udp } th dport { 443, 4443 } drop"
)
UPSTREAM_UNBLOCK = "nft delete table ip labfault"


@pytest.fixture(scope="module", name="built_lab")
def built_lab_fixture():
    with built_lab() as lab:
        yield lab


def run_checks(lab):
    code, states, output = apply_sls(lab, TESTS)
    assert states is not None, output
    return code, {state_id: ret["result"] for state_id, ret in states.items()}, states


def test_all_checks_pass_on_correct_build(built_lab):
    code, results, states = run_checks(built_lab)
    assert code == 0, states
    for check in CHECKS + (SUMMARY,):
        assert results[check] is True, states[check]["comment"]


def test_chain_check_fails_when_firewall_bypasses(built_lab):
    lab = built_lab
    lab.qvm("qvm-prefs", "sys-firewall", "netvm", "sys-net", check=True)
    try:
        code, results, states = run_checks(lab)
    finally:
        lab.qvm("qvm-prefs", "sys-firewall", "netvm", "sys-dns", check=True)
    assert code != 0
    assert results[CHAIN] is False
    assert "sys-firewall: netvm is sys-net, expected sys-dns" in states[CHAIN]["comment"]
    assert results[SUMMARY] is False


def test_resolve_check_fails_without_dnscrypt_proxy(built_lab):
    lab = built_lab
    lab.exec("sys-dns", "systemctl stop dnscrypt-proxy.service", check=True)
    try:
        code, results, states = run_checks(lab)
    finally:
        lab.exec("sys-dns", "systemctl start dnscrypt-proxy.service", check=True)
    assert code != 0
    assert results[RESOLVE] is False
    assert "personal: resolving www.lab.test failed" in states[RESOLVE]["comment"]
    # Clients failed closed: nothing left sys-dns in plaintext meanwhile.
    assert results[PLAINTEXT] is True, states[PLAINTEXT]["comment"]


def test_plaintext_check_fails_on_leak(built_lab):
    lab = built_lab
    lab.exec("sys-dns", LEAK_RULES, check=True)
    try:
        with lab.observe("sys-dns") as observer:
            code, results, states = run_checks(lab)
            observation = observer.stop()
    finally:
        lab.exec("sys-dns", RESTORE_TABLE, check=True)
    assert code != 0
    assert results[PLAINTEXT] is False
    assert "plaintext port-53 packets left through the uplink" in states[PLAINTEXT]["comment"]
    # The independent observer agrees that plaintext left.
    assert observation.dns_queries, observation.summary()


def test_resolve_check_fails_for_bypassing_client(built_lab):
    lab = built_lab
    lab.qvm("qvm-prefs", "personal", "netvm", "sys-net", check=True)
    try:
        code, results, states = run_checks(lab)
    finally:
        lab.qvm("qvm-prefs", "personal", "netvm", "sys-firewall", check=True)
    assert code != 0
    assert results[RESOLVE] is False
    comment = states[RESOLVE]["comment"]
    assert "personal: its DNS queries bypass sys-dns (netvm chain personal -> sys-net)" in comment
    assert "remove it from sysdns:tests:clients" in comment
    assert results[SUMMARY] is False


def test_upstream_check_fails_when_unreachable(built_lab):
    lab = built_lab
    lab.exec("sys-net", UPSTREAM_BLOCK, check=True)
    try:
        code, results, states = run_checks(lab)
    finally:
        lab.exec("sys-net", UPSTREAM_UNBLOCK, check=True)
    assert code != 0
    assert results[UPSTREAM] is False
    assert "dnscrypt-proxy got no upstream answer for the random name" in states[UPSTREAM]["comment"]


def test_checks_pass_again_after_faults(built_lab):
    code, results, states = run_checks(built_lab)
    assert code == 0, states
    assert all(results[check] is True for check in CHECKS), states
