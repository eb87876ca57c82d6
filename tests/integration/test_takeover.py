"""
The takeover of a sys-dns built by the original hand-written design, in the lab.

One lab first records the estate of a fresh build, rolls it back, then applies the
original design (tests/integration/original_design.py) and runs the build over it.
The build must remove and report each artifact the original left, predict them under
test=True without changing anything, and leave the estate of the fresh build: the
same properties and features of every qube (but the record of the takeover), the
same files in sys-dns and the same nft tables, a passing tests SLS, no plaintext DNS
leaving sys-dns, and a second run without changes. The rollback then keeps the
adopted sys-dns, and the template clone while sys-dns still uses it.
"""

import threading
import time

import pytest

from tests.integration import original_design
from tests.integration.answers import is_encrypted_answer, is_fail_closed, query_txt
from tests.integration.formula_lab import apply_sls, changes_by_state, failed_states, lab_pillar
from tests.integration.test_build import dom0_calls, mutating, resolves_encrypted
from tests.integration.test_rollback import apply_ok, estate
from tests.integration.test_scenarios import force_shutdown
from tests.lab.layout import REPO_DIR

pytestmark = pytest.mark.lab

BUILD = "qubes.network.sys-dns"
ROLLBACK = "qubes.network.sys-dns.rollback"
TESTS = "qubes.tests.sys-dns"
LEGACY_STATE = "qubes.network.sys-dns - sys-dns free of the original design's artifacts"
LEGACY_AFTER_START = "qubes.network.sys-dns - sys-dns free of the original design's artifacts once running"
ROLLBACK_RESTORED = "qubes.network.sys-dns.rollback - previous netvm of qubes routed through sys-dns"
ROLLBACK_QUBE = "qubes.network.sys-dns.rollback - qube sys-dns absent"
ROLLBACK_TEMPLATE = "qubes.network.sys-dns.rollback - template tpl-sys-dns absent"

EXPECTED_ARTIFACTS = {
    "/rw/config/nft-dnscrypt.sh",
    "unit dnscrypt-nft.service",
    "nft rule in ip qubes dnat-dns: udp dport 53 dnat to 127.0.0.1",
    "nft rule in ip qubes dnat-dns: tcp dport 53 dnat to 127.0.0.1",
    "/etc/dnscrypt-proxy/dnscrypt-proxy.toml",
    "/etc/dnscrypt-proxy/forwarding-rules.txt",
}

# Properties Qubes assigns when it creates a qube (qvm-prefs output), and the
# addresses derived from them: a sys-dns created by hand before the formula's
# template gets other values than one created after it, as any two creations do.
IDENTITY_PREFS = {"qid", "uuid", "ip", "mac", "visible_ip", "gateway", "visible_gateway"}

# Read-only commands that a test run may send to a qube through qvm-run.
READ_ONLY_COMMANDS = {"sh -s list", "/usr/lib/sysdns/report"}

# Files of sys-dns that the comparison covers: its whole /rw, the formula's helpers
# and units, the apt sources and dnscrypt-proxy's folder, as "PATH sha256" or
# "PATH -> TARGET" for a symbolic link.
FILES_COMMAND = r"""
find /rw /usr/lib/sysdns /etc/sysdns /etc/systemd/system /etc/dnscrypt-proxy \
    /etc/apt/sources.list.d /etc/apt/preferences.d /etc/resolv.conf \
    \( -type f -o -type l \) 2>/dev/null | LC_ALL=C sort | while read -r path; do
    if [ -L "$path" ]; then
        printf '%s -> %s\n' "$path" "$(readlink "$path")"
    else
        printf '%s %s\n' "$path" "$(sha256sum < "$path" | cut -d' ' -f1)"
    fi
done
"""

# nft tables and the Qubes chain dnat-dns, without handles and counters.
NFT_COMMAND = "nft list tables; nft list chain ip qubes dnat-dns"


def without_identity(snapshot):
    normalized = {}
    for key, value in snapshot.items():
        if key.startswith("prefs:"):
            value = [row for row in value if row.split()[0] not in IDENTITY_PREFS]
        normalized[key] = value
    return normalized


def sys_dns_files(lab):
    result = lab.exec("sys-dns", FILES_COMMAND)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def sys_dns_nft(lab):
    result = lab.exec("sys-dns", NFT_COMMAND)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def qvm_run_commands(calls):
    return [argv[-1] for argv in calls if argv[0] == "qvm-run"]


