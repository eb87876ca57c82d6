"""
sysdns.diagnose names the right cause for each fault made in one built lab, only
plausible other failures come with it, and a healthy build reports every check OK.
"""

import json
import subprocess
import sys
import time

import pytest

from tests.integration.formula_lab import apply_sls, built_lab, failed_states, lab_pillar

pytestmark = pytest.mark.lab

BUILD = "qubes.network.sys-dns"
TOML = "/rw/config/sysdns/dnscrypt-proxy.toml"
TESTS_SLS_CHECKS = {"clients resolve", "no plaintext DNS", "encrypted upstream sessions"}

# A fault in sys-net: it drops every packet forwarded to the lab's resolvers on their
# encrypted ports, as a network that blocks the upstream resolvers does.
UPSTREAM_BLOCK = (
    "nft add table ip labfault && "
    "nft add chain ip labfault forward '{ type filter hook forward priority -50; }' && "
    "nft add rule ip labfault forward ip daddr 192.0.2.0/24 meta l4proto { tcp, udp } th dport { 443, 4443 } drop"
)
UPSTREAM_UNBLOCK = "nft delete table ip labfault"
BUILD_COMMAND = "sudo qubesctl --show-output state.sls qubes.network.sys-dns"
NFT = "/rw/config/sysdns/sysdns.nft"
RESTORE_TABLES = "systemctl restart sysdns-guard.service && /usr/lib/sysdns/apply-firewall"

# Holds TCP connections to the virtual DNS address open from a client: one new
# connection every 0.1 s, up to 20 at once. dnscrypt-proxy keeps each accepted one for
# its timeout (5 s) and closes those beyond max_clients at once.
HOLD_CONNECTIONS = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[2])
held = []
while time.monotonic() < deadline:
    try:
        held.append(socket.create_connection((sys.argv[1], 53), timeout=2))
    except OSError:
        pass
    while len(held) > 20:
        held.pop(0).close()
    time.sleep(0.1)
"""


@pytest.fixture(scope="module", name="built_lab")
def built_lab_fixture():
    with built_lab() as lab:
        yield lab


def diagnose(lab):
    """Run sysdns.diagnose; return (exit code, result dict, {check: finding})."""
    result = lab.qubesctl("sysdns.diagnose", "--out=json", timeout=600)
    data = json.loads(result.stdout)["local"]
    assert isinstance(data, dict), result.stdout + result.stderr
    return result.returncode, data, {item["check"]: item for item in data["findings"]}


def dom0_calls(lab, since):
    return [call["argv"] for call in lab.calls(since) if call["argv"][0] != "qubesctl"]


def changing(calls):
    """Return the dom0 calls that start, stop or change a qube."""
    tools = ("qvm-start", "qvm-shutdown", "qvm-kill", "qvm-create", "qvm-clone", "qvm-remove")
    return [argv for argv in calls if argv[0] in tools or (argv[0] == "qvm-prefs" and len(argv) > 3)]


def failing(findings):
    return {check for check, item in findings.items() if item["status"] == "fail"}


def wait_until_answering(lab, timeout=60.0):
    """Wait until dnscrypt-proxy in sys-dns answers a cached or upstream name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = lab.exec("sys-dns", "echo www.lab.test | /usr/lib/sysdns/probe-upstream")
        if result.stdout.strip() == "rcode 0":
            return
        time.sleep(0.5)
    pytest.fail(f"dnscrypt-proxy in sys-dns did not answer within {timeout} s")


def restart_dnscrypt_proxy(lab):
    lab.exec("sys-dns", "systemctl restart dnscrypt-proxy.service", check=True)
    wait_until_answering(lab)


def test_diagnose_healthy_build_all_ok(built_lab):
    calls_before = len(built_lab.calls())
    code, data, findings = diagnose(built_lab)
    calls = dom0_calls(built_lab, calls_before)
    assert code == 0, data["summary"]
    assert changing(calls) == []
    assert len([argv for argv in calls if argv[0] == "qvm-run" and "/usr/lib/sysdns/diagnose" in argv]) == 1
    assert len([argv for argv in calls if argv[0] == "qvm-ls"]) == 2
    assert data["result"] is True
    for check, item in findings.items():
        assert item["status"] == "ok", (check, item)
    assert TESTS_SLS_CHECKS <= set(findings)


def test_diagnose_names_stopped_dnscrypt_proxy(built_lab):
    lab = built_lab
    lab.exec("sys-dns", "systemctl stop dnscrypt-proxy.service", check=True)
    try:
        code, data, findings = diagnose(lab)
    finally:
        restart_dnscrypt_proxy(lab)
    assert code != 0
    assert data["result"] is False
    assert failing(findings) == {"dnscrypt-proxy"}, data["summary"]
    assert "not running" in findings["dnscrypt-proxy"]["cause"]
    assert "systemctl restart dnscrypt-proxy" in findings["dnscrypt-proxy"]["fix"]
    assert findings["upstream"]["status"] == "skip"


