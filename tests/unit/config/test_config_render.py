"""Rendering: dnscrypt-proxy TOML, rule files, nft ruleset, template and apt files."""

import base64
import os
import re
import subprocess
import tomllib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from salt.exceptions import SaltInvocationError

from tests.unit.config.helpers import assert_check_passes, assert_nft_check_passes, config, run_check

ALL_PROPS = {"dnssec": True, "nolog": True, "nofilter": True}
LAB_DNSCRYPT = config.encode_stamp(
    "dnscrypt",
    address="192.0.2.2:443",
    props=ALL_PROPS,
    public_key="5a" * 32,
    provider_name="2.dnscrypt-cert.lab.test",
)
LAB_DOH = config.encode_stamp("doh", address="192.0.2.3", props=ALL_PROPS, host="doh.lab.test", path="/dns-query")
LAB_DOH6 = config.encode_stamp(
    "doh", address="[2001:db8::3]", props=ALL_PROPS, host="doh.lab.test:443", path="/dns-query"
)
LAB_RELAY = config.encode_stamp("dnscrypt-relay", address="192.0.2.9:443")

FULL_PILLAR = {
    "dnscrypt": {
        "resolvers": [
            {"name": "lab-dnscrypt", "stamp": LAB_DNSCRYPT},
            {"name": "lab-doh", "stamp": LAB_DOH},
            {"name": "lab-doh6", "stamp": LAB_DOH6},
        ],
        "relays": [{"name": "lab-relay", "stamp": LAB_RELAY}],
        "ipv6_servers": True,
        "require_dnssec": True,
        "lb_strategy": "ph",
        "timeout_ms": 2500,
        "keepalive_s": 15,
        "max_clients": 500,
        "cache": {"enabled": False, "size": 1024, "min_ttl": 0, "max_ttl": 3600, "neg_min_ttl": 5, "neg_max_ttl": 60},
        "query_log": {"enabled": True, "format": "ltsv", "ignored_qtypes": ["DNSKEY", "NS"]},
        "forwarding_rules": [
            {"zone": "corp.example", "servers": ["192.0.2.53", "[2001:db8::53]:5353"]},
            {"zone": "lab.example", "servers": ["198.51.100.53:5300"]},
        ],
        "cloaking_rules": [
            {"name": "printer.corp.example", "address": "192.0.2.80"},
            {"name": "*.wiki.example", "address": "wiki.corp.example"},
        ],
        "blocked_names": ["ads.example", "=tracker.example", "ad[sv].*", "*banner*"],
        "allowed_names": ["=good.ads.example"],
        "anonymized_routes": [{"server_name": "lab-dnscrypt", "via": ["lab-relay"]}],
        "block_client_dot": True,
    }
}


def test_default_toml_parses_and_checks(tmp_path):
    text = config.render_dnscrypt_toml(config.validate({}))

    parsed = tomllib.loads(text)

    assert parsed["listen_addresses"] == ["[::]:53"]
    assert parsed["ignore_system_dns"] is True
    assert parsed["netprobe_timeout"] == 0
    assert parsed["netprobe_address"] == "127.0.0.1:53"
    assert parsed["bootstrap_resolvers"] == ["127.0.0.1:53"]
    assert "sources" not in parsed
    assert set(parsed["static"]) == {entry["name"] for entry in config.DEFAULT_RESOLVERS}
    assert_check_passes(text, tmp_path)


def test_toml_header_names_formula():
    text = config.render_dnscrypt_toml(config.validate({}))

    assert text.startswith("# dnscrypt-proxy configuration for sys-dns.\n")
    assert "qubes-sysdns-formula" in text.splitlines()[1]
    assert "Edits are overwritten" in text.splitlines()[2]


