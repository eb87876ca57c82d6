"""Tests of the lab's DNS stamp encoder against the DNS Stamps byte layout and,
with the lab cache present, against dnscrypt-proxy's own parser."""

import base64
import struct
import subprocess
from pathlib import Path

import pytest

from tests.lab import stamps

DNSCRYPT_PROXY = Path("/var/cache/sysdns-lab/tools/dnscrypt-proxy")


def raw(stamp):
    text = stamp[len("sdns://") :]
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_dnscrypt_stamp_byte_layout():
    key = bytes(range(32))
    stamp = stamps.dnscrypt_stamp("192.0.2.2:443", key, "2.dnscrypt-cert.lab.test")

    expected = b"\x01" + struct.pack("<Q", 7) + b"\x0d192.0.2.2:443" + b"\x20" + key + b"\x182.dnscrypt-cert.lab.test"
    assert stamp.startswith("sdns://")
    assert "=" not in stamp
    assert raw(stamp) == expected


def test_doh_stamp_hash_set_marks_all_but_last():
    first, second = b"\x11" * 32, b"\x22" * 32
    stamp = stamps.doh_stamp("192.0.2.3:443", "doh.lab.test", "/dns-query", [first, second], properties=0)

    expected = (
        b"\x02"
        + struct.pack("<Q", 0)
        + b"\x0d192.0.2.3:443"
        + b"\xa0"
        + first
        + b"\x20"
        + second
        + b"\x0cdoh.lab.test"
        + b"\x0a/dns-query"
    )
    assert raw(stamp) == expected


def test_doh_stamp_without_hashes_has_single_zero():
    stamp = stamps.doh_stamp("192.0.2.3", "doh.lab.test", "/dns-query", [], properties=0)

    assert raw(stamp)[9:] == b"\x09192.0.2.3" + b"\x00" + b"\x0cdoh.lab.test\x0a/dns-query"


def test_decode_round_trip():
    key = b"\x05" * 32
    decoded = stamps.decode(stamps.dnscrypt_stamp("[2001:db8::2]:443", key, "2.x.lab.test"))

    assert decoded == {
        "protocol": 1,
        "properties": 7,
        "address": "[2001:db8::2]:443",
        "public_key": key,
        "provider_name": "2.x.lab.test",
    }


def test_dnscrypt_stamp_rejects_short_key():
    with pytest.raises(ValueError, match="32 bytes"):
        stamps.dnscrypt_stamp("192.0.2.2:443", b"short", "2.x.lab.test")


@pytest.mark.lab
def test_dnscrypt_proxy_accepts_lab_stamps(tmp_path):
    """dnscrypt-proxy 2.1.8 `-check` parses the lab's static stamps."""
    if not DNSCRYPT_PROXY.exists():
        pytest.fail(f"{DNSCRYPT_PROXY} is missing: build the lab cache with python3 -m tests.lab.images", pytrace=False)
    key = bytes(range(32))
    config = tmp_path / "dnscrypt-proxy.toml"
    config.write_text(
        "listen_addresses = ['127.0.0.1:5399']\n"
        "server_names = ['lab-dnscrypt', 'lab-doh']\n"
        "ignore_system_dns = true\nnetprobe_timeout = 0\n"
        "bootstrap_resolvers = ['192.0.2.1:53']\n"
        "[static]\n"
        f"  [static.'lab-dnscrypt']\n  stamp = '"
        f"{stamps.dnscrypt_stamp('192.0.2.2:443', key, '2.dnscrypt-cert.lab.test')}'\n"
        f"  [static.'lab-doh']\n  stamp = '"
        f"{stamps.doh_stamp('192.0.2.3:443', 'doh.lab.test', '/dns-query', [b'1' * 32])}'\n"
    )

    result = subprocess.run(
        [str(DNSCRYPT_PROXY), "-config", str(config), "-check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stdout + result.stderr
