"""Tests of sysdns.status: parsing the status helper's output and building the status dict."""

import ast
import hashlib
import pathlib
import struct

import pytest

from tests.unit.sysdns_fakes import FakeQubes, config_module, load_salt_module, qube

NOW = 1_800_000_000
DAY = 86400

# Properties as the default pillar requires: DNSSEC, no logs, no filter.
PROPS = {"dnssec": True, "nolog": True, "nofilter": True}
DNSCRYPT_STAMP = config_module.encode_stamp(
    "dnscrypt", "192.0.2.2:443", props=PROPS, public_key="ab" * 32, provider_name="2.dnscrypt-cert.lab.test"
)
DNSCRYPT6_STAMP = config_module.encode_stamp(
    "dnscrypt", "[2001:db8::2]:8443", props=PROPS, public_key="cd" * 32, provider_name="2.dnscrypt-cert.six.test"
)
DOH_STAMP = config_module.encode_stamp("doh", "192.0.2.3", props=PROPS, host="doh.lab.test", path="/dns-query")
RELAY_STAMP = config_module.encode_stamp("dnscrypt-relay", "192.0.2.9:443")

PILLAR = {
    "dnscrypt": {
        "resolvers": [
            {"name": "lab-dnscrypt", "stamp": DNSCRYPT_STAMP},
            {"name": "lab-doh", "stamp": DOH_STAMP},
        ]
    }
}

COUNTERS = """table inet {table} {{
	counter {name} {{
		packets {packets} bytes 100
	}}
	counter other {{
		packets 1 bytes 1
	}}
}}"""

HEALTHY_LOG = [
    "[2026-12-04 23:29:14] [NOTICE] [lab-dnscrypt] OK (DNSCrypt) - rtt: 3ms",
    "[2026-12-04 23:29:14] [NOTICE] [lab-doh] OK (DoH) - rtt: 1ms",
    "[2026-12-04 23:29:20] [NOTICE] Sorted latencies:",
    "[2026-12-04 23:29:20] [NOTICE] -     1ms lab-doh",
    "[2026-12-04 23:29:20] [NOTICE] -     3ms lab-dnscrypt",
    "[2026-12-04 23:29:20] [NOTICE] Server with the lowest initial latency: lab-doh (rtt: 1ms)",
    "[2026-12-04 23:29:20] [NOTICE] dnscrypt-proxy is ready - live servers: 2",
]


def certificate(serial, valid_from, valid_until, version=2):
    """Return the bytes of a DNSCrypt certificate (the signature is not checked)."""
    return (
        b"DNSC"
        + struct.pack(">HH", version, 0)
        + bytes(64)
        + bytes(32)
        + b"clientmg"
        + struct.pack(">III", serial, valid_from, valid_until)
    )


def txt_rdata(data, split=255):
    chunks = [data[index : index + split] for index in range(0, len(data), split)]
    return b"".join(bytes([len(chunk)]) + chunk for chunk in chunks)


# The question of a certificate query: the provider name, type TXT (16), class IN.
QUESTION = b"\x012\x0ddnscrypt-cert\x03lab\x04test\x00" + struct.pack(">HH", 16, 1)


def dns_response(certificates, rcode=0, split=255, extra_answers=()):
    """Return the hexadecimal text of a TXT response holding ``certificates``."""
    answers = list(extra_answers)
    for cert in certificates:
        rdata = txt_rdata(cert, split)
        # A compression pointer to the question name at offset 12.
        answers.append(b"\xc0\x0c" + struct.pack(">HHIH", 16, 1, 3600, len(rdata)) + rdata)
    header = struct.pack(">HBBHHHH", 0x1234, 0x84, rcode, 1, len(answers), 0, 0)
    return (header + QUESTION + b"".join(answers)).hex()