def test_full_toml_parses_and_checks(tmp_path):
    cfg = config.validate(FULL_PILLAR)
    text = config.render_dnscrypt_toml(cfg)

    parsed = tomllib.loads(text)

    assert parsed["server_names"] == ["lab-dnscrypt", "lab-doh", "lab-doh6"]
    assert parsed["ipv6_servers"] is True
    assert parsed["require_dnssec"] is True
    assert parsed["lb_strategy"] == "ph"
    assert parsed["timeout"] == 2500
    assert parsed["keepalive"] == 15
    assert parsed["max_clients"] == 500
    assert parsed["cache"] is False
    assert parsed["cache_neg_max_ttl"] == 60
    assert parsed["forwarding_rules"] == "/rw/config/sysdns/forwarding-rules.txt"
    assert parsed["cloaking_rules"] == "/rw/config/sysdns/cloaking-rules.txt"
    assert parsed["query_log"] == {
        "file": "/var/log/dnscrypt-proxy/query.log",
        "format": "ltsv",
        "ignored_qtypes": ["DNSKEY", "NS"],
    }
    assert parsed["blocked_names"] == {"blocked_names_file": "/rw/config/sysdns/blocked-names.txt"}
    assert parsed["allowed_names"] == {"allowed_names_file": "/rw/config/sysdns/allowed-names.txt"}
    assert parsed["anonymized_dns"] == {"routes": [{"server_name": "lab-dnscrypt", "via": ["lab-relay"]}]}
    assert parsed["static"]["lab-relay"] == {"stamp": LAB_RELAY}
    assert_check_passes(text, tmp_path)


def test_toml_without_optional_tables():
    parsed = tomllib.loads(config.render_dnscrypt_toml(config.validate({})))

    for key in ("query_log", "blocked_names", "allowed_names", "anonymized_dns", "forwarding_rules", "cloaking_rules"):
        assert key not in parsed


def test_toml_string_escaping():
    text = "\n".join(
        [
            "k1 = " + config._toml_string('quote " back \\ tab \t nl \n cr \r bs \b ff \f'),
            "k2 = " + config._toml_string("\x00\x01\x1f\x7f"),
            "k3 = " + config._toml_string("caf\u00e9"),
            config._toml_key("dotted.key") + " = 1",
        ]
    )

    parsed = tomllib.loads(text)

    assert parsed["k1"] == 'quote " back \\ tab \t nl \n cr \r bs \b ff \f'
    assert parsed["k2"] == "\x00\x01\x1f\x7f"
    assert parsed["k3"] == "caf\u00e9"
    assert parsed["dotted.key"] == 1


def test_unknown_key_fails_check(tmp_path):
    # The check helper itself must be able to fail: dnscrypt-proxy rejects a key it
    # does not know.
    text = config.render_dnscrypt_toml(config.validate({})).replace(
        "netprobe_timeout = 0", "netprobe_timeout = 0\nfallback_resolver = []"
    )

    result = run_check(text, tmp_path)

    assert result.returncode != 0
    assert "Unsupported key in configuration file" in result.stdout + result.stderr


def _minisign_keypair():
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key_id = os.urandom(8)
    return private, key_id, base64.b64encode(b"Ed" + key_id + public).decode()


def _minisign_signature(private, key_id, content):
    signature = private.sign(content)
    trusted = "timestamp:0\tfile:lab.md"
    global_signature = private.sign(signature + trusted.encode())
    return (
        "untrusted comment: lab signature\n"
        + base64.b64encode(b"Ed" + key_id + signature).decode()
        + "\ntrusted comment: "
        + trusted
        + "\n"
        + base64.b64encode(global_signature).decode()
        + "\n"
    )


def test_sources_opt_in_checks_with_cached_list(tmp_path):
    private, key_id, public_key = _minisign_keypair()
    pillar = {
        "dnscrypt": {
            "resolvers": [{"name": "lab-doh", "stamp": LAB_DOH}],
            "server_names": ["lab-doh", "lab-listed"],
            "sources": {
                "allow_plaintext_bootstrap": ["192.0.2.1", "[2001:db8::1]:53"],
                "lists": [
                    {
                        "name": "lab",
                        "urls": ["https://lists.lab.test/lab.md"],
                        "minisign_key": public_key,
                        "refresh_delay_h": 48,
                        "prefix": "lab-",
                    }
                ],
            },
        }
    }
    cfg = config.validate(pillar)
    text = config.render_dnscrypt_toml(cfg)
    parsed = tomllib.loads(text)
    assert parsed["bootstrap_resolvers"] == ["192.0.2.1:53", "[2001:db8::1]:53"]
    assert parsed["sources"]["lab"] == {
        "urls": ["https://lists.lab.test/lab.md"],
        "minisign_key": public_key,
        "cache_file": "/var/cache/dnscrypt-proxy/lab.md",
        "refresh_delay": 48,
        "prefix": "lab-",
    }

    # Without a cache, -check tries to download the list and fails: the
    # namespace it runs in has no route out.
    local_text = text.replace("/var/cache/dnscrypt-proxy/", f"{tmp_path}/")
    assert run_check(local_text, tmp_path).returncode != 0

    # With a fresh, signed cache file, -check reads it instead of downloading.
    listing = f"# lab list\n\n## listed\n\nA lab DoH server.\n\n{LAB_DOH6}\n".encode()
    (tmp_path / "lab.md").write_bytes(listing)
    (tmp_path / "lab.md.minisig").write_text(_minisign_signature(private, key_id, listing))
    assert_check_passes(local_text, tmp_path)


