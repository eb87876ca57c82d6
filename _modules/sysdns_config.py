"""
Validate the ``sysdns`` pillar and render every file the formula writes for sys-dns.

Everything here is pure: the functions take the pillar or the normalized config and
return text, so unit tests import this file directly, without the Salt loader. Only
the Python standard library and ``salt.exceptions`` are used, because dom0 has
nothing else.

Facts about dnscrypt-proxy cite the 2.1.8 sources (``dnscrypt-proxy/config.go``,
``xtransport.go``, ``serversInfo.go`` and the vendored
``github.com/jedisct1/go-dnsstamps/dnsstamps.go``). Facts about Qubes cite
QubesOS/qubes-core-admin and QubesOS/qubes-core-agent-linux, release 4.2.
"""

import base64
import binascii
import copy
import difflib
import hashlib
import ipaddress
import json
import re

from salt.exceptions import SaltInvocationError

__virtualname__ = "sysdns_config"

FORMULA = "qubes-sysdns-formula"

# Paths inside sys-dns and its template. /rw/config survives a reboot of an AppVM;
# for a named disposable the same path lives in its disposable template's /rw.
CONFIG_DIR = "/rw/config/sysdns"
TOML_PATH = CONFIG_DIR + "/dnscrypt-proxy.toml"
NFT_PATH = CONFIG_DIR + "/sysdns.nft"
APPLY_SCRIPT_PATH = "/usr/lib/sysdns/apply-firewall"
# SHA-256 of `nft -s list table inet sysdns` taken by the apply script right after
# loading the table. /run is a tmpfs, so a reboot drops it with the table. The report
# helper compares the loaded table with it to find rules changed at runtime.
RUN_DIR = "/run/sysdns"
RULESET_RECORD_PATH = RUN_DIR + "/ruleset.sha256"
# The same for the fixed guard table inet sysdns_guard, written by sysdns-guard.service
# as sha256sum prints it.
GUARD_RECORD_PATH = RUN_DIR + "/guard.sha256"
UNIT_DIR = "/etc/systemd/system"
# Both directories are created by the unit (LogsDirectory=, CacheDirectory=) and owned
# by the service user, so dnscrypt-proxy can write there after dropping root.
QUERY_LOG_PATH = "/var/log/dnscrypt-proxy/query.log"
SOURCES_CACHE_DIR = "/var/cache/dnscrypt-proxy"

RULE_FILE_NAMES = {
    "forwarding_rules": "forwarding-rules.txt",
    "cloaking_rules": "cloaking-rules.txt",
    "blocked_names": "blocked-names.txt",
    "allowed_names": "allowed-names.txt",
}

# dnscrypt-proxy listens on the IPv6 wildcard only. Go opens "[::]:53" as one
# dual-stack socket (IPV6_V6ONLY=0), which also receives IPv4, 127.0.0.1 included;
# adding "0.0.0.0:53" makes 2.1.8 exit with "bind: address already in use".
# NOTE: a kernel booted with ipv6.disable=1 cannot open this socket.
LISTEN_ADDRESSES = ["[::]:53"]
# Loopback, so that no outside address is ever a default. With every stamp carrying
# an IP address dnscrypt-proxy never looks a name up. If it had to, the query would
# reach dnscrypt-proxy itself.
LOCAL_RESOLVER = "127.0.0.1:53"

QUBES_LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")

# The curated default resolvers: DNSCrypt and DoH, IPv4, each stamp carrying an IP
# address and the DNSSEC, no-log and no-filter properties. Stamps copied from
# DNSCrypt/dnscrypt-resolvers v3/public-resolvers.md (one stamp per name).
DEFAULT_RESOLVERS = (
    {
        "name": "quad9-dnscrypt-ip4-nofilter-pri",
        "stamp": "sdns://AQcAAAAAAAAADTkuOS45LjEwOjg0NDMgZ8hHuMh1jNEgJFVDvnVnRt803x2EwAuMRw"
        "No34Idhj4ZMi5kbnNjcnlwdC1jZXJ0LnF1YWQ5Lm5ldA",
    },
    {
        "name": "scaleway-fr",
        "stamp": "sdns://AQcAAAAAAAAADjIxMi40Ny4yMjguMTM2IOgBuE6mBr-wusDOQ0RbsV66ZLAvo8SqMa4QY2"
        "oHkDJNHzIuZG5zY3J5cHQtY2VydC5mci5kbnNjcnlwdC5vcmc",
    },
    {
        "name": "dnscrypt.ca-ipv4",
        "stamp": "sdns://AQcAAAAAAAAAEzE4NS4xMTEuMTg4LjQ2Ojg0NDMgC-tbTwd-08e_JtBJmgsvjAG9i10itE"
        "-LBNCwjTflezQiMi5kbnNjcnlwdC1jZXJ0LmRuc2NyeXB0LmNhLTEtaXB2NA",
    },
    {
        "name": "cloudflare",
        "stamp": "sdns://AgcAAAAAAAAABzEuMC4wLjEAEmRucy5jbG91ZGZsYXJlLmNvbQovZG5zLXF1ZXJ5",
    },
    {
        "name": "mullvad-doh",
        "stamp": "sdns://AgcAAAAAAAAACzE5NC4yNDIuMi4yAA9kbnMubXVsbHZhZC5uZXQKL2Rucy1xdWVyeQ",
    },
    {
        "name": "quad9-doh-ip4-port443-nofilter-pri",
        "stamp": "sdns://AgcAAAAAAAAACDkuOS45LjEwILAZIHRLu3bJqwU-AeB7fgUORz0g95976kNfr-Q8nSQvE2"
        "RuczEwLnF1YWQ5Lm5ldDo0NDMKL2Rucy1xdWVyeQ",
    },
)

# Size limits for pillar lists. They bound the work of a state run and the size of
# the files written into sys-dns. None is a dnscrypt-proxy limit.
MAX_REWIRE = 64
MAX_RESOLVERS = 32
MAX_RELAYS = 32
MAX_FORWARDING_RULES = 256
MAX_SERVERS_PER_RULE = 8
MAX_CLOAKING_RULES = 1024
MAX_NAME_PATTERNS = 4096
MAX_ROUTES = 32
MAX_VIA = 16
MAX_SOURCE_LISTS = 4
MAX_SOURCE_URLS = 4
MAX_BOOTSTRAP = 4
MAX_IGNORED_QTYPES = 16
MAX_TEST_CLIENTS = 64
MAX_TEST_NAMES = 16


def __virtual__():
    return __virtualname__


# ---------------------------------------------------------------------------
# Stamps
# ---------------------------------------------------------------------------

STAMP_PREFIX = "sdns://"

_PROTO_NAMES = {
    0x00: "plain",
    0x01: "dnscrypt",
    0x02: "doh",
    0x03: "dot",
    0x04: "doq",
    0x05: "odoh-target",
    0x81: "dnscrypt-relay",
    0x85: "odoh-relay",
}
_PROTO_CODES = {name: code for code, name in _PROTO_NAMES.items()}

# Minimum decoded lengths that go-dnsstamps (as vendored in dnscrypt-proxy 2.1.8)
# enforces before parsing. A shorter stamp is rejected there even when its fields
# would fit. DoT and DoQ are absent because 2.1.8 cannot parse them at all.
_GO_MIN_LENGTH = {0x00: 11, 0x01: 66, 0x02: 15, 0x05: 12, 0x81: 9, 0x85: 13}

_PROP_DNSSEC = 1
_PROP_NOLOG = 2
_PROP_NOFILTER = 4

# Ports used when a stamp's address and host name give none: 443, except plain DNS
# (53) and DNS over TLS or QUIC (853), as in the DNS stamps specification.
_DEFAULT_PORT = {"plain": 53, "dot": 853, "doq": 853}


class _StampError(ValueError):
    """A stamp that cannot be decoded or encoded, with the reason."""


