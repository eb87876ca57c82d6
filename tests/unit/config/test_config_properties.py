"""Property tests: every valid pillar renders a config dnscrypt-proxy accepts and a ruleset nft accepts."""

import ipaddress
import tomllib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.config.helpers import assert_check_passes, assert_nft_check_passes, config

ALL_PROPS = {"dnssec": True, "nolog": True, "nofilter": True}
LABELS = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
DNS_NAMES = st.lists(LABELS, min_size=2, max_size=4).map(".".join)
QUBE_NAMES = st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True).filter(
    lambda name: "whonix" not in name and not name.endswith("-dm") and name not in ("none", "default", "dom0")
)
IPV4 = st.one_of(
    st.ip_addresses(network="192.0.2.0/24"),
    st.ip_addresses(network="198.51.100.0/24"),
    st.ip_addresses(network="203.0.113.0/24"),
)
IPV6 = st.ip_addresses(network="2001:db8::/32")
PORTS = st.integers(min_value=1, max_value=65535).filter(lambda port: port != 53)


def _stamp(kind, ip, port, host, key):
    address = f"[{ip}]" if ip.version == 6 else str(ip)
    if kind == "dnscrypt":
        return config.encode_stamp(
            "dnscrypt",
            address=f"{address}:{port}",
            props=ALL_PROPS,
            public_key=key,
            provider_name="2.dnscrypt-cert." + host,
        )
    if kind == "doh":
        return config.encode_stamp("doh", address=address, props=ALL_PROPS, host=f"{host}:{port}", path="/dns-query")
    return config.encode_stamp("dnscrypt-relay", address=f"{address}:{port}")


@st.composite
def servers(draw, kind, families, count):
    addresses = st.one_of(*[IPV4 if family == 4 else IPV6 for family in families])
    entries = []
    for index in range(count):
        ip = draw(addresses)
        proto = draw(st.sampled_from(["dnscrypt", "doh"])) if kind == "resolver" else "relay"
        host = f"n{index}." + draw(DNS_NAMES)  # unique, so no two stamps are equal
        # Relay stamps hold only an address: a distinct port keeps them unique.
        port = draw(PORTS) if kind == "resolver" else 4430 + index
        stamp = _stamp(proto, ip, port, host, draw(st.binary(min_size=32, max_size=32)).hex())
        entries.append({"name": f"{kind}-{index}", "stamp": stamp, "proto": proto})
    return entries


def _socket(ip, port):
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


PATTERNS = st.one_of(
    DNS_NAMES,
    DNS_NAMES.map(lambda name: "=" + name),
    DNS_NAMES.map(lambda name: "*." + name),
    LABELS.map(lambda label: label + "*"),
    LABELS.filter(lambda label: len(label) > 1).map(lambda label: f"*{label}*"),
    LABELS.map(lambda label: f"{label}[0-9].example"),
    LABELS.map(lambda label: f"{label}?.example"),
)


