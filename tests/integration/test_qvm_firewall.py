"""
Qubes' per-qube firewall (qvm-firewall) with the built formula, in the offline lab.

A client's rules are enforced in its netvm, sys-firewall, before its packets reach
sys-dns. sys-firewall resolves the host names in those rules with its own resolver,
which after the build is sys-dns. Each test checks that DNS still works where the
rules allow it, fails closed where they do not, and that no plaintext port-53
packet leaves sys-dns (the independent observer on sys-net's side of its link).

One lab is built for the module; each test resets the rules it changed.
"""

import pytest

from tests.integration.answers import is_encrypted_answer, resolve_encrypted, unique_name
from tests.integration.formula_lab import apply_sls, failed_states, lab_pillar
from tests.lab.lab import Lab
from tests.lab.uplink import ANSWER_A, PLAIN_ADDRESS

pytestmark = pytest.mark.lab

BUILD = "qubes.network.sys-dns"
CLIENT = "personal"
VIRTUAL_DNS = ("10.139.1.1", "10.139.1.2")
# EHOSTUNREACH: what the client's socket reports for the ICMP admin-prohibited
# reject with which qubes-firewall enforces action=drop and the policy.
REJECTED = 113


def qvm_firewall(lab, qube, *args):
    result = lab.qvm("qvm-firewall", qube, *args)
    assert result.returncode == 0, f"qvm-firewall {qube} {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


def set_rules(lab, qube, *rules):
    """Replace the rules of *qube* by *rules*, each a list of rule words."""
    qvm_firewall(lab, qube, "reset")
    qvm_firewall(lab, qube, "del", "--rule-no", "0")
    for rule in rules:
        qvm_firewall(lab, qube, "add", *rule)


def query(lab, server, tcp=False):
    return lab.dns_query(CLIENT, unique_name(), "TXT", server=server, tcp=tcp)


def assert_encrypted_answer(result):
    assert is_encrypted_answer(result), result


def assert_rejected(result):
    assert result["status"] == "error", result
    assert result.get("errno") == REJECTED, result


def client_chain(lab, qube=CLIENT, netvm="sys-firewall"):
    address = str(lab.store().domain(qube).get("ip"))
    result = lab.exec(netvm, f"nft list chain ip qubes-firewall qbs-{address.replace('.', '-')}")
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def built_lab():
    lab = Lab.up()
    try:
        lab.write_pillar("sysdns", lab_pillar(lab))
        code, states, output = apply_sls(lab, BUILD)
        assert states is not None, output
        assert failed_states(states) == {}
        assert code == 0, output
        yield lab
    finally:
        lab.down()


@pytest.fixture
def firewall_lab(built_lab):
    yield built_lab
    for qube in (CLIENT, "sys-firewall"):
        qvm_firewall(built_lab, qube, "reset")


def test_dns_only_client_resolves_through_sys_dns(firewall_lab):
    """A client allowed nothing but DNS (specialtarget=dns) gets encrypted answers."""
    lab = firewall_lab
    set_rules(lab, CLIENT, ["action=accept", "specialtarget=dns"])
    assert qvm_firewall(lab, CLIENT, "--raw") == "action=accept specialtarget=dns\n"

    with lab.observe("sys-dns") as uplink:
        for server in VIRTUAL_DNS:
            for tcp in (False, True):
                resolve_encrypted(lab, CLIENT, server, tcp)
        # DNS to any other address is not the special target: sys-firewall rejects it
        # before sys-dns could redirect it.
        other = query(lab, PLAIN_ADDRESS)
        web = lab.dns_query(CLIENT, "www.lab.test", "TXT", server=PLAIN_ADDRESS, port=443, tcp=True)
    seen = uplink.stop()

    assert_rejected(other)
    assert_rejected(web)
    assert seen.dns_queries == [], seen.summary()


def test_hostname_rule_resolved_through_sys_dns(firewall_lab):
    """sys-firewall resolves a dsthost= rule through sys-dns, never in plaintext upstream."""
    lab = firewall_lab
    name = unique_name()
    firewall_ip = str(lab.store().domain("sys-firewall").get("ip"))

    with lab.observe("sys-firewall") as firewall_link, lab.observe("sys-dns") as uplink:
        set_rules(lab, CLIENT, ["action=accept", "specialtarget=dns"], ["action=accept", f"dsthost={name}"])
    lookups = firewall_link.stop()
    seen = uplink.stop()

    # nft prints a set of one address as the bare address.
    assert f"ip daddr {ANSWER_A} accept" in client_chain(lab)
    assert (firewall_ip, name + ".") in {(packet.source, packet.query_name) for packet in lookups.dns_queries}
    assert seen.dns_queries == [], seen.summary()


def test_client_rules_dropping_dns_fail_closed(firewall_lab):
    """A client whose rules drop port 53 gets no answer, and nothing reaches sys-dns."""
    lab = firewall_lab
    set_rules(lab, CLIENT, ["drop", "proto=udp", "dstports=53"], ["drop", "proto=tcp", "dstports=53"], ["accept"])

    with lab.observe("sys-firewall") as firewall_link, lab.observe("sys-dns") as uplink:
        results = [query(lab, server, tcp) for server in (*VIRTUAL_DNS, PLAIN_ADDRESS) for tcp in (False, True)]
    forwarded = firewall_link.stop()
    seen = uplink.stop()

    for result in results:
        assert_rejected(result)
    # sys-firewall masquerades, so the client's queries would show as sys-firewall's:
    # only their unique names tell them from other qubes' lookups.
    assert [packet for packet in forwarded.dns_queries if (packet.query_name or "").startswith("fw")] == [], (
        forwarded.summary()
    )
    assert seen.dns_queries == [], seen.summary()


def test_dropping_the_dns_target_leaves_other_port_53(firewall_lab):
    """specialtarget=dns matches only the virtual DNS servers: sys-dns answers the rest.

    A drop of the special target rejects queries to 10.139.1.1 and .2, but a later
    accept lets port 53 to any other address through sys-firewall; sys-dns then
    redirects it into dnscrypt-proxy, so it is answered encrypted, not in plaintext.
    """
    lab = firewall_lab
    set_rules(lab, CLIENT, ["action=drop", "specialtarget=dns"], ["accept"])

    with lab.observe("sys-dns") as uplink:
        virtual = [query(lab, server) for server in VIRTUAL_DNS]
        other = query(lab, PLAIN_ADDRESS)
    seen = uplink.stop()

    for result in virtual:
        assert_rejected(result)
    assert_encrypted_answer(other)
    assert seen.dns_queries == [], seen.summary()


def test_sys_firewall_rules_do_not_filter_redirected_dns(firewall_lab):
    """sys-firewall's own rules, enforced in sys-dns's forward hook, never see its DNS.

    sys-dns redirects downstream port 53 in nat prerouting, so the query is delivered
    to dnscrypt-proxy on the input path and never passes the forward hook where
    qubes-firewall applies sys-firewall's rules. Everything else sys-firewall forwards
    is rejected by the same rules.
    """
    lab = firewall_lab
    set_rules(lab, "sys-firewall", ["drop"])

    assert "reject with icmp admin-prohibited" in client_chain(lab, "sys-firewall", "sys-dns")
    assert_encrypted_answer(query(lab, VIRTUAL_DNS[0]))
    assert_rejected(lab.dns_query(CLIENT, "www.lab.test", "TXT", server=PLAIN_ADDRESS, port=443, tcp=True))