def status_output(
    files,
    service="active",
    firewall="loaded",
    ruleset="as-loaded",
    guard="loaded",
    guard_ruleset="as-loaded",
    accept="present",
    log=HEALTHY_LOG,
    certificates=None,
    clock=NOW,
):
    lines = ["file {} {}".format(hashlib.sha256(content.encode()).hexdigest(), name) for name, content in files.items()]
    lines += [
        "service " + service,
        "firewall " + firewall,
        "ruleset " + ruleset,
        "guard " + guard,
        "guard-ruleset " + guard_ruleset,
        "input-accept " + accept,
        "version 2.1.8",
        "clock {}".format(clock),
        "begin counters inet sysdns",
        COUNTERS.format(table="sysdns", name="redirected", packets=42),
        "end counters inet sysdns",
        "begin counters inet sysdns_guard",
        COUNTERS.format(table="sysdns_guard", name="output_dropped", packets=7),
        "end counters inet sysdns_guard",
    ]
    lines += ["log " + line for line in log]
    if certificates is None:
        certificates = {"lab-dnscrypt": dns_response([certificate(1, NOW - DAY, NOW + 10 * DAY)])}
    for name, value in certificates.items():
        lines.append("certificate {} {}".format(name, value))
    return "\n".join(lines) + "\n"


class StatusQubes(FakeQubes):
    """FakeQubes whose sys-dns answers the status helper with ``self.status_text``."""

    def __init__(self, qubes):
        super().__init__(qubes)
        self.status_text = ""
        self.status_retcode = 0
        self.list_calls = 0

    def list_qubes(self, refresh=False):
        self.list_calls += 1
        return super().list_qubes(refresh)

    def run(self, name, command, user="root", stdin=None, autostart=True, timeout=900, check=True):
        if command == "/usr/lib/sysdns/status":
            self.runs.append((name, command, stdin, autostart))
            return {"retcode": self.status_retcode, "stdout": self.status_text, "stderr": "status: failed\n"}
        return super().run(name, command, user, stdin, autostart, timeout, check)


QUBES = [
    qube("sys-net", state="Running", provides_network=True),
    qube("sys-dns", state="Running", netvm="sys-net", provides_network=True, template="tpl-sys-dns"),
    qube("sys-firewall", state="Running", netvm="sys-dns", provides_network=True),
    qube("personal", state="Running", netvm="sys-firewall"),
]


def module_for(fake, pillar=PILLAR):
    functions = fake.salt_functions()
    functions.update(
        {
            "sysdns_config.validate": config_module.validate,
            "sysdns_config.config_files": config_module.config_files,
            "sysdns_config.decode_stamp": config_module.decode_stamp,
            "sysdns_config.anonymized_resolvers": config_module.anonymized_resolvers,
            "pillar.get": lambda key, default=None: pillar,
        }
    )
    return load_salt_module("_modules/sysdns.py", __salt__=functions, __context__={})


def rendered_files(pillar=PILLAR):
    return config_module.config_files(config_module.validate(pillar))


@pytest.fixture(name="fake")
def fake_fixture():
    fake = StatusQubes(QUBES)
    fake.status_text = status_output(rendered_files())
    return fake


parse = load_salt_module("_modules/sysdns.py")


# Parsing the helper's output


def test_parse_status_output_reads_every_line():
    text = status_output({"a.toml": "x\n"}, certificates={"lab-dnscrypt": "abcd", "other": "none no answer"})
    parsed = parse.parse_status_output(text)

    assert parsed["files"] == {"a.toml": hashlib.sha256(b"x\n").hexdigest()}
    assert parsed["service"] == "active"
    assert parsed["ruleset"] == "as-loaded"
    assert parsed["input-accept"] == "present"
    assert parsed["version"] == "2.1.8"
    assert parsed["clock"] == NOW
    assert parsed["counters"]["inet sysdns"] == {"redirected": 42, "other": 1}
    assert parsed["counters"]["inet sysdns_guard"]["output_dropped"] == 7
    assert parsed["log"] == HEALTHY_LOG
    assert parsed["certificates"] == {"lab-dnscrypt": "abcd", "other": {"error": "no answer"}}


def test_parse_status_output_without_clock_or_tables():
    parsed = parse.parse_status_output("service inactive\nclock \nfirewall missing\n")

    assert parsed["clock"] is None
    assert parsed["counters"] == {}
    assert parsed["firewall"] == "missing"
    assert parsed["ruleset"] is None


