"""
The rollback in the lab. From a fresh estate, a build and a rollback that removes
the formula's qubes leave every qube's properties and features as they were,
including whether a netvm follows the global default_netvm. A
second rollback changes nothing, a test run of the rollback on a built estate
changes nothing and predicts the real run, and a new build afterwards passes the
tests SLS. A qube whose recorded netvm no longer exists keeps sys-dns, and sys-dns
with it, until its netvm is set by hand.
"""

import pytest

from tests.integration.formula_lab import apply_sls, changes_by_state, failed_states, lab_pillar
from tests.integration.test_build import dom0_calls, mutating

pytestmark = pytest.mark.lab

BUILD = "qubes.network.sys-dns"
ROLLBACK = "qubes.network.sys-dns.rollback"
TESTS = "qubes.tests.sys-dns"
FORMULA_QUBES = ("sys-dns", "sys-dns-dvm", "tpl-sys-dns")
RESTORED = "qubes.network.sys-dns.rollback - previous netvm of qubes routed through sys-dns"
REMOVALS = (
    "qubes.network.sys-dns.rollback - qube sys-dns absent",
    "qubes.network.sys-dns.rollback - template tpl-sys-dns absent",
)
# Properties that change whenever a qube starts (qvm-prefs output).
VOLATILE_PREFS = {"xid", "start_time", "stubdom_xid"}


def estate(lab):
    """
    Return every qube's class and power state, its properties as ``qvm-prefs QUBE``
    lists them (value and whether it is the default) without VOLATILE_PREFS, its
    features, and the global properties.
    """
    listing = lab.qvm("qvm-ls", "--raw-data", "--fields", "name,class,state", check=True).stdout
    snapshot = {"qubes": sorted(listing.splitlines())}
    for line in listing.splitlines():
        name = line.split("|")[0]
        prefs = lab.qvm("qvm-prefs", name, check=True).stdout.splitlines()
        snapshot["prefs:" + name] = [" ".join(row.split()) for row in prefs if row.split()[0] not in VOLATILE_PREFS]
        snapshot["features:" + name] = lab.qvm("qvm-features", name, check=True).stdout
    snapshot["global"] = lab.qvm("qubes-prefs", check=True).stdout
    return snapshot


def apply_ok(lab, sls, *extra):
    code, states, output = apply_sls(lab, sls, *extra)
    assert states is not None, output
    assert failed_states(states) == {}
    assert code == 0, output
    return states


@pytest.mark.parametrize("klass, removed", [("AppVM", 3), ("DispVM", 4)])
def test_rollback_restores_estate(fresh_lab, klass, removed):
    lab = fresh_lab()
    # sys-firewall has its netvm set explicitly; personal follows default_netvm.
    pillar = lab_pillar(
        lab, qube={"class": klass}, rollback={"remove_qubes": True}, rewire=["sys-firewall", "personal"]
    )
    lab.write_pillar("sysdns", pillar)
    before = estate(lab)
    assert not any(name.startswith(FORMULA_QUBES) for name in before["qubes"])
    assert "netvm - sys-net" in before["prefs:sys-firewall"]
    assert "netvm D sys-firewall" in before["prefs:personal"]

    apply_ok(lab, BUILD)
    built = estate(lab)
    assert built != before
    assert lab.qvm("qvm-features", "sys-firewall", "sysdns.previous-netvm").stdout.strip() == "sys-net"
    assert lab.qvm("qvm-features", "personal", "sysdns.previous-netvm").stdout.strip() == "default"
    assert "netvm - sys-dns" in built["prefs:personal"]

    # A test run changes nothing and predicts the real run state by state.
    calls_before = len(lab.calls())
    predicted = apply_ok(lab, ROLLBACK, "test=True")
    assert mutating(dom0_calls(lab, calls_before)) == []
    assert estate(lab) == built
    assert all(ret["result"] is None for ret in predicted.values() if ret["changes"])
    # The netvm restore, then sys-dns, its disposable template (DispVM) and the template.
    assert len(changes_by_state(predicted)) == removed, predicted

    applied = apply_ok(lab, ROLLBACK)
    assert changes_by_state(applied) == changes_by_state(predicted)
    reset = [argv for argv in dom0_calls(lab, calls_before) if argv[0] == "qvm-prefs" and "--default" in argv]
    assert reset == [["qvm-prefs", "--default", "personal", "netvm"]]
    after = estate(lab)
    assert after["prefs:personal"] == before["prefs:personal"]
    assert after == before

    # A second rollback finds nothing to do and changes nothing.
    calls_before = len(lab.calls())
    again = apply_ok(lab, ROLLBACK)
    assert changes_by_state(again) == {}
    assert mutating(dom0_calls(lab, calls_before)) == []
    assert estate(lab) == before

    # The estate is fit for a new build, which the tests SLS accepts.
    apply_ok(lab, BUILD)
    assert lab.qvm("qvm-prefs", "sys-firewall", "netvm").stdout.strip() == "sys-dns"
    tests = apply_ok(lab, TESTS)
    assert all(ret["result"] is True for ret in tests.values()), tests


