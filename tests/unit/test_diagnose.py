"""Tests of the cause classification behind sysdns.diagnose, one branch at a time."""

import copy
import hashlib
import struct

import pytest

from tests.unit.sysdns_fakes import FakeQubes, config_module, load_salt_module, qube

NOW = 1_800_000_000
PROVIDER = "2.dnscrypt-cert.lab.test"
SKIPPED_CLOCK = "; no DNSCrypt certificate could be checked against the clock, so the check cannot pass"
SERVERS = [{"name": "lab-dnscrypt", "ip": "192.0.2.2", "port": 443, "provider_name": PROVIDER}]

checks_module = load_salt_module("_modules/sysdns.py")
diagnose_module = load_salt_module("_modules/sysdns_diagnose.py")
SALT = {
    "sysdns.check_resolve": checks_module.check_resolve,
    "sysdns.check_no_plaintext": checks_module.check_no_plaintext,
    "sysdns.check_upstream": checks_module.check_upstream,
    "sysdns.parse_certificate_response": checks_module.parse_certificate_response,
    "sysdns.select_certificate": checks_module.select_certificate,
    "sysdns_config.decode_stamp": config_module.decode_stamp,
    "sysdns_config.anonymized_resolvers": config_module.anonymized_resolvers,
}
diagnose_module.__salt__ = SALT


def cert_answer(*windows, query_id=0x5D00, magic=b"DNSC", es_versions=()):
    """
    Return the hex of a DNS answer containing one certificate per (begin, end) window, of
    es-version 2 unless ``es_versions`` gives one per window.
    """
    question = b"".join(bytes([len(label)]) + label.encode() for label in PROVIDER.split(".")) + b"\x00"
    question += struct.pack(">HH", 16, 1)
    records = b""
    for serial, (begin, end) in enumerate(windows, start=1):
        es_version = es_versions[serial - 1] if es_versions else 2
        cert = magic + struct.pack(">HH", es_version, 0) + b"\x00" * 104 + struct.pack(">III", serial, begin, end)
        rdata = bytes([len(cert)]) + cert
        records += struct.pack(">HHHIH", 0xC00C, 16, 1, 600, len(rdata)) + rdata
    header = struct.pack(">HHHHHH", query_id, 0x8180, 1, len(windows), 0, 0)
    return (header + question + records).hex()


def report_text(**replace):
    """Return the output of a healthy diagnose.sh, with some lines replaced or dropped."""
    lines = {
        "clock": f"clock {NOW}",
        "service": "service active running 445 0",
        "listen-udp": 'listen udp *:53 users:(("dnscrypt-proxy",pid=445,fd=5))',
        "listen-tcp": 'listen tcp *:53 users:(("dnscrypt-proxy",pid=445,fd=6))',
        "table": "table sysdns present",
        "guard": "table sysdns_guard present",
        "chain": "redirect-chain present",
        "rule": "redirect-rule present",
        "input": "input-accept present",
        "uplink": "uplink eth0 up",
        "route": "route default present",
        "probe": "probe rcode 0",
        "cert": "cert lab-dnscrypt " + cert_answer((NOW - 3600, NOW + 86400)),
        "log1": f"log {NOW - 100} [2026-12-04 23:29:11] [NOTICE] dnscrypt-proxy 2.1.8",
        "log2": f"log {NOW - 99} [2026-12-04 23:29:11] [NOTICE] [lab-dnscrypt] OK (DNSCrypt) - rtt: 1ms",
        "log3": f"log {NOW - 90} [2026-12-04 23:29:17] [NOTICE] dnscrypt-proxy is ready - live servers: 1",
    }
    for key, value in replace.items():
        if value is None:
            lines.pop(key)
        else:
            lines[key] = value
    return "\n".join(lines.values()) + "\n"


def window(**delta):
    values = {"redirected": 10, "forwarded": 0, "leak_dropped": 0, "leaked": 0, "upstream_replies": 4}
    values.update(delta)
    return {
        "qube": "sys-dns",
        "delta": values,
        "results": {"personal": {"www.lab.test": {"ok": True, "detail": "192.0.2.80"}}},
        "skipped": [],
        "lookups": 2,
        "upstream_probes": ["sysdns-probe-x.www.lab.test"],
        "upstream_rcodes": [3],
        "upstream_rcode": 3,
    }