def test_server_log_live_from_last_refresh():
    later = [
        "[2026-12-05 03:29:20] [NOTICE] Server with the lowest initial latency: lab-dnscrypt (rtt: 3ms)",
    ]
    view = parse.parse_server_log(HEALTHY_LOG + later)

    assert view["live"] == ["lab-dnscrypt"]
    assert view["reached"]["lab-doh"] == {"protocol": "DoH", "rtt_ms": 1}


def test_server_log_sorted_block():
    view = parse.parse_server_log(HEALTHY_LOG)

    assert view["live"] == ["lab-dnscrypt", "lab-doh"]
    assert view["reached"]["lab-dnscrypt"] == {"protocol": "DNSCrypt", "rtt_ms": 3}


def test_server_log_before_first_refresh():
    view = parse.parse_server_log(HEALTHY_LOG[:1])

    assert view["live"] is None
    assert list(view["reached"]) == ["lab-dnscrypt"]


def test_server_log_keeps_messages():
    view = parse.parse_server_log(
        [
            "[2026-12-04 23:29:14] [CRITICAL] [lab-doh] Certificate hash [00] not found",
            "[2026-12-04 23:29:14] [ERROR] No servers configured",
            "[2026-12-04 23:29:14] [NOTICE] Now listening to [::]:53 [UDP]",
        ]
    )

    assert view["messages"] == {"lab-doh": "CRITICAL Certificate hash [00] not found"}
    assert view["other"] == ["ERROR No servers configured"]
    assert view["live"] is None


# Certificates


def test_certificate_response_parsed():
    hex_text = dns_response([certificate(7, NOW - DAY, NOW + DAY, version=1)])

    parsed = parse.parse_certificate_response(hex_text)

    assert parsed == [
        {
            "serial": 7,
            "valid_from": NOW - DAY,
            "valid_until": NOW + DAY,
            "es_version": 1,
            "construction": "XSalsa20Poly1305",
        }
    ]


def test_certificate_split_over_strings():
    extra = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes(4)
    hex_text = dns_response([certificate(2, NOW, NOW + DAY)], split=100, extra_answers=[extra])

    parsed = parse.parse_certificate_response(hex_text)

    assert [cert["serial"] for cert in parsed] == [2]
    assert parsed[0]["construction"] == "XChacha20Poly1305"


def test_certificate_skips_unusable_records():
    # dnscrypt-proxy skips these records and uses the certificate after them.
    hex_text = dns_response(
        [
            b"v=spf1 -all",
            b"DNSX" + bytes(120),
            certificate(5, NOW, NOW + DAY, version=3),
            certificate(6, NOW + DAY, NOW),
            certificate(4, NOW, NOW + DAY),
        ]
    )

    parsed = parse.parse_certificate_response(hex_text)

    assert [cert["serial"] for cert in parsed] == [4]


def test_certificate_keeps_extensions():
    hex_text = dns_response([certificate(3, NOW, NOW + DAY) + b"extension data"])

    assert [cert["serial"] for cert in parse.parse_certificate_response(hex_text)] == [3]


def with_flags(hex_text, flags):
    """Return ``hex_text`` with the third header byte (QR, opcode, AA, TC, RD) set to ``flags``."""
    data = bytearray(bytes.fromhex(hex_text))
    data[2] = flags
    return data.hex()


VALID_RESPONSE = dns_response([certificate(1, NOW, NOW + DAY)])
# Offset of the first answer record, after the header (12 bytes) and the question.
ANSWER_OFFSET = 12 + len(QUESTION)