def test_takeover_of_original_design(fresh_lab):
    lab = fresh_lab()
    lab.write_pillar("sysdns", lab_pillar(lab, rollback={"remove_qubes": True}))

    # The estate and sys-dns of a fresh build, then the estate before any build.
    pristine = estate(lab)
    apply_ok(lab, BUILD)
    fresh = estate(lab)
    fresh_files = sys_dns_files(lab)
    fresh_nft = sys_dns_nft(lab)
    apply_ok(lab, ROLLBACK)
    assert estate(lab) == pristine

    # The original design, in place: its script, its running unit and its rules.
    original_design.install(lab)
    assert lab.exec("sys-dns", "test -x /rw/config/nft-dnscrypt.sh").returncode == 0
    assert lab.exec("sys-dns", "systemctl is-active dnscrypt-nft.service").stdout.strip() == "active"
    dnat_dns = lab.exec("sys-dns", "nft list chain ip qubes dnat-dns").stdout
    assert "\t\tudp dport 53 dnat to 127.0.0.1\n" in dnat_dns
    assert "\t\ttcp dport 53 dnat to 127.0.0.1\n" in dnat_dns
    assert lab.qvm("qvm-prefs", "sys-dns", "template").stdout.strip() == "debian-12-hard-min"
    assert lab.qvm("qvm-prefs", "sys-firewall", "netvm").stdout.strip() == "sys-dns"
    original = estate(lab)

    # A test run changes nothing, reads sys-dns only, and predicts the removals.
    calls_before = len(lab.calls())
    predicted = apply_ok(lab, BUILD, "test=True")
    calls = dom0_calls(lab, calls_before)
    assert mutating([argv for argv in calls if argv[0] != "qvm-run"]) == []
    assert set(qvm_run_commands(calls)) <= READ_ONLY_COMMANDS
    assert estate(lab) == original
    assert lab.exec("sys-dns", "test -x /rw/config/nft-dnscrypt.sh").returncode == 0
    assert set(predicted[LEGACY_STATE]["changes"]) == EXPECTED_ARTIFACTS
    assert predicted[LEGACY_STATE]["result"] is None

    # The build removes and reports each artifact, as predicted.
    applied = apply_ok(lab, BUILD)
    legacy = applied[LEGACY_STATE]
    assert legacy["changes"] == {artifact: {"old": "present", "new": "removed"} for artifact in EXPECTED_ARTIFACTS}
    assert legacy["changes"] == predicted[LEGACY_STATE]["changes"]
    for artifact in EXPECTED_ARTIFACTS:
        assert artifact in legacy["comment"]
    assert set(changes_by_state(applied)) == set(changes_by_state(predicted))
    assert lab.exec("sys-dns", "test -e /rw/config/nft-dnscrypt.sh").returncode == 1
    assert lab.exec("sys-dns", "systemctl cat dnscrypt-nft.service").returncode != 0
    assert "127.0.0.1" not in lab.exec("sys-dns", "nft list chain ip qubes dnat-dns").stdout

    # The estate equals the fresh build's: prefs, features, files and nft tables,
    # except for the record of the takeover, which names sys-dns's template before it.
    taken_over = without_identity(estate(lab))
    expected = without_identity(fresh)
    assert lab.qvm("qvm-features", "sys-dns", "sysdns.adopted").stdout.strip() == original_design.TEMPLATE
    taken_over["features:sys-dns"] = without_adoption(taken_over["features:sys-dns"])
    for key in sorted(set(taken_over) | set(expected)):
        assert taken_over.get(key) == expected.get(key), key
    assert sys_dns_files(lab) == fresh_files
    assert sys_dns_nft(lab) == fresh_nft

    # The tests SLS passes and the observer sees no port-53 packet leave sys-dns.
    tests = apply_ok(lab, TESTS)
    assert all(ret["result"] is True for ret in tests.values()), tests
    with lab.observe("sys-dns") as observer:
        resolves_encrypted(lab, "personal")
        observation = observer.stop()
    assert observation.dns_queries == [], observation.summary()

    # A second build changes nothing.
    calls_before = len(lab.calls())
    code, again, output = apply_sls(lab, BUILD)
    assert again is not None, output
    assert failed_states(again) == {}
    assert code == 0, output
    assert changes_by_state(again) == {}
    calls = dom0_calls(lab, calls_before)
    assert mutating([argv for argv in calls if argv[0] != "qvm-run"]) == []
    assert len(calls) <= 12, calls

    # The rollback restores sys-firewall's netvm and keeps the adopted sys-dns. The
    # template clone stays because sys-dns still uses it, and the rollback reports that.
    taken_over = estate(lab)
    calls_before = len(lab.calls())
    _, predicted, output = apply_sls(lab, ROLLBACK, "test=True")
    assert predicted is not None, output
    assert mutating(dom0_calls(lab, calls_before)) == []
    assert estate(lab) == taken_over
    code, rolled_back, output = apply_sls(lab, ROLLBACK)
    assert rolled_back is not None, output
    assert code != 0
    assert changes_by_state(rolled_back) == changes_by_state(predicted)
    assert list(changes_by_state(rolled_back)) == [ROLLBACK_RESTORED]
    assert rolled_back[ROLLBACK_RESTORED]["result"] is True
    assert rolled_back[ROLLBACK_QUBE]["result"] is True
    assert rolled_back[ROLLBACK_TEMPLATE]["result"] is False
    assert predicted[ROLLBACK_RESTORED]["result"] is None
    assert predicted[ROLLBACK_QUBE]["result"] is True
    assert predicted[ROLLBACK_TEMPLATE]["result"] is False
    kept_comment = rolled_back[ROLLBACK_QUBE]["comment"]
    assert kept_comment == predicted[ROLLBACK_QUBE]["comment"]
    assert "kept because it existed before the build" in kept_comment
    assert original_design.TEMPLATE in kept_comment
    rejected_comment = rolled_back[ROLLBACK_TEMPLATE]["comment"]
    assert rejected_comment == predicted[ROLLBACK_TEMPLATE]["comment"]
    assert "still in use as template of sys-dns" in rejected_comment
    assert lab.qvm("qvm-prefs", "sys-firewall", "netvm").stdout.strip() == "sys-net"
    assert lab.qvm("qvm-check", "sys-dns").returncode == 0
    assert lab.qvm("qvm-check", "tpl-sys-dns").returncode == 0

    # Moved back to its template of before, sys-dns no longer uses the clone.
    lab.shutdown("sys-dns")
    lab.qvm("qvm-prefs", "sys-dns", "template", original_design.TEMPLATE, check=True)
    again = apply_ok(lab, ROLLBACK)
    assert list(changes_by_state(again)) == [ROLLBACK_TEMPLATE]
    assert "kept because it existed before the build" in again[ROLLBACK_QUBE]["comment"]
    assert lab.qvm("qvm-check", "tpl-sys-dns").returncode != 0
    assert lab.qvm("qvm-check", "sys-dns").returncode == 0