def facts(report=None, **overrides):
    """Return the facts of a healthy sys-dns, with overrides."""
    base = {
        "qube": "sys-dns",
        "netvm": "sys-net",
        "rewired": ["sys-firewall"],
        "row": qube("sys-dns", state="Running", netvm="sys-net", provides_network=True),
        "chain": {"ok": True, "problems": [], "seen": {"sys-dns": {"netvm": "sys-net", "provides_network": True}}},
        "bypass": [],
        "report": diagnose_module.parse_report(report if report is not None else report_text()),
        "dom0_clock": NOW,
        "servers": copy.deepcopy(SERVERS),
        "max_clients": 250,
        "window": window(),
        "window_error": None,
    }
    base.update(overrides)
    return base


def by_check(findings):
    return {item["check"]: item for item in findings}


def failing(findings):
    return {item["check"] for item in findings if item["status"] == "fail"}


# Certificates


def test_cert_query_asks_txt_of_provider():
    message = bytes.fromhex(diagnose_module.build_cert_query(PROVIDER, 0x1234))
    assert message[:2] == b"\x12\x34"
    assert b"\x0ednscrypt-cert" not in message
    assert b"\x0ddnscrypt-cert\x03lab\x04test\x00\x00\x10\x00\x01" in message


def test_cert_query_rejects_invalid_name():
    with pytest.raises(diagnose_module.SaltInvocationError, match="provider name"):
        diagnose_module.build_cert_query("a..b", 1)


# sysdns.parse_certificate_response reads the answers. tests/unit/test_status.py
# covers it with malformed input.


def test_cert_answer_parsed_by_status_parser():
    answer = cert_answer((NOW - 600, NOW + 600))
    status, certificates, reason = diagnose_module._certificate_status(answer, NOW)
    assert status == "valid"
    assert [(cert["valid_from"], cert["valid_until"]) for cert in certificates] == [(NOW - 600, NOW + 600)]
    assert reason == ""


def test_cert_query_rejected_as_answer():
    query = diagnose_module.build_cert_query(PROVIDER, 1)
    status, certificates, reason = diagnose_module._certificate_status(query, NOW)
    assert status == "unreadable"
    assert certificates == []
    assert reason == "the message is a query, not a response"


# The report


def test_report_parsed():
    report = diagnose_module.parse_report(report_text())
    assert report["clock"] == NOW
    assert report["service"] == {"active": "active", "sub": "running", "pid": 445, "restarts": 0}
    assert [(item["proto"], item["process"]) for item in report["listen"]] == [
        ("udp", "dnscrypt-proxy"),
        ("tcp", "dnscrypt-proxy"),
    ]
    assert report["tables"] == {"sysdns": True, "sysdns_guard": True}
    assert report["redirect_rule"] is True
    assert report["probe_rcode"] == 0
    assert report["certs"]["lab-dnscrypt"]
    assert report["log"][0] == (NOW - 100, "[2026-12-04 23:29:11] [NOTICE] dnscrypt-proxy 2.1.8")


def test_report_without_lines_is_not_healthy():
    report = diagnose_module.parse_report("")
    assert report["service"] is None
    assert report["redirect_rule"] is None
    assert report["probe_rcode"] is None


def test_log_counts_recent_refusals_only():
    lines = [
        (NOW - 2000, "[WARNING] Too many incoming connections (max=2)"),
        (NOW - 10, "[WARNING] Too many incoming connections (max=2)"),
        (NOW - 5, "[WARNING] Too many incoming connections (max=2)"),
    ]
    logs = diagnose_module.log_facts(lines, NOW)
    assert logs["too_many"] == 2
    assert logs["max_clients"] == 2


def test_log_forgets_refusals_before_restart():
    lines = [
        (NOW - 60, "[WARNING] Too many incoming connections (max=2)"),
        (NOW - 50, "Started dnscrypt-proxy.service - DNSCrypt client proxy"),
        (NOW - 49, "[NOTICE] dnscrypt-proxy 2.1.8"),
    ]
    logs = diagnose_module.log_facts(lines, NOW)
    assert logs["too_many"] == 0
    assert logs["max_clients"] is None


def test_log_resets_servers_at_restart():
    lines = [
        (NOW - 50, "[NOTICE] [lab-dnscrypt] OK (DNSCrypt) - rtt: 1ms"),
        (NOW - 40, "[NOTICE] dnscrypt-proxy 2.1.8"),
        (NOW - 39, "[NOTICE] [lab-doh] OK (DoH) - rtt: 0ms"),
        (NOW - 30, "[NOTICE] dnscrypt-proxy is waiting for at least one server to be reachable"),
    ]
    logs = diagnose_module.log_facts(lines, NOW)
    assert logs["servers_ok"] == {"lab-doh"}
    assert logs["live_servers"] == 0


