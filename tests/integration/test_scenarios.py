"""
The built formula under faults and Qubes' own events, in the offline lab.

Every scenario checks three claims: no plaintext port-53 packet leaves sys-dns
(the independent observer on sys-net's side of the link), except to the server a
forwarding rule names; clients get answers from dnscrypt-proxy (the TXT record of
a *.lab.test name names the encrypted uplink endpoint) or fail closed; service
comes back by itself when the fault ends.

One lab is built for most tests (module fixture); the tests run in file order and
each restores what it changed, except the IPv6 test, which runs last.
"""

import subprocess
import threading
import time

import pytest

from tests.integration.answers import (
    endpoint,
    is_encrypted_answer,
    is_fail_closed,
    query_txt,
    resolve_encrypted,
    unique_name,
)
from tests.integration.formula_lab import apply_sls, failed_states, lab_pillar
from tests.lab.lab import Lab

pytestmark = pytest.mark.lab

BUILD = "qubes.network.sys-dns"
# The uplink's plain resolver answers with this TXT marker: an answer carrying it
# went out in plaintext.
PLAIN_ENDPOINT = "uplink-plain"
PLAIN_RESOLVER = "192.0.2.1"

# An internal zone that the pillar forwards in plaintext to the uplink's plain
# resolver, which answers every *.lab.test name.
FORWARDED_ZONE = "corp.lab.test"
FORWARDING_RULES = [{"zone": FORWARDED_ZONE, "servers": [f"{PLAIN_RESOLVER}:53"]}]

# Destinations a client may aim a query at; sys-dns must answer all of them itself.
IPV4_SERVERS = ("10.139.1.1", "10.139.1.2", PLAIN_RESOLVER, "198.51.100.7")
IPV6_SERVERS = ("2001:db8::1", "2001:db8::99")

UPSTREAM_BLOCK = (
    "nft add table ip labfault && "
    "nft add chain ip labfault forward '{ type filter hook forward priority -50; }' && "
    "nft add rule ip labfault forward ip daddr 192.0.2.0/24 meta l4proto { tcp, udp } th dport { 443, 4443 } drop"
)
UPSTREAM_UNBLOCK = "nft delete table ip labfault"

WHONIX_QUBES = ("sys-whonix", "anon-whonix")
RECOVERY_TIMEOUT = 30.0


def wait_resolves(lab, client="personal", timeout=RECOVERY_TIMEOUT):
    """Poll until *client* gets an encrypted answer; return the seconds it took."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        last = query_txt(lab, client, timeout=1.0)
        if is_encrypted_answer(last):
            return time.monotonic() - started
        assert is_fail_closed(last), last
        time.sleep(0.3)
    raise AssertionError(f"{client} did not resolve within {timeout} s: last result {last}")


def assert_resolves_everywhere(lab, client="personal", servers=IPV4_SERVERS):
    """Query *client* -> each server over UDP and TCP; all must be answered encrypted."""
    with lab.observe("sys-dns") as observer:
        for server in servers:
            for tcp in (False, True):
                resolve_encrypted(lab, client, server, tcp)
        observation = observer.stop()
    assert observation.dns_queries == [], observation.summary()


def qvm(lab, tool, *args, timeout=300):
    """Run a dom0 tool and require success; a failure shows the tool's stderr."""
    result = lab.qvm(tool, *args, timeout=timeout)
    assert result.returncode == 0, f"{tool} {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


def force_shutdown(lab, netvm):
    """Force a network-providing qube down and remove its clients' links.

    NOTE: the lab leaves a client's eth0 for the kernel to remove with the netvm's
    namespace, which can take a minute or more. Until then the next start fails with
    "RTNETLINK answers: File exists". On Qubes the removal of the backend vif
    removes the client's interface, so the test deletes it as that would.
    """
    clients = [
        name for name, qube in lab.status()["qubes"].items() if qube["netvm"] == netvm and qube["state"] == "Running"
    ]
    qvm(lab, "qvm-shutdown", "--wait", "--force", netvm)
    for client in clients:
        subprocess.run(["ip", "-n", lab.netns(client), "link", "delete", "eth0"], capture_output=True, check=False)