@pytest.mark.parametrize(
    ("hex_text", "reason"),
    [
        ("zz", "the response is not hexadecimal text"),
        (None, "the response is NoneType, not hexadecimal text"),
        ("0000", "shorter than a DNS header"),
        (with_flags(VALID_RESPONSE, 0x01), "the message is a query, not a response"),
        (dns_response([], rcode=3), "response code 3"),
        (dns_response([]), "^the response contains no DNSCrypt certificate$"),
        (dns_response([b"DNSX" + bytes(120)]), "starts with b'DNSX', not the certificate magic b'DNSC'"),
        (dns_response([b"DNSC" + bytes(60)]), "a TXT record of 64 bytes is shorter than a certificate \\(124 bytes\\)"),
        (dns_response([certificate(1, NOW, NOW + DAY, version=3)]), "certificate 1 has es-version 3, expected 1 or 2"),
        (dns_response([certificate(1, NOW, NOW)]), "certificate 1 ends \\(2027-01-15 08:00:00 UTC\\) before it starts"),
        (with_flags(dns_response([]), 0x86), "no DNSCrypt certificate \\(the server set the truncation flag\\)"),
        (VALID_RESPONSE[:70], "a name runs past the end of the message"),
        (VALID_RESPONSE[: 2 * (ANSWER_OFFSET - 2)], "a question runs past the end of the message"),
        (VALID_RESPONSE[: 2 * (ANSWER_OFFSET + 1)], "a name runs past the end of the message"),
        (VALID_RESPONSE[: 2 * (ANSWER_OFFSET + 8)], "an answer record runs past the end of the message"),
        (VALID_RESPONSE[:-2], "an answer record of 125 data bytes runs past the end of the message"),
    ],
    ids=[
        "not-hex",
        "not-text",
        "short",
        "query",
        "nxdomain",
        "no-answer",
        "bad-magic",
        "short-record",
        "es-version-3",
        "empty-window",
        "truncation-flag",
        "cut-in-question-name",
        "cut-in-question-type",
        "cut-in-pointer",
        "cut-in-record-header",
        "cut-in-record-data",
    ],
)
def test_certificate_response_rejected(hex_text, reason):
    with pytest.raises(ValueError, match=reason):
        parse.parse_certificate_response(hex_text)


def test_certificate_string_past_record():
    # One character-string claims 200 bytes inside a record of 125.
    rdata = bytes([200]) + certificate(1, NOW, NOW + DAY)
    record = b"\xc0\x0c" + struct.pack(">HHIH", 16, 1, 3600, len(rdata)) + rdata
    hex_text = dns_response([], extra_answers=[record])

    with pytest.raises(ValueError, match="a TXT string of 200 bytes runs past the end of its record"):
        parse.parse_certificate_response(hex_text)


def test_certificate_every_cut_rejected():
    data = bytes.fromhex(VALID_RESPONSE)
    for length in range(len(data)):
        with pytest.raises(ValueError):
            parse.parse_certificate_response(data[:length].hex())


def test_certificate_corrupt_bytes_rejected():
    # Every single-byte change either parses or raises ValueError, never another error.
    data = bytes.fromhex(dns_response([certificate(1, NOW, NOW + DAY), certificate(2, NOW, NOW + DAY)]))
    for index in range(len(data)):
        for value in (0x00, 0x3F, 0xC0, 0xFF):
            corrupt = data[:index] + bytes([value]) + data[index + 1 :]
            try:
                parsed = parse.parse_certificate_response(corrupt.hex())
            except ValueError:
                continue
            assert all(cert["valid_from"] < cert["valid_until"] for cert in parsed)


def certificate_entry(serial, valid_from, valid_until, es_version=2):
    return {
        "serial": serial,
        "valid_from": valid_from,
        "valid_until": valid_until,
        "es_version": es_version,
        "construction": parse._CERT_CONSTRUCTIONS[es_version],
    }


def test_select_highest_valid_serial():
    old = certificate_entry(1, NOW - DAY, NOW + DAY)
    newest_valid = certificate_entry(3, NOW - DAY, NOW + DAY)
    future = certificate_entry(9, NOW + DAY, NOW + 2 * DAY)

    assert parse.select_certificate([old, newest_valid, future], NOW) is newest_valid
    assert parse.select_certificate([newest_valid, old], NOW) is newest_valid


def test_select_prefers_es_version_2():
    version_2 = certificate_entry(4, NOW - DAY, NOW + DAY, es_version=2)
    version_1 = certificate_entry(4, NOW - DAY, NOW + DAY, es_version=1)

    assert parse.select_certificate([version_2, version_1], NOW) is version_2
    assert parse.select_certificate([version_1, version_2], NOW) is version_2


def test_select_none_valid():
    expired = certificate_entry(1, NOW - 2 * DAY, NOW - DAY)

    assert parse.select_certificate([expired], NOW) is None
    assert parse.select_certificate([], NOW) is None
    # The window includes both ends, as in dnscrypt-proxy.
    assert parse.select_certificate([expired], NOW - DAY) is expired


