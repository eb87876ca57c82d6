"""The rendered firewall and rule files at work, in throwaway network namespaces.

Every namespace is created here and removed afterwards; none has a route out, and
the only addresses used are Qubes' internal ranges and documentation addresses.
"""

import hashlib
import re
import subprocess

import pytest

from tests.unit.config.helpers import config
from tests.unit.config.netns import Namespaces, prefix, read_log, wait_for

ALL_PROPS = {"dnssec": True, "nolog": True, "nofilter": True}
UPSTREAM_DNSCRYPT = config.encode_stamp(
    "dnscrypt",
    address="192.0.2.2:443",
    props=ALL_PROPS,
    public_key="5a" * 32,
    provider_name="2.dnscrypt-cert.lab.test",
)
UPSTREAM_DOH = config.encode_stamp("doh", address="192.0.2.3", props=ALL_PROPS, host="doh.lab.test", path="/dns-query")

QUBES_TABLES = """
table ip qubes {
    chain input {
        type filter hook input priority filter; policy drop;
        jump custom-input
        iif lo accept
        iifgroup 2 counter reject with icmp type host-prohibited
    }
    chain custom-input {
        iifgroup 2 tcp dport 22 drop comment "user rule"
    }
}
table ip6 qubes {
    chain input {
        type filter hook input priority filter; policy drop;
        jump custom-input
        iif lo accept
    }
    chain custom-input {
    }
}
"""


@pytest.fixture(name="namespaces")
def fixture_namespaces(root_netns_tools):
    del root_netns_tools
    namespaces = Namespaces(prefix())
    try:
        yield namespaces
    finally:
        namespaces.close()


def _sysdns_rules(namespaces, namespace, family):
    listing = namespaces.run(namespace, "nft", "-a", "list", "chain", family, "qubes", "custom-input").stdout
    return [line.strip() for line in listing.splitlines() if 'comment "sysdns"' in line]


def _load_qubes_tables(namespaces, namespace, text, tmp_path):
    path = tmp_path / "qubes.nft"
    path.write_text(text)
    namespaces.run(namespace, "nft", "-f", str(path))


def _write_apply(tmp_path, cfg):
    ruleset = tmp_path / "sysdns.nft"
    ruleset.write_text(config.render_nft_ruleset(cfg))
    script = tmp_path / "apply-firewall"
    script.write_text(config.render_firewall_apply_script())
    return script, ruleset


def test_apply_script_idempotent(namespaces, tmp_path):
    namespace = namespaces.add("apply")
    _load_qubes_tables(namespaces, namespace, QUBES_TABLES, tmp_path)
    script, ruleset = _write_apply(tmp_path, config.validate({}))

    record = tmp_path / "run" / "ruleset.sha256"
    first = namespaces.run(namespace, "sh", str(script), str(ruleset), str(record))
    second = namespaces.run(namespace, "sh", str(script), str(ruleset), str(record))

    assert first.returncode == 0
    assert second.returncode == 0
    for family in ("ip", "ip6"):
        rules = _sysdns_rules(namespaces, namespace, family)
        assert len(rules) == 2, rules
        assert sum("udp dport 53 accept" in rule for rule in rules) == 1
        assert sum("tcp dport 53 accept" in rule for rule in rules) == 1
        assert all(rule.startswith("iifgroup 2 ") for rule in rules)
    listing = namespaces.run(namespace, "nft", "list", "chain", "ip", "qubes", "custom-input").stdout
    rules_in_order = [line.strip() for line in listing.splitlines() if "dport" in line]
    assert rules_in_order[-1] == 'iifgroup 2 tcp dport 22 drop comment "user rule"'
    assert namespaces.run(namespace, "nft", "list", "counter", "inet", "sysdns", "leaked").returncode == 0
    tables = namespaces.run(namespace, "nft", "list", "tables").stdout
    assert tables.count("table inet sysdns") == 1