def without_adoption(features):
    """Return ``qvm-features`` output without the line of the feature sysdns.adopted."""
    return "".join(line for line in features.splitlines(keepends=True) if line.split()[:1] != ["sysdns.adopted"])


# Rules a DNAT script may leave in Qubes' chain dnat-dns: two copies of the original
# design's pair, and a rule of Qubes' own form that also DNATs to 127.0.0.1 (what
# qubes-setup-dnat-to-ns writes once resolv.conf names 127.0.0.1, as the original
# makes it), which must stay.
EXTRA_RULES = """
nft add rule ip qubes dnat-dns udp dport 53 dnat to 127.0.0.1
nft add rule ip qubes dnat-dns tcp dport 53 dnat to 127.0.0.1
nft add rule ip qubes dnat-dns udp dport 53 dnat to 127.0.0.1
nft add rule ip qubes dnat-dns tcp dport 53 dnat to 127.0.0.1
nft add rule ip qubes dnat-dns ip daddr 10.139.1.3 udp dport 53 dnat to 127.0.0.1
"""


def legacy_script(lab, mode):
    script = (REPO_DIR / "qubes-sysdns-formula/qubes/network/sys-dns/files/legacy-artifacts.sh").read_text()
    result = lab.qvm("qvm-run", "--pass-io", "--user", "root", "sys-dns", "sh -s " + mode, input=script)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_takeover_of_own_table_and_dnat_rules(fresh_lab):
    lab = fresh_lab()
    lab.write_pillar("sysdns", lab_pillar(lab))

    # Without the networking agent the original's script makes its own table.
    original_design.install(lab, networking_agent=False)
    assert lab.exec("sys-dns", "nft list table ip dnscrypt").returncode == 0
    assert lab.qvm("qvm-prefs", "sys-firewall", "netvm").stdout.strip() == "sys-net"

    applied = apply_ok(lab, BUILD)
    assert applied[LEGACY_STATE]["changes"] == {
        artifact: {"old": "present", "new": "removed"}
        for artifact in (
            "/rw/config/nft-dnscrypt.sh",
            "unit dnscrypt-nft.service",
            "nft table ip dnscrypt",
            "/etc/dnscrypt-proxy/dnscrypt-proxy.toml",
            "/etc/dnscrypt-proxy/forwarding-rules.txt",
        )
    }
    assert lab.exec("sys-dns", "nft list table ip dnscrypt").returncode != 0
    assert lab.qvm("qvm-prefs", "sys-firewall", "netvm").stdout.strip() == "sys-dns"
    assert lab.qvm("qvm-features", "sys-firewall", "sysdns.previous-netvm").stdout.strip() == "sys-net"

    # In the formula's sys-dns, the script removes every copy of the original's rules
    # from dnat-dns and keeps the rules of Qubes' form.
    lab.exec("sys-dns", EXTRA_RULES, check=True)
    assert legacy_script(lab, "list") == [
        "present nft rule in ip qubes dnat-dns: udp dport 53 dnat to 127.0.0.1",
        "present nft rule in ip qubes dnat-dns: tcp dport 53 dnat to 127.0.0.1",
    ]
    qubes_rules = [
        line
        for line in lab.exec("sys-dns", "nft list chain ip qubes dnat-dns").stdout.splitlines()
        if "ip daddr" in line
    ]
    assert len(qubes_rules) == 5, qubes_rules
    predicted = apply_ok(lab, BUILD, "test=True")
    assert set(predicted[LEGACY_STATE]["changes"]) == {
        "nft rule in ip qubes dnat-dns: udp dport 53 dnat to 127.0.0.1",
        "nft rule in ip qubes dnat-dns: tcp dport 53 dnat to 127.0.0.1",
    }
    applied = apply_ok(lab, BUILD)
    assert applied[LEGACY_STATE]["changes"] == {
        artifact: {"old": "present", "new": "removed"} for artifact in predicted[LEGACY_STATE]["changes"]
    }
    remaining = lab.exec("sys-dns", "nft list chain ip qubes dnat-dns").stdout.splitlines()
    assert [line for line in remaining if "ip daddr" in line] == qubes_rules
    assert legacy_script(lab, "list") == []

    again = apply_ok(lab, BUILD)
    assert changes_by_state(again) == {}
    tests = apply_ok(lab, TESTS)
    assert all(ret["result"] is True for ret in tests.values()), tests