def test_certificate_valid_now():
    hex_text = dns_response([certificate(1, NOW - 2 * DAY, NOW - DAY), certificate(2, NOW - DAY, NOW + 3 * DAY)])

    described = parse.describe_certificate(hex_text, NOW)

    assert described["valid_now"] is True
    assert described["serial"] == 2
    assert described["days_left"] == 3.0
    assert described["valid_until"] == "2027-01-18 08:00:00 UTC"
    assert described["certificates"] == 2
    assert "problem" not in described


def test_certificate_ignores_unsupported_version():
    hex_text = dns_response(
        [certificate(9, NOW - DAY, NOW + DAY, version=3), certificate(2, NOW - DAY, NOW + DAY, version=1)]
    )

    described = parse.describe_certificate(hex_text, NOW)

    assert described["valid_now"] is True
    assert described["serial"] == 2
    assert described["construction"] == "XSalsa20Poly1305"
    assert described["certificates"] == 1


def test_certificate_expired_names_clock():
    described = parse.describe_certificate(dns_response([certificate(1, NOW - 2 * DAY, NOW - DAY)]), NOW)

    assert described["valid_now"] is False
    assert "no certificate is valid at the qube's time 2027-01-15 08:00:00 UTC" in described["problem"]
    assert described["problem"].endswith(": check the clock of the qube")


def test_certificate_without_clock():
    described = parse.describe_certificate(dns_response([certificate(1, NOW, NOW + DAY)]), None)

    assert described["valid_now"] is None
    assert described["problem"] == "the clock of the qube is unknown"


def test_certificate_not_fetched():
    described = parse.describe_certificate({"error": "no answer from 192.0.2.2 port 443 within 5 s"}, NOW)

    assert described == {
        "valid_now": None,
        "problem": "certificate not fetched: no answer from 192.0.2.2 port 443 within 5 s",
    }


def test_certificate_unreadable():
    described = parse.describe_certificate("00", NOW)

    assert described["valid_now"] is None
    assert described["problem"].startswith("certificate unreadable: the response is shorter")


# Servers from the pillar


def test_certificate_requests_only_dnscrypt(fake):
    pillar = {
        "dnscrypt": {
            "resolvers": PILLAR["dnscrypt"]["resolvers"] + [{"name": "six", "stamp": DNSCRYPT6_STAMP}],
            "relays": [{"name": "relay", "stamp": RELAY_STAMP}],
            "ipv6_servers": True,
        }
    }
    module = module_for(fake, pillar)
    servers = module.configured_servers(config_module.validate(pillar))

    assert module.certificate_requests(servers) == (
        "lab-dnscrypt 192.0.2.2 443 2.dnscrypt-cert.lab.test\nsix 2001:db8::2 8443 2.dnscrypt-cert.six.test\n"
    )
    assert servers["six"]["address"] == "[2001:db8::2]:8443"
    assert servers["relay"]["kind"] == "relay"
    assert servers["lab-doh"] == {
        "kind": "resolver",
        "protocol": "doh",
        "address": "192.0.2.3:443",
        "host": "doh.lab.test",
        "_fetch": ("192.0.2.3", 443, None),
    }


@pytest.mark.parametrize("route_name", ["six", "*"])
def test_certificate_requests_skip_anonymized(fake, route_name):
    pillar = {
        "dnscrypt": {
            "resolvers": PILLAR["dnscrypt"]["resolvers"] + [{"name": "six", "stamp": DNSCRYPT6_STAMP}],
            "relays": [{"name": "relay", "stamp": RELAY_STAMP}],
            "anonymized_routes": [{"server_name": route_name, "via": ["relay"]}],
            "ipv6_servers": True,
        }
    }
    module = module_for(fake, pillar)
    servers = module.configured_servers(config_module.validate(pillar))

    requests = module.certificate_requests(servers)
    assert "six " not in requests
    assert servers["six"]["anonymized"] is True
    if route_name == "*":
        assert requests == ""
        assert servers["lab-dnscrypt"]["anonymized"] is True
    else:
        assert requests == "lab-dnscrypt 192.0.2.2 443 2.dnscrypt-cert.lab.test\n"
    assert "anonymized" not in servers["lab-doh"]