def test_apply_script_without_ip6_qubes(namespaces, tmp_path):
    namespace = namespaces.add("noip6")
    ipv4_only = QUBES_TABLES[: QUBES_TABLES.index("table ip6 qubes")]
    _load_qubes_tables(namespaces, namespace, ipv4_only, tmp_path)
    script, ruleset = _write_apply(tmp_path, config.validate({}))

    result = namespaces.run(namespace, "sh", str(script), str(ruleset), str(tmp_path / "ruleset.sha256"))

    assert result.returncode == 0, result.stderr
    assert "no ip6 qubes custom-input chain, skipped" in result.stderr
    assert len(_sysdns_rules(namespaces, namespace, "ip")) == 2


def test_apply_script_fails_on_bad_ruleset(namespaces, tmp_path):
    namespace = namespaces.add("badrules")
    _load_qubes_tables(namespaces, namespace, QUBES_TABLES, tmp_path)
    script, ruleset = _write_apply(tmp_path, config.validate({}))
    ruleset.write_text("table inet sysdns {\n\tchain x { nonsense }\n}\n")

    record = tmp_path / "ruleset.sha256"
    result = namespaces.run(namespace, "sh", str(script), str(ruleset), str(record), check=False)

    assert result.returncode != 0
    assert _sysdns_rules(namespaces, namespace, "ip") == []
    assert not record.exists()


def test_apply_script_records_loaded_table(namespaces, tmp_path):
    namespace = namespaces.add("record")
    _load_qubes_tables(namespaces, namespace, QUBES_TABLES, tmp_path)
    script, ruleset = _write_apply(tmp_path, config.validate({}))
    record = tmp_path / "run" / "ruleset.sha256"

    namespaces.run(namespace, "sh", str(script), str(ruleset), str(record))
    listing = namespaces.run(namespace, "nft", "-s", "list", "table", "inet", "sysdns").stdout
    namespaces.run(namespace, "nft", "flush", "chain", "inet", "sysdns", "redirect_downstream")
    flushed = namespaces.run(namespace, "nft", "-s", "list", "table", "inet", "sysdns").stdout

    # The canonical form: the stateless listing with exactly one final newline.
    assert record.read_text() == hashlib.sha256((listing.rstrip("\n") + "\n").encode()).hexdigest() + "\n"
    assert hashlib.sha256((flushed.rstrip("\n") + "\n").encode()).hexdigest() not in record.read_text()


def test_ruleset_reload_keeps_one_table(namespaces, tmp_path):
    namespace = namespaces.add("reload")
    ruleset = tmp_path / "sysdns.nft"
    ruleset.write_text(config.render_nft_ruleset(config.validate({})))

    for _ in range(3):
        namespaces.run(namespace, "nft", "-f", str(ruleset))

    listing = namespaces.run(namespace, "nft", "list", "table", "inet", "sysdns").stdout
    assert listing.count("chain redirect_downstream {") == 1
    assert listing.count("counter redirected {") == 1
    counters = namespaces.run(namespace, "nft", "list", "counters", "table", "inet", "sysdns").stdout
    listed = re.findall(r"counter\s+(\S+)\s*\{\s*packets\s+(\d+)\s+bytes\s+(\d+)", counters)
    assert [name for name, _, _ in listed] == list(config.NFT_COUNTERS)