def estate_of(lab, names):
    """Return each qube's prefs and features, to compare before and after a run."""
    snapshot = {}
    for name in names:
        snapshot[name] = (qvm(lab, "qvm-prefs", name), qvm(lab, "qvm-features", name))
    return snapshot


def pillar(lab, **overrides):
    overrides.setdefault("dnscrypt", {"forwarding_rules": FORWARDING_RULES})
    return lab_pillar(lab, **overrides)


def build(lab, data):
    lab.write_pillar("sysdns", data)
    code, states, output = apply_sls(lab, BUILD)
    assert states is not None, output
    assert failed_states(states) == {}
    assert code == 0
    return states


# The disposable sys-firewall needs its own lab; it runs before the shared lab
# exists, so the two labs never run at the same time.
def test_disposable_firewall_builds_and_resolves(fresh_lab):
    lab = fresh_lab(disposable_firewall=True)
    assert lab.store().domain("sys-firewall").klass == "DispVM"
    firewall_ip = lab.qvm("qvm-prefs", "sys-firewall", "ip").stdout.strip()
    assert firewall_ip.startswith("10.138."), firewall_ip

    build(lab, pillar(lab))

    assert lab.qvm("qvm-prefs", "sys-firewall", "netvm").stdout.strip() == "sys-dns"
    assert_resolves_everywhere(lab, "personal")


@pytest.fixture(scope="module")
def built_lab():
    lab = Lab.up()
    try:
        lab.whonix_before = estate_of(lab, WHONIX_QUBES)
        build(lab, pillar(lab))
        yield lab
    finally:
        lab.down()


def test_queries_to_any_address(built_lab):
    assert_resolves_everywhere(built_lab, "personal")


def test_whonix_untouched_by_build(built_lab):
    assert estate_of(built_lab, WHONIX_QUBES) == built_lab.whonix_before
    assert built_lab.qvm("qvm-prefs", "sys-whonix", "netvm").stdout.strip() == "sys-firewall"
    assert built_lab.qvm("qvm-prefs", "anon-whonix", "netvm").stdout.strip() == "sys-whonix"


@pytest.mark.parametrize("qube", ["sys-whonix", "anon-whonix"])
def test_whonix_in_rewire_rejected(built_lab, qube):
    lab = built_lab
    before = estate_of(lab, WHONIX_QUBES)
    lab.write_pillar("sysdns", pillar(lab, rewire=["sys-firewall", qube]))
    try:
        code, states, output = apply_sls(lab, BUILD)
    finally:
        lab.write_pillar("sysdns", pillar(lab))
    assert code != 0
    text = output if states is None else str(failed_states(states))
    assert qube in text, text
    assert "Whonix" in text, text
    assert estate_of(lab, WHONIX_QUBES) == before


def test_whonix_template_in_rewire_rejected(built_lab):
    # A qube named without "whonix" is still a Whonix gateway when its template
    # carries the whonix-gw feature.
    lab = built_lab
    qvm(lab, "qvm-create", "-t", "whonix-gateway-17", "-l", "black", "tor-gateway")
    try:
        qvm(lab, "qvm-prefs", "tor-gateway", "netvm", "sys-firewall")
        lab.write_pillar("sysdns", pillar(lab, rewire=["sys-firewall", "tor-gateway"]))
        code, states, output = apply_sls(lab, BUILD)
        netvm = lab.qvm("qvm-prefs", "tor-gateway", "netvm").stdout.strip()
    finally:
        lab.write_pillar("sysdns", pillar(lab))
        lab.qvm("qvm-remove", "-f", "tor-gateway")
    assert states is not None, output
    assert code != 0
    failures = " ".join(str(comment) for comment in failed_states(states).values())
    assert "tor-gateway is not rewired" in failures, failures
    assert "whonix-gateway-17" in failures, failures
    assert netvm == "sys-firewall"


