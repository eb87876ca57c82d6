"""
sysdns.status in one built lab. On a healthy build it shows every field within three
dom0 calls. Then one fault at a time (dnscrypt-proxy stopped, a file edited by hand,
rules changed in the loaded tables, sys-dns halted) is reported by status, and the
next build undoes each fault but the halt and names what it restored.
"""

import datetime
import json
import time

import pytest

from tests.integration.formula_lab import apply_sls, built_lab, changes_by_state, failed_states

pytestmark = pytest.mark.lab

BUILD = "qubes.network.sys-dns"
CONFIG_STATE = "qubes.network.sys-dns - configuration of sys-dns applied"
MAX_DOM0_CALLS = 3
READY_TIMEOUT_S = 60


@pytest.fixture(scope="module", name="built_lab")
def built_lab_fixture():
    with built_lab() as lab:
        yield lab


def run_status(lab):
    """Run ``qubesctl sysdns.status --out=json``; return the status dict and the dom0 calls it made."""
    calls_before = len(lab.calls())
    result = lab.qubesctl("sysdns.status", "--out=json", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)["local"]
    calls = [call["argv"] for call in lab.calls(calls_before) if call["argv"][0] != "qubesctl"]
    return status, calls


def wait_until_ready(lab):
    """Wait until dnscrypt-proxy in sys-dns reports live servers again."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if lab.dns_query("personal", "www.lab.test")["status"] == "answer":
            return
        time.sleep(1)
    raise AssertionError("dnscrypt-proxy in sys-dns did not answer within {} s".format(READY_TIMEOUT_S))


def certificate_window(lab):
    """Return the validity window of the lab's DNSCrypt certificate as status prints it."""
    data = (lab.layout.uplink_dir / "resolver.cert").read_bytes()

    def utc(offset):
        seconds = int.from_bytes(data[offset : offset + 4], "big")
        return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    return utc(116), utc(120)


def rebuild(lab):
    code, states, output = apply_sls(lab, BUILD)
    assert states is not None, output
    assert failed_states(states) == {}
    assert code == 0, output
    return states


def test_status_on_healthy_build(built_lab):
    lab = built_lab
    stamps = {entry["name"]: entry for entry in lab.stamps}

    status, calls = run_status(lab)

    assert len(calls) <= MAX_DOM0_CALLS, calls
    assert [argv[0] for argv in calls] == ["qvm-ls", "qvm-run"]
    assert "--no-autostart" in calls[1]
    assert status["ok"] is True, status["problems"]
    assert status["problems"] == []
    assert status["qube"]["class"] == "AppVM"
    assert status["qube"]["template"] == "tpl-sys-dns"
    assert status["qube"]["state"] == "Running"
    assert status["qube"]["netvm"] == "sys-net"
    assert status["chain"]["sys-firewall"]["netvm"] == "sys-dns"
    assert status["chain"]["sys-firewall"]["path"] == "sys-firewall -> sys-dns -> sys-net"
    assert status["chain"]["sys-firewall"]["through_sysdns"] is True
    assert status["dnscrypt_proxy"]["running"] is True
    assert status["dnscrypt_proxy"]["version"] == "2.1.8"
    assert status["dnscrypt_proxy"]["live_servers"] == ["lab-dnscrypt", "lab-doh"]
    for name, protocol in (("lab-dnscrypt", "dnscrypt"), ("lab-doh", "doh")):
        server = status["servers"][name]
        assert server["protocol"] == protocol
        assert server["address"] == "{}:{}".format(stamps[name]["address"], stamps[name]["port"])
        assert server["live"] is True
    certificate = status["servers"]["lab-dnscrypt"]["certificate"]
    assert certificate["valid_now"] is True, certificate
    assert (certificate["valid_from"], certificate["valid_until"]) == certificate_window(lab)
    assert "certificate" not in status["servers"]["lab-doh"]
    assert status["drift"]["in_sync"] is True
    assert set(status["drift"]["files"].values()) == {"matches"}
    assert status["drift"]["table inet sysdns"] == {"firewall": "loaded", "ruleset": "as-loaded"}
    assert status["drift"]["table inet sysdns_guard"] == {"guard": "loaded", "ruleset": "as-loaded"}
    assert status["drift"]["custom-input accept"] == "present"
    assert status["counters"]["plaintext_leaked"] == 0
    assert set(status["counters"]["tables"]) == {"inet sysdns", "inet sysdns_guard"}

    # The redirect counter counts client queries between two readings.
    for index in range(3):
        assert lab.dns_query("personal", "status-{}.lab.test".format(index))["status"] == "answer"
    later, _ = run_status(lab)
    moved = later["counters"]["queries_redirected"] - status["counters"]["queries_redirected"]
    assert moved >= 3, (status["counters"], later["counters"])


def test_status_when_dnscrypt_proxy_stopped(built_lab):
    lab = built_lab
    lab.exec("sys-dns", "systemctl stop dnscrypt-proxy.service", check=True)
    try:
        status, _ = run_status(lab)
    finally:
        lab.exec("sys-dns", "systemctl start dnscrypt-proxy.service", check=True)
        wait_until_ready(lab)

    assert status["ok"] is False
    assert status["dnscrypt_proxy"]["running"] is False
    assert status["dnscrypt_proxy"]["service"] == "inactive"
    assert status["dnscrypt_proxy"]["live_servers"] == []
    stopped = [
        problem for problem in status["problems"] if problem.startswith("sys-dns: dnscrypt-proxy is not running")
    ]
    assert len(stopped) == 1, status["problems"]
    assert stopped[0].startswith("sys-dns: dnscrypt-proxy is not running (service inactive); fix: ")
    assert "systemctl restart dnscrypt-proxy" in stopped[0]
    assert status["servers"]["lab-doh"]["live"] is False


