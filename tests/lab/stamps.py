"""DNS stamps (sdns://) for the lab's resolvers.

Encoding from the DNS Stamps specification published with
DNSCrypt/dnscrypt-proxy: a protocol byte, 8-byte little-endian properties
(1 DNSSEC, 2 no logs, 4 no filter), then length-prefixed fields, encoded as
URL-safe base64 without padding.
"""

import base64
import hashlib
import struct

PROTOCOL_PLAIN = 0x00
PROTOCOL_DNSCRYPT = 0x01
PROTOCOL_DOH = 0x02

PROPERTY_DNSSEC = 1
PROPERTY_NO_LOGS = 2
PROPERTY_NO_FILTER = 4
LAB_PROPERTIES = PROPERTY_DNSSEC | PROPERTY_NO_LOGS | PROPERTY_NO_FILTER


def _length_prefixed(data):
    if len(data) > 255:
        raise ValueError(f"stamp field longer than 255 bytes: {data[:40]!r}...")
    return bytes([len(data)]) + data


def _variable_length_set(items):
    """Encode a set of fields: every length byte but the last has 0x80 set."""
    if not items:
        return b"\x00"
    encoded = b""
    for index, item in enumerate(items):
        if len(item) > 0x7F:
            raise ValueError("stamp set item longer than 127 bytes")
        last = index == len(items) - 1
        encoded += bytes([len(item) | (0 if last else 0x80)]) + item
    return encoded


def _encode(payload):
    return "sdns://" + base64.urlsafe_b64encode(payload).decode("ascii").rstrip("=")


def _header(protocol, properties):
    return bytes([protocol]) + struct.pack("<Q", properties)


def plain_stamp(address, properties=0):
    return _encode(_header(PROTOCOL_PLAIN, properties) + _length_prefixed(address.encode()))


def dnscrypt_stamp(address, provider_public_key, provider_name, properties=LAB_PROPERTIES):
    """Return a DNSCrypt stamp; *address* is "IP:port" or "[IPv6]:port"."""
    if len(provider_public_key) != 32:
        raise ValueError(f"DNSCrypt provider public key must be 32 bytes, got {len(provider_public_key)}")
    payload = (
        _header(PROTOCOL_DNSCRYPT, properties)
        + _length_prefixed(address.encode())
        + _length_prefixed(provider_public_key)
        + _length_prefixed(provider_name.encode())
    )
    return _encode(payload)


def doh_stamp(address, hostname, path, certificate_hashes, properties=LAB_PROPERTIES):
    """Return a DoH stamp; *hostname* may carry ":port" when it is not 443."""
    payload = (
        _header(PROTOCOL_DOH, properties)
        + _length_prefixed(address.encode())
        + _variable_length_set(list(certificate_hashes))
        + _length_prefixed(hostname.encode())
        + _length_prefixed(path.encode())
    )
    return _encode(payload)


def decode(stamp):
    """Decode a stamp into a dict (used by tests to check the encoding)."""
    if not stamp.startswith("sdns://"):
        raise ValueError(f"not a DNS stamp: {stamp!r}")
    text = stamp[len("sdns://") :]
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    protocol = data[0]
    properties = struct.unpack("<Q", data[1:9])[0]
    position = 9

    def field():
        nonlocal position
        length = data[position]
        value = data[position + 1 : position + 1 + length]
        position += 1 + length
        return value

    result = {"protocol": protocol, "properties": properties, "address": field().decode()}
    if protocol == PROTOCOL_DNSCRYPT:
        result["public_key"] = field()
        result["provider_name"] = field().decode()
    elif protocol == PROTOCOL_DOH:
        hashes = []
        while True:
            length = data[position]
            item = data[position + 1 : position + 1 + (length & 0x7F)]
            position += 1 + (length & 0x7F)
            if item:
                hashes.append(item)
            if not length & 0x80:
                break
        result["hashes"] = hashes
        result["hostname"] = field().decode()
        result["path"] = field().decode()
    return result


def tbs_certificate_hash(der_certificate):
    """Return SHA-256 of the TBSCertificate inside a DER X.509 certificate.

    dnscrypt-proxy pins DoH servers by this hash (the `hashes` stamp field).
    """

    def read_header(data, offset):
        tag = data[offset]
        length = data[offset + 1]
        offset += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[offset : offset + count], "big")
            offset += count
        return tag, length, offset

    tag, _, offset = read_header(der_certificate, 0)
    if tag != 0x30:
        raise ValueError("certificate is not a DER SEQUENCE")
    start = offset
    tag, length, content = read_header(der_certificate, offset)
    if tag != 0x30:
        raise ValueError("TBSCertificate is not a DER SEQUENCE")
    return hashlib.sha256(der_certificate[start : content + length]).digest()