def test_configured_servers_skips_unused_resolvers(fake):
    pillar = {"dnscrypt": dict(PILLAR["dnscrypt"], server_names=["lab-doh"])}
    module = module_for(fake, pillar)

    servers = module.configured_servers(config_module.validate(pillar))

    assert list(servers) == ["lab-doh"]


# collect_status


def test_status_healthy(fake):
    status = module_for(fake).collect_status()

    assert status["ok"] is True, status["problems"]
    assert status["problems"] == []
    assert fake.list_calls == 1
    assert len(fake.runs) == 1
    name, command, stdin, autostart = fake.runs[0]
    assert (name, command, autostart) == ("sys-dns", "/usr/lib/sysdns/status", False)
    assert stdin == "lab-dnscrypt 192.0.2.2 443 2.dnscrypt-cert.lab.test\n"
    assert status["qube"]["template"] == "tpl-sys-dns"
    assert status["chain"]["sys-firewall"] == {
        "netvm": "sys-dns",
        "path": "sys-firewall -> sys-dns -> sys-net",
        "through_sysdns": True,
        "state": "Running",
    }
    assert status["dnscrypt_proxy"]["live_servers"] == ["lab-dnscrypt", "lab-doh"]
    assert status["dnscrypt_proxy"]["version"] == "2.1.8"
    assert status["servers"]["lab-dnscrypt"]["live"] is True
    assert status["servers"]["lab-dnscrypt"]["certificate"]["valid_now"] is True
    assert status["servers"]["lab-dnscrypt"]["address"] == "192.0.2.2:443"
    assert "_fetch" not in status["servers"]["lab-doh"]
    assert status["counters"]["queries_redirected"] == 42
    assert status["counters"]["plaintext_dropped_by_guard"] == 7
    assert status["drift"]["in_sync"] is True
    assert status["clock"] == "2027-01-15 08:00:00 UTC"


def test_status_reads_pillar_argument(fake):
    pillar = {"dnscrypt": dict(PILLAR["dnscrypt"], server_names=["lab-doh"])}
    fake.status_text = status_output(rendered_files(pillar), certificates={})

    status = module_for(fake, pillar={}).collect_status(pillar=pillar)

    assert list(status["servers"]) == ["lab-doh"]
    assert status["ok"] is True, status["problems"]


def test_status_halted_runs_nothing(fake):
    fake.qubes["sys-dns"]["state"] = "Halted"

    status = module_for(fake).collect_status()

    assert fake.runs == []
    assert fake.changes == []
    assert status["ok"] is False
    assert status["qube"]["state"] == "Halted"
    assert status["dnscrypt_proxy"] == {"service": "unknown: sys-dns is Halted", "running": False}
    assert status["drift"] == {"in_sync": None, "files": "unknown: sys-dns is Halted"}
    assert "sys-dns is Halted, so downstream qubes have no DNS" in status["problems"][0]


def test_status_missing_qube(fake):
    del fake.qubes["sys-dns"]
    fake.qubes["sys-firewall"]["netvm"] = "sys-net"

    status = module_for(fake).collect_status()

    assert fake.runs == []
    assert status["qube"] == {"name": "sys-dns", "exists": False}
    assert (
        "qube sys-dns not found; fix: run the build: sudo qubesctl --show-output state.sls qubes.network.sys-dns"
        in status["problems"]
    )
    assert status["chain"]["sys-firewall"]["through_sysdns"] is False
    assert status["counters"] == "unknown: sys-dns is missing"


def test_status_chain_bypass_and_wrong_netvm(fake):
    fake.qubes["sys-firewall"]["netvm"] = "sys-net"
    fake.qubes["sys-dns"]["netvm"] = "sys-whonix"
    fake.qubes["sys-dns"]["provides_network"] = False

    status = module_for(fake).collect_status()

    assert status["chain"]["sys-firewall"]["path"] == "sys-firewall -> sys-net"
    assert (
        "sys-firewall: netvm is sys-net, so its DNS does not pass through sys-dns; fix: "
        "qvm-prefs sys-firewall netvm sys-dns, or re-run the build: sudo qubesctl --show-output state.sls qubes.network.sys-dns"
        in status["problems"]
    )
    assert "sys-dns: netvm is sys-whonix, expected sys-net; fix: qvm-prefs sys-dns netvm sys-net" in status["problems"]
    assert (
        "sys-dns: provides_network is False, expected True; fix: qvm-prefs sys-dns provides_network True"
        in status["problems"]
    )