def test_diagnose_names_proxy_not_listening(built_lab):
    lab = built_lab
    lab.exec(
        "sys-dns",
        f"cp -p {TOML} /root/toml.saved && "
        f"sed -i 's/^listen_addresses = .*/listen_addresses = [\"127.0.0.1:5300\"]/' {TOML} && "
        "systemctl restart dnscrypt-proxy.service",
        check=True,
    )
    try:
        code, data, findings = diagnose(lab)
    finally:
        lab.exec("sys-dns", f"cp -p /root/toml.saved {TOML}", check=True)
        restart_dnscrypt_proxy(lab)
    assert code != 0
    assert failing(findings) == {"port 53"}, data["summary"]
    assert findings["dnscrypt-proxy"]["status"] == "ok"
    assert "does not listen on port 53" in findings["port 53"]["detail"]
    assert "listen_addresses" in findings["port 53"]["cause"]


@pytest.mark.parametrize(
    ("fault", "seen"),
    [
        ("nft delete table inet sysdns", "table inet sysdns is missing"),
        ("nft flush chain inet sysdns redirect_downstream", "lacks the redirect rule"),
    ],
)
def test_diagnose_names_missing_redirect(built_lab, fault, seen):
    lab = built_lab
    lab.exec("sys-dns", fault, check=True)
    try:
        code, data, findings = diagnose(lab)
    finally:
        lab.exec("sys-dns", "/usr/lib/sysdns/apply-firewall", check=True)
    assert code != 0
    assert failing(findings) == {"redirect"}, data["summary"]
    assert seen in findings["redirect"]["detail"]
    assert "apply-firewall" in findings["redirect"]["fix"]


def test_diagnose_fails_plaintext_without_tables(built_lab):
    lab = built_lab
    lab.exec("sys-dns", "nft delete table inet sysdns && nft delete table inet sysdns_guard", check=True)
    try:
        code, data, findings = diagnose(lab)
        result = lab.qubesctl("sysdns.status", "--out=json", timeout=300)
    finally:
        lab.exec("sys-dns", RESTORE_TABLES, check=True)
    assert code != 0
    assert failing(findings) == {"redirect", "no plaintext DNS"}, data["summary"]
    plaintext = findings["no plaintext DNS"]
    assert plaintext["cause"].startswith("nothing stops port-53 traffic from leaving sys-dns")
    assert plaintext["fix"] == "re-run the build: " + BUILD_COMMAND
    assert "nothing stops it from leaving" in findings["redirect"]["cause"]
    # apply-firewall does not load the guard, so the build is the fix here too.
    assert findings["redirect"]["fix"].startswith("re-run the build")
    problems = json.loads(result.stdout)["local"]["problems"]
    guard = [problem for problem in problems if problem.startswith("sys-dns: guard is missing")]
    assert len(guard) == 1, problems
    assert "does not stop plaintext DNS from leaving" in guard[0]
    assert guard[0].endswith("; fix: re-run the build, which reloads the tables: " + BUILD_COMMAND)


def test_diagnose_gives_build_for_edited_file(built_lab):
    lab = built_lab
    lab.exec("sys-dns", f"sed -i '/counter name \"redirected\" redirect/d' {NFT}", check=True)
    lab.exec("sys-dns", "/usr/lib/sysdns/apply-firewall", check=True)
    try:
        code, data, findings = diagnose(lab)
    finally:
        # The fix that diagnose names: the build restores the file and reloads it.
        restore_code, states, output = apply_sls(lab, BUILD)
    assert restore_code == 0, output
    assert code != 0
    assert failing(findings) == {"redirect"}, data["summary"]
    redirect = findings["redirect"]
    assert "lacks the redirect rule" in redirect["detail"]
    assert redirect["detail"].endswith("/rw/config/sysdns differs from what the pillar renders: sysdns.nft")
    assert redirect["fix"].startswith("re-run the build, which restores /rw/config/sysdns")
    assert BUILD_COMMAND in redirect["fix"]
    for item in findings.values():
        assert "qvm-run -u root sys-dns /usr/lib/sysdns/apply-firewall" not in item["fix"], item
    code, data, findings = diagnose(lab)
    assert findings["redirect"]["status"] == "ok", data["summary"]


def test_diagnose_names_blocked_upstream(built_lab):
    lab = built_lab
    lab.exec("sys-net", UPSTREAM_BLOCK, check=True)
    try:
        code, data, findings = diagnose(lab)
    finally:
        lab.exec("sys-net", UPSTREAM_UNBLOCK, check=True)
    assert code != 0
    assert "upstream" in failing(findings), data["summary"]
    # Clients fail too when the test names are not cached (dnscrypt-proxy restarted).
    assert failing(findings) <= {"upstream", "encrypted upstream sessions", "clients resolve"}, data["summary"]
    assert findings["upstream"]["cause"].startswith("no upstream reachable")
    assert findings["encrypted upstream sessions"]["cause"] == findings["upstream"]["cause"]
    assert "lab-dnscrypt" in findings["upstream"]["detail"]
    # No certificate answer reaches sys-dns, so the clock check cannot pass.
    assert findings["clock"]["status"] == "skip", findings["clock"]
    assert "no certificate answer from lab-dnscrypt" in findings["clock"]["detail"]


