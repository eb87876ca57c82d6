"""
sysdns.status in one built lab: every field on a healthy build within three dom0
calls, then one fault at a time (dnscrypt-proxy stopped, a file edited by hand,
rules removed from the loaded table, sys-dns halted), each reported by status and
each but the halt undone by the next build, which names what it restored.
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
    assert "sys-dns: dnscrypt-proxy is not running (service inactive)" in status["problems"]
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


@pytest.mark.parametrize(
    "change",
    [
        # The uplink guard's drop of plaintext DNS, found by its counter name.
        "nft delete rule inet sysdns guard_uplink handle "
        "$(nft -a list chain inet sysdns guard_uplink | sed -n 's/.*\"leak_dropped\" drop # handle //p')",
        "nft flush chain inet sysdns redirect_downstream",
    ],
    ids=["delete-rule", "flush-chain"],
)
def test_runtime_rule_change_reported_and_reloaded(built_lab, change):
    lab = built_lab
    lab.exec("sys-dns", change, check=True)

    status, _ = run_status(lab)
    assert status["ok"] is False
    assert status["drift"]["table inet sysdns"]["ruleset"] == "modified"
    assert set(status["drift"]["files"].values()) == {"matches"}
    assert any("rules of table inet sysdns changed" in problem for problem in status["problems"])

    states = rebuild(lab)
    ret = states[CONFIG_STATE]
    assert ret["changes"] == {"ruleset": {"old": "modified", "new": "as-loaded"}}
    assert ret["comment"].endswith("restored after changes inside the qube: rules of table inet sysdns (modified)")

    status, _ = run_status(lab)
    assert status["drift"]["table inet sysdns"]["ruleset"] == "as-loaded"
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