class _StampReader:
    """Read the length-prefixed fields of a decoded stamp."""

    def __init__(self, data):
        self.data = data
        self.pos = 0

    def remaining(self):
        return len(self.data) - self.pos

    def take(self, count, what):
        if count > self.remaining():
            raise _StampError(f"truncated: {what} takes {count} bytes but only {self.remaining()} are left")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def field(self, what):
        length = self.take(1, f"the length of {what}")[0]
        return self.take(length, what)

    def text(self, what):
        raw = self.field(what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise _StampError(f"{what} is not ASCII") from None

    def variable_list(self, what):
        # Every length byte except the last has bit 0x80 set, and a single 0x00
        # means an empty list.
        items = []
        while True:
            length_byte = self.take(1, f"a length in {what}")[0]
            length = length_byte & 0x7F
            item = self.take(length, what)
            if length:
                items.append(item)
            if not length_byte & 0x80:
                return items


def _split_stamp_address(address, default_port):
    """Split a stamp address into (ip, port, port_written) the way go-dnsstamps does."""
    colon = address.rfind(":")
    if colon < address.rfind("]"):
        colon = -1
    if colon < 0:
        host, port_text = address, str(default_port)
    else:
        host, port_text = address[:colon], address[colon + 1 :]
    if not port_text:
        raise _StampError(f"address {address!r} has an empty port")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise _StampError(f"address {address!r} has an invalid port")
    ip_text = host.lstrip("[").rstrip("]")
    if "%" in ip_text:
        raise _StampError(f"address {address!r} has an IPv6 zone, which is not allowed")
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        raise _StampError(f"address {address!r} is not an IP address") from None
    return ip, int(port_text), colon >= 0


def _split_host_port(host, default_port):
    """Split a stamp host name field into (name, port) as dnscrypt-proxy's ExtractHostAndPort."""
    colon = host.rfind(":")
    if 0 <= colon < len(host) - 1 and host[colon + 1 :].isdigit():
        return host[:colon], int(host[colon + 1 :])
    return host, default_port


def _decode_stamp(stamp, require_ip=True):
    if not isinstance(stamp, str):
        raise _StampError(f"expected a string, got {type(stamp).__name__}")
    if not stamp.startswith(STAMP_PREFIX):
        raise _StampError(f"a stamp starts with {STAMP_PREFIX!r}")
    payload = stamp[len(STAMP_PREFIX) :]
    if not re.fullmatch(r"[A-Za-z0-9_-]+", payload):
        raise _StampError("the part after sdns:// must be URL-safe base64 without padding")
    try:
        data = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    except (binascii.Error, ValueError):
        raise _StampError("the part after sdns:// is not valid base64") from None
    # Go's RawURLEncoding.Strict rejects non-zero trailing bits: re-encoding must
    # give back the same text.
    if base64.urlsafe_b64encode(data).decode("ascii").rstrip("=") != payload:
        raise _StampError("the base64 text is not canonical (non-zero trailing bits)")
    if not data:
        raise _StampError("the stamp is empty")

    code = data[0]
    proto = _PROTO_NAMES.get(code)
    if proto is None:
        raise _StampError(f"unknown protocol byte 0x{code:02x}")
    min_length = _GO_MIN_LENGTH.get(code)
    if min_length is not None and len(data) < min_length:
        raise _StampError(
            f"too short: a {proto} stamp needs at least {min_length} bytes "
            f"in dnscrypt-proxy 2.1.8, this one has {len(data)}"
        )

    reader = _StampReader(data)
    reader.take(1, "the protocol byte")
    decoded = {
        "stamp": stamp,
        "proto": proto,
        "props": {"dnssec": False, "nolog": False, "nofilter": False},
        "props_value": None,
        "address": "",
        "ip": None,
        "family": None,
        "port": None,
        "public_key": None,
        "provider_name": None,
        "hashes": [],
        "host": None,
        "path": None,
        "bootstrap_ips": [],
        "address_port": None,
    }
    if proto != "dnscrypt-relay":
        props_value = int.from_bytes(reader.take(8, "the properties"), "little")
        decoded["props_value"] = props_value
        decoded["props"] = {
            "dnssec": bool(props_value & _PROP_DNSSEC),
            "nolog": bool(props_value & _PROP_NOLOG),
            "nofilter": bool(props_value & _PROP_NOFILTER),
        }

    if proto != "odoh-target":
        decoded["address"] = reader.text("the server address")
    if proto == "dnscrypt":
        decoded["public_key"] = reader.field("the provider public key").hex()
        decoded["provider_name"] = reader.text("the provider name")
    elif proto in ("doh", "dot", "doq", "odoh-relay"):
        decoded["hashes"] = [item.hex() for item in reader.variable_list("the hashes")]
        decoded["host"] = reader.text("the host name")
        if proto in ("doh", "odoh-relay"):
            decoded["path"] = reader.text("the path")
        if reader.remaining():
            decoded["bootstrap_ips"] = [
                item.decode("ascii", "replace") for item in reader.variable_list("the bootstrap IP addresses")
            ]
    elif proto == "odoh-target":
        decoded["host"] = reader.text("the host name")
        decoded["path"] = reader.text("the path")
    if reader.remaining():
        raise _StampError(f"{reader.remaining()} unexpected bytes after the last field")

    _fill_stamp_endpoint(decoded, require_ip)
    return decoded


def _fill_stamp_endpoint(decoded, require_ip):
    proto = decoded["proto"]
    address = decoded["address"]
    default_port = _DEFAULT_PORT.get(proto, 443)
    address_port = written_port = None
    if address:
        ip, address_port, port_written = _split_stamp_address(address, default_port)
        if port_written:
            written_port = address_port
        decoded["ip"] = str(ip)
        decoded["family"] = ip.version
    elif proto in ("plain", "dnscrypt", "dnscrypt-relay"):
        raise _StampError(f"a {proto} stamp needs an IP address")

    if decoded["host"] is not None:
        host_name, host_port = _split_host_port(decoded["host"], default_port)
        if not host_name:
            raise _StampError("the host name is empty")
        # dnscrypt-proxy connects to the host's port (Fetch in xtransport.go). The
        # stamp's IP address only replaces the name lookup.
        decoded["port"] = host_port
    else:
        decoded["port"] = address_port
    decoded["address_port"] = written_port

    if require_ip and decoded["ip"] is None:
        raise _StampError(
            f"the {proto} stamp has no IP address, so dnscrypt-proxy would look up "
            f"{decoded['host']!r} in plaintext DNS: use a stamp that carries the address"
        )


def anonymized_resolvers(cfg):
    """
    Return the names of the resolvers of the validated pillar ``cfg`` that
    dnscrypt-proxy reaches only through anonymizing relays: those named by an
    ``anonymized_routes`` entry, or every DNSCrypt resolver when an entry names '*'.
    dnscrypt-proxy 2.1.8 also fetches their certificates through the relay, so a
    direct query from sys-dns would show the resolver the qube's public address.
    """
    routes = cfg["dnscrypt"]["anonymized_routes"]
    named = {route["server_name"] for route in routes}
    if "*" not in named:
        return named
    return {
        entry["name"] for entry in cfg["dnscrypt"]["resolvers"] if decode_stamp(entry["stamp"])["proto"] == "dnscrypt"
    }


def decode_stamp(stamp, require_ip=True):
    """
    Decode a DNS stamp (``sdns://``) into its fields.

    stamp
        The stamp text.

    require_ip
        When true (the default), reject a stamp without an IP address, because
        dnscrypt-proxy would then look the host name up in plaintext DNS. ODoH target
        stamps never carry one.

    Returns a dict: ``proto`` (``plain``, ``dnscrypt``, ``doh``, ``dot``, ``doq``,
    ``odoh-target``, ``dnscrypt-relay`` or ``odoh-relay``), ``props`` (``dnssec``,
    ``nolog``, ``nofilter`` booleans), ``props_value`` (the raw 64-bit field, None
    for DNSCrypt relays), ``address`` (as written in the stamp), ``ip``, ``family``
    (4 or 6), ``port`` (where dnscrypt-proxy connects), ``public_key`` (hex),
    ``provider_name``, ``hashes`` (hex), ``host``, ``path``, ``bootstrap_ips``,
    ``address_port`` (the port written in the address, None without one) and
    ``stamp``.

    Raises SaltInvocationError for a malformed stamp.

    CLI example:

    .. code-block:: bash

        salt-call sysdns_config.decode_stamp sdns://AgcAAAAAAAAABzEuMC4wLjEAEmRucy5jbG91ZGZsYXJlLmNvbQovZG5zLXF1ZXJ5
    """
    try:
        return _decode_stamp(stamp, require_ip=require_ip)
    except _StampError as error:
        raise SaltInvocationError(f"invalid stamp {stamp!r}: {error}") from None


def _ascii(value, what):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise _StampError(f"{what} must be a string, not {type(value).__name__}")
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise _StampError(f"{what} must be ASCII") from None


def _length_prefixed(value, what):
    value = _ascii(value, what)
    if len(value) > 255:
        raise _StampError(f"{what} is longer than 255 bytes")
    return bytes([len(value)]) + value


def _to_bytes(value, what):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    try:
        return bytes.fromhex(value)
    except (TypeError, ValueError):
        raise _StampError(f"{what} must be bytes or a hex string") from None


def _variable_list(items, what):
    if not items:
        return b"\x00"
    out = b""
    for index, item in enumerate(items):
        if len(item) > 0x7F:
            raise _StampError(f"an entry of {what} is longer than 127 bytes")
        flag = 0x80 if index < len(items) - 1 else 0
        out += bytes([len(item) | flag]) + item
    return out


def _encode_stamp(
    proto,
    address="",
    props=None,
    props_value=None,
    public_key=None,
    provider_name="",
    hashes=(),
    host="",
    path="",
    bootstrap_ips=(),
):
    code = proto if isinstance(proto, int) else _PROTO_CODES.get(proto)
    if code not in _PROTO_NAMES:
        raise _StampError(f"unknown protocol {proto!r}: expected one of {sorted(_PROTO_CODES)}")
    name = _PROTO_NAMES[code]

    value = 0
    for flag, bit in (("dnssec", _PROP_DNSSEC), ("nolog", _PROP_NOLOG), ("nofilter", _PROP_NOFILTER)):
        if (props or {}).get(flag):
            value |= bit
    if props_value is not None:
        if isinstance(props_value, bool) or not isinstance(props_value, int) or not 0 <= props_value < 2**64:
            raise _StampError("props_value must be an integer from 0 to 2**64 - 1")
        if props is not None and props_value & 7 != value:
            raise _StampError("props and props_value disagree")
        value = props_value

    data = bytes([code])
    if name != "dnscrypt-relay":
        data += value.to_bytes(8, "little")
    if name != "odoh-target":
        data += _length_prefixed(address or "", "address")
    if name == "dnscrypt":
        data += _length_prefixed(_to_bytes(public_key or b"", "public_key"), "public_key")
        data += _length_prefixed(provider_name or "", "provider_name")
    elif name in ("doh", "dot", "doq", "odoh-relay"):
        data += _variable_list([_to_bytes(item, "hashes") for item in hashes], "hashes")
        data += _length_prefixed(host or "", "host")
        if name in ("doh", "odoh-relay"):
            data += _length_prefixed(path or "", "path")
        if bootstrap_ips:
            data += _variable_list([_ascii(ip, "bootstrap_ips") for ip in bootstrap_ips], "bootstrap_ips")
    elif name == "odoh-target":
        data += _length_prefixed(host or "", "host")
        data += _length_prefixed(path or "", "path")
    return STAMP_PREFIX + base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def encode_stamp(
    proto,
    address="",
    props=None,
    props_value=None,
    public_key=None,
    provider_name="",
    hashes=(),
    host="",
    path="",
    bootstrap_ips=(),
):
    """
    Encode a DNS stamp (``sdns://``), the inverse of :py:func:`decode_stamp`.

    proto
        ``plain``, ``dnscrypt``, ``doh``, ``dot``, ``doq``, ``odoh-target``,
        ``dnscrypt-relay`` or ``odoh-relay`` (or the protocol byte).

    address
        ``IP``, ``IP:PORT`` or ``[IPv6]:PORT``, written as given.

    props
        Dict of ``dnssec``, ``nolog``, ``nofilter`` booleans.

    props_value
        The raw 64-bit properties field; overrides ``props`` (both must agree).

    public_key
        DNSCrypt provider public key, bytes or hex.

    provider_name
        DNSCrypt provider name, such as ``2.dnscrypt-cert.example.org``.

    hashes
        DoH, DoT, DoQ and ODoH relay certificate hashes (SHA-256 of the DER
        TBSCertificate), bytes or hex.

    host, path
        Host name (optionally ``:PORT``) and URL path.

    bootstrap_ips
        Optional trailing bootstrap addresses of DoH, DoT, DoQ and ODoH relay stamps.
        dnscrypt-proxy 2.1.8 rejects stamps that carry them.

    CLI example:

    .. code-block:: bash

        salt-call sysdns_config.encode_stamp doh address=192.0.2.3 host=doh.lab.test path=/dns-query
    """
    try:
        return _encode_stamp(
            proto,
            address=address,
            props=props,
            props_value=props_value,
            public_key=public_key,
            provider_name=provider_name,
            hashes=hashes,
            host=host,
            path=path,
            bootstrap_ips=bootstrap_ips,
        )
    except _StampError as error:
        raise SaltInvocationError(f"cannot encode a {proto} stamp: {error}") from None


# ---------------------------------------------------------------------------
# Value checks used by the pillar schema
# ---------------------------------------------------------------------------


class _Invalid(Exception):
    """A rejected value: the expected form, and optionally why this value misses it."""

    def __init__(self, expected, reason=None):
        super().__init__(expected)
        self.expected = expected
        self.reason = reason


_SHELL_METACHARACTERS = set(";&|$<>()\\!*?[]{}~#`^")


def _text_problem(value, allowed=""):
    """Return why a string cannot be written into a config file or command, or None."""
    for char in value:
        if char == "\x00":
            return "it contains a NUL character"
        if char in "\n\r":
            return "it contains a newline"
        if ord(char) < 0x20 or ord(char) == 0x7F:
            return "it contains a control character"
        if ord(char) > 0x7E:
            return "it contains a non-ASCII character"
        if char in "'\"":
            return "it contains a quote"
        if char.isspace():
            return "it contains whitespace"
        if char in _SHELL_METACHARACTERS and char not in allowed:
            return f"it contains the shell metacharacter {char!r}"
    return None


def _require_text(value, expected, allowed=""):
    if not isinstance(value, str):
        raise _Invalid(expected, f"it is a {type(value).__name__}, not a string")
    if not value:
        raise _Invalid(expected, "it is empty")
    problem = _text_problem(value, allowed)
    if problem:
        raise _Invalid(expected, problem)
    return value


def _integer(low, high, unit=""):
    suffix = f" {unit}" if unit else ""
    expected = f"expected an integer from {low} to {high}{suffix}"

    def check(value):
        if isinstance(value, bool):
            raise _Invalid(expected, "it is a boolean")
        if not isinstance(value, int):
            raise _Invalid(expected, f"it is a {type(value).__name__}")
        if not low <= value <= high:
            raise _Invalid(expected, "it is out of range")
        return value

    check.expected = expected
    return check


def _boolean(value):
    if not isinstance(value, bool):
        raise _Invalid("expected true or false", f"it is a {type(value).__name__}")
    return value


_boolean.expected = "expected true or false"


def _choice(*options):
    expected = "expected one of " + ", ".join(repr(option) for option in options)

    def check(value):
        if value not in options or isinstance(value, bool):
            raise _Invalid(expected)
        return value

    check.expected = expected
    return check


QUBE_NAME_FORM = "expected a qube name: a letter, then letters, digits, '_' or '-', at most 31 characters"
_RESERVED_QUBE_NAMES = ("none", "default", "dom0", "Domain-0")


def _qube_name(value):
    # Qubes 4.2 qubes/vm/__init__.py validate_name: ^[a-zA-Z][a-zA-Z0-9_-]*$, at most
    # 31 characters, not 'none', 'default' or 'Domain-0', not ending in '-dm'.
    # Qubes 4.3 also allows dots but 4.2 does not, so dots are rejected here.
    _require_text(value, QUBE_NAME_FORM)
    if len(value) > 31:
        raise _Invalid(QUBE_NAME_FORM, "it is longer than 31 characters")
    if "." in value:
        raise _Invalid(QUBE_NAME_FORM, "it contains a dot, which Qubes 4.2 rejects")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", value):
        raise _Invalid(QUBE_NAME_FORM)
    if value in _RESERVED_QUBE_NAMES:
        raise _Invalid(QUBE_NAME_FORM, f"{value!r} is reserved by Qubes")
    if value.endswith("-dm"):
        raise _Invalid(QUBE_NAME_FORM, "Qubes reserves names ending in '-dm'")
    return value


_qube_name.expected = QUBE_NAME_FORM


def _label(value):
    expected = "expected a Qubes label: " + ", ".join(QUBES_LABELS)
    if value not in QUBES_LABELS:
        raise _Invalid(expected)
    return value


_label.expected = "expected a Qubes label"

DNS_NAME_FORM = (
    "expected a DNS name: labels of letters, digits, '-' or '_' "
    "(1 to 63 characters each) separated by dots, at most 253 characters"
)


def _dns_name(value):
    _require_text(value, DNS_NAME_FORM)
    name = value[:-1] if value.endswith(".") and len(value) > 1 else value
    if len(name) > 253:
        raise _Invalid(DNS_NAME_FORM, "it is longer than 253 characters")
    for label in name.split("."):
        if not re.fullmatch(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", label):
            raise _Invalid(DNS_NAME_FORM, f"the label {label!r} is invalid")
    return name.lower()


_dns_name.expected = DNS_NAME_FORM

NAME_PATTERN_FORM = (
    "expected a dnscrypt-proxy name pattern: a name such as 'ads.example.com' "
    "(the name and its subdomains), '=name' (exactly that name), 'prefix*', "
    "'*substring*' or a glob with '*', '?' and '[...]'"
)


def _name_pattern(value):
    # The forms PatternMatcher.Add accepts in dnscrypt-proxy 2.1.8
    # (pattern_matcher.go). The formula does not support '@' time ranges.
    _require_text(value, NAME_PATTERN_FORM, allowed="*?[]")
    if len(value) > 253:
        raise _Invalid(NAME_PATTERN_FORM, "it is longer than 253 characters")
    if not re.fullmatch(r"=?[A-Za-z0-9_.*?\[\]-]+", value):
        raise _Invalid(NAME_PATTERN_FORM)
    if value.startswith("="):
        if re.search(r"[*?\[\]]", value):
            raise _Invalid(NAME_PATTERN_FORM, "an '=' pattern cannot contain wildcards")
        try:
            _dns_name(value[1:])
        except _Invalid as invalid:
            raise _Invalid(NAME_PATTERN_FORM, invalid.reason) from None
        return value.lower()
    core = value.strip("*")
    if not core.strip("."):
        raise _Invalid(NAME_PATTERN_FORM, "it matches every name")
    is_glob = "?" in value or "[" in value or "*" in value[1:-1]
    if is_glob:
        depth = 0
        for char in value:
            if char == "[":
                if depth:
                    raise _Invalid(NAME_PATTERN_FORM, "it nests '['")
                depth = 1
            elif char == "]":
                if not depth:
                    raise _Invalid(NAME_PATTERN_FORM, "it has ']' without '['")
                depth = 0
        if depth:
            raise _Invalid(NAME_PATTERN_FORM, "it has '[' without ']'")
        if "[]" in value:
            raise _Invalid(NAME_PATTERN_FORM, "it has an empty '[]'")
    elif value.startswith("*") and value.endswith("*") and len(value) < 3:
        raise _Invalid(NAME_PATTERN_FORM, "it is too short")
    return value.lower()


_name_pattern.expected = NAME_PATTERN_FORM


def _parse_ip(text):
    if "%" in text:
        raise ValueError("zone")
    return ipaddress.ip_address(text)


def _non_unicast_problem(ip):
    """Return why ``ip`` cannot be the address of one DNS server, or None."""
    if ip.is_unspecified or ip.is_multicast:
        return "it is not a unicast address"
    if ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255"):
        return "it is the IPv4 broadcast address, not a unicast address"
    return None


def _socket_address(default_port):
    expected = (
        f"expected an IP address with an optional port (default {default_port}): "
        "'192.0.2.53', '192.0.2.53:5353', '2001:db8::53' or '[2001:db8::53]:5353'"
    )

    def check(value):
        _require_text(value, expected, allowed="[]")
        port = default_port
        if value.startswith("["):
            match = re.fullmatch(r"\[([^\]]+)\](?::([0-9]{1,5}))?", value)
            if not match:
                raise _Invalid(expected)
            host, port_text = match.group(1), match.group(2)
            if port_text is not None:
                port = int(port_text)
        elif value.count(":") == 1:
            host, port_text = value.split(":")
            if not port_text.isdigit() or len(port_text) > 5:
                raise _Invalid(expected, "the port is not a number")
            port = int(port_text)
        else:
            host = value
        try:
            ip = _parse_ip(host)
        except ValueError:
            raise _Invalid(expected, f"{host!r} is not an IP address") from None
        if value.startswith("[") and ip.version == 4:
            raise _Invalid(expected, "IPv4 addresses are written without brackets")
        if not 1 <= port <= 65535:
            raise _Invalid(expected, "the port is out of range")
        problem = _non_unicast_problem(ip)
        if problem:
            raise _Invalid(expected, problem)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            raise _Invalid(
                expected,
                f"it is an IPv4-mapped IPv6 address: write the IPv4 address {_format_socket(ip.ipv4_mapped, port)}",
            )
        return _format_socket(ip, port)

    check.expected = expected
    return check


def _format_socket(ip, port):
    if ip.version == 6:
        return f"[{ip}]:{port}"
    return f"{ip}:{port}"


RESOLVER_NAME_FORM = (
    "expected a server name: a letter or digit, then letters, digits, '.', '_' or '-', at most 64 characters"
)


def _server_name(value):
    _require_text(value, RESOLVER_NAME_FORM)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise _Invalid(RESOLVER_NAME_FORM)
    return value


_server_name.expected = RESOLVER_NAME_FORM

ROUTE_NAME_FORM = RESOLVER_NAME_FORM + ", or '*' for all"


def _route_name(value):
    if value == "*":
        return value
    try:
        return _server_name(value)
    except _Invalid as invalid:
        raise _Invalid(ROUTE_NAME_FORM, invalid.reason) from None


_route_name.expected = ROUTE_NAME_FORM

STAMP_FORM = "expected a DNS stamp starting with 'sdns://'"
STAMP_DECODE_FORM = "expected a well-formed DNS stamp"


def _stamp_text(value):
    _require_text(value, STAMP_FORM)
    if len(value) > 2048:
        raise _Invalid(STAMP_FORM, "it is longer than 2048 characters")
    if not value.startswith(STAMP_PREFIX):
        raise _Invalid(STAMP_FORM)
    return value


_stamp_text.expected = STAMP_FORM

LB_STRATEGY_FORM = (
    "expected 'p2', 'ph', 'first', 'random' or 'pN' (N from 1 to 64): "
    "the load-balancing strategies of dnscrypt-proxy 2.1.8"
)


def _lb_strategy(value):
    _require_text(value, LB_STRATEGY_FORM)
    if value == "wp2":
        raise _Invalid(
            LB_STRATEGY_FORM,
            "'wp2' does not exist in dnscrypt-proxy 2.1.8, which would ignore it",
        )
    if value in ("p2", "ph", "first", "random"):
        return value
    match = re.fullmatch(r"p([1-9][0-9]?)", value)
    if match and int(match.group(1)) <= 64:
        return value
    raise _Invalid(LB_STRATEGY_FORM)


_lb_strategy.expected = LB_STRATEGY_FORM

QTYPE_FORM = "expected a DNS record type such as 'AAAA' or 'DNSKEY' (uppercase)"


def _qtype(value):
    _require_text(value, QTYPE_FORM)
    if not re.fullmatch(r"[A-Z][A-Z0-9]{0,9}", value):
        raise _Invalid(QTYPE_FORM)
    return value


_qtype.expected = QTYPE_FORM

URL_FORM = "expected an https:// URL without spaces, quotes or shell metacharacters"


def _https_url(value):
    _require_text(value, URL_FORM, allowed="")
    if len(value) > 512:
        raise _Invalid(URL_FORM, "it is longer than 512 characters")
    match = re.fullmatch(r"https://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[A-Za-z0-9._~%/+=,:@-]*)?", value)
    if not match:
        raise _Invalid(URL_FORM)
    return value


_https_url.expected = URL_FORM

MINISIGN_FORM = "expected a minisign public key: 56 base64 characters starting with 'RW'"


def _minisign_key(value):
    _require_text(value, MINISIGN_FORM)
    if not re.fullmatch(r"RW[A-Za-z0-9+/]{54}", value):
        raise _Invalid(MINISIGN_FORM)
    raw = base64.b64decode(value)
    if len(raw) != 42 or raw[:2] != b"Ed":
        raise _Invalid(MINISIGN_FORM, "it does not decode to an Ed25519 minisign key")
    return value


_minisign_key.expected = MINISIGN_FORM

FILE_NAME_FORM = f"expected a file name (letters, digits, '.', '_' or '-', no '/'), kept in {SOURCES_CACHE_DIR}"


def _file_name(value):
    _require_text(value, FILE_NAME_FORM)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", value):
        raise _Invalid(FILE_NAME_FORM)
    return value


_file_name.expected = FILE_NAME_FORM

PREFIX_FORM = "expected a server-name prefix: letters, digits, '.', '_' or '-', or ''"


def _name_prefix(value):
    if value == "":
        return value
    _require_text(value, PREFIX_FORM)
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,32}", value):
        raise _Invalid(PREFIX_FORM)
    return value


_name_prefix.expected = PREFIX_FORM

CLOAK_TARGET_FORM = "expected an IPv4 or IPv6 address, or a DNS name"


def _cloak_target(value):
    _require_text(value, CLOAK_TARGET_FORM)
    try:
        return str(_parse_ip(value))
    except ValueError:
        pass
    try:
        return _dns_name(value)
    except _Invalid:
        raise _Invalid(CLOAK_TARGET_FORM) from None


_cloak_target.expected = CLOAK_TARGET_FORM


# ---------------------------------------------------------------------------
# Pillar schema
# ---------------------------------------------------------------------------

_BAD = object()
"""Marks a value that failed validation, so later cross checks skip it."""


class _Errors:
    """Collect every validation error of one pillar pass."""

    def __init__(self):
        self.messages = []

    def add(self, path, message):
        self.messages.append(f"{_path_text(path)}: {message}")

    def invalid(self, path, value, expected, reason=None):
        shown = repr(value)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        text = f"{shown} is invalid: {expected}"
        if reason:
            text += f" ({reason})"
        self.add(path, text)


def _path_text(path):
    # Keys the user wrote may hold any character: quote them unless plain, so every
    # error stays on one line.
    parts = ["sysdns"]
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            parts.append(str(part))
        elif isinstance(part, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", part):
            parts.append(part)
        else:
            parts.append(repr(part))
    return ":".join(parts)


class _Scalar:
    def __init__(self, check, default):
        self.check = check
        self.default = default

    def default_value(self):
        return copy.deepcopy(self.default)

    def normalize(self, value, path, errors):
        try:
            return self.check(value)
        except _Invalid as invalid:
            errors.invalid(path, value, invalid.expected, invalid.reason)
            return _BAD

    def key_paths(self, prefix):
        return []


class _Optional:
    """A value that may also be null (YAML ``~`` or ``null``)."""

    def __init__(self, node, default=None):
        self.node = node
        self.default = default

    def default_value(self):
        return copy.deepcopy(self.default)

    def normalize(self, value, path, errors):
        if value is None:
            return None
        return self.node.normalize(value, path, errors)

    def key_paths(self, prefix):
        return self.node.key_paths(prefix)


class _Struct:
    def __init__(self, fields, required=()):
        self.fields = fields
        self.required = required

    def default_value(self):
        return {key: node.default_value() for key, node in self.fields.items()}

    def normalize(self, value, path, errors):
        if not isinstance(value, dict):
            errors.invalid(path, value, "expected a mapping with the keys " + ", ".join(self.fields))
            return _BAD
        result = {}
        for key in value:
            if key not in self.fields:
                errors.add(path + [key], _unknown_key_message(key, self.fields))
        for key, node in self.fields.items():
            if key in value:
                result[key] = node.normalize(value[key], path + [key], errors)
            elif key in self.required:
                errors.add(path + [key], f"missing: {_expected_of(node)}")
                result[key] = _BAD
            else:
                result[key] = node.default_value()
        return result

    def key_paths(self, prefix):
        paths = []
        for key, node in self.fields.items():
            paths.append(prefix + (key,))
            paths.extend(node.key_paths(prefix + (key,)))
        return paths


class _List:
    def __init__(self, item, max_items, default=(), min_items=0):
        self.item = item
        self.max_items = max_items
        self.min_items = min_items
        self.default = list(default)

    def default_value(self):
        return copy.deepcopy(self.default)

    def normalize(self, value, path, errors):
        expected = f"expected a list of {self.min_items} to {self.max_items} entries"
        if not isinstance(value, list):
            errors.invalid(path, value, expected, f"it is a {type(value).__name__}")
            return _BAD
        if not self.min_items <= len(value) <= self.max_items:
            errors.add(path, f"a list of {len(value)} entries is invalid: {expected}")
            return _BAD
        return [self.item.normalize(entry, path + [index], errors) for index, entry in enumerate(value)]

    def key_paths(self, prefix):
        return self.item.key_paths(prefix + ("*",))


def _unknown_key_message(key, known):
    message = "unknown key"
    if isinstance(key, str):
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
        if close:
            return f"{message}, did you mean {close[0]!r}?"
    return f"{message}, expected one of: " + ", ".join(known)


def _expected_of(node):
    check = getattr(node, "check", None)
    return getattr(check, "expected", "expected a value")


_RESOLVER_ENTRY = _Struct(
    {"name": _Scalar(_server_name, None), "stamp": _Scalar(_stamp_text, None)},
    required=("name", "stamp"),
)

_SCHEMA = _Struct(
    {
        "template": _Struct(
            {
                "source": _Scalar(_qube_name, "debian-12-hard-min"),
                "clone": _Scalar(_boolean, True),
                "name": _Scalar(_qube_name, "tpl-sys-dns"),
            }
        ),
        "qube": _Struct(
            {
                "name": _Scalar(_qube_name, "sys-dns"),
                "class": _Scalar(_choice("AppVM", "DispVM"), "AppVM"),
                "disposable_template": _Optional(_Scalar(_qube_name, None)),
                "label": _Scalar(_label, "orange"),
                "memory": _Scalar(_integer(200, 65536, "(MiB)"), 400),
                "maxmem": _Scalar(_integer(0, 1048576, "(MiB, 0 disables memory balancing)"), 0),
                "vcpus": _Scalar(_integer(1, 64), 1),
                "netvm": _Scalar(_qube_name, "sys-net"),
                "autostart": _Scalar(_boolean, True),
            }
        ),
        "rewire": _List(_Scalar(_qube_name, None), MAX_REWIRE, default=["sys-firewall"]),
        "rollback": _Struct({"remove_qubes": _Scalar(_boolean, False)}),
        "dnscrypt": _Struct(
            {
                "resolvers": _List(_RESOLVER_ENTRY, MAX_RESOLVERS, default=DEFAULT_RESOLVERS, min_items=1),
                "relays": _List(_RESOLVER_ENTRY, MAX_RELAYS),
                "server_names": _Optional(_List(_Scalar(_server_name, None), MAX_RESOLVERS)),
                "require_dnssec": _Scalar(_boolean, False),
                "require_nolog": _Scalar(_boolean, True),
                "require_nofilter": _Scalar(_boolean, True),
                "ipv4_servers": _Scalar(_boolean, True),
                "ipv6_servers": _Scalar(_boolean, False),
                "lb_strategy": _Scalar(_lb_strategy, "p2"),
                "timeout_ms": _Scalar(_integer(100, 60000, "(milliseconds)"), 5000),
                "keepalive_s": _Scalar(_integer(1, 3600, "(seconds)"), 30),
                "max_clients": _Scalar(_integer(1, 65536), 250),
                "cache": _Struct(
                    {
                        "enabled": _Scalar(_boolean, True),
                        "size": _Scalar(_integer(16, 1048576, "(entries)"), 4096),
                        "min_ttl": _Scalar(_integer(0, 604800, "(seconds)"), 60),
                        "max_ttl": _Scalar(_integer(0, 604800, "(seconds)"), 86400),
                        "neg_min_ttl": _Scalar(_integer(0, 604800, "(seconds)"), 60),
                        "neg_max_ttl": _Scalar(_integer(0, 604800, "(seconds)"), 600),
                    }
                ),
                "query_log": _Struct(
                    {
                        "enabled": _Scalar(_boolean, False),
                        "format": _Scalar(_choice("tsv", "ltsv"), "tsv"),
                        "ignored_qtypes": _List(_Scalar(_qtype, None), MAX_IGNORED_QTYPES),
                    }
                ),
                "forwarding_rules": _List(
                    _Struct(
                        {
                            "zone": _Scalar(_dns_name, None),
                            "servers": _List(
                                _Scalar(_socket_address(53), None),
                                MAX_SERVERS_PER_RULE,
                                min_items=1,
                            ),
                        },
                        required=("zone", "servers"),
                    ),
                    MAX_FORWARDING_RULES,
                ),
                "cloaking_rules": _List(
                    _Struct(
                        {
                            "name": _Scalar(_name_pattern, None),
                            "address": _Scalar(_cloak_target, None),
                        },
                        required=("name", "address"),
                    ),
                    MAX_CLOAKING_RULES,
                ),
                "blocked_names": _List(_Scalar(_name_pattern, None), MAX_NAME_PATTERNS),
                "allowed_names": _List(_Scalar(_name_pattern, None), MAX_NAME_PATTERNS),
                "anonymized_routes": _List(
                    _Struct(
                        {
                            "server_name": _Scalar(_route_name, None),
                            "via": _List(
                                _Scalar(_route_name, None),
                                MAX_VIA,
                                min_items=1,
                            ),
                        },
                        required=("server_name", "via"),
                    ),
                    MAX_ROUTES,
                ),
                "sources": _Struct(
                    {
                        "allow_plaintext_bootstrap": _List(_Scalar(_socket_address(53), None), MAX_BOOTSTRAP),
                        "lists": _List(
                            _Struct(
                                {
                                    "name": _Scalar(_server_name, None),
                                    "urls": _List(_Scalar(_https_url, None), MAX_SOURCE_URLS, min_items=1),
                                    "minisign_key": _Scalar(_minisign_key, None),
                                    "cache_file": _Optional(_Scalar(_file_name, None)),
                                    "refresh_delay_h": _Scalar(_integer(25, 169, "(hours)"), 72),
                                    "prefix": _Scalar(_name_prefix, ""),
                                },
                                required=("name", "urls", "minisign_key"),
                            ),
                            MAX_SOURCE_LISTS,
                        ),
                    }
                ),
                "block_client_dot": _Scalar(_boolean, False),
            }
        ),
        "tests": _Struct(
            {
                "clients": _List(
                    _Scalar(_qube_name, None),
                    MAX_TEST_CLIENTS,
                    default=["personal", "work", "pro", "untrusted"],
                ),
                "names": _List(
                    _Scalar(_dns_name, None),
                    MAX_TEST_NAMES,
                    default=["qubes-os.org", "debian.org"],
                    min_items=1,
                ),
                "nxdomain_probe": _Optional(_Scalar(_dns_name, None), default="sysdns-nxdomain-probe.invalid"),
                "window_s": _Scalar(_integer(2, 300, "(seconds)"), 10),
            }
        ),
    }
)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _loader_pillar():
    pillar = globals().get("__pillar__")
    if pillar is None:
        raise SaltInvocationError(
            "validate() needs the sysdns pillar as its argument when called outside the Salt loader"
        )
    return pillar


def _raw_section(pillar, *keys):
    """Return a pillar sub-mapping as the user wrote it, or {} when absent or not a mapping."""
    section = pillar
    for key in keys:
        if not isinstance(section, dict):
            return {}
        section = section.get(key, {})
    return section if isinstance(section, dict) else {}


def _entries(value):
    """Return a validated list, or [] when it failed validation."""
    return [] if value is _BAD else value


def _all_good(*values):
    return all(value is not _BAD for value in values)


def _report_duplicates(values, path_of, errors):
    """Report each value that equals an earlier one (path_of maps an index to its key path)."""
    first_seen = {}
    for index, value in enumerate(values):
        if value is _BAD or value is None:
            continue
        if value in first_seen:
            errors.invalid(
                path_of(index),
                value,
                f"expected a unique entry, this is a duplicate of {_path_text(path_of(first_seen[value]))}",
            )
        else:
            first_seen[value] = index


def _check_template(cfg, pillar, errors):
    template = cfg["template"]
    if template is _BAD or not _all_good(*template.values()):
        return
    raw = _raw_section(pillar, "template")
    if not template["clone"]:
        if "name" in raw and template["name"] != template["source"]:
            errors.invalid(
                ["template", "name"],
                template["name"],
                "expected no name, or the name of template:source, when clone is false",
                f"without a clone the formula installs into {template['source']!r} itself",
            )
        template["name"] = template["source"]
    elif template["name"] == template["source"]:
        errors.invalid(
            ["template", "name"],
            template["name"],
            "expected a name other than template:source when clone is true",
        )


def _check_qube(cfg, pillar, errors):
    qube = cfg["qube"]
    if qube is _BAD:
        return
    raw = _raw_section(pillar, "qube")
    if qube["class"] == "DispVM":
        if qube["disposable_template"] is None:
            qube["disposable_template"] = "sys-dns-dvm"
    elif qube["class"] == "AppVM" and raw.get("disposable_template") is not None:
        errors.invalid(
            ["qube", "disposable_template"],
            raw["disposable_template"],
            "expected no disposable_template when qube:class is 'AppVM'",
            "it is only used for a named disposable (class 'DispVM')",
        )
        qube["disposable_template"] = None

    name = qube["name"]
    template = cfg["template"] if cfg["template"] is not _BAD else {}
    template_names = {template.get("name"), template.get("source")} - {_BAD, None}
    if _all_good(name, qube["netvm"]) and name == qube["netvm"]:
        errors.invalid(["qube", "netvm"], qube["netvm"], "expected a qube other than qube:name")
    if name is not _BAD and name in template_names:
        errors.invalid(["qube", "name"], name, "expected a name other than the template's")
    disposable = qube["disposable_template"]
    if disposable not in (None, _BAD) and disposable in template_names | {name, qube["netvm"]}:
        errors.invalid(
            ["qube", "disposable_template"],
            disposable,
            "expected a name other than qube:name, qube:netvm and the template's",
        )
    if _all_good(qube["maxmem"], qube["memory"]) and 0 < qube["maxmem"] < qube["memory"]:
        errors.invalid(
            ["qube", "maxmem"],
            qube["maxmem"],
            f"expected 0 (no memory balancing) or at least qube:memory ({qube['memory']})",
        )


def _is_whonix(name):
    lowered = name.lower()
    return lowered.startswith(("sys-whonix", "anon-whonix")) or "whonix" in lowered


def _check_rewire(cfg, errors):
    rewire = cfg["rewire"]
    if rewire is _BAD:
        return
    qube = cfg["qube"] if cfg["qube"] is not _BAD else {}
    template = cfg["template"] if cfg["template"] is not _BAD else {}
    _report_duplicates(rewire, lambda index: ["rewire", index], errors)
    for index, name in enumerate(rewire):
        if name is _BAD:
            continue
        reason = None
        if name == qube.get("name"):
            reason = "sys-dns cannot be downstream of itself"
        elif name == qube.get("netvm"):
            reason = "the netvm of sys-dns cannot be moved behind sys-dns (a loop)"
        elif name == qube.get("disposable_template"):
            reason = "it is the disposable template of sys-dns (a loop)"
        elif name in (template.get("name"), template.get("source")):
            reason = "it is the template of sys-dns"
        elif _is_whonix(name):
            reason = "Whonix qubes keep their Tor chain, so the formula never rewires them"
        if reason:
            errors.invalid(["rewire", index], name, "expected a downstream qube to rewire", reason)


_SAFE_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._~%/+=,:@-]*")


def _stamp_problem(decoded, kind, dnscrypt):
    """Return why a decoded stamp cannot serve as a resolver or relay, or None."""
    proto = decoded["proto"]
    if kind == "resolver":
        if proto in ("dnscrypt-relay", "odoh-relay"):
            return "it is a relay stamp: list it under dnscrypt:relays"
        if proto in ("dot", "doq"):
            return f"dnscrypt-proxy 2.1.8 cannot use {proto.upper()} stamps"
        if proto == "plain":
            return "a plain DNS stamp sends queries unencrypted"
    else:
        if proto == "odoh-relay":
            return (
                "ODoH relays only serve ODoH targets, whose stamps never carry an IP "
                "address, so the formula rejects both"
            )
        if proto != "dnscrypt-relay":
            return "expected a DNSCrypt relay stamp (sdns://gQ...)"

    if decoded["ip"] is None:
        try:
            _fill_stamp_endpoint(dict(decoded), require_ip=True)
        except _StampError as error:
            return str(error)
    if decoded["ip"] is not None:
        ip = ipaddress.ip_address(decoded["ip"])
        if ip.is_loopback:
            return (
                f"its address {decoded['ip']} is a loopback address, so dnscrypt-proxy would "
                "query sys-dns itself: use the stamp of a server on the network"
            )
        problem = _non_unicast_problem(ip)
        if problem:
            return f"its address {decoded['ip']}: {problem}; use the stamp of a unicast server"
    if decoded["bootstrap_ips"]:
        return "dnscrypt-proxy 2.1.8 rejects stamps with bootstrap IP addresses"
    if proto == "dnscrypt":
        if len(decoded["public_key"]) != 64:
            return "the DNSCrypt provider public key must be 32 bytes"
        if _text_problem(decoded["provider_name"]) or not decoded["provider_name"]:
            return "the DNSCrypt provider name is empty or contains unsafe characters"
    if proto == "doh":
        host_name, _ = _split_host_port(decoded["host"], 443)
        if not _SAFE_HOST.fullmatch(host_name):
            return f"the host name {decoded['host']!r} contains unsafe characters"
        if not _SAFE_PATH.fullmatch(decoded["path"] or ""):
            return f"the path {decoded['path']!r} must start with '/' and use URL characters"
        if decoded["address_port"] not in (None, decoded["port"]):
            return (
                f"the address port {decoded['address_port']} differs from the host port "
                f"{decoded['port']}, and dnscrypt-proxy 2.1.8 connects to the host port"
            )
    if decoded["port"] == 0:
        return "port 0 is invalid"
    if decoded["port"] == 53:
        return (
            "the server uses port 53, which the formula's firewall reserves for plaintext DNS and drops on the uplink"
        )
    family = decoded["family"]
    # Flags that failed validation are _BAD, neither True nor False: skip them.
    if family == 4 and dnscrypt["ipv4_servers"] is False:
        return "it has an IPv4 address but dnscrypt:ipv4_servers is false"
    if family == 6 and dnscrypt["ipv6_servers"] is False:
        return "it has an IPv6 address but dnscrypt:ipv6_servers is false"
    if kind == "resolver":
        for prop in ("dnssec", "nolog", "nofilter"):
            if dnscrypt[f"require_{prop}"] is True and not decoded["props"][prop]:
                return (
                    f"the stamp lacks the {prop} property that dnscrypt:require_{prop} "
                    "demands, which dnscrypt-proxy 2.1.8 checks only for servers from "
                    "[sources], so the formula checks static stamps itself. Choose "
                    f"another resolver or set require_{prop}: false"
                )
    return None


def _check_servers(dnscrypt, kind, errors):
    """Decode and check resolver or relay stamps, and return {name: decoded} of the valid ones."""
    key = "resolvers" if kind == "resolver" else "relays"
    entries = dnscrypt[key]
    decoded_by_name = {}
    if entries is _BAD:
        return decoded_by_name
    _report_duplicates(
        [entry["stamp"] if entry is not _BAD else _BAD for entry in entries],
        lambda index: ["dnscrypt", key, index, "stamp"],
        errors,
    )
    for index, entry in enumerate(entries):
        if entry is _BAD or not _all_good(entry["name"], entry["stamp"]):
            continue
        path = ["dnscrypt", key, index, "stamp"]
        try:
            decoded = _decode_stamp(entry["stamp"], require_ip=False)
        except _StampError as error:
            errors.invalid(path, entry["stamp"], STAMP_DECODE_FORM, str(error))
            continue
        problem = _stamp_problem(decoded, kind, dnscrypt)
        if problem:
            errors.invalid(path, entry["stamp"], f"expected a usable {kind} stamp", problem)
            continue
        decoded_by_name[entry["name"]] = decoded
    return decoded_by_name


def _check_server_names(dnscrypt, errors):
    names = [entry["name"] if entry is not _BAD else _BAD for entry in _entries(dnscrypt["resolvers"])]
    relay_names = [entry["name"] if entry is not _BAD else _BAD for entry in _entries(dnscrypt["relays"])]

    # [static] holds resolvers and relays in one table, so a name must be unique
    # across both lists.
    every = [("resolvers", index, name) for index, name in enumerate(names)]
    every += [("relays", index, name) for index, name in enumerate(relay_names)]
    _report_duplicates(
        [name for _, _, name in every],
        lambda position: ["dnscrypt", every[position][0], every[position][1], "name"],
        errors,
    )

    lists = dnscrypt["sources"]["lists"] if dnscrypt["sources"] is not _BAD else _BAD
    has_lists = lists is not _BAD and bool(lists)
    server_names = dnscrypt["server_names"]
    if server_names is None:
        dnscrypt["server_names"] = [name for name in names if name is not _BAD]
        return
    if server_names is _BAD:
        return
    if not server_names and not has_lists:
        errors.invalid(
            ["dnscrypt", "server_names"],
            server_names,
            "expected at least one resolver name, or no server_names key to use every resolver",
        )
        return
    _report_duplicates(server_names, lambda index: ["dnscrypt", "server_names", index], errors)
    for index, name in enumerate(server_names):
        if name is _BAD or name in names:
            continue
        if name in relay_names:
            errors.invalid(
                ["dnscrypt", "server_names", index],
                name,
                "expected the name of a resolver",
                "it names a relay",
            )
        elif not has_lists:
            errors.invalid(
                ["dnscrypt", "server_names", index],
                name,
                "expected the name of an entry in dnscrypt:resolvers",
                "without dnscrypt:sources:lists only those resolvers exist",
            )


def _check_routes(dnscrypt, resolvers, errors):
    routes = dnscrypt["anonymized_routes"]
    if routes is _BAD:
        return
    relay_names = {entry["name"] for entry in _entries(dnscrypt["relays"]) if entry is not _BAD}
    resolver_names = {entry["name"] for entry in _entries(dnscrypt["resolvers"]) if entry is not _BAD}
    has_lists = dnscrypt["sources"] is not _BAD and bool(_entries(dnscrypt["sources"]["lists"]))
    _report_duplicates(
        [route["server_name"] if route is not _BAD else _BAD for route in routes],
        lambda index: ["dnscrypt", "anonymized_routes", index, "server_name"],
        errors,
    )
    for index, route in enumerate(routes):
        if route is _BAD:
            continue
        path = ["dnscrypt", "anonymized_routes", index]
        server = route["server_name"]
        if server not in (_BAD, "*"):
            if server in resolvers and resolvers[server]["proto"] != "dnscrypt":
                errors.invalid(
                    path + ["server_name"],
                    server,
                    "expected a DNSCrypt resolver or '*'",
                    "dnscrypt-proxy 2.1.8 anonymizes only DNSCrypt servers",
                )
            elif server not in resolver_names and not has_lists:
                errors.invalid(
                    path + ["server_name"],
                    server,
                    "expected the name of an entry in dnscrypt:resolvers or '*'",
                )
        via = route["via"]
        if via is _BAD:
            continue
        if "*" in via and len(via) > 1:
            errors.invalid(path + ["via"], via, "expected ['*'] alone or a list of relay names")
        _report_duplicates(via, lambda position: path + ["via", position], errors)
        for position, relay in enumerate(via):
            if relay in (_BAD, "*") or relay in relay_names:
                continue
            errors.invalid(
                path + ["via", position],
                relay,
                "expected the name of an entry in dnscrypt:relays or '*'",
            )
        if via == ["*"] and not relay_names:
            errors.invalid(path + ["via"], via, "expected at least one entry in dnscrypt:relays")


def _check_cache(dnscrypt, errors):
    cache = dnscrypt["cache"]
    if cache is _BAD:
        return
    for low, high in (("min_ttl", "max_ttl"), ("neg_min_ttl", "neg_max_ttl")):
        if _all_good(cache[low], cache[high]) and cache[low] > cache[high]:
            errors.invalid(
                ["dnscrypt", "cache", low],
                cache[low],
                f"expected at most dnscrypt:cache:{high} ({cache[high]})",
            )


def _is_local_resolver(address):
    """True for loopback port 53, where dnscrypt-proxy itself listens."""
    host, port = address.rsplit(":", 1)
    return port == "53" and ipaddress.ip_address(host.strip("[]")).is_loopback


def _check_rules(dnscrypt, errors):
    rules = dnscrypt["forwarding_rules"]
    if rules is not _BAD:
        _report_duplicates(
            [rule["zone"] if rule is not _BAD else _BAD for rule in rules],
            lambda index: ["dnscrypt", "forwarding_rules", index, "zone"],
            errors,
        )
        for index, rule in enumerate(rules):
            if rule is _BAD or rule["servers"] is _BAD:
                continue
            path = ["dnscrypt", "forwarding_rules", index, "servers"]
            _report_duplicates(rule["servers"], lambda position: path + [position], errors)
            for position, server in enumerate(rule["servers"]):
                if server is not _BAD and _is_local_resolver(server):
                    errors.invalid(
                        path + [position],
                        server,
                        "expected the address of another DNS server",
                        "dnscrypt-proxy itself listens there, so the rule would loop",
                    )

    cloaking = dnscrypt["cloaking_rules"]
    if cloaking is not _BAD:
        _report_duplicates(
            [
                (rule["name"], rule["address"])
                if rule is not _BAD and _all_good(rule["name"], rule["address"])
                else _BAD
                for rule in cloaking
            ],
            lambda index: ["dnscrypt", "cloaking_rules", index],
            errors,
        )
    for key in ("blocked_names", "allowed_names"):
        if dnscrypt[key] is not _BAD:
            _report_duplicates(dnscrypt[key], lambda index, key=key: ["dnscrypt", key, index], errors)
    query_log = dnscrypt["query_log"]
    if query_log is not _BAD and query_log["ignored_qtypes"] is not _BAD:
        _report_duplicates(
            query_log["ignored_qtypes"],
            lambda index: ["dnscrypt", "query_log", "ignored_qtypes", index],
            errors,
        )


def _check_sources(dnscrypt, errors):
    sources = dnscrypt["sources"]
    if sources is _BAD:
        return
    lists, bootstrap = sources["lists"], sources["allow_plaintext_bootstrap"]
    if lists is _BAD or bootstrap is _BAD:
        return
    path = ["dnscrypt", "sources"]
    if lists and not bootstrap:
        errors.invalid(
            path + ["allow_plaintext_bootstrap"],
            bootstrap,
            "expected the plaintext DNS servers ('IP[:PORT]') that may resolve the list URLs' host names",
            "dnscrypt-proxy downloads lists by host name and looks names up in "
            "plaintext, so the opt-in must name where those lookups go",
        )
    if bootstrap and not lists:
        errors.invalid(
            path + ["allow_plaintext_bootstrap"],
            bootstrap,
            "expected [] when dnscrypt:sources:lists is empty",
            "it would allow plaintext DNS for nothing",
        )
    _report_duplicates(bootstrap, lambda index: path + ["allow_plaintext_bootstrap", index], errors)
    for index, address in enumerate(bootstrap):
        if address is not _BAD and _is_local_resolver(address):
            errors.invalid(
                path + ["allow_plaintext_bootstrap", index],
                address,
                "expected the address of another DNS server",
                "dnscrypt-proxy itself listens there",
            )
    _report_duplicates(
        [entry["name"] if entry is not _BAD else _BAD for entry in lists],
        lambda index: path + ["lists", index, "name"],
        errors,
    )
    for entry in lists:
        if entry is not _BAD and entry["cache_file"] is None and entry["name"] is not _BAD:
            entry["cache_file"] = f"{entry['name']}.md"
    _report_duplicates(
        [entry["cache_file"] if entry is not _BAD else _BAD for entry in lists],
        lambda index: path + ["lists", index, "cache_file"],
        errors,
    )
    for index, entry in enumerate(lists):
        if entry is not _BAD and entry["urls"] is not _BAD:
            _report_duplicates(
                entry["urls"], lambda position, index=index: path + ["lists", index, "urls", position], errors
            )


def _check_dnscrypt(cfg, errors):
    dnscrypt = cfg["dnscrypt"]
    if dnscrypt is _BAD:
        return
    if (dnscrypt["ipv4_servers"], dnscrypt["ipv6_servers"]) == (False, False):
        errors.invalid(
            ["dnscrypt", "ipv6_servers"],
            False,
            "expected dnscrypt:ipv4_servers or dnscrypt:ipv6_servers to be true",
        )
    resolvers = _check_servers(dnscrypt, "resolver", errors)
    _check_servers(dnscrypt, "relay", errors)
    _check_server_names(dnscrypt, errors)
    _check_routes(dnscrypt, resolvers, errors)
    _check_cache(dnscrypt, errors)
    _check_rules(dnscrypt, errors)
    _check_sources(dnscrypt, errors)


def _check_tests(cfg, errors):
    tests = cfg["tests"]
    if tests is _BAD:
        return
    qube = cfg["qube"] if cfg["qube"] is not _BAD else {}
    if tests["clients"] is not _BAD:
        _report_duplicates(tests["clients"], lambda index: ["tests", "clients", index], errors)
        for index, client in enumerate(tests["clients"]):
            if client is not _BAD and client in (qube.get("name"), qube.get("netvm")):
                errors.invalid(
                    ["tests", "clients", index],
                    client,
                    "expected a qube downstream of sys-dns",
                    "sys-dns and its netvm do not send their queries through sys-dns",
                )
    if tests["names"] is not _BAD:
        _report_duplicates(tests["names"], lambda index: ["tests", "names", index], errors)


def validate(pillar=None):
    """
    Validate the ``sysdns`` pillar and return the normalized config.

    The whole pillar is checked in one pass. Every problem is collected and raised
    together, one line each, as ``sysdns:path:to:key: <value> is invalid: <expected
    form>``, and unknown keys name the nearest known key.

    pillar
        The ``sysdns`` pillar mapping. When omitted, ``__pillar__['sysdns']`` is
        read (only inside the Salt loader).

    Returns a dict with every default filled in: ``template``, ``qube``,
    ``rewire``, ``rollback``, ``dnscrypt`` and ``tests`` (see ``pillar.example``).

    Raises SaltInvocationError listing every invalid value.

    CLI example:

    .. code-block:: bash

        salt-call sysdns_config.validate
    """
    if pillar is None:
        pillar = _loader_pillar().get("sysdns", {})
        if pillar is None:
            pillar = {}
    errors = _Errors()
    cfg = _SCHEMA.normalize(pillar, [], errors)
    if cfg is not _BAD:
        _check_template(cfg, pillar, errors)
        _check_qube(cfg, pillar, errors)
        _check_rewire(cfg, errors)
        _check_dnscrypt(cfg, errors)
        _check_tests(cfg, errors)
    if errors.messages:
        count = len(errors.messages)
        raise SaltInvocationError(
            f"the sysdns pillar has {count} invalid value{'s' if count > 1 else ''}:\n" + "\n".join(errors.messages)
        )
    return cfg


def pillar_keys():
    """
    Return every key path the ``sysdns`` pillar accepts, as colon-joined strings.

    List entries appear as ``*``, for example ``dnscrypt:resolvers:*:stamp``.
    """
    return sorted(":".join(path) for path in _SCHEMA.key_paths(()))


# ---------------------------------------------------------------------------
# dnscrypt-proxy configuration
# ---------------------------------------------------------------------------

_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(text):
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(key):
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return key
    return _toml_string(key)


def _toml_value(value):
    # bool before int: a Python bool is an int.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = ", ".join(f"{_toml_key(key)} = {_toml_value(item)}" for key, item in value.items())
        return "{ " + pairs + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _toml_lines(pairs):
    return [f"{_toml_key(key)} = {_toml_value(value)}" for key, value in pairs]


def _generated_header(comment, what):
    return [
        f"{comment} {what}",
        f"{comment} Written by {FORMULA} (state qubes.network.sys-dns).",
        f"{comment} Edits are overwritten: change the sysdns pillar instead.",
    ]


def _bootstrap_resolvers(dnscrypt):
    return list(dnscrypt["sources"]["allow_plaintext_bootstrap"]) or [LOCAL_RESOLVER]


def render_dnscrypt_toml(cfg):
    """
    Render ``dnscrypt-proxy.toml`` for dnscrypt-proxy 2.1.8 from the normalized config.

    Every key is one that ``config.go`` of 2.1.8 accepts at its place (an unknown key
    is fatal there). Resolvers and relays go to ``[static]``, and ``[sources]`` appears
    only when the pillar opts in.

    cfg
        The dict returned by :py:func:`validate`.
    """
    dnscrypt = cfg["dnscrypt"]
    cache = dnscrypt["cache"]
    has_lists = bool(dnscrypt["sources"]["lists"])
    lines = _generated_header("#", "dnscrypt-proxy configuration for sys-dns.")
    lines.append("")

    lines.append("# The firewall redirects downstream port-53 traffic to the receiving")
    lines.append("# interface's own address, so listen on the dual-stack wildcard.")
    lines += _toml_lines(
        [
            ("listen_addresses", LISTEN_ADDRESSES),
            ("server_names", dnscrypt["server_names"]),
            ("ipv4_servers", dnscrypt["ipv4_servers"]),
            ("ipv6_servers", dnscrypt["ipv6_servers"]),
        ]
    )
    lines.append("# dnscrypt-proxy applies these to [sources] servers only. The formula")
    lines.append("# checked the [static] stamps below itself.")
    lines += _toml_lines(
        [
            ("require_dnssec", dnscrypt["require_dnssec"]),
            ("require_nolog", dnscrypt["require_nolog"]),
            ("require_nofilter", dnscrypt["require_nofilter"]),
            ("lb_strategy", dnscrypt["lb_strategy"]),
            ("timeout", dnscrypt["timeout_ms"]),
            ("keepalive", dnscrypt["keepalive_s"]),
            ("max_clients", dnscrypt["max_clients"]),
        ]
    )
    lines.append("# No plaintext lookups by default: every stamp carries an IP address,")
    lines.append("# the network probe is off and bootstrap lookups stay on this qube")
    lines.append("# unless the pillar opts in to [sources].")
    lines += _toml_lines(
        [
            ("ignore_system_dns", True),
            ("bootstrap_resolvers", _bootstrap_resolvers(dnscrypt)),
            ("netprobe_address", LOCAL_RESOLVER),
            ("netprobe_timeout", 0),
            ("cache", cache["enabled"]),
            ("cache_size", cache["size"]),
            ("cache_min_ttl", cache["min_ttl"]),
            ("cache_max_ttl", cache["max_ttl"]),
            ("cache_neg_min_ttl", cache["neg_min_ttl"]),
            ("cache_neg_max_ttl", cache["neg_max_ttl"]),
        ]
    )
    if dnscrypt["forwarding_rules"]:
        lines += _toml_lines([("forwarding_rules", _rule_path("forwarding_rules"))])
    if dnscrypt["cloaking_rules"]:
        lines += _toml_lines([("cloaking_rules", _rule_path("cloaking_rules"))])

    # Tables come last: a key after a [table] header belongs to that table.
    query_log = dnscrypt["query_log"]
    if query_log["enabled"]:
        lines += ["", "[query_log]"]
        lines += _toml_lines([("file", QUERY_LOG_PATH), ("format", query_log["format"])])
        if query_log["ignored_qtypes"]:
            lines += _toml_lines([("ignored_qtypes", query_log["ignored_qtypes"])])
    for key, file_key in (("blocked_names", "blocked_names_file"), ("allowed_names", "allowed_names_file")):
        if dnscrypt[key]:
            lines += ["", f"[{key}]"]
            lines += _toml_lines([(file_key, _rule_path(key))])
    if dnscrypt["anonymized_routes"]:
        lines += ["", "[anonymized_dns]", "routes = ["]
        for route in dnscrypt["anonymized_routes"]:
            inline = {"server_name": route["server_name"], "via": route["via"]}
            lines.append(f"  {_toml_value(inline)},")
        lines.append("]")
    if has_lists:
        lines += ["", "# Opted in by the pillar: lists downloaded over HTTPS, host names looked"]
        lines += ["# up through bootstrap_resolvers in plaintext.", "[sources]"]
        for entry in dnscrypt["sources"]["lists"]:
            lines += ["", f"[sources.{_toml_key(entry['name'])}]"]
            lines += _toml_lines(
                [
                    ("urls", entry["urls"]),
                    ("minisign_key", entry["minisign_key"]),
                    ("cache_file", f"{SOURCES_CACHE_DIR}/{entry['cache_file']}"),
                    ("refresh_delay", entry["refresh_delay_h"]),
                    ("prefix", entry["prefix"]),
                ]
            )
    lines += ["", "[static]"]
    for entry in dnscrypt["resolvers"] + dnscrypt["relays"]:
        lines += ["", f"[static.{_toml_key(entry['name'])}]"]
        lines += _toml_lines([("stamp", entry["stamp"])])
    return "\n".join(lines) + "\n"


def _rule_path(key):
    return f"{CONFIG_DIR}/{RULE_FILE_NAMES[key]}"


def render_rule_files(cfg):
    """
    Render the rule files dnscrypt-proxy reads, only those in use.

    Returns a dict: file name (relative to ``/rw/config/sysdns``) -> content, among
    ``forwarding-rules.txt``, ``cloaking-rules.txt``, ``blocked-names.txt`` and
    ``allowed-names.txt``. Formats as parsed by dnscrypt-proxy 2.1.8
    (``plugin_forward.go``, ``plugin_cloak.go``, ``pattern_matcher.go``).

    cfg
        The dict returned by :py:func:`validate`.
    """
    dnscrypt = cfg["dnscrypt"]
    files = {}
    if dnscrypt["forwarding_rules"]:
        lines = _generated_header("#", "Forwarding rules: zone, then servers.")
        lines += [f"{rule['zone']} {','.join(rule['servers'])}" for rule in dnscrypt["forwarding_rules"]]
        files[RULE_FILE_NAMES["forwarding_rules"]] = "\n".join(lines) + "\n"
    if dnscrypt["cloaking_rules"]:
        lines = _generated_header("#", "Cloaking rules: name pattern, then address.")
        lines += [f"{rule['name']} {rule['address']}" for rule in dnscrypt["cloaking_rules"]]
        files[RULE_FILE_NAMES["cloaking_rules"]] = "\n".join(lines) + "\n"
    for key, what in (("blocked_names", "Blocked"), ("allowed_names", "Allowed")):
        if dnscrypt[key]:
            lines = _generated_header("#", f"{what} name patterns.")
            lines += list(dnscrypt[key])
            files[RULE_FILE_NAMES[key]] = "\n".join(lines) + "\n"
    return files


# ---------------------------------------------------------------------------
# Firewall
# ---------------------------------------------------------------------------

NFT_TABLE = "inet sysdns"
NFT_COUNTERS = {
    "redirected": "port-53 packets from downstream qubes redirected to dnscrypt-proxy",
    "redirected_local": "port-53 packets of sys-dns itself redirected to dnscrypt-proxy",
    "forwarded": "port-53 packets to forwarding-rule servers accepted on the uplink",
    "bootstrapped": "port-53 packets to opted-in bootstrap resolvers accepted on the uplink",
    "leak_dropped": "other port-53 packets dropped on the uplink",
    "leaked": "port-53 packets leaving on the uplink to other servers (expected 0)",
    "upstream_replies": "packets received from the encrypted upstream servers",
    "client_dot_dropped": "DoT and DoQ packets from downstream qubes dropped",
}

# Interface groups set by Qubes' network scripts (qubes-core-agent-linux
# network/vif-route-qubes and setup-ip): 1 is the uplink eth0, 2 each downstream vif.
_UPLINK_GROUP = 1
_DOWNSTREAM_GROUP = 2
_LAST_PRIORITY = 2147483646  # just before conntrack confirmation (INT_MAX)


def upstreams(cfg):
    """
    List the encrypted upstream endpoints dnscrypt-proxy connects to.

    Returns a list of dicts ``{name, kind, proto, ip, family, port}`` for every
    ``[static]`` resolver and relay, from their stamps. Servers downloaded through
    opted-in ``[sources]`` are not known in advance and are not listed.
    """
    dnscrypt = cfg["dnscrypt"]
    endpoints = []
    for kind, entries in (("resolver", dnscrypt["resolvers"]), ("relay", dnscrypt["relays"])):
        for entry in entries:
            decoded = _decode_stamp(entry["stamp"], require_ip=True)
            endpoints.append(
                {
                    "name": entry["name"],
                    "kind": kind,
                    "proto": decoded["proto"],
                    "ip": decoded["ip"],
                    "family": decoded["family"],
                    "port": decoded["port"],
                }
            )
    return endpoints


def _split_socket(address):
    host, port = address.rsplit(":", 1)
    return ipaddress.ip_address(host.strip("[]")), int(port)


def _nft_set(name, family, elements):
    kind = "ipv4_addr" if family == 4 else "ipv6_addr"
    lines = [f"\tset {name} {{", f"\t\ttype {kind} . inet_service"]
    members = sorted({f"{ip} . {port}" for ip, port in elements if ip.version == family})
    if members:
        lines.append("\t\telements = { " + ", ".join(members) + " }")
    lines.append("\t}")
    return lines


def _nft_chain(name, hook_line, rules, comment):
    lines = [f"\tchain {name} {{", f'\t\tcomment "{comment}"', f"\t\t{hook_line}"]
    lines += [f"\t\t{rule}" for rule in rules]
    lines.append("\t}")
    return lines


def render_nft_ruleset(cfg):
    """
    Render the nftables ruleset of the formula's own table ``inet sysdns``.

    The file first declares and deletes the table, then defines it, so ``nft -f``
    replaces it atomically and can run any number of times. No Qubes script touches
    this table (Qubes owns ``ip qubes``, ``ip6 qubes`` and the qubes-firewall tables).
    Named counters (``nft list counter inet sysdns NAME``): see ``NFT_COUNTERS``.

    cfg
        The dict returned by :py:func:`validate`.
    """
    dnscrypt = cfg["dnscrypt"]
    forward = [_split_socket(server) for rule in dnscrypt["forwarding_rules"] for server in rule["servers"]]
    bootstrap = [_split_socket(address) for address in dnscrypt["sources"]["allow_plaintext_bootstrap"]]
    upstream = [(ipaddress.ip_address(endpoint["ip"]), endpoint["port"]) for endpoint in upstreams(cfg)]
    dns = "meta l4proto { tcp, udp } th dport 53"
    l4 = "meta l4proto { tcp, udp }"
    uplink = f"oifgroup {_UPLINK_GROUP}"

    lines = ["#!/usr/sbin/nft -f"]
    lines += _generated_header("#", "nftables table of sys-dns.")
    lines += [f"table {NFT_TABLE}", f"delete table {NFT_TABLE}", f"table {NFT_TABLE} {{"]
    # No counter comments: `nft list counters` then prints only "packets N bytes M"
    # inside each counter, the form the sysdns states parse.
    for name in NFT_COUNTERS:
        lines += [f"\tcounter {name} {{", "\t}"]
    for set_name, elements in (("upstream", upstream), ("forward", forward), ("bootstrap", bootstrap)):
        lines += _nft_set(f"{set_name}_v4", 4, elements)
        lines += _nft_set(f"{set_name}_v6", 6, elements)

    # Before Qubes' dnat-dns chain (priority dstnat), which Qubes rewrites at boot
    # and on every uplink change: whatever the destination, downstream DNS ends
    # at dnscrypt-proxy on the receiving interface's own address.
    lines += _nft_chain(
        "redirect_downstream",
        "type nat hook prerouting priority dstnat - 10; policy accept;",
        [f'iifgroup {_DOWNSTREAM_GROUP} {dns} counter name "redirected" redirect'],
        "downstream DNS to dnscrypt-proxy",
    )
    # nft 1.0.6 accepts the symbolic "dstnat" priority only in prerouting, so the
    # output chain spells it as a number: dstnat (-100) - 10.
    lines += _nft_chain(
        "redirect_local",
        "type nat hook output priority -110; policy accept;",
        [
            'oif "lo" accept',
            f"{l4} ip daddr . th dport @forward_v4 accept",
            f"{l4} ip6 daddr . th dport @forward_v6 accept",
            f"{l4} ip daddr . th dport @bootstrap_v4 accept",
            f"{l4} ip6 daddr . th dport @bootstrap_v6 accept",
            f'{dns} counter name "redirected_local" redirect',
        ],
        "DNS of sys-dns itself to dnscrypt-proxy",
    )
    # The output redirect sends sys-dns's own queries to 127.0.0.1 or ::1 but keeps
    # their source address (that of eth0). dnscrypt-proxy answers from a wildcard
    # socket, so the kernel would pick eth0's address as the reply's source, which
    # matches no connection and never reaches the asking program. Rewriting the
    # source to loopback makes the reply match and be translated back.
    lines += _nft_chain(
        "snat_local",
        "type nat hook postrouting priority srcnat - 10; policy accept;",
        [
            f'oif "lo" ct status dnat {dns} ip daddr 127.0.0.1 snat ip to 127.0.0.1',
            f'oif "lo" ct status dnat {dns} ip6 daddr ::1 snat ip6 to ::1',
        ],
        "replies to the redirected queries of sys-dns itself",
    )
    lines += _nft_chain(
        "guard_uplink",
        "type filter hook postrouting priority srcnat + 200; policy accept;",
        [
            f'{uplink} {l4} ip daddr . th dport @forward_v4 counter name "forwarded" accept',
            f'{uplink} {l4} ip6 daddr . th dport @forward_v6 counter name "forwarded" accept',
            f'{uplink} {l4} ip daddr . th dport @bootstrap_v4 counter name "bootstrapped" accept',
            f'{uplink} {l4} ip6 daddr . th dport @bootstrap_v6 counter name "bootstrapped" accept',
            f'{uplink} {dns} counter name "leak_dropped" drop',
        ],
        "no plaintext DNS on the uplink except to pillar-named servers",
    )
    # Runs after every other postrouting chain, so it sees only packets that leave.
    lines += _nft_chain(
        "count_leaks",
        f"type filter hook postrouting priority {_LAST_PRIORITY}; policy accept;",
        [
            f"{uplink} {l4} ip daddr . th dport @forward_v4 accept",
            f"{uplink} {l4} ip6 daddr . th dport @forward_v6 accept",
            f"{uplink} {l4} ip daddr . th dport @bootstrap_v4 accept",
            f"{uplink} {l4} ip6 daddr . th dport @bootstrap_v6 accept",
            f'{uplink} {dns} counter name "leaked"',
        ],
        "plaintext DNS that left despite the guard",
    )
    lines += _nft_chain(
        "count_upstream_replies",
        "type filter hook input priority filter - 10; policy accept;",
        [
            f'iifgroup {_UPLINK_GROUP} {l4} ip saddr . th sport @upstream_v4 counter name "upstream_replies"',
            f'iifgroup {_UPLINK_GROUP} {l4} ip6 saddr . th sport @upstream_v6 counter name "upstream_replies"',
        ],
        "replies from the encrypted upstream servers",
    )
    if dnscrypt["block_client_dot"]:
        lines += _nft_chain(
            "block_client_dot",
            "type filter hook forward priority filter - 10; policy accept;",
            [f'iifgroup {_DOWNSTREAM_GROUP} {l4} th dport 853 counter name "client_dot_dropped" drop'],
            "DNS over TLS and QUIC from downstream qubes",
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_firewall_apply_script():
    """
    Render ``/usr/lib/sysdns/apply-firewall``, the POSIX sh script that loads the
    ruleset and accepts downstream DNS in Qubes' ``custom-input`` chains.

    Qubes 4.2's input chain (``ip qubes`` and ``ip6 qubes``, qubes-core-agent-linux
    network/qubes-ipv4.nft) rejects downstream traffic to the qube itself after
    jumping to ``custom-input``, the chain Qubes reserves for users. The script
    replaces its own rules there (comment ``sysdns``) in one nft transaction per
    family, so repeated runs leave exactly one copy, and skips a family whose table
    is missing (``ip6 qubes`` exists only with IPv6 enabled). After loading, it
    records the SHA-256 of the stateless listing of the table (``nft -s``, without
    counter values) in ``RULESET_RECORD_PATH``. The optional first argument
    overrides the ruleset path, the second the record path.
    """
    return f"""#!/bin/sh
# Load the sysdns nftables table, record a digest of it as loaded, then accept
# downstream DNS in Qubes' custom-input chains. Runs at boot
# (sysdns-firewall.service) and on every reload, and idempotent.
# Written by {FORMULA}. Edits are overwritten when the template is updated.
set -eu

ruleset=${{1:-{NFT_PATH}}}
record=${{2:-{RULESET_RECORD_PATH}}}
chain=custom-input
tag=sysdns

nft -f "$ruleset"
# The report helper compares the loaded table with this digest: a rule deleted or
# added at runtime changes the listing without touching any file.
mkdir -p "${{record%/*}}"
listing=$(nft -s list table {NFT_TABLE})
sum=$(printf '%s\\n' "$listing" | sha256sum)
printf '%s\\n' "${{sum%% *}}" >"$record"

for family in ip ip6; do
    if ! listing=$(nft -a list chain "$family" qubes "$chain" 2>/dev/null); then
        echo "sysdns: no $family qubes $chain chain, skipped" >&2
        continue
    fi
    handles=$(printf '%s\\n' "$listing" |
        sed -n "s/.* comment \\"$tag\\" # handle \\([0-9][0-9]*\\)\\$/\\1/p")
    {{
        for handle in $handles; do
            echo "delete rule $family qubes $chain handle $handle"
        done
        for proto in tcp udp; do
            echo "insert rule $family qubes $chain iifgroup {_DOWNSTREAM_GROUP} $proto dport 53 accept comment \\"$tag\\""
        done
    }} | nft -f -
done
"""


# ---------------------------------------------------------------------------
# Template files
# ---------------------------------------------------------------------------

# Qubes creates /run/qubes-service/NAME at boot in a qube whose feature
# service.NAME is set (qubes-core-agent-linux vm-systemd/qubes-sysinit.sh, 4.2). The
# formula sets service.sysdns on sys-dns only, so other qubes based on the same
# template, such as a disposable template, never start these units.
SERVICE_FLAG_PATH = "/run/qubes-service/sysdns"

_DNSCRYPT_UNIT = f"""# Replaces Debian's dnscrypt-proxy.service (package 2.1.8+ds1), which requires
# dnscrypt-proxy.socket on 127.0.2.1:53 and lacks the capability to bind port 53.
# Written by {FORMULA}. Edits are overwritten.
[Unit]
Description=DNSCrypt client proxy for downstream qubes ({FORMULA})
Documentation=https://github.com/DNSCrypt/dnscrypt-proxy/wiki
ConditionPathExists={SERVICE_FLAG_PATH}
ConditionPathExists={TOML_PATH}
Wants=sysdns-firewall.service
After=network.target sysdns-firewall.service
Before=nss-lookup.target
Wants=nss-lookup.target

[Service]
Type=simple
ExecStart=/usr/sbin/dnscrypt-proxy -config {TOML_PATH}
User=_dnscrypt-proxy
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=true
ProtectHome=true
ProtectKernelModules=true
ProtectKernelTunables=true
ProtectControlGroups=true
MemoryDenyWriteExecute=true
CacheDirectory=dnscrypt-proxy
LogsDirectory=dnscrypt-proxy
RuntimeDirectory=dnscrypt-proxy
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"""

_FIREWALL_UNIT = f"""# Loads the sysdns nftables table and accepts downstream DNS in Qubes'
# custom-input chains, after Qubes loads its base tables.
# Written by {FORMULA}. Edits are overwritten.
[Unit]
Description=sysdns firewall: redirect downstream DNS to dnscrypt-proxy ({FORMULA})
ConditionPathExists={SERVICE_FLAG_PATH}
ConditionPathExists={NFT_PATH}
After=qubes-iptables.service
Before=dnscrypt-proxy.service network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={APPLY_SCRIPT_PATH}

[Install]
WantedBy=multi-user.target
"""


GUARD_RULESET_PATH = "/usr/lib/sysdns/guard.nft"

# A fixed table, loaded at boot from the template whatever the site configuration, so
# that DNS fails closed when the table inet sysdns is missing (a ruleset that failed to
# load, a file removed from /rw): without the redirect, Qubes' dnat-dns would forward
# downstream queries to sys-net in plaintext. Redirected queries reach dnscrypt-proxy
# on the input path and never pass the forward hook; only dnscrypt-proxy itself sends
# port-53 traffic to the uplink (forwarding rules, opted-in bootstrap), and the table
# inet sysdns narrows that to the pillar's addresses.
_GUARD_RULESET = f"""#!/usr/sbin/nft -f
# Fail-closed DNS guard of sys-dns. Written by {FORMULA}; edits are overwritten
# when the template is updated.
table inet sysdns_guard
delete table inet sysdns_guard
table inet sysdns_guard {{
\tcounter forward_dropped {{
\t}}
\tcounter output_dropped {{
\t}}
\tchain forward {{
\t\tcomment "no DNS forwarded through sys-dns: downstream DNS must be redirected"
\t\ttype filter hook forward priority filter - 5; policy accept;
\t\tmeta l4proto {{ tcp, udp }} th dport 53 counter name "forward_dropped" drop
\t}}
\tchain output {{
\t\tcomment "no plaintext DNS from sys-dns itself except dnscrypt-proxy's"
\t\ttype filter hook output priority filter - 5; policy accept;
\t\toifgroup {_UPLINK_GROUP} meta l4proto {{ tcp, udp }} th dport 53 meta skuid != "_dnscrypt-proxy" counter name "output_dropped" drop
\t}}
}}
"""

_GUARD_UNIT = f"""# Loads the fail-closed DNS guard of sys-dns before the network comes up.
# Written by {FORMULA}; edits are overwritten.
[Unit]
Description=sysdns guard: drop DNS that bypasses dnscrypt-proxy ({FORMULA})
ConditionPathExists={SERVICE_FLAG_PATH}
DefaultDependencies=no
# qubes-sysinit.service creates /run/qubes-service (vm-systemd/qubes-sysinit.sh).
After=qubes-sysinit.service
Before=network-pre.target sysdns-firewall.service dnscrypt-proxy.service
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/nft -f {GUARD_RULESET_PATH}
# A digest of the table as loaded, without counter values, for the report helper,
# which compares the loaded table with it to find rules changed at runtime.
ExecStartPost=/bin/sh -c 'mkdir -p {RUN_DIR} && nft -s list table inet sysdns_guard | sha256sum >{GUARD_RECORD_PATH}'

[Install]
WantedBy=multi-user.target
"""


def render_guard_ruleset():
    """Return the fixed fail-closed nft table ``inet sysdns_guard`` of sys-dns."""
    return _GUARD_RULESET


def render_template_files(cfg=None):
    """
    Render the files the formula installs into the template of sys-dns.

    Returns a dict: absolute path -> (content, mode): the complete
    ``dnscrypt-proxy.service`` that replaces Debian's, ``sysdns-firewall.service``
    and the firewall apply script. Masks and enablement links come from
    :py:func:`render_template_links`.

    cfg
        The dict returned by :py:func:`validate`; the files do not depend on it
        today, it is accepted so callers need not change when they do.
    """
    del cfg
    return {
        f"{UNIT_DIR}/dnscrypt-proxy.service": (_DNSCRYPT_UNIT, 0o644),
        f"{UNIT_DIR}/sysdns-firewall.service": (_FIREWALL_UNIT, 0o644),
        f"{UNIT_DIR}/sysdns-guard.service": (_GUARD_UNIT, 0o644),
        GUARD_RULESET_PATH: (_GUARD_RULESET, 0o644),
        APPLY_SCRIPT_PATH: (render_firewall_apply_script(), 0o755),
    }


def render_template_links():
    """
    Return the symbolic links the formula creates in the template.

    A dict with ``masks`` (link path -> ``/dev/null``: Debian's
    ``dnscrypt-proxy.socket`` and ``dnscrypt-proxy-resolvconf.service``) and
    ``wants`` (link path -> unit path: both units enabled for multi-user.target).
    """
    wants_dir = f"{UNIT_DIR}/multi-user.target.wants"
    return {
        "masks": {
            f"{UNIT_DIR}/dnscrypt-proxy.socket": "/dev/null",
            f"{UNIT_DIR}/dnscrypt-proxy-resolvconf.service": "/dev/null",
        },
        "wants": {
            f"{wants_dir}/dnscrypt-proxy.service": f"{UNIT_DIR}/dnscrypt-proxy.service",
            f"{wants_dir}/sysdns-firewall.service": f"{UNIT_DIR}/sysdns-firewall.service",
            f"{wants_dir}/sysdns-guard.service": f"{UNIT_DIR}/sysdns-guard.service",
        },
    }


# Debian suites that ship dnscrypt-proxy 2.1.8 or later in main, and those that
# need the trixie package (bookworm has none in main, -updates, -security or
# -backports; the trixie .deb installs there because its dependencies are met).
_SUITES_WITH_PACKAGE = ("trixie", "forky", "sid", "testing", "unstable")
_SUITES_NEEDING_TRIXIE = ("bookworm",)
APT_SOURCE_PATH = "/etc/apt/sources.list.d/sysdns-trixie.list"
APT_PIN_PATH = "/etc/apt/preferences.d/sysdns-dnscrypt-proxy"

MIRROR_FORM = "expected the template's Debian mirror URI, such as 'https://deb.debian.org/debian' or 'tor+https://...'"


def render_apt_sources(mirror_uri, suite):
    """
    Render the apt source and pin that install dnscrypt-proxy on a Debian 12 template.

    mirror_uri
        The Debian mirror URI the template already uses (so proxies and Tor
        transports keep working).

    suite
        The template's Debian suite (``bookworm``, ``trixie``, ...).

    Returns a dict: absolute path -> (content, mode). Empty for suites whose main
    component already has dnscrypt-proxy. For bookworm: a trixie source and a pin
    that lets only dnscrypt-proxy come from trixie (every other trixie package gets
    a negative priority, so apt never installs it).

    Raises SaltInvocationError for an unknown suite or an unsafe mirror URI.
    """
    if suite in _SUITES_WITH_PACKAGE:
        return {}
    if suite not in _SUITES_NEEDING_TRIXIE:
        raise SaltInvocationError(
            f"Debian suite {suite!r} is not supported: expected one of "
            + ", ".join(_SUITES_NEEDING_TRIXIE + _SUITES_WITH_PACKAGE)
        )
    if (
        not isinstance(mirror_uri, str)
        or _text_problem(mirror_uri)
        or not re.fullmatch(r"(tor\+)?https?://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._~%/+-]*)?", mirror_uri)
    ):
        raise SaltInvocationError(f"mirror URI {mirror_uri!r} is invalid: {MIRROR_FORM}")
    header = "\n".join(_generated_header("#", "dnscrypt-proxy from Debian trixie.")) + "\n"
    source = header + f"deb {mirror_uri} trixie main\n"
    pin = (
        header
        + "Package: *\nPin: release n=trixie\nPin-Priority: -10\n\n"
        + "Package: dnscrypt-proxy\nPin: release n=trixie\nPin-Priority: 500\n"
    )
    return {APT_SOURCE_PATH: (source, 0o644), APT_PIN_PATH: (pin, 0o644)}


# ---------------------------------------------------------------------------
# Everything written into sys-dns
# ---------------------------------------------------------------------------


def config_files(cfg):
    """
    Render every file the formula writes into ``/rw/config/sysdns`` of sys-dns.

    Returns a dict: file name -> content: ``dnscrypt-proxy.toml``, ``sysdns.nft``
    and the rule files in use.

    cfg
        The dict returned by :py:func:`validate`.
    """
    files = {
        "dnscrypt-proxy.toml": render_dnscrypt_toml(cfg),
        "sysdns.nft": render_nft_ruleset(cfg),
    }
    files.update(render_rule_files(cfg))
    return files


def digest(files):
    """
    Return the SHA-256 hex digest of a file dict, independent of key order.

    files
        A dict of name -> content (a string, or a (content, mode) pair).
    """
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def paths():
    """Return the fixed paths the formula uses inside sys-dns and its template."""
    return {
        "config_dir": CONFIG_DIR,
        "toml": TOML_PATH,
        "nft": NFT_PATH,
        "apply_script": APPLY_SCRIPT_PATH,
        "unit_dir": UNIT_DIR,
        "query_log": QUERY_LOG_PATH,
        "sources_cache_dir": SOURCES_CACHE_DIR,
        "apt_source": APT_SOURCE_PATH,
        "apt_pin": APT_PIN_PATH,
    }