def test_diagnose_names_clock_skew(built_lab):
    lab = built_lab
    now = int(time.time())
    # A certificate that starts in two days: what sys-dns sees when its clock (and
    # dom0's) runs two days behind.
    lab.uplink.serve_dnscrypt_certificate(now + 2 * 86400, now + 3 * 86400)
    try:
        restart_dnscrypt_proxy(lab)
        code, data, findings = diagnose(lab)
    finally:
        lab.uplink.restore_dnscrypt()
        restart_dnscrypt_proxy(lab)
    assert code != 0
    assert failing(findings) == {"clock"}, data["summary"]
    assert findings["clock"]["cause"].startswith("clock skew")
    assert "lab-dnscrypt: certificate valid from" in findings["clock"]["detail"]
    assert "clockvm" in findings["clock"]["fix"]
    # The DoH resolver still answers, so upstream resolution works.
    assert findings["upstream"]["status"] == "ok"


def test_diagnose_names_max_clients_exhausted(built_lab):
    lab = built_lab
    lab.write_pillar("sysdns", lab_pillar(lab, dnscrypt={"max_clients": 2}))
    code, states, output = apply_sls(lab, BUILD)
    assert states is not None, output
    assert failed_states(states) == {}
    wait_until_answering(lab)
    for rtype in ("A", "AAAA"):
        lab.dns_query("personal", "www.lab.test", rtype)
    holder = subprocess.Popen(
        ["ip", "netns", "exec", lab.netns("personal"), sys.executable, "-c", HOLD_CONNECTIONS, "10.139.1.1", "300"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2)
        code, data, findings = diagnose(lab)
    finally:
        holder.terminate()
        holder.wait(timeout=30)
        lab.write_pillar("sysdns", lab_pillar(lab))
        restore_code, states, output = apply_sls(lab, BUILD)
    assert restore_code == 0, output
    assert code != 0
    assert "max_clients" in failing(findings), data["summary"]
    plausible = {"max_clients", "upstream", "encrypted upstream sessions", "clients resolve"}
    assert failing(findings) <= plausible, data["summary"]
    assert "Too many incoming connections (max=2)" in findings["max_clients"]["detail"]
    assert "sysdns:dnscrypt:max_clients" in findings["max_clients"]["fix"]
    if findings["upstream"]["status"] == "fail":
        assert findings["upstream"]["cause"].startswith("max_clients exhausted")


def test_diagnose_names_bypassing_client(built_lab):
    lab = built_lab
    lab.qvm("qvm-prefs", "work", "netvm", "sys-net", check=True)
    try:
        code, data, findings = diagnose(lab)
    finally:
        lab.qvm("qvm-prefs", "work", "netvm", "sys-firewall", check=True)
    assert code != 0
    assert "bypass" in failing(findings), data["summary"]
    assert failing(findings) <= {"bypass", "no plaintext DNS", "clients resolve"}, data["summary"]
    assert "work: work -> sys-net" in findings["bypass"]["detail"]
    # work is a test client, so the tests SLS check fails for it too, naming its chain.
    assert findings["clients resolve"]["status"] == "fail", data["summary"]
    assert "work: its DNS queries bypass sys-dns (netvm chain work -> sys-net)" in findings["clients resolve"]["detail"]
    assert "qvm-prefs work netvm sys-firewall" in findings["bypass"]["fix"]


def test_diagnose_names_halted_sys_dns(built_lab):
    lab = built_lab
    lab.qvm("qvm-shutdown", "--wait", "--force", "sys-dns", check=True)
    calls_before = len(lab.calls())
    try:
        code, data, findings = diagnose(lab)
        calls = dom0_calls(lab, calls_before)
        state = lab.qvm("qvm-ls", "--raw-data", "--fields", "name,state", check=True).stdout
    finally:
        lab.qvm("qvm-start", "sys-dns", check=True)
        wait_until_answering(lab)
    assert code != 0
    assert failing(findings) == {"qube sys-dns"}, data["summary"]
    assert "sys-dns|Halted" in state.splitlines()
    assert changing(calls) == []
    assert [argv for argv in calls if argv[0] == "qvm-run"] == []
    assert findings["qube sys-dns"]["fix"] == "qvm-start sys-dns"
    assert "does not start it" in findings["qube sys-dns"]["detail"]
    assert {item["status"] for check, item in findings.items() if check in TESTS_SLS_CHECKS} == {"skip"}


def test_diagnose_all_ok_again_after_faults(built_lab):
    code, data, findings = diagnose(built_lab)
    assert code == 0, data["summary"]
    assert failing(findings) == set(), data["summary"]