def test_rule_files_content():
    files = config.render_rule_files(config.validate(FULL_PILLAR))

    assert sorted(files) == ["allowed-names.txt", "blocked-names.txt", "cloaking-rules.txt", "forwarding-rules.txt"]
    assert _body(files["forwarding-rules.txt"]) == [
        "corp.example 192.0.2.53:53,[2001:db8::53]:5353",
        "lab.example 198.51.100.53:5300",
    ]
    assert _body(files["cloaking-rules.txt"]) == [
        "printer.corp.example 192.0.2.80",
        "*.wiki.example wiki.corp.example",
    ]
    assert _body(files["blocked-names.txt"]) == ["ads.example", "=tracker.example", "ad[sv].*", "*banner*"]
    assert _body(files["allowed-names.txt"]) == ["=good.ads.example"]
    for content in files.values():
        assert "qubes-sysdns-formula" in content


def _body(content):
    return [line for line in content.splitlines() if not line.startswith("#")]


def test_rule_files_only_in_use():
    assert config.render_rule_files(config.validate({})) == {}
    files = config.render_rule_files(config.validate({"dnscrypt": {"blocked_names": ["ads.example"]}}))
    assert list(files) == ["blocked-names.txt"]


def test_default_ruleset_checks(tmp_path):
    assert_nft_check_passes(config.render_nft_ruleset(config.validate({})), tmp_path)


def test_full_ruleset_checks(tmp_path):
    assert_nft_check_passes(config.render_nft_ruleset(config.validate(FULL_PILLAR)), tmp_path)


def test_broken_ruleset_fails_check(tmp_path):
    text = config.render_nft_ruleset(config.validate({})).replace("redirect\n", "redirect to :nope\n")

    with pytest.raises(AssertionError, match="nft -c failed"):
        assert_nft_check_passes(text, tmp_path)


def test_ruleset_structure():
    text = config.render_nft_ruleset(config.validate(FULL_PILLAR))
    lines = [line for line in text.splitlines() if not line.startswith("#")]

    assert lines[:3] == ["table inet sysdns", "delete table inet sysdns", "table inet sysdns {"]
    assert lines[-1] == "}"
    for name in config.NFT_COUNTERS:
        assert f"\tcounter {name} {{" in text
    assert "type nat hook prerouting priority dstnat - 10; policy accept;" in text
    assert 'iifgroup 2 meta l4proto { tcp, udp } th dport 53 counter name "redirected" redirect' in text
    assert 'oifgroup 1 meta l4proto { tcp, udp } th dport 53 counter name "leak_dropped" drop' in text
    assert 'oifgroup 1 meta l4proto { tcp, udp } th dport 53 counter name "leaked"' in text
    assert "elements = { 192.0.2.53 . 53, 198.51.100.53 . 5300 }" in text
    assert "elements = { 2001:db8::53 . 5353 }" in text
    assert "elements = { 192.0.2.2 . 443, 192.0.2.3 . 443, 192.0.2.9 . 443 }" in text
    assert "elements = { 2001:db8::3 . 443 }" in text
    assert 'th dport 853 counter name "client_dot_dropped" drop' in text


def test_ruleset_without_dot_blocking():
    text = config.render_nft_ruleset(config.validate({}))

    assert "chain block_client_dot" not in text
    assert "counter client_dot_dropped {" in text