def test_forwarding_rule_plaintext_only_to_named_server(built_lab):
    lab = built_lab
    with lab.observe("sys-dns") as observer:
        forwarded = {
            server: query_txt(lab, "personal", server=server, name=unique_name(FORWARDED_ZONE))
            for server in ("10.139.1.1", "198.51.100.7")
        }
        other = query_txt(lab, "personal")
        observation = observer.stop()
    for server, result in forwarded.items():
        # The plain resolver answered, through the rule, whatever address was asked.
        assert result["status"] == "answer", (server, result)
        assert endpoint(result) == PLAIN_ENDPOINT, (server, result)
    assert is_encrypted_answer(other), other
    queries = observation.dns_queries
    assert queries, observation.summary()
    assert {(packet.destination, packet.destination_port) for packet in queries} == {(PLAIN_RESOLVER, 53)}, (
        observation.summary()
    )
    assert all(packet.query_name.rstrip(".").endswith(FORWARDED_ZONE) for packet in queries), observation.summary()


def test_sys_dns_restarted(built_lab):
    lab = built_lab
    force_shutdown(lab, "sys-dns")
    qvm(lab, "qvm-start", "sys-dns")
    wait_resolves(lab)
    assert_resolves_everywhere(lab, "work")


def test_sys_net_restarted(built_lab):
    lab = built_lab
    force_shutdown(lab, "sys-net")
    qvm(lab, "qvm-start", "sys-net")
    wait_resolves(lab)
    assert_resolves_everywhere(lab, "personal")


def test_netvm_changed_away_and_back(built_lab):
    lab = built_lab
    qvm(lab, "qvm-prefs", "sys-dns", "netvm", "")
    try:
        result = query_txt(lab, "personal")
        assert is_fail_closed(result), result
    finally:
        qvm(lab, "qvm-prefs", "sys-dns", "netvm", "sys-net")
    wait_resolves(lab)
    assert_resolves_everywhere(lab, "personal")


def test_uplink_renewed_and_changed(built_lab):
    lab = built_lab
    lab.renew_uplink()
    lab.uplink_changed("sys-dns")
    dnat = lab.exec("sys-dns", "nft list chain ip qubes dnat-dns", check=True).stdout
    assert "dnat to" in dnat, dnat
    assert_resolves_everywhere(lab, "personal")


def test_dnscrypt_proxy_killed(built_lab):
    lab = built_lab
    show = "systemctl show -p MainPID --value dnscrypt-proxy.service"
    pid = lab.exec("sys-dns", show, check=True).stdout.strip()
    assert pid not in ("", "0"), pid
    with lab.observe("sys-dns") as observer:
        lab.exec("sys-dns", f"kill -9 {pid}", check=True)
        # systemd waits RestartSec=2 before the restart: these queries fall in the outage.
        outage = [query_txt(lab, "personal", server=server, timeout=1.0) for server in ("10.139.1.1", PLAIN_RESOLVER)]
        recovery = wait_resolves(lab)
        observation = observer.stop()
    for result in outage:
        assert is_fail_closed(result), result
    assert not any(is_encrypted_answer(result) for result in outage), outage
    new_pid = lab.exec("sys-dns", show, check=True).stdout.strip()
    assert new_pid not in ("", "0", pid), new_pid
    assert recovery < RECOVERY_TIMEOUT
    assert observation.dns_queries == [], observation.summary()


def test_upstream_unreachable_then_back(built_lab):
    lab = built_lab
    with lab.observe("sys-dns") as observer:
        lab.exec("sys-net", UPSTREAM_BLOCK, check=True)
        try:
            outage = [
                query_txt(lab, "personal", server=server, timeout=3.0) for server in ("10.139.1.1", PLAIN_RESOLVER)
            ]
        finally:
            lab.exec("sys-net", UPSTREAM_UNBLOCK, check=True)
        recovery = wait_resolves(lab)
        observation = observer.stop()
    for result in outage:
        assert is_fail_closed(result), result
        assert not is_encrypted_answer(result), result
    assert recovery < RECOVERY_TIMEOUT
    assert observation.dns_queries == [], observation.summary()