def test_status_rewired_qube_missing(fake):
    del fake.qubes["sys-firewall"]

    status = module_for(fake).collect_status()

    assert status["chain"]["sys-firewall"] == {"exists": False, "through_sysdns": False}
    assert (
        "qube sys-firewall (sysdns:rewire) not found; fix: create it, or remove it from sysdns:rewire "
        "and re-run the build" in status["problems"]
    )


def test_status_class_differs(fake):
    fake.qubes["sys-dns"]["class"] = "DispVM"

    status = module_for(fake).collect_status()

    assert (
        "sys-dns: class is DispVM, the pillar asks for AppVM; fix: Qubes cannot change a qube's class, "
        "so set sysdns:qube:class to DispVM, or remove the qube (qvm-remove sys-dns) and re-run the build"
        in status["problems"]
    )


def test_status_file_drift(fake):
    files = rendered_files()
    files["dnscrypt-proxy.toml"] += "# edited\n"
    del files["sysdns.nft"]
    files["stray.txt"] = "x\n"
    fake.status_text = status_output(files)

    status = module_for(fake).collect_status()

    assert status["drift"]["files"] == {
        "dnscrypt-proxy.toml": "differs from the pillar",
        "stray.txt": "not rendered by the pillar",
        "sysdns.nft": "missing",
    }
    assert status["drift"]["in_sync"] is False
    assert status["ok"] is False
    assert any("dnscrypt-proxy.toml (differs from the pillar)" in problem for problem in status["problems"])


@pytest.mark.parametrize(
    ("ruleset", "words"),
    [
        ("modified", "sys-dns: the rules of table inet sysdns changed since they were loaded"),
        ("unrecorded", "sys-dns: table inet sysdns was loaded without a recorded digest"),
    ],
)
def test_status_ruleset_drift(fake, ruleset, words):
    fake.status_text = status_output(rendered_files(), ruleset=ruleset)

    status = module_for(fake).collect_status()

    assert status["drift"]["table inet sysdns"] == {"firewall": "loaded", "ruleset": ruleset}
    assert status["drift"]["in_sync"] is False
    assert any(problem.startswith(words) for problem in status["problems"])


def test_status_guard_ruleset_drift(fake):
    fake.status_text = status_output(rendered_files(), guard_ruleset="modified")

    status = module_for(fake).collect_status()

    assert status["drift"]["table inet sysdns_guard"] == {"guard": "loaded", "ruleset": "modified"}
    assert status["drift"]["in_sync"] is False
    assert any("rules of table inet sysdns_guard changed" in problem for problem in status["problems"])


def test_status_input_accept_incomplete(fake):
    fake.status_text = status_output(rendered_files(), accept="incomplete")

    status = module_for(fake).collect_status()

    assert status["drift"]["custom-input accept"] == "incomplete"
    assert (
        "sys-dns: input-accept is incomplete, expected present, so Qubes' input chain rejects the "
        "redirected queries; fix: re-run the build, which reloads the tables: sudo qubesctl --show-output state.sls qubes.network.sys-dns"
        in status["problems"]
    )
    assert status["drift"]["in_sync"] is False


def test_status_tables_missing(fake):
    fake.status_text = status_output(
        rendered_files(), firewall="missing", ruleset="missing", guard="missing", guard_ruleset="missing"
    )

    status = module_for(fake).collect_status()

    assert (
        "sys-dns: firewall is missing, expected loaded, so downstream DNS is not redirected to "
        "dnscrypt-proxy (table inet sysdns); fix: re-run the build, which reloads the tables: sudo qubesctl --show-output state.sls qubes.network.sys-dns"
        in status["problems"]
    )
    assert (
        "sys-dns: guard is missing, expected loaded, so the fail-closed guard (table inet sysdns_guard) "
        "does not stop plaintext DNS from leaving while table inet sysdns is missing; fix: re-run the "
        "build, which reloads the tables: sudo qubesctl --show-output state.sls qubes.network.sys-dns"
        in status["problems"]
    )
    assert status["drift"]["in_sync"] is False