# Netvm chains


def estate(**netvms):
    rows = {
        "dom0": qube("dom0", klass="AdminVM", state="Running"),
        "sys-net": qube("sys-net", state="Running", provides_network=True),
        "sys-dns": qube("sys-dns", state="Running", netvm="sys-net", provides_network=True),
        "sys-firewall": qube("sys-firewall", state="Running", netvm="sys-dns", provides_network=True),
        "personal": qube("personal", state="Running", netvm="sys-firewall"),
        "sys-whonix": qube("sys-whonix", state="Running", netvm="sys-net", provides_network=True),
        "anon-whonix": qube("anon-whonix", netvm="sys-whonix"),
        "vault": qube("vault"),
    }
    for name, netvm in netvms.items():
        rows.setdefault(name, qube(name))["netvm"] = netvm
    return rows


def test_bypass_none_on_default_estate():
    assert diagnose_module.bypassing_qubes(estate(), "sys-dns") == []


def test_bypass_client_on_sys_net():
    assert diagnose_module.bypassing_qubes(estate(work="sys-net"), "sys-dns") == [("work", ["work", "sys-net"])]


def test_bypass_through_network_provider():
    found = diagnose_module.bypassing_qubes(estate(**{"sys-vpn": "sys-net", "work": "sys-vpn"}), "sys-dns")
    assert found == [("sys-vpn", ["sys-vpn", "sys-net"]), ("work", ["work", "sys-vpn", "sys-net"])]


def test_bypass_upstream_of_service_qube_exempt():
    rows = estate(**{"sys-vpn": "sys-net"})
    rows["sys-dns"]["netvm"] = "sys-vpn"
    assert diagnose_module.bypassing_qubes(rows, "sys-dns") == []


def test_bypass_netvm_loop_terminates():
    assert diagnose_module.bypassing_qubes(estate(a="b", b="a"), "sys-dns") == [("a", ["a", "b"]), ("b", ["b", "a"])]


# Classification


def test_healthy_all_ok():
    findings = diagnose_module.classify(facts())
    assert {item["status"] for item in findings} == {"ok"}
    result, lines = diagnose_module.summarize(findings)
    assert result is True
    assert lines[-1] == "result: all checks passed"


def test_missing_qube_skips_rest():
    findings = by_check(diagnose_module.classify({**facts(row=None), "report": None}))
    assert findings["qube sys-dns"]["status"] == "fail"
    assert "state.sls qubes.network.sys-dns" in findings["qube sys-dns"]["fix"]
    assert findings["upstream"]["detail"] == "sys-dns does not exist"


def test_halted_qube_not_started_and_rest_skipped():
    row = qube("sys-dns", state="Halted", netvm="sys-net", provides_network=True)
    findings = diagnose_module.classify({**facts(row=row), "report": None})
    checks = by_check(findings)
    assert failing(findings) == {"qube sys-dns"}
    assert checks["qube sys-dns"]["fix"] == "qvm-start sys-dns"
    assert checks["clients resolve"]["status"] == "skip"


def test_chain_fault_gives_qvm_prefs_fix():
    chain = {
        "ok": False,
        "problems": ["sys-firewall: netvm is sys-net, expected sys-dns"],
        "seen": {"sys-dns": {"netvm": "sys-net", "provides_network": True}, "sys-firewall": {"netvm": "sys-net"}},
    }
    checks = by_check(diagnose_module.classify(facts(chain=chain)))
    assert checks["netvm chain"]["status"] == "fail"
    assert checks["netvm chain"]["fix"] == "qvm-prefs sys-firewall netvm sys-dns"


def test_chain_fault_of_service_qube():
    chain = {
        "ok": False,
        "problems": ["sys-dns: netvm is None, expected sys-net", "sys-dns: provides_network is False, expected True"],
        "seen": {"sys-dns": {"netvm": None, "provides_network": False}, "sys-firewall": {"netvm": "sys-dns"}},
    }
    checks = by_check(diagnose_module.classify(facts(chain=chain)))
    assert checks["netvm chain"]["fix"] == "qvm-prefs sys-dns netvm sys-net; qvm-prefs sys-dns provides_network True"


def test_cut_report_fails_service_check():
    checks = by_check(diagnose_module.classify(facts("clock 1\n", window=None)))
    assert checks["dnscrypt-proxy"]["status"] == "fail"
    assert checks["dnscrypt-proxy"]["cause"] == "the report was cut short"