def test_ruleset_one_statement_per_line():
    text = config.render_nft_ruleset(config.validate(FULL_PILLAR))

    for line in text.splitlines():
        assert line.count("{") <= 1 or "elements" in line or "l4proto" in line, line
        assert ";" not in line or line.strip().startswith("type "), line


def test_upstreams_listed():
    endpoints = config.upstreams(config.validate(FULL_PILLAR))

    assert endpoints == [
        {"name": "lab-dnscrypt", "kind": "resolver", "proto": "dnscrypt", "ip": "192.0.2.2", "family": 4, "port": 443},
        {"name": "lab-doh", "kind": "resolver", "proto": "doh", "ip": "192.0.2.3", "family": 4, "port": 443},
        {"name": "lab-doh6", "kind": "resolver", "proto": "doh", "ip": "2001:db8::3", "family": 6, "port": 443},
        {"name": "lab-relay", "kind": "relay", "proto": "dnscrypt-relay", "ip": "192.0.2.9", "family": 4, "port": 443},
    ]


def test_apply_script_is_posix_sh(tmp_path):
    script = tmp_path / "apply-firewall"
    script.write_text(config.render_firewall_apply_script())

    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stderr
    assert script.read_text().startswith("#!/bin/sh\n")
    assert "ruleset=${1:-/rw/config/sysdns/sysdns.nft}" in script.read_text()


def test_template_files():
    files = config.render_template_files(config.validate({}))

    assert sorted(files) == [
        "/etc/systemd/system/dnscrypt-proxy.service",
        "/etc/systemd/system/sysdns-firewall.service",
        "/etc/systemd/system/sysdns-guard.service",
        "/usr/lib/sysdns/apply-firewall",
        "/usr/lib/sysdns/guard.nft",
    ]
    service, mode = files["/etc/systemd/system/dnscrypt-proxy.service"]
    assert mode == 0o644
    assert "ExecStart=/usr/sbin/dnscrypt-proxy -config /rw/config/sysdns/dnscrypt-proxy.toml\n" in service
    assert "ConditionPathExists=/rw/config/sysdns/dnscrypt-proxy.toml\n" in service
    assert "User=_dnscrypt-proxy\n" in service
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE\n" in service
    assert "Restart=always\n" in service
    assert "Requires=" not in service
    assert "dnscrypt-proxy.socket" not in service.split("[Unit]", 1)[1]
    firewall, mode = files["/etc/systemd/system/sysdns-firewall.service"]
    assert mode == 0o644
    assert "Type=oneshot\n" in firewall
    assert "RemainAfterExit=yes\n" in firewall
    assert "After=qubes-iptables.service\n" in firewall
    assert "Before=dnscrypt-proxy.service network-pre.target\n" in firewall
    assert "ConditionPathExists=/rw/config/sysdns/sysdns.nft\n" in firewall
    assert "ExecStart=/usr/lib/sysdns/apply-firewall\n" in firewall
    script, mode = files["/usr/lib/sysdns/apply-firewall"]
    assert mode == 0o755
    assert script == config.render_firewall_apply_script()


def test_units_pass_systemd_analyze(tmp_path):
    if not os.path.exists("/usr/bin/systemd-analyze"):
        pytest.fail("systemd-analyze is missing: install the Debian package systemd")
    for path, (content, _) in config.render_template_files().items():
        if path.endswith(".service"):
            (tmp_path / os.path.basename(path)).write_text(content)

    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(str(path) for path in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        check=False,
    )

    # The executables exist only in the template, so only their absence may be
    # reported; unknown keys or sections would be listed too.
    problems = [line for line in result.stderr.splitlines() if "is not executable" not in line]
    assert not problems, result.stderr


def test_template_links():
    links = config.render_template_links()

    assert links["masks"] == {
        "/etc/systemd/system/dnscrypt-proxy.socket": "/dev/null",
        "/etc/systemd/system/dnscrypt-proxy-resolvconf.service": "/dev/null",
    }
    assert links["wants"] == {
        "/etc/systemd/system/multi-user.target.wants/dnscrypt-proxy.service": "/etc/systemd/system/dnscrypt-proxy.service",
        "/etc/systemd/system/multi-user.target.wants/sysdns-firewall.service": "/etc/systemd/system/sysdns-firewall.service",
        "/etc/systemd/system/multi-user.target.wants/sysdns-guard.service": "/etc/systemd/system/sysdns-guard.service",
    }


