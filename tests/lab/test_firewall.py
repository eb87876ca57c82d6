"""Fidelity tests of the lab's qvm-firewall: the dom0 tool, the QubesDB entries it
publishes in the client's netvm, and the qubes-firewall agent that enforces them.

Reproduces QubesOS/qubes-core-admin-client v4.2.18 qubesadmin/tools/qvm_firewall.py,
QubesOS/qubes-core-admin v4.2.39 qubes/firewall.py and qubes/vm/mix/net.py, and
QubesOS/qubes-core-agent-linux v4.2.47 qubesagent/firewall.py. Every test runs on the
shared lab without the formula and resets the rules of the qube it changed.
"""

import pytest

from tests.lab import qubesdb
from tests.lab.uplink import ANSWER_A, LEAK_MARKER, PLAIN_ADDRESS

pytestmark = pytest.mark.lab

CLIENT = "personal"
# EHOSTUNREACH: what a client's socket reports for the ICMP admin-prohibited
# reject of a rule with action=drop.
REJECTED = 113


def client_ip(lab):
    return str(lab.store().domain(CLIENT).get("ip"))


def qvm_firewall(lab, *args):
    result = lab.qvm("qvm-firewall", *args)
    assert result.returncode == 0, f"qvm-firewall {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


def set_rules(lab, *rules):
    """Replace the client's rules by *rules* (each a list of rule words)."""
    qvm_firewall(lab, CLIENT, "reset")
    qvm_firewall(lab, CLIENT, "del", "--rule-no", "0")
    for rule in rules:
        qvm_firewall(lab, CLIENT, "add", *rule)


def client_chain(lab):
    chain = "qbs-" + client_ip(lab).replace(".", "-")
    result = lab.exec("sys-firewall", f"nft list chain ip qubes-firewall {chain}")
    assert result.returncode == 0, result.stderr
    return result.stdout


def query(lab, server, tcp=False):
    return lab.dns_query(CLIENT, "www.lab.test", "TXT", server=server, tcp=tcp)


def assert_answered(result):
    assert result["status"] == "answer", result
    assert result["answers"] == [LEAK_MARKER]


def assert_rejected(result):
    assert result["status"] == "error", result
    assert result["errno"] == REJECTED, result


@pytest.fixture
def firewall_lab(lab):
    """The shared lab; the client's rules are reset to Qubes' default afterwards."""
    yield lab
    qvm_firewall(lab, CLIENT, "reset")


def test_default_rules_accept_everything(firewall_lab):
    """A qube without rules has the single rule accept (Firewall.load_defaults)."""
    lab = firewall_lab
    qvm_firewall(lab, CLIENT, "reset")

    assert qvm_firewall(lab, "--raw", CLIENT, "list") == "action=accept\n"
    entries = qubesdb.read_tree(lab.runtime.qubesdb_dir("sys-firewall"))
    assert entries[f"/qubes-firewall/{client_ip(lab)}/policy"] == "drop"
    assert entries[f"/qubes-firewall/{client_ip(lab)}/0000"] == "action=accept"
    assert_answered(query(lab, PLAIN_ADDRESS))
    assert_answered(query(lab, PLAIN_ADDRESS, tcp=True))


def test_accept_rule_allows_and_policy_drops_the_rest(firewall_lab):
    """Traffic no rule accepts meets the policy drop, rejected as admin-prohibited."""
    lab = firewall_lab
    set_rules(lab, ["action=accept", f"dsthost={PLAIN_ADDRESS}", "proto=udp", "dstports=53"])

    entries = qubesdb.read_tree(lab.runtime.qubesdb_dir("sys-firewall"))
    assert entries[f"/qubes-firewall/{client_ip(lab)}/0000"] == (
        f"action=accept dst4={PLAIN_ADDRESS}/32 proto=udp dstports=53-53"
    )
    assert f"ip daddr {PLAIN_ADDRESS} udp dport 53 accept" in client_chain(lab)
    assert_answered(query(lab, PLAIN_ADDRESS))
    assert_rejected(query(lab, PLAIN_ADDRESS, tcp=True))
    assert_rejected(query(lab, "10.139.1.1"))


def test_drop_rule_blocks_before_accept(firewall_lab):
    """Rules apply in order: a drop before an accept-all blocks what it matches."""
    lab = firewall_lab
    set_rules(lab, ["drop", PLAIN_ADDRESS, "udp", "53"], ["accept"])

    assert qvm_firewall(lab, "--raw", CLIENT) == (
        f"action=drop proto=udp dst4={PLAIN_ADDRESS}/32 dstports=53-53\naction=accept\n"
    )
    assert_rejected(query(lab, PLAIN_ADDRESS))
    assert_answered(query(lab, PLAIN_ADDRESS, tcp=True))
    assert_answered(query(lab, "10.139.1.1"))