def test_report_without_clock_skips_clock():
    checks = by_check(diagnose_module.classify(facts(report_text(clock=None))))
    assert checks["clock"]["status"] == "skip"


def test_bypass_named_with_fix():
    findings = diagnose_module.classify(facts(bypass=[("work", ["work", "sys-net"])], window=window(redirected=1)))
    checks = by_check(findings)
    assert failing(findings) == {"bypass", "no plaintext DNS"}
    assert checks["bypass"]["detail"] == "work: work -> sys-net"
    assert "qvm-prefs work netvm sys-firewall" in checks["bypass"]["fix"]
    assert checks["no plaintext DNS"]["cause"] == checks["bypass"]["cause"]


def test_stopped_service_named():
    text = report_text(service="service inactive dead 0 0", **{"listen-udp": None, "listen-tcp": None})
    findings = diagnose_module.classify(facts(text, window=None))
    checks = by_check(findings)
    assert failing(findings) == {"dnscrypt-proxy"}
    assert "not running" in checks["dnscrypt-proxy"]["cause"]
    assert checks["port 53"]["status"] == "skip"
    assert checks["upstream"]["status"] == "skip"
    assert checks["clients resolve"]["detail"] == "skipped: dnscrypt-proxy failed"


def test_failed_service_quotes_fatal_log():
    text = report_text(
        service="service activating auto-restart 0 7",
        log3=f"log {NOW - 5} [2026-12-04 23:29:17] [FATAL] Unsupported key in configuration file: [foo]",
        **{"listen-udp": None, "listen-tcp": None},
    )
    checks = by_check(diagnose_module.classify(facts(text, window=None)))
    assert "Unsupported key in configuration file" in checks["dnscrypt-proxy"]["cause"]
    assert "7 restarts" in checks["dnscrypt-proxy"]["detail"]


def test_port_taken_by_other_program():
    text = report_text(
        service="service activating auto-restart 0 3",
        log3=f"log {NOW - 5} [FATAL] listen udp [::]:53: bind: address already in use",
        **{"listen-udp": 'listen udp 127.0.0.53:53 users:(("systemd-resolve",pid=9,fd=5))', "listen-tcp": None},
    )
    checks = by_check(diagnose_module.classify(facts(text, window=None)))
    assert checks["dnscrypt-proxy"]["cause"].startswith("port 53 is taken by systemd-resolve")


def test_not_listening_named():
    text = report_text(**{"listen-udp": None, "listen-tcp": None})
    findings = diagnose_module.classify(facts(text, window=None))
    checks = by_check(findings)
    assert failing(findings) == {"port 53"}
    assert "over UDP and TCP" in checks["port 53"]["detail"]
    assert checks["upstream"]["status"] == "skip"


def test_not_listening_names_holder():
    text = report_text(**{"listen-tcp": 'listen tcp 0.0.0.0:53 users:(("dnsmasq",pid=9,fd=5))'})
    checks = by_check(diagnose_module.classify(facts(text, window=None)))
    assert checks["port 53"]["detail"].endswith("port 53 is held by dnsmasq (tcp)")


@pytest.mark.parametrize(
    ("replace", "seen"),
    [
        (
            {"table": "table sysdns missing", "chain": "redirect-chain missing", "rule": "redirect-rule missing"},
            "is missing",
        ),
        ({"chain": "redirect-chain missing", "rule": "redirect-rule missing"}, "lacks chain redirect_downstream"),
        ({"rule": "redirect-rule missing"}, "lacks the redirect rule"),
        ({"input": "input-accept missing"}, "custom-input"),
    ],
)
def test_redirect_faults_named(replace, seen):
    findings = diagnose_module.classify(facts(report_text(**replace), window=None))
    checks = by_check(findings)
    assert failing(findings) == {"redirect"}
    assert seen in checks["redirect"]["detail"]
    assert "apply-firewall" in checks["redirect"]["fix"]


def test_missing_table_mentions_guard():
    text = report_text(table="table sysdns missing", guard="table sysdns_guard missing")
    checks = by_check(diagnose_module.classify(facts(text, window=None)))
    assert "(table inet sysdns_guard is missing too, so nothing stops it from leaving)" in checks["redirect"]["cause"]
    assert checks["redirect"]["fix"].startswith("re-run the build")
    assert "qvm-run -u root sys-dns /usr/lib/sysdns/apply-firewall" not in checks["redirect"]["fix"]


