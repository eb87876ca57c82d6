"""Validation of the sysdns pillar: defaults, normalization and a corpus of bad input."""

import copy

import pytest
from salt.exceptions import SaltInvocationError

from tests.unit.config.helpers import config, validation_errors

QUAD9_FILTER = (  # quad9-dnscrypt-ip4-filter-pri: DNSSEC and no-log, filtering
    "sdns://AQMAAAAAAAAADDkuOS45Ljk6ODQ0MyBnyEe4yHWM0SAkVUO-dWdG3zTfHYTAC4xHA2jfgh2GPhkyLmRuc2NyeXB0LWNlcnQucXVhZDkubmV0"
)
LIBREDNS = (  # libredns: no-log only
    "sdns://AgIAAAAAAAAADjExNi4yMDIuMTc2LjI2IDLtuxHMJY--M8LNJKFJJw8L5vRG9XJks70cJbmFMycuD2RvaC5saWJyZWRucy5ncgovZG5zLXF1ZXJ5"
)
QUAD9_IP6 = (  # quad9-dnscrypt-ip6-nofilter-pri
    "sdns://AQcAAAAAAAAAElsyNjIwOmZlOjoxMF06ODQ0MyBnyEe4yHWM0SAkVUO-dWdG3zTfHYTAC4xHA2jfgh2GPhkyLmRuc2NyeXB0LWNlcnQucXVhZDkubmV0"
)
ANON_CS_NL = "sdns://gRExODUuMTA3LjgwLjg0OjQ0Mw"
ODOH_TARGET = "sdns://BQcAAAAAAAAAF29kb2guY2xvdWRmbGFyZS1kbnMuY29tCi9kbnMtcXVlcnk"
ODOH_RELAY = "sdns://hQcAAAAAAAAAAAASb2RvaC1yZWxheS5udW1hLnJzBi9yZWxheQ"
CLOUDFLARE = config.DEFAULT_RESOLVERS[3]["stamp"]
ALL_PROPS = {"dnssec": True, "nolog": True, "nofilter": True}
KEY = "11" * 32


def dnscrypt_stamp(address="192.0.2.2:443", public_key=KEY, provider="2.dnscrypt-cert.lab.test", props=None):
    return config.encode_stamp(
        "dnscrypt", address=address, props=props or ALL_PROPS, public_key=public_key, provider_name=provider
    )


def doh_stamp(address="192.0.2.3", host="doh.lab.test", path="/dns-query", **extra):
    return config.encode_stamp("doh", address=address, props=ALL_PROPS, host=host, path=path, **extra)