def test_takeover_of_halted_original_design(fresh_lab):
    """A halted hand-made sys-dns is inspected only once it runs with the formula's guard."""
    lab = fresh_lab()
    lab.write_pillar("sysdns", lab_pillar(lab))
    original_design.install(lab)
    # sys-firewall keeps running, detached, as after `qvm-shutdown --force sys-dns`;
    # Qubes attaches it again when sys-dns starts.
    force_shutdown(lab, "sys-dns")
    assert lab.status()["qubes"]["sys-firewall"]["state"] == "Running"
    original = estate(lab)

    # A test run starts nothing and predicts the inspection, not what /rw contains.
    calls_before = len(lab.calls())
    predicted = apply_ok(lab, BUILD, "test=True")
    calls = dom0_calls(lab, calls_before)
    assert mutating(calls) == []
    assert estate(lab) == original
    assert lab.status()["qubes"]["sys-dns"]["state"] == "Halted"
    assert predicted[LEGACY_STATE]["result"] is True
    assert predicted[LEGACY_STATE]["changes"] == {}
    assert predicted[LEGACY_AFTER_START]["result"] is None

    # A client asks all through the build: every query fails closed or gets an
    # encrypted answer, and no plaintext port-53 packet reaches the uplink.
    results = []
    stop = threading.Event()

    def ask():
        count = 0
        while not stop.is_set():
            results.append(query_txt(lab, "personal", tcp=count % 2 == 1, timeout=0.3))
            count += 1

    sender = threading.Thread(target=ask, name="takeover-queries")
    with lab.observe("sys-net") as observer:
        sender.start()
        try:
            applied = apply_ok(lab, BUILD)
            time.sleep(1.0)
        finally:
            stop.set()
            sender.join()
        observation = observer.stop()
    assert observation.dns_queries == [], observation.summary()
    for result in results:
        assert is_fail_closed(result), result
    assert any(is_encrypted_answer(result) for result in results), results[-5:]

    # Only the script in /rw outlived the shutdown; the second instance removes it.
    assert applied[LEGACY_STATE]["changes"] == {}
    assert applied[LEGACY_AFTER_START]["changes"] == {
        "/rw/config/nft-dnscrypt.sh": {"old": "present", "new": "removed"}
    }
    assert lab.exec("sys-dns", "test -e /rw/config/nft-dnscrypt.sh").returncode == 1
    assert lab.qvm("qvm-prefs", "sys-dns", "template").stdout.strip() == "tpl-sys-dns"

    tests = apply_ok(lab, TESTS)
    assert all(ret["result"] is True for ret in tests.values()), tests
    again = apply_ok(lab, BUILD)
    assert changes_by_state(again) == {}