def test_apt_sources_for_bookworm():
    files = config.render_apt_sources("https://deb.debian.org/debian", "bookworm")

    source, mode = files["/etc/apt/sources.list.d/sysdns-trixie.list"]
    assert mode == 0o644
    assert source.splitlines()[-1] == "deb https://deb.debian.org/debian trixie main"
    pin, _ = files["/etc/apt/preferences.d/sysdns-dnscrypt-proxy"]
    stanzas = [stanza.strip().splitlines() for stanza in pin.split("\n\n")]
    assert [line for line in stanzas[0] if not line.startswith("#")] == [
        "Package: *",
        "Pin: release n=trixie",
        "Pin-Priority: -10",
    ]
    assert stanzas[1] == ["Package: dnscrypt-proxy", "Pin: release n=trixie", "Pin-Priority: 500"]


def test_apt_sources_follow_mirror():
    files = config.render_apt_sources("tor+https://deb.debian.org/debian", "bookworm")

    assert "deb tor+https://deb.debian.org/debian trixie main" in files[config.APT_SOURCE_PATH][0]


def test_apt_sources_not_needed_on_trixie():
    assert config.render_apt_sources("https://deb.debian.org/debian", "trixie") == {}


@pytest.mark.parametrize(
    "mirror, suite, text",
    [
        ("https://deb.debian.org/debian", "bullseye", "not supported"),
        ("https://deb.debian.org/debian main\ndeb http://evil", "bookworm", "is invalid"),
        ("ftp://deb.debian.org/debian", "bookworm", "is invalid"),
        ("https://deb.debian.org/debian;id", "bookworm", "is invalid"),
    ],
)
def test_apt_sources_reject_bad_input(mirror, suite, text):
    with pytest.raises(SaltInvocationError, match=text):
        config.render_apt_sources(mirror, suite)


def test_apt_pin_syntax_accepted_by_apt(tmp_path):
    files = config.render_apt_sources("http://deb.debian.org/debian", "bookworm")
    (tmp_path / "preferences").write_text(files[config.APT_PIN_PATH][0])
    (tmp_path / "sources.list").write_text("")
    (tmp_path / "lists" / "partial").mkdir(parents=True)
    (tmp_path / "empty").mkdir()

    result = subprocess.run(
        [
            "apt-cache",
            "-o",
            f"Dir::Etc::preferences={tmp_path}/preferences",
            "-o",
            f"Dir::Etc::preferencesparts={tmp_path}/empty",
            "-o",
            f"Dir::Etc::sourcelist={tmp_path}/sources.list",
            "-o",
            f"Dir::Etc::sourceparts={tmp_path}/empty",
            "-o",
            f"Dir::State::Lists={tmp_path}/lists",
            "-o",
            f"Dir::Cache={tmp_path}",
            "policy",
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "E:" not in result.stderr, result.stderr
    assert "W:" not in result.stderr, result.stderr


def test_config_files_and_digest():
    cfg = config.validate(FULL_PILLAR)

    files = config.config_files(cfg)

    assert sorted(files) == [
        "allowed-names.txt",
        "blocked-names.txt",
        "cloaking-rules.txt",
        "dnscrypt-proxy.toml",
        "forwarding-rules.txt",
        "sysdns.nft",
    ]
    assert files["sysdns.nft"] == config.render_nft_ruleset(cfg)
    value = config.digest(files)
    assert re.fullmatch(r"[0-9a-f]{64}", value)
    assert config.digest(dict(reversed(list(files.items())))) == value
    changed = dict(files, **{"sysdns.nft": files["sysdns.nft"] + "\n"})
    assert config.digest(changed) != value
    assert config.digest(config.config_files(config.validate(FULL_PILLAR))) == value


def test_digest_separates_names_and_contents():
    assert config.digest({"a": "bc"}) != config.digest({"ab": "c"})
    assert config.digest({"a": ("x", 0o644)}) != config.digest({"a": ("x", 0o755)})


def test_paths_are_absolute():
    for name, path in config.paths().items():
        assert path.startswith("/"), name