def test_rollback_keeps_qubes_until_removable(fresh_lab):
    lab = fresh_lab()
    lab.write_pillar("sysdns", lab_pillar(lab))
    apply_ok(lab, BUILD)

    applied = apply_ok(lab, ROLLBACK)

    assert list(changes_by_state(applied)) == [RESTORED]
    assert lab.qvm("qvm-prefs", "sys-firewall", "netvm").stdout.strip() == "sys-net"
    assert lab.qvm("qvm-features", "sys-firewall", "sysdns.previous-netvm").returncode == 1
    assert lab.qvm("qvm-check", "sys-dns").returncode == 0
    assert lab.qvm("qvm-check", "tpl-sys-dns").returncode == 0

    # The same lab, built again with personal rewired, then personal's recorded netvm
    # names a qube that no longer exists.
    lab.write_pillar("sysdns", lab_pillar(lab, rollback={"remove_qubes": True}, rewire=["sys-firewall", "personal"]))
    apply_ok(lab, BUILD)
    lab.qvm("qvm-features", "personal", "sysdns.previous-netvm", "sys-gone", check=True)
    built = estate(lab)

    calls_before = len(lab.calls())
    _, predicted, output = apply_sls(lab, ROLLBACK, "test=True")
    assert predicted is not None, output
    assert mutating(dom0_calls(lab, calls_before)) == []
    assert estate(lab) == built

    code, applied, output = apply_sls(lab, ROLLBACK)
    assert applied is not None, output
    assert code != 0
    failed = failed_states(applied)
    assert set(failed) == set(REMOVALS) | {RESTORED}, failed
    assert "qube personal still uses sys-dns because its previous netvm sys-gone" in failed[RESTORED]
    assert "qvm-prefs personal netvm QUBE" in failed[RESTORED]
    for state_id in REMOVALS:
        assert "requisite failed" in failed[state_id], failed[state_id]
    assert changes_by_state(applied) == changes_by_state(predicted)
    assert set(failed_states(predicted)) == set(failed)
    assert list(changes_by_state(applied)[RESTORED]) == ["sys-firewall"]
    assert lab.qvm("qvm-prefs", "sys-firewall", "netvm").stdout.strip() == "sys-net"
    assert lab.qvm("qvm-prefs", "personal", "netvm").stdout.strip() == "sys-dns"
    assert lab.qvm("qvm-features", "personal", "sysdns.previous-netvm").stdout.strip() == "sys-gone"
    assert lab.qvm("qvm-check", "sys-dns").returncode == 0
    assert lab.qvm("qvm-check", "tpl-sys-dns").returncode == 0

    # The fix the failure names: a netvm set by hand, then the rollback again.
    lab.qvm("qvm-prefs", "personal", "netvm", "sys-firewall", check=True)
    applied = apply_ok(lab, ROLLBACK)
    assert set(changes_by_state(applied)) == set(REMOVALS) | {RESTORED}
    assert changes_by_state(applied)[RESTORED] == {
        "personal": {"features": {"sysdns.previous-netvm": {"old": "sys-gone", "new": None}}}
    }
    assert lab.qvm("qvm-prefs", "personal", "netvm").stdout.strip() == "sys-firewall"
    assert lab.qvm("qvm-check", "sys-dns").returncode != 0
    assert lab.qvm("qvm-check", "tpl-sys-dns").returncode != 0