def test_status_service_stopped(fake):
    fake.status_text = status_output(rendered_files(), service="inactive")

    status = module_for(fake).collect_status()

    assert status["dnscrypt_proxy"]["running"] is False
    assert status["dnscrypt_proxy"]["live_servers"] == []
    assert status["servers"]["lab-doh"]["live"] is False
    assert (
        "sys-dns: dnscrypt-proxy is not running (service inactive); fix: qvm-run -u root sys-dns "
        "'systemctl restart dnscrypt-proxy'; if it stops again, read its log: "
        "qvm-run -p -u root sys-dns 'journalctl -u dnscrypt-proxy -b'" in status["problems"]
    )
    # Files and tables still match: a stopped service is no drift.
    assert status["drift"]["in_sync"] is True


def test_status_no_live_server(fake):
    fake.status_text = status_output(rendered_files(), log=[])

    status = module_for(fake).collect_status()

    assert status["dnscrypt_proxy"]["live_servers"] == []
    assert (
        "sys-dns: dnscrypt-proxy reports no live server yet; fix: wait a minute for its first server "
        "refresh; if it persists, qubesctl sysdns.diagnose names the cause" in status["problems"]
    )


def test_status_expired_certificate(fake):
    expired = dns_response([certificate(1, NOW - 9 * DAY, NOW - DAY)])
    fake.status_text = status_output(rendered_files(), certificates={"lab-dnscrypt": expired})

    status = module_for(fake).collect_status()

    assert status["servers"]["lab-dnscrypt"]["certificate"]["valid_now"] is False
    assert any(
        problem.startswith("sys-dns: server lab-dnscrypt: no certificate is valid") for problem in status["problems"]
    )


def test_status_certificate_missing_from_output(fake):
    fake.status_text = status_output(rendered_files(), certificates={})

    status = module_for(fake).collect_status()

    assert status["servers"]["lab-dnscrypt"]["certificate"] == {
        "valid_now": None,
        "problem": "not fetched: the status helper printed nothing",
    }
    assert (
        "sys-dns: server lab-dnscrypt: the status helper printed no certificate line; fix: re-run the "
        "build, which reinstalls /usr/lib/sysdns/status: sudo qubesctl --show-output state.sls qubes.network.sys-dns"
        in status["problems"]
    )


def test_status_helper_failure(fake):
    fake.status_retcode = 127

    status = module_for(fake).collect_status()

    assert status["ok"] is False
    assert "the status helper failed (status: failed)" in status["problems"][0]
    assert status["dnscrypt_proxy"]["running"] is False


def test_status_function_returns_collected(fake):
    assert module_for(fake).status() == module_for(fake).collect_status()


def test_every_problem_carries_fix():
    # Every problem of the module goes through add_problem, which rejects an empty
    # fix, so no code path can report a problem without saying what to do.
    source = pathlib.Path(__file__).resolve().parents[2] / "_modules" / "sysdns.py"
    tree = ast.parse(source.read_text())
    calls = 0
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef) or function.name == "add_problem":
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            callee = node.func
            if isinstance(callee, ast.Attribute) and callee.attr == "append":
                assert not (isinstance(callee.value, ast.Name) and callee.value.id == "problems"), (
                    "{} appends a problem without add_problem (line {})".format(function.name, node.lineno)
                )
            if isinstance(callee, ast.Name) and callee.id == "add_problem":
                calls += 1
                assert len(node.args) == 3, "add_problem at line {} lacks a fix".format(node.lineno)
                fix = node.args[2]
                assert not (isinstance(fix, ast.Constant) and not fix.value), node.lineno
    assert calls >= 25


def test_add_problem_rejects_empty_fix():
    module = load_salt_module("_modules/sysdns.py")
    problems = []
    with pytest.raises(ValueError, match="has no fix"):
        module.add_problem(problems, "sys-dns: something is wrong", "")
    assert problems == []
    module.add_problem(problems, "sys-dns: something is wrong", "do this")
    assert problems == ["sys-dns: something is wrong; fix: do this"]