@st.composite
def pillars(draw):
    ipv4 = draw(st.booleans())
    ipv6 = True
    if ipv4:
        ipv6 = draw(st.booleans())
    families = [family for family, enabled in ((4, ipv4), (6, ipv6)) if enabled]
    resolvers = draw(servers("resolver", families, draw(st.integers(min_value=1, max_value=4))))
    relays = draw(servers("relay", families, draw(st.integers(min_value=0, max_value=2))))
    names = [entry["name"] for entry in resolvers]
    dnscrypt_names = [entry["name"] for entry in resolvers if entry["proto"] == "dnscrypt"]

    min_ttl, max_ttl = sorted(draw(st.lists(st.integers(min_value=0, max_value=604800), min_size=2, max_size=2)))
    neg_min, neg_max = sorted(draw(st.lists(st.integers(min_value=0, max_value=604800), min_size=2, max_size=2)))

    zones = draw(st.lists(DNS_NAMES, max_size=3, unique=True))
    forwarding = [
        {
            "zone": zone,
            "servers": draw(
                st.lists(
                    st.builds(_socket, st.one_of(IPV4, IPV6), st.integers(min_value=1, max_value=65535)),
                    min_size=1,
                    max_size=3,
                    unique=True,
                )
            ),
        }
        for zone in zones
    ]

    routes = []
    if relays and dnscrypt_names:
        routes = [
            {
                "server_name": draw(st.sampled_from(dnscrypt_names + ["*"])),
                "via": draw(st.sampled_from([["*"], [relays[0]["name"]]])),
            }
        ]

    dnscrypt = {
        "resolvers": [{"name": entry["name"], "stamp": entry["stamp"]} for entry in resolvers],
        "relays": [{"name": entry["name"], "stamp": entry["stamp"]} for entry in relays],
        "server_names": draw(st.one_of(st.none(), st.lists(st.sampled_from(names), min_size=1, unique=True))),
        "ipv4_servers": ipv4,
        "ipv6_servers": ipv6,
        "lb_strategy": draw(st.sampled_from(["p2", "ph", "first", "random", "p5"])),
        "timeout_ms": draw(st.integers(min_value=100, max_value=60000)),
        "keepalive_s": draw(st.integers(min_value=1, max_value=3600)),
        "max_clients": draw(st.integers(min_value=1, max_value=65536)),
        "cache": {
            "enabled": draw(st.booleans()),
            "size": draw(st.integers(min_value=16, max_value=1048576)),
            "min_ttl": min_ttl,
            "max_ttl": max_ttl,
            "neg_min_ttl": neg_min,
            "neg_max_ttl": neg_max,
        },
        "query_log": {
            "enabled": draw(st.booleans()),
            "format": draw(st.sampled_from(["tsv", "ltsv"])),
            "ignored_qtypes": draw(
                st.lists(st.sampled_from(["A", "AAAA", "DNSKEY", "NS", "TXT"]), unique=True, max_size=3)
            ),
        },
        "forwarding_rules": forwarding,
        "cloaking_rules": draw(
            st.lists(
                st.fixed_dictionaries(
                    {"name": PATTERNS, "address": st.one_of(IPV4.map(str), IPV6.map(str), DNS_NAMES)}
                ),
                max_size=3,
                unique_by=lambda rule: (rule["name"], rule["address"]),
            )
        ),
        "blocked_names": draw(st.lists(PATTERNS, max_size=4, unique=True)),
        "allowed_names": draw(st.lists(PATTERNS, max_size=2, unique=True)),
        "anonymized_routes": routes,
        "block_client_dot": draw(st.booleans()),
    }

    return {
        "qube": {
            "name": draw(QUBE_NAMES.filter(lambda name: name not in ("sys-net", "tpl-sys-dns", "debian-12-hard-min"))),
            "class": draw(st.sampled_from(["AppVM", "DispVM"])),
        },
        "rewire": [],
        "dnscrypt": dnscrypt,
    }


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(pillar=pillars())
def test_valid_pillar_renders_accepted_files(pillar, tmp_path):
    cfg = config.validate(pillar)

    toml_text = config.render_dnscrypt_toml(cfg)
    parsed = tomllib.loads(toml_text)
    assert parsed["server_names"] == cfg["dnscrypt"]["server_names"]
    assert_check_passes(toml_text, tmp_path)

    ruleset = config.render_nft_ruleset(cfg)
    assert_nft_check_passes(ruleset, tmp_path)
    for rule in cfg["dnscrypt"]["forwarding_rules"]:
        for server in rule["servers"]:
            host, port = server.rsplit(":", 1)
            assert f"{ipaddress.ip_address(host.strip('[]'))} . {port}" in ruleset

    files = config.render_rule_files(cfg)
    for name, content in files.items():
        body = [line for line in content.splitlines() if not line.startswith("#")]
        assert body, name
        for line in body:
            fields = line.split()
            assert len(fields) == (2 if name in ("forwarding-rules.txt", "cloaking-rules.txt") else 1), line


JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def _set_path(tree, path, value):
    """Place value at a pillar key path; '*' becomes a one-entry list of mappings."""
    node = tree
    for position, key in enumerate(path[:-1]):
        if key == "*":
            continue
        following = path[position + 1]
        if following == "*":
            entries = node.setdefault(key, [{}])
            if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
                return
            node = entries[0]
        else:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                return
            node = child
    if path[-1] != "*":
        node[path[-1]] = value


@settings(max_examples=300, deadline=None)
@given(
    assignments=st.lists(
        st.tuples(st.sampled_from(config.pillar_keys()), JUNK),
        min_size=1,
        max_size=6,
    )
)
def test_junk_pillar_raises_only_invalid_input(assignments):
    pillar = {}
    for key, value in assignments:
        _set_path(pillar, key.split(":"), value)

    try:
        cfg = config.validate(pillar)
    except config.SaltInvocationError as error:
        for line in str(error).splitlines()[1:]:
            assert line.startswith("sysdns"), line
        return
    # Whatever passes validation renders.
    config.config_files(cfg)