def test_missing_table_with_guard_drops():
    text = report_text(table="table sysdns missing", chain="redirect-chain missing", rule="redirect-rule missing")
    findings = diagnose_module.classify(facts(text, window=None))
    checks = by_check(findings)
    assert "(the guard table inet sysdns_guard drops it, so it does not leave)" in checks["redirect"]["cause"]
    assert checks["no plaintext DNS"]["status"] == "skip"
    assert failing(findings) == {"redirect"}


def test_missing_tables_fail_plaintext_check():
    text = report_text(
        table="table sysdns missing",
        guard="table sysdns_guard missing",
        chain="redirect-chain missing",
        rule="redirect-rule missing",
    )
    findings = diagnose_module.classify(facts(text, window=None))
    plaintext = by_check(findings)["no plaintext DNS"]
    assert failing(findings) == {"redirect", "no plaintext DNS"}
    assert plaintext["detail"] == "tables inet sysdns and inet sysdns_guard are both missing in sys-dns"
    assert plaintext["cause"].startswith("nothing stops port-53 traffic from leaving sys-dns")
    assert plaintext["fix"] == "re-run the build: sudo qubesctl --show-output state.sls qubes.network.sys-dns"


@pytest.mark.parametrize(
    "replace",
    [
        {"table": "table sysdns missing", "chain": "redirect-chain missing", "rule": "redirect-rule missing"},
        {"rule": "redirect-rule missing"},
        {"input": "input-accept missing"},
    ],
)
def test_redirect_fix_for_edited_file_is_build(replace):
    findings = diagnose_module.classify(facts(report_text(**replace), window=None, drift=["sysdns.nft"]))
    redirect = by_check(findings)["redirect"]
    assert redirect["fix"].startswith("re-run the build, which restores /rw/config/sysdns from the pillar")
    assert "sudo qubesctl --show-output state.sls qubes.network.sys-dns" in redirect["fix"]
    assert "qvm-run -u root sys-dns /usr/lib/sysdns/apply-firewall" not in redirect["fix"]
    assert redirect["detail"].endswith("; /rw/config/sysdns differs from what the pillar renders: sysdns.nft")
    for item in findings:
        assert "qvm-run -u root sys-dns /usr/lib/sysdns/apply-firewall" not in item["fix"], item


def test_config_drift_compares_digests():
    wanted = {"sysdns.nft": "table inet sysdns {}\n", "dnscrypt-proxy.toml": "listen = 1\n"}
    digests = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in wanted.items()}
    listed = "".join(f"file {digest} {name}\n" for name, digest in digests.items()) + "files listed\n"
    assert diagnose_module.config_drift(diagnose_module.parse_report(listed), wanted) == []
    edited = listed.replace(digests["sysdns.nft"], "0" * 64)
    assert diagnose_module.config_drift(diagnose_module.parse_report(edited), wanted) == ["sysdns.nft"]
    missing = "".join(line + "\n" for line in listed.splitlines() if "sysdns.nft" not in line)
    assert diagnose_module.config_drift(diagnose_module.parse_report(missing), wanted) == ["sysdns.nft"]
    unlisted = listed.replace("files listed\n", "")
    assert diagnose_module.config_drift(diagnose_module.parse_report(unlisted), wanted) is None


def test_cert_not_yet_valid_is_clock_skew():
    text = report_text(cert="cert lab-dnscrypt " + cert_answer((NOW + 7200, NOW + 90000)))
    findings = diagnose_module.classify(facts(text))
    checks = by_check(findings)
    assert failing(findings) == {"clock"}
    assert checks["clock"]["cause"].startswith("clock skew: the system clock is behind")
    assert "7200 s after the qube's clock" in checks["clock"]["detail"]


def test_expired_cert_is_clock_ahead_or_expired():
    text = report_text(cert="cert lab-dnscrypt " + cert_answer((NOW - 90000, NOW - 600)))
    checks = by_check(diagnose_module.classify(facts(text)))
    assert "clock is ahead, or the server let its certificate expire" in checks["clock"]["cause"]


def test_skewed_qube_clock_names_offset():
    text = report_text(cert="cert lab-dnscrypt " + cert_answer((NOW - 3600, NOW + 86400)))
    checks = by_check(diagnose_module.classify(facts(text, dom0_clock=NOW - 2 * 86400)))
    assert checks["clock"]["status"] == "warn"
    assert "172800 s ahead of dom0's" in checks["clock"]["detail"]
    assert "qvm-sync-clock" in checks["clock"]["fix"]


