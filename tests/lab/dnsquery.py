"""A minimal DNS client (stdlib) that the lab runs inside a qube's network namespace.

`python3 -m tests.lab.dnsquery --server IP [--port N] [--type A|AAAA|TXT] [--tcp]
NAME` prints one JSON object: {"status": "answer", "rcode": N, "answers": [...]}
or {"status": "error", "error": "..."} for a timeout, an ICMP rejection
(connection refused, host unreachable) or a malformed reply. It runs through
`ip netns exec`, so it uses the qube's own network stack and firewall, without
needing a DNS client inside the qube's image.
"""

import argparse
import ipaddress
import json
import secrets
import socket
import struct
import sys

TYPES = {"A": 1, "NS": 2, "TXT": 16, "AAAA": 28}


def build_query(name, rtype):
    identifier = secrets.randbits(16)
    header = struct.pack("!HHHHHH", identifier, 0x0100, 1, 0, 0, 0)
    question = (
        b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.rstrip(".").split(".") if label)
        + b"\x00"
    )
    return identifier, header + question + struct.pack("!HH", TYPES[rtype], 1)


def skip_name(message, position):
    while True:
        length = message[position]
        if length == 0:
            return position + 1
        if length & 0xC0 == 0xC0:
            return position + 2
        position += 1 + length


def parse_response(message, identifier):
    if len(message) < 12:
        raise ValueError("reply shorter than a DNS header")
    reply_id, flags, questions, answers = struct.unpack("!HHHH", message[:8])
    if reply_id != identifier:
        raise ValueError(f"reply id {reply_id} does not match query id {identifier}")
    position = 12
    for _ in range(questions):
        position = skip_name(message, position) + 4
    records = []
    for _ in range(answers):
        position = skip_name(message, position)
        rtype, _, _, length = struct.unpack("!HHIH", message[position : position + 10])
        data = message[position + 10 : position + 10 + length]
        position += 10 + length
        if rtype == TYPES["A"]:
            records.append(str(ipaddress.IPv4Address(data)))
        elif rtype == TYPES["AAAA"]:
            records.append(str(ipaddress.IPv6Address(data)))
        elif rtype == TYPES["TXT"]:
            texts, offset = [], 0
            while offset < len(data):
                texts.append(data[offset + 1 : offset + 1 + data[offset]].decode("utf-8", "replace"))
                offset += 1 + data[offset]
            records.append("".join(texts))
    return {"status": "answer", "rcode": flags & 0x0F, "answers": records}


def query(server, name, rtype="A", port=53, tcp=False, timeout=2.0):
    """Send one query and return the result dict (never raises for network errors)."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    identifier, message = build_query(name, rtype)
    try:
        if tcp:
            with socket.socket(family, socket.SOCK_STREAM) as connection:
                connection.settimeout(timeout)
                connection.connect((server, port))
                connection.sendall(struct.pack("!H", len(message)) + message)
                data = b""
                while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
                    chunk = connection.recv(65535)
                    if not chunk:
                        raise ConnectionError("connection closed before a full reply")
                    data += chunk
                reply = data[2:]
        else:
            with socket.socket(family, socket.SOCK_DGRAM) as connection:
                connection.settimeout(timeout)
                connection.connect((server, port))
                connection.send(message)
                reply = connection.recv(65535)
        return parse_response(reply, identifier)
    except socket.timeout:
        return {"status": "error", "error": "timeout"}
    except OSError as error:
        return {"status": "error", "error": error.strerror or str(error), "errno": error.errno}
    except (ValueError, struct.error, IndexError) as error:
        return {"status": "error", "error": f"malformed reply: {error}"}


def main(argv=None):
    parser = argparse.ArgumentParser(description="send one DNS query, print JSON")
    parser.add_argument("--server", required=True)
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--type", default="A", choices=sorted(TYPES))
    parser.add_argument("--tcp", action="store_true")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("name")
    args = parser.parse_args(argv)
    print(json.dumps(query(args.server, args.name, args.type, args.port, args.tcp, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
