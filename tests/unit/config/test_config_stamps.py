"""DNS stamps: real-world stamps, round trips, and malformed input."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from salt.exceptions import SaltInvocationError

from tests.unit.config.helpers import config

ENCODE_FIELDS = (
    "address",
    "props",
    "props_value",
    "public_key",
    "provider_name",
    "hashes",
    "host",
    "path",
    "bootstrap_ips",
)

# Stamps from DNSCrypt/dnscrypt-resolvers (v3/public-resolvers.md, relays.md,
# odoh-servers.md, odoh-relays.md), with the fields they must decode to:
# (stamp, proto, ip, port, host or provider name, path, (dnssec, nolog, nofilter))
REAL_STAMPS = [
    (  # quad9-dnscrypt-ip4-nofilter-pri
        "sdns://AQcAAAAAAAAADTkuOS45LjEwOjg0NDMgZ8hHuMh1jNEgJFVDvnVnRt803x2EwAuMRwNo34Idhj4ZMi5kbnNjcnlwdC1jZXJ0LnF1YWQ5Lm5ldA",
        "dnscrypt",
        "9.9.9.10",
        8443,
        "2.dnscrypt-cert.quad9.net",
        None,
        (True, True, True),
    ),
    (  # quad9-dnscrypt-ip4-filter-pri
        "sdns://AQMAAAAAAAAADDkuOS45Ljk6ODQ0MyBnyEe4yHWM0SAkVUO-dWdG3zTfHYTAC4xHA2jfgh2GPhkyLmRuc2NyeXB0LWNlcnQucXVhZDkubmV0",
        "dnscrypt",
        "9.9.9.9",
        8443,
        "2.dnscrypt-cert.quad9.net",
        None,
        (True, True, False),
    ),
    (  # quad9-dnscrypt-ip6-nofilter-pri
        "sdns://AQcAAAAAAAAAElsyNjIwOmZlOjoxMF06ODQ0MyBnyEe4yHWM0SAkVUO-dWdG3zTfHYTAC4xHA2jfgh2GPhkyLmRuc2NyeXB0LWNlcnQucXVhZDkubmV0",
        "dnscrypt",
        "2620:fe::10",
        8443,
        "2.dnscrypt-cert.quad9.net",
        None,
        (True, True, True),
    ),
    (  # scaleway-fr: no port in the address
        "sdns://AQcAAAAAAAAADjIxMi40Ny4yMjguMTM2IOgBuE6mBr-wusDOQ0RbsV66ZLAvo8SqMa4QY2oHkDJNHzIuZG5zY3J5cHQtY2VydC5mci5kbnNjcnlwdC5vcmc",
        "dnscrypt",
        "212.47.228.136",
        443,
        "2.dnscrypt-cert.fr.dnscrypt.org",
        None,
        (True, True, True),
    ),
    (  # cloudflare
        "sdns://AgcAAAAAAAAABzEuMC4wLjEAEmRucy5jbG91ZGZsYXJlLmNvbQovZG5zLXF1ZXJ5",
        "doh",
        "1.0.0.1",
        443,
        "dns.cloudflare.com",
        "/dns-query",
        (True, True, True),
    ),
    (  # cloudflare-ipv6: the host field carries a port
        "sdns://AgcAAAAAAAAAFlsyNjA2OjQ3MDA6NDcwMDo6MTExMV0AGlsyNjA2OjQ3MDA6NDcwMDo6MTExMV06NDQzCi9kbnMtcXVlcnk",
        "doh",
        "2606:4700:4700::1111",
        443,
        "[2606:4700:4700::1111]:443",
        "/dns-query",
        (True, True, True),
    ),
    (  # quad9-doh-ip4-port443-nofilter-pri: one certificate hash
        "sdns://AgcAAAAAAAAACDkuOS45LjEwILAZIHRLu3bJqwU-AeB7fgUORz0g95976kNfr-Q8nSQvE2RuczEwLnF1YWQ5Lm5ldDo0NDMKL2Rucy1xdWVyeQ",
        "doh",
        "9.9.9.10",
        443,
        "dns10.quad9.net:443",
        "/dns-query",
        (True, True, True),
    ),
    (  # libredns
        "sdns://AgIAAAAAAAAADjExNi4yMDIuMTc2LjI2IDLtuxHMJY--M8LNJKFJJw8L5vRG9XJks70cJbmFMycuD2RvaC5saWJyZWRucy5ncgovZG5zLXF1ZXJ5",
        "doh",
        "116.202.176.26",
        443,
        "doh.libredns.gr",
        "/dns-query",
        (False, True, False),
    ),
    (  # mullvad-doh
        "sdns://AgcAAAAAAAAACzE5NC4yNDIuMi4yAA9kbnMubXVsbHZhZC5uZXQKL2Rucy1xdWVyeQ",
        "doh",
        "194.242.2.2",
        443,
        "dns.mullvad.net",
        "/dns-query",
        (True, True, True),
    ),
    (  # anon-cs-nl
        "sdns://gRExODUuMTA3LjgwLjg0OjQ0Mw",
        "dnscrypt-relay",
        "185.107.80.84",
        443,
        None,
        None,
        (False, False, False),
    ),
    (  # anon-cs-nl6
        "sdns://gRpbMmEwMDoxNzY4OjYwMDE6ODo6NTNdOjQ0Mw",
        "dnscrypt-relay",
        "2a00:1768:6001:8::53",
        443,
        None,
        None,
        (False, False, False),
    ),
    (  # odoh-cloudflare: an ODoH target has no address
        "sdns://BQcAAAAAAAAAF29kb2guY2xvdWRmbGFyZS1kbnMuY29tCi9kbnMtcXVlcnk",
        "odoh-target",
        None,
        443,
        "odoh.cloudflare-dns.com",
        "/dns-query",
        (True, True, True),
    ),
    (  # odohrelay-numa
        "sdns://hQcAAAAAAAAAAAASb2RvaC1yZWxheS5udW1hLnJzBi9yZWxheQ",
        "odoh-relay",
        None,
        443,
        "odoh-relay.numa.rs",
        "/relay",
        (True, True, True),
    ),
]


@pytest.mark.parametrize("stamp, proto, ip, port, name, path, props", REAL_STAMPS)
def test_real_stamp_decodes(stamp, proto, ip, port, name, path, props):
    decoded = config.decode_stamp(stamp, require_ip=False)

    assert decoded["proto"] == proto
    assert decoded["ip"] == ip
    assert decoded["port"] == port
    assert (decoded["provider_name"] or decoded["host"]) == name
    assert decoded["path"] == path
    assert (decoded["props"]["dnssec"], decoded["props"]["nolog"], decoded["props"]["nofilter"]) == props


@pytest.mark.parametrize("stamp", [case[0] for case in REAL_STAMPS])
def test_real_stamp_round_trip(stamp):
    decoded = config.decode_stamp(stamp, require_ip=False)

    assert config.encode_stamp(decoded["proto"], **{key: decoded[key] for key in ENCODE_FIELDS}) == stamp


def test_dnscrypt_fields():
    decoded = config.decode_stamp(REAL_STAMPS[0][0])

    assert decoded["address"] == "9.9.9.10:8443"
    assert decoded["address_port"] == 8443
    assert decoded["family"] == 4
    assert len(decoded["public_key"]) == 64
    assert decoded["hashes"] == []
    assert decoded["props_value"] == 7


def test_doh_hash_decoded():
    decoded = config.decode_stamp(REAL_STAMPS[6][0])

    assert decoded["hashes"] == ["b019207 44bbb76c9ab053e01e07b7e050e473d20f79f7bea435fafe43c9d242f".replace(" ", "")]


def test_relay_has_no_properties():
    decoded = config.decode_stamp("sdns://gRExODUuMTA3LjgwLjg0OjQ0Mw")

    assert decoded["props_value"] is None
    assert decoded["address"] == "185.107.80.84:443"


@pytest.mark.parametrize("stamp", [REAL_STAMPS[11][0], REAL_STAMPS[12][0]])
def test_stamp_without_ip_rejected_by_default(stamp):
    with pytest.raises(SaltInvocationError, match="in plaintext DNS"):
        config.decode_stamp(stamp)


def test_doh_without_address_rejected():
    stamp = config.encode_stamp("doh", host="doh.lab.test", path="/dns-query")

    with pytest.raises(SaltInvocationError, match="would look up 'doh.lab.test' in plaintext DNS"):
        config.decode_stamp(stamp)
    assert config.decode_stamp(stamp, require_ip=False)["ip"] is None


@pytest.mark.parametrize("proto", ["dot", "doq"])
def test_dot_and_doq_decoded(proto):
    stamp = config.encode_stamp(
        proto, address="[2001:db8::4]", props={"nolog": True}, host="dot.lab.test", hashes=["ab" * 32]
    )

    decoded = config.decode_stamp(stamp)

    assert decoded["proto"] == proto
    assert decoded["ip"] == "2001:db8::4"
    assert decoded["family"] == 6
    assert decoded["port"] == 853
    assert decoded["hashes"] == ["ab" * 32]
    assert decoded["props"] == {"dnssec": False, "nolog": True, "nofilter": False}


def test_bootstrap_ips_decoded():
    stamp = config.encode_stamp(
        "doh", address="192.0.2.3", host="doh.lab.test", path="/q", bootstrap_ips=["192.0.2.1", "192.0.2.2"]
    )

    assert config.decode_stamp(stamp)["bootstrap_ips"] == ["192.0.2.1", "192.0.2.2"]


@pytest.mark.parametrize("stamp", [REAL_STAMPS[0][0], REAL_STAMPS[4][0], REAL_STAMPS[6][0], REAL_STAMPS[9][0]])
def test_every_truncation_rejected(stamp):
    # Cut on 4-character boundaries so that the base64 stays canonical and the
    # field parser itself must notice the missing bytes.
    for length in range(len("sdns://"), len(stamp), 4):
        with pytest.raises(SaltInvocationError):
            config.decode_stamp(stamp[:length], require_ip=False)


def test_trailing_bytes_rejected():
    stamp = config.encode_stamp("dnscrypt-relay", address="192.0.2.9:443")
    padded = config._encode_stamp("dnscrypt-relay", address="192.0.2.9:443")
    assert stamp == padded
    raw = bytes([0x81, 13]) + b"192.0.2.9:443" + b"\x00\x00\x00"
    import base64

    bad = "sdns://" + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    with pytest.raises(SaltInvocationError, match="unexpected bytes after the last field"):
        config.decode_stamp(bad)


@pytest.mark.parametrize(
    "stamp, text",
    [
        ("sdns:AgcA", "starts with 'sdns://'"),
        ("sdns://", "URL-safe base64"),
        ("sdns://AgcA==", "URL-safe base64"),
        ("sdns://Ag+A", "URL-safe base64"),
        ("sdns://Bw", "unknown protocol byte 0x07"),
        (None, "expected a string"),
    ],
)
def test_malformed_stamp_rejected(stamp, text):
    with pytest.raises(SaltInvocationError, match=text.replace("+", r"\+")):
        config.decode_stamp(stamp)


@pytest.mark.parametrize(
    "address, text",
    [
        ("192.0.2.2:", "empty port"),
        ("192.0.2.2:99999", "invalid port"),
        ("dns.lab.test:443", "not an IP address"),
        ("2001:db8::2", "not an IP address"),
        ("[fe80::1%eth0]:443", "IPv6 zone"),
        ("192.0.2.02:443", "not an IP address"),
    ],
)
def test_bad_stamp_address_rejected(address, text):
    stamp = config.encode_stamp("dnscrypt-relay", address=address)

    with pytest.raises(SaltInvocationError, match=text):
        config.decode_stamp(stamp)


def test_dnscrypt_stamp_below_go_minimum_rejected():
    stamp = config.encode_stamp("dnscrypt", address="192.0.2.2", public_key="00" * 32, provider_name="p")

    with pytest.raises(SaltInvocationError, match="at least 66 bytes"):
        config.decode_stamp(stamp)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"proto": "doh", "host": "h" * 256}, "longer than 255 bytes"),
        ({"proto": "doh", "hashes": ["00" * 128]}, "longer than 127 bytes"),
        ({"proto": "tor"}, "unknown protocol 'tor'"),
        ({"proto": "doh", "props": {"nolog": True}, "props_value": 1}, "disagree"),
        ({"proto": "dnscrypt", "public_key": "zz"}, "bytes or a hex string"),
        ({"proto": "doh", "host": "h\u00e9"}, "must be ASCII"),
    ],
)
def test_encode_rejects_bad_fields(kwargs, text):
    with pytest.raises(SaltInvocationError, match=text):
        config.encode_stamp(**kwargs)


def test_encode_keeps_unknown_property_bits():
    stamp = config.encode_stamp("doh", address="192.0.2.3", host="h.lab.test", path="/", props_value=0x107)

    decoded = config.decode_stamp(stamp)

    assert decoded["props_value"] == 0x107
    assert decoded["props"] == {"dnssec": True, "nolog": True, "nofilter": True}


def _ip_addresses():
    # Documentation ranges: every address is long enough for the minimum stamp
    # sizes of go-dnsstamps (a relay stamp of "[::]" would be too short).
    ipv4 = st.one_of(st.ip_addresses(network="192.0.2.0/24"), st.ip_addresses(network="198.51.100.0/24")).map(str)
    ipv6 = st.ip_addresses(network="2001:db8::/32").map(lambda ip: f"[{ip}]")
    return st.one_of(ipv4, ipv6)


def _addresses():
    ports = st.integers(min_value=1, max_value=65535)
    return st.one_of(
        _ip_addresses(),
        st.builds(lambda ip, port: f"{ip}:{port}", _ip_addresses(), ports),
    )


_host_names = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){1,3}", fullmatch=True)
_props = st.fixed_dictionaries({"dnssec": st.booleans(), "nolog": st.booleans(), "nofilter": st.booleans()})
_hashes = st.lists(st.binary(min_size=32, max_size=32).map(bytes.hex), max_size=3)


@settings(max_examples=200, deadline=None)
@given(
    proto=st.sampled_from(["dnscrypt", "doh", "dnscrypt-relay", "odoh-relay", "dot", "doq"]),
    address=_addresses(),
    props=_props,
    key=st.binary(min_size=32, max_size=32).map(bytes.hex),
    provider=_host_names.map(lambda name: "2.dnscrypt-cert." + name),
    hashes=_hashes,
    host=_host_names,
    path=st.from_regex(r"/[a-z0-9/-]{0,30}", fullmatch=True),
)
def test_generated_stamp_round_trip(proto, address, props, key, provider, hashes, host, path):
    fields = {"address": address, "props": props}
    if proto == "dnscrypt":
        fields.update(public_key=key, provider_name=provider)
    elif proto != "dnscrypt-relay":
        fields.update(hashes=hashes, host=host)
        if proto in ("doh", "odoh-relay"):
            fields["path"] = path

    stamp = config.encode_stamp(proto, **fields)
    decoded = config.decode_stamp(stamp)

    assert decoded["proto"] == proto
    assert decoded["address"] == address
    assert config.encode_stamp(proto, **{key: decoded[key] for key in ENCODE_FIELDS}) == stamp
    if proto != "dnscrypt-relay":
        assert decoded["props"] == props
    if proto == "dnscrypt":
        assert decoded["public_key"] == key
        assert decoded["provider_name"] == provider
    if proto in ("doh", "dot", "doq", "odoh-relay"):
        assert decoded["hashes"] == hashes
        assert decoded["host"] == host