def test_specialtarget_dns_allows_only_dns_servers(firewall_lab):
    """specialtarget=dns accepts port 53 to the nameservers in sys-firewall's resolv.conf."""
    lab = firewall_lab
    set_rules(lab, ["action=accept", "specialtarget=dns"])

    chain = client_chain(lab)
    assert "ip daddr { 10.139.1.1-10.139.1.2 } udp dport 53 accept" in chain
    assert "ip daddr { 10.139.1.1-10.139.1.2 } tcp dport 53 accept" in chain
    assert_answered(query(lab, "10.139.1.1"))
    assert_answered(query(lab, "10.139.1.2", tcp=True))
    assert_rejected(query(lab, PLAIN_ADDRESS))


def test_dsthost_resolved_by_the_netvm(firewall_lab):
    """A host name is resolved in sys-firewall when the rules are applied."""
    lab = firewall_lab
    set_rules(lab, ["action=accept", "dsthost=www.lab.test", "proto=tcp", "dstports=443"])

    # nft prints a set of one address as the bare address.
    assert f"ip daddr {ANSWER_A} tcp dport 443 accept" in client_chain(lab)


def test_unresolvable_dsthost_blocks_the_client(firewall_lab):
    """A rule that cannot be resolved turns the client's chain into a single reject."""
    lab = firewall_lab
    set_rules(lab, ["action=accept", "specialtarget=dns"], ["action=accept", "dsthost=nosuch.example"])

    chain = client_chain(lab)
    assert "accept" not in chain
    assert "reject with icmp admin-prohibited" in chain
    assert_rejected(query(lab, "10.139.1.1"))


def test_rules_survive_a_client_restart(firewall_lab):
    """dom0 writes a starting client's rules to its netvm (net.py on_pre_spawn)."""
    lab = firewall_lab
    set_rules(lab, ["drop", PLAIN_ADDRESS], ["accept"])
    lab.qvm("qvm-shutdown", "--wait", CLIENT, check=True)
    lab.qvm("qvm-start", CLIENT, check=True)

    assert_rejected(query(lab, PLAIN_ADDRESS))
    assert_answered(query(lab, "10.139.1.1"))


FIREWALL_CASES = [
    # (argv, exit code, exact stdout or None, stderr fragment or None)
    (["qvm-firewall", "work", "list"], 0, None, None),
    (["qvm-firewall", "--raw", "work"], 0, "action=accept\n", None),
    (["qvm-firewall", "nosuch", "list"], 2, "", "no such domain: 'nosuch'"),
    (["qvm-firewall", "work", "add", "foo=bar"], 2, "", "Invalid rule element: foo=bar"),
    (["qvm-firewall", "work", "add", "action="], 2, "", "invalid rule description: action="),
    (["qvm-firewall", "work", "add", "action=accept", "dstports=53"], 1, "", "dstports valid only for"),
    (["qvm-firewall", "work", "add", "action=reject"], 1, "", "invalid action 'reject'"),
    (["qvm-firewall", "work", "add", "accept", "Bad_Host"], 1, "", "Invalid hostname"),
    (["qvm-firewall", "work", "del", "--rule-no", "5"], 1, "", "no rule number 5"),
    (["qvm-firewall", "work", "list", "--raw"], 2, "", "unrecognized arguments: --raw"),
]


@pytest.mark.parametrize("argv,code,stdout,stderr", FIREWALL_CASES, ids=[" ".join(case[0]) for case in FIREWALL_CASES])
def test_qvm_firewall_output_and_exit_code(lab, argv, code, stdout, stderr):
    """qvm-firewall prints and exits as qubesadmin/tools/qvm_firewall.py v4.2.18 does."""
    result = lab.qvm(*argv)

    assert result.returncode == code, result.stderr
    if stdout is not None:
        assert result.stdout == stdout
    if stderr is not None:
        assert stderr in result.stderr
    assert lab.qvm("qvm-firewall", "--raw", "work").stdout == "action=accept\n"


def test_qvm_firewall_table(firewall_lab):
    """The list command prints qubesadmin's table, one numbered row per rule."""
    lab = firewall_lab
    set_rules(lab, ["accept", "specialtarget=dns"], ["accept", "192.0.2.0/24", "icmp", "8", "comment=ping"])

    lines = qvm_firewall(lab, CLIENT).splitlines()
    assert lines[0].split() == ["NO", "ACTION", "HOST", "PROTOCOL", "PORT(S)", "SPECIAL", "TARGET", "ICMP", "TYPE"] + [
        "EXPIRE",
        "COMMENT",
    ]
    assert lines[1].split() == ["0", "accept", "-", "-", "-", "dns", "-", "-", "-"]
    assert lines[2].split() == ["1", "accept", "192.0.2.0/24", "icmp", "-", "-", "8", "-", "ping"]