def test_skewed_qube_clock_with_invalid_cert_fails():
    text = report_text(cert="cert lab-dnscrypt " + cert_answer((NOW - 3 * 86400, NOW - 2 * 86400)))
    checks = by_check(diagnose_module.classify(facts(text, dom0_clock=NOW - 2 * 86400 - 600)))
    assert checks["clock"]["status"] == "fail"
    assert checks["clock"]["fix"].startswith("qvm-run -u root sys-dns qvm-sync-clock")


def test_one_valid_certificate_is_enough():
    text = report_text(cert="cert lab-dnscrypt " + cert_answer((NOW - 90000, NOW - 600), (NOW - 600, NOW + 600)))
    checks = by_check(diagnose_module.classify(facts(text)))
    assert checks["clock"]["status"] == "ok"
    assert "DNSCrypt certificates valid at its clock: lab-dnscrypt" in checks["clock"]["detail"]


def test_unsupported_version_is_not_valid():
    # dnscrypt-proxy skips a certificate of es-version 3, so only the expired one counts.
    answer = cert_answer((NOW - 90000, NOW - 600), (NOW - 600, NOW + 600), es_versions=(2, 3))
    checks = by_check(diagnose_module.classify(facts(report_text(cert="cert lab-dnscrypt " + answer))))
    assert checks["clock"]["status"] == "fail"
    assert "lab-dnscrypt: certificate expired at" in checks["clock"]["detail"]


def test_only_unsupported_versions_rejected():
    answer = cert_answer((NOW - 600, NOW + 600), es_versions=(3,))
    checks = by_check(diagnose_module.classify(facts(report_text(cert="cert lab-dnscrypt " + answer))))
    assert checks["clock"]["status"] == "skip"
    assert checks["clock"]["detail"].endswith(
        "; certificate answer rejected from lab-dnscrypt (the response contains no DNSCrypt "
        "certificate: certificate 1 has es-version 3, expected 1 or 2)" + SKIPPED_CLOCK
    )


def test_unreadable_answer_named_in_clock():
    text = report_text(cert="cert lab-dnscrypt 8180")
    checks = by_check(diagnose_module.classify(facts(text)))
    assert checks["clock"]["status"] == "skip"
    assert "no certificate answer" not in checks["clock"]["detail"]
    assert checks["clock"]["detail"].endswith(
        "; certificate answer rejected from lab-dnscrypt (the response is shorter than a DNS header (2 bytes))"
        + SKIPPED_CLOCK
    )


def test_clock_without_certificate_answer_skipped():
    checks = by_check(diagnose_module.classify(facts(report_text(cert="cert lab-dnscrypt none"))))
    assert checks["clock"]["status"] == "skip"
    assert "; no certificate answer from lab-dnscrypt" in checks["clock"]["detail"]
    assert checks["clock"]["detail"].endswith(SKIPPED_CLOCK)


def test_clock_without_dnscrypt_server_ok():
    checks = by_check(diagnose_module.classify(facts(servers=[])))
    assert checks["clock"]["status"] == "ok"


def test_max_clients_named():
    refusals = {
        f"log{index}": f"log {NOW - index} [WARNING] Too many incoming connections (max=2)" for index in range(4, 9)
    }
    text = report_text(probe="probe rcode none", **refusals)
    findings = diagnose_module.classify(facts(text, max_clients=2, window=window(upstream_replies=0)))
    checks = by_check(findings)
    assert failing(findings) == {"max_clients", "upstream", "encrypted upstream sessions"}
    assert "5 times" in checks["max_clients"]["detail"]
    assert checks["upstream"]["cause"].startswith("max_clients exhausted")
    assert checks["encrypted upstream sessions"]["fix"] == "fix max_clients, upstream first"


@pytest.mark.parametrize("server", ["10.137.0.5:53", "10.137.0.5", "[fd09:24ef:4179::a89:5]:53", "127.0.0.1:53"])
def test_forwarding_loop_named_over_max_clients(server):
    refusals = {
        f"log{index}": f"log {NOW - index} [WARNING] Too many incoming connections (max=250)" for index in range(4, 9)
    }
    own = "\n".join(
        ["address 127.0.0.1", "address ::1", "address 10.137.0.5", "address fd09:24ef:4179::a89:5"]
        + [f"forward lan 192.168.1.1:53,{server}", "forward corp 192.168.1.2:53"]
    )
    text = report_text(**refusals) + own + "\n"
    checks = by_check(diagnose_module.classify(facts(text)))
    max_clients = checks["max_clients"]
    assert max_clients["status"] == "fail"
    assert max_clients["cause"].startswith(
        f"forwarding loop: the forwarding rules (zone lan -> {server}) name an address of sys-dns itself"
    )
    assert "sysdns:dnscrypt:forwarding_rules" in max_clients["fix"]
    assert "raise sysdns:dnscrypt:max_clients" not in max_clients["fix"]