def test_boot_window_leaks_nothing(built_lab):
    # The observer sits on sys-net's uplink, because sys-dns's own link does not
    # exist yet when the boot starts; any plaintext sys-dns lets out crosses it.
    lab = built_lab
    results = []
    stop = threading.Event()

    def ask():
        servers = ("10.139.1.1", PLAIN_RESOLVER, "198.51.100.7")
        count = 0
        while not stop.is_set():
            server = servers[count % len(servers)]
            results.append(
                (time.monotonic(), server, query_txt(lab, "personal", server=server, tcp=count % 2 == 1, timeout=0.3))
            )
            count += 1

    force_shutdown(lab, "sys-dns")
    sender = threading.Thread(target=ask, name="boot-window-queries")
    with lab.observe("sys-net") as observer:
        sender.start()
        try:
            started = time.monotonic()
            qvm(lab, "qvm-start", "sys-dns")
            ready = wait_resolves(lab)
            # Keep asking a little longer after the first encrypted answer.
            time.sleep(1.0)
        finally:
            stop.set()
            sender.join()
        observation = observer.stop()
    first_answer = min((when for when, _, result in results if is_encrypted_answer(result)), default=None)
    assert first_answer is not None, "no query of the sender got an encrypted answer"
    in_window = [result for when, _, result in results if started <= when < first_answer]
    # The window was probed: queries went out between qvm-start and the first answer.
    assert len(in_window) >= 3, f"only {len(in_window)} queries in the {ready:.1f} s window"
    for _, server, result in results:
        assert is_fail_closed(result), (server, result)
    assert observation.dns_queries == [], observation.summary()


def test_template_updated(built_lab):
    lab = built_lab
    update = lab.qvm("qvm-run", "-p", "-u", "root", "tpl-sys-dns", "apt-get update && apt-get -y upgrade", timeout=600)
    assert update.returncode == 0, update.stdout + update.stderr
    # apt reached the lab mirror through the updates proxy.
    assert "http://deb.debian.org/debian" in update.stdout, update.stdout
    qvm(lab, "qvm-shutdown", "--wait", "tpl-sys-dns")
    force_shutdown(lab, "sys-dns")
    qvm(lab, "qvm-start", "sys-dns")
    wait_resolves(lab)
    assert_resolves_everywhere(lab, "personal")
    code, states, output = apply_sls(lab, BUILD)
    assert states is not None, output
    assert failed_states(states) == {}, failed_states(states)


def test_ipv6_queries_leak_nothing(built_lab):
    # IPv6 addresses come from QubesDB at start: the chain restarts with the feature
    # set on sys-net, which every downstream qube inherits through its netvm.
    lab = built_lab
    qvm(lab, "qvm-features", "sys-net", "ipv6", "1")
    for qube in ("sys-net", "sys-dns", "sys-firewall"):
        force_shutdown(lab, qube)
    qvm(lab, "qvm-shutdown", "--wait", "personal")
    qvm(lab, "qvm-start", "personal")
    personal_ip6 = lab.qvm("qvm-prefs", "personal", "ip6").stdout.strip()
    sys_dns_ip6 = lab.qvm("qvm-prefs", "sys-dns", "ip6").stdout.strip()
    assert personal_ip6.startswith("fd09:24ef:4179:"), personal_ip6
    assert personal_ip6 in lab.exec("personal", "ip -6 addr show eth0", check=True).stdout
    wait_resolves(lab)
    assert_resolves_everywhere(lab, "personal", servers=IPV6_SERVERS + (sys_dns_ip6, "10.139.1.1"))