def _build_chain(namespaces, tmp_path, cfg):
    """client -> sys-dns -> uplink, wired like Qubes: vif in group 2, eth0 in group 1."""
    client, sysdns, uplink = namespaces.add("cli"), namespaces.add("dns"), namespaces.add("up")

    namespaces.ip(sysdns, f"link add vif3.0 type veth peer name eth0 netns {client}")
    namespaces.ip(sysdns, "link set vif3.0 group 2 up")
    namespaces.ip(sysdns, "addr add 10.137.0.1/32 dev vif3.0")
    namespaces.ip(sysdns, "addr add fd09:24ef:4179::1/128 dev vif3.0 nodad")
    namespaces.ip(sysdns, "route add 10.137.0.2/32 dev vif3.0")
    namespaces.ip(sysdns, "route add fd09:24ef:4179::2/128 dev vif3.0")
    namespaces.ip(client, "link set eth0 up")
    namespaces.ip(client, "addr add 10.137.0.2/32 dev eth0")
    namespaces.ip(client, "addr add fd09:24ef:4179::2/128 dev eth0 nodad")
    namespaces.ip(client, "route add 10.137.0.1/32 dev eth0")
    namespaces.ip(client, "route add default via 10.137.0.1 dev eth0")
    namespaces.ip(client, "route add fd09:24ef:4179::1/128 dev eth0")
    namespaces.ip(client, "-6 route add default via fd09:24ef:4179::1 dev eth0")

    namespaces.ip(sysdns, f"link add eth0 type veth peer name eth0 netns {uplink}")
    namespaces.ip(sysdns, "link set eth0 group 1 up")
    namespaces.ip(sysdns, "addr add 192.0.2.10/24 dev eth0")
    namespaces.ip(sysdns, "addr add 2001:db8::10/64 dev eth0 nodad")
    namespaces.ip(sysdns, "route add default via 192.0.2.1")
    namespaces.ip(sysdns, "-6 route add default via 2001:db8::1")
    namespaces.ip(uplink, "link set eth0 up")
    for address in ("192.0.2.1/24", "192.0.2.2/24", "192.0.2.53/24"):
        namespaces.ip(uplink, f"addr add {address} dev eth0")
    namespaces.ip(uplink, "addr add 2001:db8::1/64 dev eth0 nodad")
    namespaces.run(sysdns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")

    ruleset = tmp_path / "sysdns.nft"
    ruleset.write_text(config.render_nft_ruleset(cfg))
    namespaces.run(sysdns, "nft", "-f", str(ruleset))
    return client, sysdns, uplink


def test_ruleset_redirects_and_guards(namespaces, tmp_path):
    cfg = config.validate(
        {
            "dnscrypt": {
                "resolvers": [
                    {"name": "lab-dnscrypt", "stamp": UPSTREAM_DNSCRYPT},
                    {"name": "lab-doh", "stamp": UPSTREAM_DOH},
                ],
                "forwarding_rules": [{"zone": "corp.example", "servers": ["192.0.2.53"]}],
                "block_client_dot": True,
            }
        }
    )
    client, sysdns, uplink = _build_chain(namespaces, tmp_path, cfg)
    # The stub in sys-dns stands for dnscrypt-proxy (answer 192.0.2.99), the one
    # on the uplink for sys-net's plain resolver, forwarding server and an
    # encrypted upstream (answer 192.0.2.66), and logs what reaches the uplink.
    local_log, uplink_log = tmp_path / "local.jsonl", tmp_path / "uplink.jsonl"
    namespaces.spawn_stub(sysdns, "192.0.2.99", local_log, "[::]:53")
    namespaces.spawn_stub(
        uplink, "192.0.2.66", uplink_log, "192.0.2.1:53", "[2001:db8::1]:53", "192.0.2.53:53", "192.0.2.2:443"
    )

    # Downstream queries, whatever their destination, end at sys-dns.
    assert namespaces.query(client, "10.139.1.1", 53, "v4.lab.test")["addresses"] == ["192.0.2.99"]
    assert namespaces.query(client, "192.0.2.1", 53, "v4tcp.lab.test", tcp=True)["addresses"] == ["192.0.2.99"]
    assert namespaces.query(client, "2001:db8::1", 53, "v6.lab.test")["addresses"] == ["192.0.2.99"]
    assert namespaces.counter(sysdns, "redirected") >= 3
    assert {entry["name"] for entry in read_log(local_log)} >= {"v4.lab.test.", "v4tcp.lab.test.", "v6.lab.test."}

    # Lookups of sys-dns itself end at sys-dns too.
    assert namespaces.query(sysdns, "192.0.2.1", 53, "self.lab.test")["addresses"] == ["192.0.2.99"]
    assert namespaces.query(sysdns, "10.139.1.1", 53, "self-tcp.lab.test", tcp=True)["addresses"] == ["192.0.2.99"]
    assert namespaces.query(sysdns, "2001:db8::1", 53, "self6.lab.test")["addresses"] == ["192.0.2.99"]
    assert namespaces.counter(sysdns, "redirected_local") >= 3

    # Forwarding-rule servers are reachable in plaintext, counted.
    assert namespaces.query(sysdns, "192.0.2.53", 53, "host.corp.example")["addresses"] == ["192.0.2.66"]
    assert namespaces.counter(sysdns, "forwarded") >= 1

    # Replies of an encrypted upstream are counted.
    assert namespaces.query(sysdns, "192.0.2.2", 443, "probe.lab.test")["addresses"] == ["192.0.2.66"]
    assert namespaces.counter(sysdns, "upstream_replies") >= 1

    # DoT from downstream is dropped.
    dot = namespaces.run(
        client,
        "python3",
        "-c",
        "import socket; socket.create_connection(('192.0.2.1', 853), timeout=1)",
        check=False,
    )
    assert dot.returncode != 0
    assert namespaces.counter(sysdns, "client_dot_dropped") >= 1

    # Nothing but the forwarded name and the upstream probe reached the uplink.
    assert {entry["name"] for entry in read_log(uplink_log)} == {"host.corp.example.", "probe.lab.test."}
    assert namespaces.counter(sysdns, "leak_dropped") == 0
    assert namespaces.counter(sysdns, "leaked") == 0

    # A query that escapes the redirect (untracked, so NAT never sees it) is
    # dropped by the guard ...
    bypass = tmp_path / "bypass.nft"
    bypass.write_text(
        "table ip sysdnstest {\n"
        "\tchain raw_output {\n"
        "\t\ttype filter hook output priority raw; policy accept;\n"
        "\t\tip daddr 192.0.2.1 udp dport 53 notrack\n"
        "\t}\n"
        "}\n"
    )
    namespaces.run(sysdns, "nft", "-f", str(bypass))
    # A local sender sees EPERM when its packet is dropped on the way out.
    assert "error" in namespaces.query(sysdns, "192.0.2.1", 53, "leak1.lab.test", timeout=1)
    assert namespaces.counter(sysdns, "leak_dropped") >= 1
    assert namespaces.counter(sysdns, "leaked") == 0

    # ... and without the guard it leaves the qube and is counted as leaked.
    namespaces.run(sysdns, "nft", "flush", "chain", "inet", "sysdns", "guard_uplink")
    assert namespaces.query(sysdns, "192.0.2.1", 53, "leak2.lab.test")["addresses"] == ["192.0.2.66"]
    assert namespaces.counter(sysdns, "leaked") >= 1
    assert "leak2.lab.test." in {entry["name"] for entry in read_log(uplink_log)}


def test_rule_files_work_in_dnscrypt_proxy(namespaces, tmp_path, dnscrypt_proxy):
    cfg = config.validate(
        {
            "dnscrypt": {
                "resolvers": [{"name": "lab-doh", "stamp": UPSTREAM_DOH}],
                "forwarding_rules": [{"zone": "corp.example", "servers": ["127.0.0.2:5300"]}],
                "cloaking_rules": [
                    {"name": "printer.corp.example", "address": "192.0.2.80"},
                    {"name": "*.wiki.example", "address": "192.0.2.81"},
                    {"name": "v6.cloak.example", "address": "2001:db8::82"},
                ],
                "blocked_names": ["ads.example", "=tracker.example", "ad[sv].*"],
                "allowed_names": ["=good.ads.example"],
            }
        }
    )
    namespace = namespaces.add("rules")
    namespaces.ip(namespace, "addr add 127.0.0.2/8 dev lo")
    for name, content in config.render_rule_files(cfg).items():
        (tmp_path / name).write_text(content)
    toml = config.render_dnscrypt_toml(cfg).replace(f"{config.CONFIG_DIR}/", f"{tmp_path}/")
    (tmp_path / "dnscrypt-proxy.toml").write_text(toml)
    forward_log = tmp_path / "forward.jsonl"
    namespaces.spawn_stub(namespace, "192.0.2.66", forward_log, "127.0.0.2:5300")
    proxy_log = tmp_path / "dnscrypt-proxy.log"
    proxy = namespaces.spawn(
        namespace, str(dnscrypt_proxy), "-config", str(tmp_path / "dnscrypt-proxy.toml"), log_path=proxy_log
    )

    # The only resolver is unreachable: answers below come from the rule files.
    # IPv4 queries reach the "[::]:53" listener too (dual-stack socket).
    wait_for(
        lambda: namespaces.query(namespace, "127.0.0.1", 53, "printer.corp.example", timeout=0.5).get("addresses"),
        "dnscrypt-proxy",
        proxy,
    )
    assert namespaces.query(namespace, "127.0.0.1", 53, "printer.corp.example")["addresses"] == ["192.0.2.80"]
    assert namespaces.query(namespace, "::1", 53, "docs.wiki.example")["addresses"] == ["192.0.2.81"]
    assert namespaces.query(namespace, "127.0.0.1", 53, "v6.cloak.example", record_type="AAAA")["addresses"] == [
        "2001:db8::82"
    ]
    assert namespaces.query(namespace, "127.0.0.1", 53, "host.corp.example")["addresses"] == ["192.0.2.66"]
    assert [entry["name"] for entry in read_log(forward_log)] == ["host.corp.example."]
    for blocked in ("ads.example", "x.ads.example", "tracker.example", "adv.lab.test"):
        answer = namespaces.query(namespace, "127.0.0.1", 53, blocked)
        assert answer["types"] == ["HINFO"], (blocked, answer)
    for passed in ("sub.tracker.example", "good.ads.example", "adx.lab.test"):
        answer = namespaces.query(namespace, "127.0.0.1", 53, passed, timeout=3)
        assert answer.get("types") != ["HINFO"], (passed, answer)

    log = proxy_log.read_text()
    problems = [
        line
        for line in log.splitlines()
        if any(level in line for level in ("[ERROR]", "[CRITICAL]", "[FATAL]", "[WARNING]"))
        if "network is unreachable" not in line
    ]
    assert not problems, log
    assert proxy.poll() is None, log


def test_tcp_and_udp_listeners_bind_together(namespaces, tmp_path, dnscrypt_proxy):
    # listen_addresses = ["[::]:53"] must bind; adding "0.0.0.0:53" would fail with
    # "address already in use", which is why the formula does not.
    namespace = namespaces.add("bind")
    toml = config.render_dnscrypt_toml(
        config.validate({"dnscrypt": {"resolvers": [{"name": "d", "stamp": UPSTREAM_DOH}]}})
    )
    (tmp_path / "a.toml").write_text(toml)
    (tmp_path / "b.toml").write_text(toml.replace('["[::]:53"]', '["0.0.0.0:53", "[::]:53"]'))

    good = namespaces.spawn(
        namespace, str(dnscrypt_proxy), "-config", str(tmp_path / "a.toml"), log_path=tmp_path / "a.log"
    )
    wait_for(lambda: "Now listening to [::]:53 [TCP]" in (tmp_path / "a.log").read_text(), "dnscrypt-proxy", good)
    listening = namespaces.run(namespace, "ss", "-Hlntu").stdout
    good.terminate()
    good.wait(timeout=5)
    bad = subprocess.run(
        ["ip", "netns", "exec", namespace, str(dnscrypt_proxy), "-config", str(tmp_path / "b.toml")],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )

    assert "[::]:53" in listening or "*:53" in listening, listening
    assert bad.returncode != 0
    assert "address already in use" in bad.stdout + bad.stderr