def test_forwarding_to_other_server_keeps_max_clients():
    refusals = {
        f"log{index}": f"log {NOW - index} [WARNING] Too many incoming connections (max=250)" for index in range(4, 9)
    }
    text = report_text(**refusals) + "address 10.137.0.5\nforward lan 10.137.0.50:53\n"
    checks = by_check(diagnose_module.classify(facts(text)))
    assert checks["max_clients"]["cause"].startswith("max_clients exhausted")
    assert "raise sysdns:dnscrypt:max_clients" in checks["max_clients"]["fix"]


def test_upstream_blocked_named():
    text = report_text(probe="probe rcode 2", cert="cert lab-dnscrypt none")
    findings = diagnose_module.classify(facts(text, window=window(upstream_replies=0)))
    checks = by_check(findings)
    assert failing(findings) == {"upstream", "encrypted upstream sessions"}
    assert checks["upstream"]["cause"].startswith("no upstream reachable: sys-dns's netvm (sys-net) is set")
    assert "no DNSCrypt certificate answer from lab-dnscrypt" in checks["upstream"]["detail"]
    assert "no certificate answer from lab-dnscrypt" in checks["clock"]["detail"]


def test_upstream_without_netvm_named():
    row = qube("sys-dns", state="Running", netvm=None, provides_network=True)
    text = report_text(probe="probe rcode none", route="route default missing")
    checks = by_check(diagnose_module.classify(facts(text, row=row, window=None)))
    assert checks["upstream"]["cause"] == "sys-dns has no netvm, so no upstream resolver is reachable"
    assert checks["upstream"]["fix"] == "qvm-prefs sys-dns netvm sys-net"


def test_upstream_without_uplink_named():
    text = report_text(probe="probe rcode none", uplink="uplink eth0 down")
    checks = by_check(diagnose_module.classify(facts(text, window=None)))
    assert checks["upstream"]["cause"] == "sys-dns has no working link to its netvm"


def test_upstream_failing_from_clock_skew():
    text = report_text(
        probe="probe rcode 2",
        cert="cert lab-dnscrypt " + cert_answer((NOW + 7200, NOW + 90000)),
        log2=f"log {NOW - 99} [NOTICE] [lab-dnscrypt] should upgrade to XChaCha20 for encryption",
    )
    findings = diagnose_module.classify(facts(text, window=None))
    checks = by_check(findings)
    assert failing(findings) == {"clock", "upstream"}
    assert checks["upstream"]["cause"].startswith("clock skew")


def test_measure_error_reported_as_skip():
    checks = by_check(diagnose_module.classify(facts(window=None, window_error="cannot read the counters")))
    assert checks["clients resolve"]["status"] == "skip"
    assert checks["clients resolve"]["detail"] == "cannot read the counters"


def test_unexplained_leak_gets_own_cause():
    findings = diagnose_module.classify(facts(window=window(leaked=3)))
    checks = by_check(findings)
    assert failing(findings) == {"no plaintext DNS"}
    assert "looks complete" in checks["no plaintext DNS"]["cause"]


def test_summary_lists_cause_and_fix():
    text = report_text(rule="redirect-rule missing")
    result, lines = diagnose_module.summarize(diagnose_module.classify(facts(text, window=None)))
    assert result is False
    assert lines[-1] == "result: failed: redirect"
    assert any(line.startswith("FAIL redirect:") and "| fix: qvm-run" in line for line in lines)


# Collection


class DiagnoseQubes(FakeQubes):
    """FakeQubes whose sys-dns runs the diagnose script."""

    def __init__(self, qubes, output, retcode=0):
        super().__init__(qubes)
        self.output = output
        self.retcode = retcode

    def run(self, name, command, user="root", stdin=None, autostart=True, timeout=900, check=True):
        if command == diagnose_module.DIAGNOSE_COMMAND:
            self.runs.append((name, command, stdin, timeout))
            return {"retcode": self.retcode, "stdout": self.output, "stderr": ""}
        return super().run(name, command, user, stdin, autostart, timeout, check)


