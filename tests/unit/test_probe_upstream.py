"""
probe-upstream, the helper that asks dnscrypt-proxy in sys-dns for random names over
TCP, run against a small DNS server on 127.0.0.1:53 in a network namespace of its own.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "qubes-sysdns-formula/qubes/network/sys-dns/files/probe-upstream.sh"

# Serves DNS over TCP on 127.0.0.1:53: for each connection it takes the next action
# from argv ("close": close without an answer, a number: answer with that RCODE) and
# prints each question name it read.
SERVER = r"""
import socket, struct, sys
actions = sys.argv[1:]
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 53))
listener.listen(8)
print("ready", flush=True)
for action in actions:
    connection, _ = listener.accept()
    length = struct.unpack(">H", connection.recv(2))[0]
    message = b""
    while len(message) < length:
        message += connection.recv(length - len(message))
    labels, position = [], 12
    while message[position]:
        size = message[position]
        labels.append(message[position + 1 : position + 1 + size].decode())
        position += 1 + size
    print("asked", ".".join(labels), flush=True)
    if action != "close":
        flags = struct.pack(">H", 0x8180 | int(action))
        reply = message[:2] + flags + message[4:]
        connection.sendall(struct.pack(">H", len(reply)) + reply)
    connection.close()
"""


def run_probe(names, actions):
    """Run probe-upstream with ``names`` on stdin against a server doing ``actions``."""
    script = (
        "ip link set lo up\n"
        f'{sys.executable} -c "$SERVER" {" ".join(actions)} > "$LOG" &\n'
        "server=$!\n"
        'for _ in $(seq 50); do grep -q ready "$LOG" && break; sleep 0.1; done\n'
        f'printf "$NAMES" | SYSDNS_PROBE_TIMEOUT=3 bash {PROBE}\n'
        "status=$?\n"
        "kill $server 2>/dev/null\n"
        "wait $server 2>/dev/null\n"
        "cat $LOG >&2\n"
        "exit $status\n"
    )
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        return subprocess.run(
            ["unshare", "--net", "sh", "-c", script],
            env={
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "SERVER": SERVER,
                "LOG": log.name,
                "NAMES": "".join(name + "\\n" for name in names),
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def test_probe_stops_at_first_upstream_answer():
    result = run_probe(["a1.lab.test", "a2.lab.test", "a3.lab.test"], ["3"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "rcode 3\n"
    assert "asked a1.lab.test" in result.stderr


def test_probe_tries_next_name_after_closed_session():
    result = run_probe(["b1.lab.test", "b2.lab.test", "b3.lab.test"], ["close", "0"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "rcode none\nrcode 0\n"
    assert "asked b2.lab.test" in result.stderr


def test_probe_reports_every_failed_name():
    result = run_probe(["c1.lab.test", "c_2.lab.test", "c3.lab.test"], ["2", "close", "2"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "rcode 2\nrcode none\nrcode 2\n"
    assert "asked c_2.lab.test" in result.stderr


@pytest.mark.parametrize("name", ["bad name", "UPPER.lab.test", ".lead.lab.test", "two..dots.lab.test"])
def test_probe_rejects_invalid_name(name):
    result = run_probe([name], [])
    assert result.returncode == 2
    assert "probe-upstream: invalid name" in result.stderr


def test_probe_without_listener_prints_none():
    result = run_probe(["d1.lab.test"], [])
    assert result.returncode == 0
    assert result.stdout == "rcode none\n"