def non_canonical(stamp):
    """Set an unused trailing bit of a stamp's base64 text, which Go's strict decoder rejects."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    payload = stamp[len("sdns://") :]
    assert len(payload) % 4 in (2, 3), "the stamp needs trailing bits"
    last = alphabet.index(payload[-1])
    assert last & 1 == 0
    return "sdns://" + payload[:-1] + alphabet[last | 1]


def resolvers(*stamps):
    return [{"name": f"r{index}", "stamp": stamp} for index, stamp in enumerate(stamps)]


def dnscrypt(**values):
    return {"dnscrypt": values}


MINISIGN_KEY = "RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3"
SOURCE_LIST = {
    "name": "public",
    "urls": ["https://lists.lab.test/public-resolvers.md"],
    "minisign_key": MINISIGN_KEY,
}

# (pillar, key path, text the message must contain)
BAD_INPUT = [
    # the root
    ("sysdns", "sysdns", "expected a mapping"),
    ({"dnscrpyt": {}}, "sysdns:dnscrpyt", "did you mean 'dnscrypt'?"),
    # template
    ({"template": "debian-12"}, "sysdns:template", "expected a mapping"),
    ({"template": {"sourc": "x"}}, "sysdns:template:sourc", "did you mean 'source'?"),
    ({"template": {"source": "debian 12"}}, "sysdns:template:source", "it contains whitespace"),
    ({"template": {"source": "a" * 32}}, "sysdns:template:source", "longer than 31 characters"),
    ({"template": {"clone": "yes"}}, "sysdns:template:clone", "expected true or false"),
    ({"template": {"clone": False, "name": "other"}}, "sysdns:template:name", "when clone is false"),
    ({"template": {"name": "debian-12-hard-min"}}, "sysdns:template:name", "other than template:source"),
    ({"template": {"name": "tpl.sys-dns"}}, "sysdns:template:name", "contains a dot, which Qubes 4.2 rejects"),
    # qube
    ({"qube": {"name": "none"}}, "sysdns:qube:name", "'none' is reserved by Qubes"),
    ({"qube": {"name": "dom0"}}, "sysdns:qube:name", "'dom0' is reserved by Qubes"),
    ({"qube": {"name": "sys-dns-dm"}}, "sysdns:qube:name", "ending in '-dm'"),
    ({"qube": {"name": "1sys-dns"}}, "sysdns:qube:name", "expected a qube name"),
    ({"qube": {"name": "sys-dns;reboot"}}, "sysdns:qube:name", "shell metacharacter ';'"),
    ({"qube": {"name": "sys-dns$(id)"}}, "sysdns:qube:name", "shell metacharacter '$'"),
    ({"qube": {"name": "sys-dns\n"}}, "sysdns:qube:name", "it contains a newline"),
    ({"qube": {"name": "sys\x00dns"}}, "sysdns:qube:name", "it contains a NUL character"),
    ({"qube": {"name": "sys-dns\u00e9"}}, "sysdns:qube:name", "non-ASCII character"),
    ({"qube": {"name": "sys'dns"}}, "sysdns:qube:name", "it contains a quote"),
    ({"qube": {"name": ""}}, "sysdns:qube:name", "it is empty"),
    ({"qube": {"name": 42}}, "sysdns:qube:name", "it is a int, not a string"),
    ({"qube": {"class": "StandaloneVM"}}, "sysdns:qube:class", "expected one of 'AppVM', 'DispVM'"),
    ({"qube": {"label": "pink"}}, "sysdns:qube:label", "expected a Qubes label"),
    ({"qube": {"memory": True}}, "sysdns:qube:memory", "it is a boolean"),
    ({"qube": {"memory": 100}}, "sysdns:qube:memory", "expected an integer from 200 to 65536 (MiB)"),
    ({"qube": {"memory": "400"}}, "sysdns:qube:memory", "it is a str"),
    ({"qube": {"maxmem": 300}}, "sysdns:qube:maxmem", "expected 0 (no memory balancing) or at least"),
    ({"qube": {"maxmem": -1}}, "sysdns:qube:maxmem", "out of range"),
    ({"qube": {"vcpus": 0}}, "sysdns:qube:vcpus", "expected an integer from 1 to 64"),
    ({"qube": {"vcpus": 1.5}}, "sysdns:qube:vcpus", "it is a float"),
    ({"qube": {"netvm": "sys-dns"}}, "sysdns:qube:netvm", "expected a qube other than qube:name"),
    ({"qube": {"name": "tpl-sys-dns"}}, "sysdns:qube:name", "other than the template's"),
    ({"qube": {"autostart": 1}}, "sysdns:qube:autostart", "expected true or false"),
    ({"qube": {"disposable_template": "dvm"}}, "sysdns:qube:disposable_template", "when qube:class is 'AppVM'"),
    (
        {"qube": {"class": "DispVM", "disposable_template": "sys-dns"}},
        "sysdns:qube:disposable_template",
        "other than qube:name",
    ),
    ({"qube": {"memroy": 500}}, "sysdns:qube:memroy", "did you mean 'memory'?"),
    # rewire
    ({"rewire": "sys-firewall"}, "sysdns:rewire", "expected a list"),
    ({"rewire": None}, "sysdns:rewire", "it is a NoneType"),
    ({"rewire": ["sys-firewall", "sys-firewall"]}, "sysdns:rewire:1", "duplicate of sysdns:rewire:0"),
    ({"rewire": ["sys-dns"]}, "sysdns:rewire:0", "downstream of itself"),
    ({"rewire": ["sys-net"]}, "sysdns:rewire:0", "a loop"),
    ({"rewire": ["tpl-sys-dns"]}, "sysdns:rewire:0", "template of sys-dns"),
    ({"rewire": ["sys-whonix"]}, "sysdns:rewire:0", "Whonix qubes keep their Tor chain"),
    ({"rewire": ["anon-whonix"]}, "sysdns:rewire:0", "Whonix qubes keep their Tor chain"),
    ({"rewire": ["my-Whonix-ws"]}, "sysdns:rewire:0", "Whonix qubes keep their Tor chain"),
    ({"rewire": [f"q{index}" for index in range(65)]}, "sysdns:rewire", "a list of 65 entries is invalid"),
    # rollback
    ({"rollback": {"remove_qubes": "yes"}}, "sysdns:rollback:remove_qubes", "expected true or false"),
    ({"rollback": {"remove_qube": True}}, "sysdns:rollback:remove_qube", "did you mean 'remove_qubes'?"),
    ({"rollback": True}, "sysdns:rollback", "expected a mapping"),
    # resolvers and relays
    (dnscrypt(resolvers=[]), "sysdns:dnscrypt:resolvers", "a list of 0 entries is invalid"),
    (dnscrypt(resolvers=[{"name": "x"}]), "sysdns:dnscrypt:resolvers:0:stamp", "missing: expected a DNS stamp"),
    (dnscrypt(resolvers=[{"name": "x", "stamp": "s", "ip": "1"}]), "sysdns:dnscrypt:resolvers:0:ip", "unknown key"),
    (
        dnscrypt(resolvers=resolvers("https://dns.example/dns-query")),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "starting with 'sdns://'",
    ),
    (dnscrypt(resolvers=resolvers(CLOUDFLARE[:-8])), "sysdns:dnscrypt:resolvers:0:stamp", "truncated"),
    (
        dnscrypt(resolvers=resolvers("sdns://AgcA=AAA")),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "URL-safe base64 without padding",
    ),
    (dnscrypt(resolvers=resolvers(non_canonical(doh_stamp()))), "sysdns:dnscrypt:resolvers:0:stamp", "not canonical"),
    (dnscrypt(resolvers=resolvers(doh_stamp(address=""))), "sysdns:dnscrypt:resolvers:0:stamp", "in plaintext DNS"),
    (dnscrypt(resolvers=resolvers(ODOH_TARGET)), "sysdns:dnscrypt:resolvers:0:stamp", "has no IP address"),
    (dnscrypt(resolvers=resolvers(QUAD9_FILTER)), "sysdns:dnscrypt:resolvers:0:stamp", "lacks the nofilter property"),
    (
        dnscrypt(require_dnssec=True, require_nofilter=False, resolvers=resolvers(LIBREDNS)),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "lacks the dnssec property",
    ),
    (dnscrypt(resolvers=resolvers(ANON_CS_NL)), "sysdns:dnscrypt:resolvers:0:stamp", "it is a relay stamp"),
    (
        dnscrypt(
            resolvers=resolvers(config.encode_stamp("dot", address="192.0.2.4", props=ALL_PROPS, host="dot.lab.test"))
        ),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "cannot use DOT stamps",
    ),
    (
        dnscrypt(resolvers=resolvers(config.encode_stamp("plain", address="192.0.2.1", props=ALL_PROPS))),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "sends queries unencrypted",
    ),
    (
        dnscrypt(resolvers=resolvers(dnscrypt_stamp(address="192.0.2.2:53"))),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "uses port 53",
    ),
    (
        dnscrypt(resolvers=resolvers(QUAD9_IP6)),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "IPv6 address but dnscrypt:ipv6_servers is false",
    ),
    (
        dnscrypt(ipv4_servers=False, ipv6_servers=True, resolvers=resolvers(CLOUDFLARE)),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "IPv4 address but dnscrypt:ipv4_servers is false",
    ),
    (
        dnscrypt(resolvers=[{"name": "a", "stamp": CLOUDFLARE}, {"name": "a", "stamp": doh_stamp()}]),
        "sysdns:dnscrypt:resolvers:1:name",
        "duplicate of sysdns:dnscrypt:resolvers:0:name",
    ),
    (
        dnscrypt(resolvers=[{"name": "a", "stamp": CLOUDFLARE}, {"name": "b", "stamp": CLOUDFLARE}]),
        "sysdns:dnscrypt:resolvers:1:stamp",
        "duplicate of sysdns:dnscrypt:resolvers:0:stamp",
    ),
    (
        dnscrypt(resolvers=[{"name": "my resolver", "stamp": CLOUDFLARE}]),
        "sysdns:dnscrypt:resolvers:0:name",
        "expected a server name",
    ),
    (
        dnscrypt(resolvers=[{"name": "a", "stamp": CLOUDFLARE}], relays=[{"name": "a", "stamp": ANON_CS_NL}]),
        "sysdns:dnscrypt:relays:0:name",
        "duplicate of sysdns:dnscrypt:resolvers:0:name",
    ),
    (
        dnscrypt(relays=[{"name": "relay", "stamp": CLOUDFLARE}]),
        "sysdns:dnscrypt:relays:0:stamp",
        "expected a DNSCrypt relay stamp",
    ),
    (
        dnscrypt(relays=[{"name": "relay", "stamp": ODOH_RELAY}]),
        "sysdns:dnscrypt:relays:0:stamp",
        "ODoH relays only serve ODoH targets",
    ),
    (
        dnscrypt(resolvers=resolvers(doh_stamp(address="192.0.2.3:8443", host="doh.lab.test"))),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "differs from the host port 443",
    ),
    (
        dnscrypt(resolvers=resolvers(doh_stamp(bootstrap_ips=["192.0.2.1"]))),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "rejects stamps with bootstrap IP addresses",
    ),
    (
        dnscrypt(
            resolvers=resolvers(
                dnscrypt_stamp(public_key="22" * 16, provider="2.dnscrypt-cert.a-long-provider.lab.test")
            )
        ),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "public key must be 32 bytes",
    ),
    (
        dnscrypt(
            resolvers=resolvers(
                config.encode_stamp(
                    "dnscrypt", address="192.0.2.2", props=ALL_PROPS, public_key="33" * 20, provider_name="x"
                )
            )
        ),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "too short",
    ),
    (
        dnscrypt(resolvers=resolvers(doh_stamp(path="dns-query"))),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "must start with '/'",
    ),
    (
        dnscrypt(resolvers=resolvers(doh_stamp(host="doh.lab.test;id"))),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "unsafe characters",
    ),
    # server_names
    (
        dnscrypt(server_names=["nope"]),
        "sysdns:dnscrypt:server_names:0",
        "expected the name of an entry in dnscrypt:resolvers",
    ),
    (
        dnscrypt(relays=[{"name": "anon-cs-nl", "stamp": ANON_CS_NL}], server_names=["anon-cs-nl"]),
        "sysdns:dnscrypt:server_names:0",
        "it names a relay",
    ),
    (dnscrypt(server_names=[]), "sysdns:dnscrypt:server_names", "no server_names key to use every resolver"),
    (dnscrypt(server_names=["cloudflare", "cloudflare"]), "sysdns:dnscrypt:server_names:1", "duplicate"),
    # resolver options
    (
        dnscrypt(ipv4_servers=False, ipv6_servers=False),
        "sysdns:dnscrypt:ipv6_servers",
        "ipv4_servers or dnscrypt:ipv6_servers",
    ),
    (dnscrypt(lb_strategy="wp2"), "sysdns:dnscrypt:lb_strategy", "'wp2' does not exist in dnscrypt-proxy 2.1.8"),
    (dnscrypt(lb_strategy="fastest"), "sysdns:dnscrypt:lb_strategy", "expected 'p2', 'ph', 'first', 'random'"),
    (dnscrypt(lb_strategy="p0"), "sysdns:dnscrypt:lb_strategy", "expected 'p2'"),
    (dnscrypt(timeout_ms=50), "sysdns:dnscrypt:timeout_ms", "from 100 to 60000 (milliseconds)"),
    (dnscrypt(keepalive_s=True), "sysdns:dnscrypt:keepalive_s", "it is a boolean"),
    (dnscrypt(max_clients=-1), "sysdns:dnscrypt:max_clients", "out of range"),
    (dnscrypt(max_clients=False), "sysdns:dnscrypt:max_clients", "it is a boolean"),
    (dnscrypt(require_nolog="true"), "sysdns:dnscrypt:require_nolog", "expected true or false"),
    (
        dnscrypt(cache={"min_ttl": 700, "max_ttl": 600}),
        "sysdns:dnscrypt:cache:min_ttl",
        "at most dnscrypt:cache:max_ttl (600)",
    ),
    (dnscrypt(cache={"neg_min_ttl": 900}), "sysdns:dnscrypt:cache:neg_min_ttl", "at most dnscrypt:cache:neg_max_ttl"),
    (dnscrypt(cache={"size": 0}), "sysdns:dnscrypt:cache:size", "(entries)"),
    (dnscrypt(cache={"sise": 10}), "sysdns:dnscrypt:cache:sise", "did you mean 'size'?"),
    (dnscrypt(query_log={"format": "json"}), "sysdns:dnscrypt:query_log:format", "expected one of 'tsv', 'ltsv'"),
    (dnscrypt(query_log={"ignored_qtypes": ["aaaa"]}), "sysdns:dnscrypt:query_log:ignored_qtypes:0", "uppercase"),
    # forwarding rules
    (
        dnscrypt(forwarding_rules=[{"zone": "corp example", "servers": ["192.0.2.53"]}]),
        "sysdns:dnscrypt:forwarding_rules:0:zone",
        "whitespace",
    ),
    (
        dnscrypt(forwarding_rules=[{"zone": "-bad-.example", "servers": ["192.0.2.53"]}]),
        "sysdns:dnscrypt:forwarding_rules:0:zone",
        "label '-bad-' is invalid",
    ),
    (
        dnscrypt(forwarding_rules=[{"zone": "corp.example", "servers": ["dns.corp.example"]}]),
        "sysdns:dnscrypt:forwarding_rules:0:servers:0",
        "is not an IP address",
    ),
    (
        dnscrypt(forwarding_rules=[{"zone": "corp.example", "servers": ["192.0.2.53:70000"]}]),
        "sysdns:dnscrypt:forwarding_rules:0:servers:0",
        "out of range",
    ),
    (
        dnscrypt(forwarding_rules=[{"zone": "corp.example", "servers": ["127.0.0.1"]}]),
        "sysdns:dnscrypt:forwarding_rules:0:servers:0",
        "would loop",
    ),
    (
        dnscrypt(forwarding_rules=[{"zone": "corp.example", "servers": ["255.255.255.255"]}]),
        "sysdns:dnscrypt:forwarding_rules:0:servers:0",
        "it is the IPv4 broadcast address, not a unicast address",
    ),
    (
        dnscrypt(forwarding_rules=[{"zone": "corp.example", "servers": ["::ffff:192.0.2.1"]}]),
        "sysdns:dnscrypt:forwarding_rules:0:servers:0",
        "write the IPv4 address 192.0.2.1:53",
    ),
    (
        dnscrypt(sources={"allow_plaintext_bootstrap": ["255.255.255.255"]}),
        "sysdns:dnscrypt:sources:allow_plaintext_bootstrap:0",
        "broadcast address",
    ),
    (
        dnscrypt(resolvers=resolvers(dnscrypt_stamp(address="127.0.0.1:443"))),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "its address 127.0.0.1 is a loopback address",
    ),
    (
        dnscrypt(resolvers=resolvers(doh_stamp(address="[::1]:443"))),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "its address ::1 is a loopback address",
    ),
    (
        dnscrypt(resolvers=resolvers(dnscrypt_stamp(address="224.0.0.1:443"))),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "its address 224.0.0.1: it is not a unicast address",
    ),
    (
        dnscrypt(resolvers=resolvers(dnscrypt_stamp(address="0.0.0.0:443"))),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "its address 0.0.0.0: it is not a unicast address",
    ),
    (
        dnscrypt(resolvers=resolvers(dnscrypt_stamp(address="255.255.255.255:443"))),
        "sysdns:dnscrypt:resolvers:0:stamp",
        "its address 255.255.255.255: it is the IPv4 broadcast address",
    ),
    (
        dnscrypt(relays=[{"name": "relay0", "stamp": config.encode_stamp("dnscrypt-relay", address="127.0.0.1:443")}]),
        "sysdns:dnscrypt:relays:0:stamp",
        "is a loopback address",
    ),
    (
        dnscrypt(forwarding_rules=[{"zone": "corp.example", "servers": []}]),
        "sysdns:dnscrypt:forwarding_rules:0:servers",
        "a list of 0 entries",
    ),
    (
        dnscrypt(forwarding_rules=[{"zone": "corp.example", "servers": "192.0.2.53"}]),
        "sysdns:dnscrypt:forwarding_rules:0:servers",
        "expected a list",
    ),
    (
        dnscrypt(forwarding_rules=[{"zone": "corp.example", "servers": ["192.0.2.53;reboot"]}]),
        "sysdns:dnscrypt:forwarding_rules:0:servers:0",
        "shell metacharacter ';'",
    ),
    (
        dnscrypt(forwarding_rules=[{"zone": "corp.example", "servers": ["[192.0.2.53]:53"]}]),
        "sysdns:dnscrypt:forwarding_rules:0:servers:0",
        "without brackets",
    ),
    (
        dnscrypt(forwarding_rules=[{"zone": "corp.example", "servers": ["fe80::1%eth0"]}]),
        "sysdns:dnscrypt:forwarding_rules:0:servers:0",
        "is not an IP address",
    ),
    (
        dnscrypt(
            forwarding_rules=[
                {"zone": "corp.example", "servers": ["192.0.2.53"]},
                {"zone": "Corp.Example.", "servers": ["192.0.2.54"]},
            ]
        ),
        "sysdns:dnscrypt:forwarding_rules:1:zone",
        "duplicate of sysdns:dnscrypt:forwarding_rules:0:zone",
    ),
    (
        dnscrypt(forwarding_rules=[{"zone": "corp.example", "server": ["192.0.2.53"]}]),
        "sysdns:dnscrypt:forwarding_rules:0:server",
        "did you mean 'servers'?",
    ),
    # cloaking, blocked and allowed names
    (
        dnscrypt(cloaking_rules=[{"name": "printer corp", "address": "192.0.2.80"}]),
        "sysdns:dnscrypt:cloaking_rules:0:name",
        "whitespace",
    ),
    (
        dnscrypt(cloaking_rules=[{"name": "printer.corp.example", "address": "printer!"}]),
        "sysdns:dnscrypt:cloaking_rules:0:address",
        "shell metacharacter '!'",
    ),
    (
        dnscrypt(
            cloaking_rules=[
                {"name": "p.example", "address": "192.0.2.80"},
                {"name": "p.example", "address": "192.0.2.80"},
            ]
        ),
        "sysdns:dnscrypt:cloaking_rules:1",
        "duplicate",
    ),
    (dnscrypt(blocked_names=["*"]), "sysdns:dnscrypt:blocked_names:0", "it matches every name"),
    (dnscrypt(blocked_names=["ads[.example"]), "sysdns:dnscrypt:blocked_names:0", "'[' without ']'"),
    (dnscrypt(blocked_names=["ads.example@work"]), "sysdns:dnscrypt:blocked_names:0", "name pattern"),
    (dnscrypt(blocked_names=["ads.example", "ads.example"]), "sysdns:dnscrypt:blocked_names:1", "duplicate"),
    (dnscrypt(allowed_names=["=*.example"]), "sysdns:dnscrypt:allowed_names:0", "cannot contain wildcards"),
    (
        dnscrypt(blocked_names=[f"n{index}.example" for index in range(4097)]),
        "sysdns:dnscrypt:blocked_names",
        "4096 entries",
    ),
    # anonymized routes
    (
        dnscrypt(
            relays=[{"name": "anon-cs-nl", "stamp": ANON_CS_NL}],
            anonymized_routes=[{"server_name": "cloudflare", "via": ["anon-cs-nl"]}],
        ),
        "sysdns:dnscrypt:anonymized_routes:0:server_name",
        "anonymizes only DNSCrypt servers",
    ),
    (
        dnscrypt(anonymized_routes=[{"server_name": "scaleway-fr", "via": ["ghost"]}]),
        "sysdns:dnscrypt:anonymized_routes:0:via:0",
        "expected the name of an entry in dnscrypt:relays",
    ),
    (
        dnscrypt(
            relays=[{"name": "anon-cs-nl", "stamp": ANON_CS_NL}],
            anonymized_routes=[{"server_name": "*", "via": ["*", "anon-cs-nl"]}],
        ),
        "sysdns:dnscrypt:anonymized_routes:0:via",
        "alone",
    ),
    (
        dnscrypt(anonymized_routes=[{"server_name": "*", "via": ["*"]}]),
        "sysdns:dnscrypt:anonymized_routes:0:via",
        "at least one entry in dnscrypt:relays",
    ),
    (
        dnscrypt(anonymized_routes=[{"server_name": "ghost", "via": ["*"]}]),
        "sysdns:dnscrypt:anonymized_routes:0:server_name",
        "expected the name of an entry",
    ),
    # sources
    (
        dnscrypt(sources={"lists": [SOURCE_LIST]}),
        "sysdns:dnscrypt:sources:allow_plaintext_bootstrap",
        "the opt-in must name where those lookups go",
    ),
    (
        dnscrypt(sources={"allow_plaintext_bootstrap": ["192.0.2.53"]}),
        "sysdns:dnscrypt:sources:allow_plaintext_bootstrap",
        "plaintext DNS for nothing",
    ),
    (
        dnscrypt(
            sources={
                "allow_plaintext_bootstrap": ["192.0.2.53"],
                "lists": [dict(SOURCE_LIST, urls=["http://lists.lab.test/x.md"])],
            }
        ),
        "sysdns:dnscrypt:sources:lists:0:urls:0",
        "expected an https:// URL",
    ),
    (
        dnscrypt(
            sources={"allow_plaintext_bootstrap": ["192.0.2.53"], "lists": [dict(SOURCE_LIST, minisign_key="RWabc")]}
        ),
        "sysdns:dnscrypt:sources:lists:0:minisign_key",
        "expected a minisign public key",
    ),
    (
        dnscrypt(
            sources={
                "allow_plaintext_bootstrap": ["192.0.2.53"],
                "lists": [dict(SOURCE_LIST, cache_file="../etc/passwd")],
            }
        ),
        "sysdns:dnscrypt:sources:lists:0:cache_file",
        "expected a file name",
    ),
    (
        dnscrypt(
            sources={"allow_plaintext_bootstrap": ["192.0.2.53"], "lists": [dict(SOURCE_LIST, refresh_delay_h=10)]}
        ),
        "sysdns:dnscrypt:sources:lists:0:refresh_delay_h",
        "from 25 to 169 (hours)",
    ),
    (
        dnscrypt(sources={"allow_plaintext_bootstrap": ["127.0.0.1:53"], "lists": [SOURCE_LIST]}),
        "sysdns:dnscrypt:sources:allow_plaintext_bootstrap:0",
        "dnscrypt-proxy itself listens there",
    ),
    (dnscrypt(sources={"list": []}), "sysdns:dnscrypt:sources:list", "did you mean 'lists'?"),
    (dnscrypt(block_client_dot="no"), "sysdns:dnscrypt:block_client_dot", "expected true or false"),
    # tests
    ({"tests": {"clients": ["sys-dns"]}}, "sysdns:tests:clients:0", "expected a qube downstream of sys-dns"),
    ({"tests": {"names": []}}, "sysdns:tests:names", "a list of 0 entries"),
    ({"tests": {"window_s": 1}}, "sysdns:tests:window_s", "from 2 to 300 (seconds)"),
    ({"tests": {"nxdomain_probe": "no such name"}}, "sysdns:tests:nxdomain_probe", "whitespace"),
]


def _case_id(case):
    return case[1].replace("sysdns:", "", 1) or "root"


@pytest.mark.parametrize("pillar, path, text", BAD_INPUT, ids=[_case_id(case) for case in BAD_INPUT])
def test_bad_input_rejected(pillar, path, text):
    errors = validation_errors(pillar)

    matching = [line for line in errors if line.startswith(path + ": ")]
    assert matching, f"no error for {path}, got: {errors}"
    assert any(text in line for line in matching), f"{text!r} not in {matching}"


def test_corpus_covers_at_least_fifty_cases():
    assert len(BAD_INPUT) >= 50


@pytest.mark.parametrize("pillar, path, text", BAD_INPUT, ids=[_case_id(case) for case in BAD_INPUT])
def test_bad_input_message_shows_value(pillar, path, text):
    errors = validation_errors(pillar)

    for line in errors:
        assert line.startswith("sysdns")
        assert "\n" not in line
        assert " is invalid: " in line or "unknown key" in line or "missing: " in line, line


def test_all_errors_collected_in_one_pass():
    pillar = {"qube": {"memory": True, "label": "pink"}, "rewire": ["sys-whonix"]}

    with pytest.raises(SaltInvocationError) as raised:
        config.validate(pillar)

    message = str(raised.value)
    assert message.startswith("the sysdns pillar has 3 invalid values:")
    assert "sysdns:qube:memory: True is invalid" in message
    assert "sysdns:qube:label: 'pink' is invalid" in message
    assert "sysdns:rewire:0: 'sys-whonix' is invalid" in message


def test_defaults_filled():
    cfg = config.validate({})

    assert cfg["template"] == {"source": "debian-12-hard-min", "clone": True, "name": "tpl-sys-dns"}
    assert cfg["qube"]["name"] == "sys-dns"
    assert cfg["qube"]["class"] == "AppVM"
    assert cfg["qube"]["disposable_template"] is None
    assert cfg["qube"]["memory"] == 400
    assert cfg["rewire"] == ["sys-firewall"]
    assert [entry["name"] for entry in cfg["dnscrypt"]["resolvers"]] == cfg["dnscrypt"]["server_names"]
    assert cfg["dnscrypt"]["require_nolog"] is True
    assert cfg["dnscrypt"]["require_nofilter"] is True
    assert cfg["dnscrypt"]["sources"] == {"allow_plaintext_bootstrap": [], "lists": []}
    assert cfg["tests"]["window_s"] == 10


def test_defaults_do_not_leak_between_calls():
    first = config.validate({})
    first["dnscrypt"]["resolvers"].clear()
    first["rewire"].append("work")

    second = config.validate({})

    assert len(second["dnscrypt"]["resolvers"]) == len(config.DEFAULT_RESOLVERS)
    assert second["rewire"] == ["sys-firewall"]


def test_input_pillar_not_modified():
    pillar = {"qube": {"class": "DispVM"}, "template": {"clone": False}}
    before = copy.deepcopy(pillar)

    config.validate(pillar)

    assert pillar == before


def test_default_resolvers_meet_requirements():
    for entry in config.DEFAULT_RESOLVERS:
        decoded = config.decode_stamp(entry["stamp"])
        assert decoded["proto"] in ("dnscrypt", "doh")
        assert decoded["family"] == 4
        assert decoded["props"] == ALL_PROPS


def test_rollback_keeps_qubes_by_default():
    assert config.validate({})["rollback"] == {"remove_qubes": False}
    assert config.validate({"rollback": {"remove_qubes": True}})["rollback"] == {"remove_qubes": True}


def test_dispvm_gets_default_disposable_template():
    cfg = config.validate({"qube": {"class": "DispVM"}})

    assert cfg["qube"]["disposable_template"] == "sys-dns-dvm"


def test_template_name_forced_when_not_cloned():
    cfg = config.validate({"template": {"source": "debian-13-minimal", "clone": False}})

    assert cfg["template"]["name"] == "debian-13-minimal"


def test_values_normalized():
    cfg = config.validate(
        dnscrypt(
            forwarding_rules=[{"zone": "Corp.Example.", "servers": ["2001:db8::53", "192.0.2.53:5353"]}],
            cloaking_rules=[{"name": "Printer.Corp.Example", "address": "2001:DB8::80"}],
        )
    )

    rule = cfg["dnscrypt"]["forwarding_rules"][0]
    assert rule == {"zone": "corp.example", "servers": ["[2001:db8::53]:53", "192.0.2.53:5353"]}
    assert cfg["dnscrypt"]["cloaking_rules"][0] == {"name": "printer.corp.example", "address": "2001:db8::80"}


def test_qubes_resolvers_accepted_as_forwarders():
    # Forwarding an internal zone to the Qubes network's own resolvers is a real use.
    cfg = config.validate(
        dnscrypt(forwarding_rules=[{"zone": "corp.example", "servers": ["10.139.1.1", "10.139.1.2"]}])
    )

    assert cfg["dnscrypt"]["forwarding_rules"][0]["servers"] == ["10.139.1.1:53", "10.139.1.2:53"]


def test_truncated_stamp_message_reads():
    errors = validation_errors(dnscrypt(resolvers=resolvers(CLOUDFLARE[:-8])))

    assert len(errors) == 1
    assert "(truncated: the path takes 10 bytes but only 4 are left)" in errors[0]


def test_sources_allow_names_from_lists():
    cfg = config.validate(
        dnscrypt(
            server_names=[],
            sources={"allow_plaintext_bootstrap": ["192.0.2.53"], "lists": [SOURCE_LIST]},
        )
    )

    assert cfg["dnscrypt"]["server_names"] == []
    assert cfg["dnscrypt"]["sources"]["lists"][0]["cache_file"] == "public.md"
    assert cfg["dnscrypt"]["sources"]["allow_plaintext_bootstrap"] == ["192.0.2.53:53"]


def test_ipv6_resolver_accepted_with_ipv6_servers():
    cfg = config.validate(dnscrypt(ipv6_servers=True, resolvers=[{"name": "q6", "stamp": QUAD9_IP6}]))

    assert cfg["dnscrypt"]["server_names"] == ["q6"]


def test_filtering_resolver_accepted_when_not_required():
    cfg = config.validate(dnscrypt(require_nofilter=False, resolvers=[{"name": "q", "stamp": QUAD9_FILTER}]))

    assert cfg["dnscrypt"]["server_names"] == ["q"]


def test_pn_strategy_accepted():
    assert config.validate(dnscrypt(lb_strategy="p3"))["dnscrypt"]["lb_strategy"] == "p3"


def test_validate_without_pillar_outside_loader():
    with pytest.raises(SaltInvocationError, match="outside the Salt loader"):
        config.validate()


def test_validate_reads_loader_pillar(monkeypatch):
    monkeypatch.setattr(config, "__pillar__", {"sysdns": {"qube": {"label": "blue"}}}, raising=False)

    assert config.validate()["qube"]["label"] == "blue"


def test_validate_loader_pillar_without_sysdns(monkeypatch):
    monkeypatch.setattr(config, "__pillar__", {}, raising=False)

    assert config.validate()["qube"]["name"] == "sys-dns"


def test_virtual_name():
    assert config.__virtual__() == "sysdns_config"


def test_stamp_checked_when_flag_invalid():
    errors = validation_errors(dnscrypt(require_nolog="yes", resolvers=resolvers("sdns://AgcA=AAA")))

    assert any(line.startswith("sysdns:dnscrypt:require_nolog: 'yes' is invalid") for line in errors)
    assert any(line.startswith("sysdns:dnscrypt:resolvers:0:stamp: ") for line in errors)