def test_hand_edit_reported_and_restored(built_lab):
    lab = built_lab
    lab.exec("sys-dns", "echo '# edited by hand' >> /rw/config/sysdns/dnscrypt-proxy.toml", check=True)

    status, _ = run_status(lab)
    assert status["ok"] is False
    assert status["drift"]["in_sync"] is False
    assert status["drift"]["files"]["dnscrypt-proxy.toml"] == "differs from the pillar"
    assert status["drift"]["files"]["sysdns.nft"] == "matches"
    assert any("dnscrypt-proxy.toml (differs from the pillar)" in problem for problem in status["problems"])

    states = rebuild(lab)
    assert list(changes_by_state(states)) == [CONFIG_STATE]
    assert list(states[CONFIG_STATE]["changes"]["files"]) == ["dnscrypt-proxy.toml"]
    assert states[CONFIG_STATE]["comment"].endswith("restored after changes inside the qube: dnscrypt-proxy.toml")

    status, _ = run_status(lab)
    assert status["drift"]["files"]["dnscrypt-proxy.toml"] == "matches"
    assert status["ok"] is True, status["problems"]


# Runtime changes to sys-dns's rules: (command, where status reports it, what it
# reports, the change the build reports, what its comment names, whether clients
# still resolve meanwhile).
RUNTIME_CHANGES = {
    # The uplink guard's drop of plaintext DNS, found by its counter name.
    "delete-rule": (
        "nft delete rule inet sysdns guard_uplink handle "
        "$(nft -a list chain inet sysdns guard_uplink | sed -n 's/.*\"leak_dropped\" drop # handle //p')",
        "table inet sysdns",
        {"firewall": "loaded", "ruleset": "modified"},
        {"ruleset": {"old": "modified", "new": "as-loaded"}},
        "rules of table inet sysdns (modified)",
        True,
    ),
    # Without the redirect, clients' queries follow Qubes' dnat-dns and the guard
    # drops them: DNS fails closed until the build reloads the table.
    "flush-chain": (
        "nft flush chain inet sysdns redirect_downstream",
        "table inet sysdns",
        {"firewall": "loaded", "ruleset": "modified"},
        {"ruleset": {"old": "modified", "new": "as-loaded"}},
        "rules of table inet sysdns (modified)",
        False,
    ),
    "flush-guard": (
        "nft flush chain inet sysdns_guard forward",
        "table inet sysdns_guard",
        {"guard": "loaded", "ruleset": "modified"},
        {"guard-ruleset": {"old": "modified", "new": "as-loaded"}},
        "rules of table inet sysdns_guard (modified)",
        True,
    ),
    # One of the two accept rules (TCP) in Qubes' custom-input chain.
    "delete-accept": (
        "nft delete rule ip qubes custom-input handle "
        "$(nft -a list chain ip qubes custom-input | sed -n 's/.*tcp dport 53 accept comment \"sysdns\" # handle //p')",
        "custom-input accept",
        "incomplete",
        {"input-accept": {"old": "incomplete", "new": "present"}},
        "accept rules in custom-input (incomplete)",
        True,
    ),
}


@pytest.mark.parametrize("change", sorted(RUNTIME_CHANGES))
def test_runtime_rule_change_reported_and_restored(built_lab, change):
    lab = built_lab
    command, drift_key, drift_value, build_changes, restored, resolves = RUNTIME_CHANGES[change]
    lab.exec("sys-dns", command, check=True)

    status, _ = run_status(lab)
    assert status["ok"] is False
    assert status["drift"]["in_sync"] is False
    assert status["drift"][drift_key] == drift_value
    assert set(status["drift"]["files"].values()) == {"matches"}
    assert (lab.dns_query("personal", "www.lab.test")["status"] == "answer") is resolves

    states = rebuild(lab)
    ret = states[CONFIG_STATE]
    assert ret["changes"] == build_changes
    assert ret["comment"].endswith("restored after changes inside the qube: " + restored)

    status, _ = run_status(lab)
    assert status["drift"]["in_sync"] is True
    assert status["ok"] is True, status["problems"]
    with lab.observe("sys-dns") as observer:
        assert lab.dns_query("work", "www.lab.test")["status"] == "answer"
        observation = observer.stop()
    assert observation.dns_queries == [], observation.summary()


def test_status_when_halted_does_not_start(built_lab):
    lab = built_lab
    assert lab.qvm("qvm-shutdown", "--wait", "--force", "sys-dns").returncode == 0
    try:
        status, calls = run_status(lab)
        state_after = lab.store().power_state("sys-dns")
    finally:
        assert lab.qvm("qvm-start", "sys-dns").returncode == 0

    assert state_after == "Halted"
    assert [argv[0] for argv in calls] == ["qvm-ls"]
    assert status["ok"] is False
    assert status["qube"]["state"] == "Halted"
    assert status["dnscrypt_proxy"]["running"] is False
    assert status["drift"]["in_sync"] is None
    assert any("sys-dns is Halted" in problem for problem in status["problems"])