def run_diagnose(qubes, pillar, retcode=0, output=None):
    fake = DiagnoseQubes(qubes.values(), report_text(clock=None) if output is None else output, retcode)
    context = {}
    measured = []
    salt = dict(SALT)
    salt.update(fake.salt_functions())
    salt["sysdns_config.validate"] = lambda: config_module.validate(pillar)
    salt["sysdns_config.config_files"] = config_module.config_files
    checks_module.__salt__ = salt
    salt["sysdns.chain"] = checks_module.chain
    salt["sysdns.measure"] = lambda *args, **kwargs: measured.append((args, kwargs)) or window()
    diagnose_module.__salt__ = salt
    diagnose_module.__context__ = context
    try:
        return diagnose_module.run(), fake, context, measured
    finally:
        diagnose_module.__salt__ = SALT


def lab_like_pillar():
    stamp = config_module.encode_stamp(
        "dnscrypt", address="192.0.2.2:443", props_value=7, public_key=bytes(32), provider_name=PROVIDER
    )
    return {"dnscrypt": {"resolvers": [{"name": "lab-dnscrypt", "stamp": stamp}]}}


def test_run_uses_one_qvm_run_with_requests():
    data, fake, context, measured = run_diagnose(estate(), lab_like_pillar())
    assert len(fake.runs) == 1
    name, command, stdin, timeout = fake.runs[0]
    assert (name, command) == ("sys-dns", "/usr/lib/sysdns/diagnose")
    assert timeout == diagnose_module.diagnose_timeout(1)
    assert stdin.splitlines()[0].startswith("probe sysdns-diagnose-")
    assert stdin.splitlines()[1].startswith("cert lab-dnscrypt 192.0.2.2 443 5d00")
    assert measured[0][1] == {"start_clients": False, "refresh": True}
    assert "retcode" not in context
    assert data["result"] is True, data["summary"]


def test_dnscrypt_servers_only_used_and_direct():
    pillar = lab_like_pillar()
    direct = pillar["dnscrypt"]["resolvers"][0]
    pillar["dnscrypt"]["resolvers"] = [direct] + [
        {
            "name": name,
            "stamp": config_module.encode_stamp(
                "dnscrypt", address=address, props_value=7, public_key=bytes(32), provider_name=PROVIDER
            ),
        }
        for name, address in (("unused", "192.0.2.3:443"), ("routed", "192.0.2.4:443"))
    ]
    pillar["dnscrypt"]["server_names"] = ["lab-dnscrypt", "routed"]
    pillar["dnscrypt"]["relays"] = [
        {"name": "relay", "stamp": config_module.encode_stamp("dnscrypt-relay", "192.0.2.9:443")}
    ]
    pillar["dnscrypt"]["anonymized_routes"] = [{"server_name": "routed", "via": ["relay"]}]
    servers = diagnose_module.dnscrypt_servers(config_module.validate(pillar))
    assert [server["name"] for server in servers] == ["lab-dnscrypt"]


def test_run_does_not_start_halted_qube():
    qubes = estate()
    qubes["sys-dns"]["state"] = "Halted"
    data, fake, context, measured = run_diagnose(qubes, lab_like_pillar())
    assert fake.runs == []
    assert fake.changes == []
    assert measured == []
    assert context["retcode"] == 1
    assert data["result"] is False


def test_diagnose_timeout_covers_every_fetch():
    # 32 DNSCrypt resolvers whose fetches each time out, plus a probe that times out,
    # must still fit in the time dom0 waits.
    assert diagnose_module.diagnose_timeout(32) >= 32 * 6 + 15 + 30
    assert diagnose_module.diagnose_timeout(0) < diagnose_module.diagnose_timeout(1)


@pytest.mark.parametrize(
    "retcode, advice",
    [(127, "re-apply qubes.network.sys-dns to install it"), (1, "check that sys-dns responds to qvm-run")],
)
def test_helper_failure_names_fix(retcode, advice):
    with pytest.raises(Exception, match="(?s)exit code {}: .*; {}".format(retcode, advice)):
        run_diagnose(estate(), lab_like_pillar(), retcode=retcode)


def test_run_gives_build_fix_for_edited_file():
    pillar = lab_like_pillar()
    wanted = config_module.config_files(config_module.validate(pillar))
    lines = [f"file {hashlib.sha256(text.encode()).hexdigest()} {name}" for name, text in wanted.items()]
    lines = [line.replace(line.split()[1], "0" * 64) if line.endswith(" sysdns.nft") else line for line in lines]
    output = "\n".join(lines + ["files listed"]) + "\n" + report_text(clock=None, rule="redirect-rule missing")
    data, fake, context, measured = run_diagnose(estate(), pillar, output=output)
    redirect = by_check(data["findings"])["redirect"]
    assert "sysdns.nft" in redirect["detail"]
    assert redirect["fix"].startswith("re-run the build")
    assert measured == []
    assert context["retcode"] == 1
