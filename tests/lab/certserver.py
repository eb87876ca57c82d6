"""Answer DNSCrypt certificate queries over UDP with one fixed certificate.

dnsdist 1.7 serves only certificates valid at its own clock, and the lab's clock is the
host's, which must never change. So to show dnscrypt-proxy a certificate that is not
valid at its clock, the uplink runs this server in place of dnsdist's DNSCrypt listener.
It answers the TXT query for the provider name with a certificate that dnsdist signed
with the run's provider key for another validity window, and ignores everything else.

Run inside the uplink namespace: python -m tests.lab.certserver ADDRESS PORT PROVIDER CERT
"""

import socket
import struct
import sys

TYPE_TXT = 16


def question_end(message):
    """Return the offset after the first question's name, or None when malformed."""
    offset = 12
    while offset < len(message):
        length = message[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0:
            return None
        offset += 1 + length
    return None


def question_name(message, end):
    labels = []
    offset = 12
    while offset < end - 1:
        length = message[offset]
        labels.append(message[offset + 1 : offset + 1 + length].decode("ascii", "replace").lower())
        offset += 1 + length
    return ".".join(labels)


def answer(query, provider, certificate):
    """Return the response to a certificate query, or None for any other message."""
    if len(query) < 12:
        return None
    query_id, flags, questions = struct.unpack(">HHH", query[:6])
    end = question_end(query)
    if flags & 0x8000 or questions != 1 or end is None or end + 4 > len(query):
        return None
    qtype, _ = struct.unpack(">HH", query[end : end + 4])
    if qtype != TYPE_TXT or question_name(query, end) != provider.rstrip(".").lower():
        return None
    header = struct.pack(">HHHHHH", query_id, 0x8400 | (flags & 0x0100), 1, 1, 0, 0)
    rdata = bytes([len(certificate)]) + certificate
    record = struct.pack(">HHHIH", 0xC00C, TYPE_TXT, 1, 600, len(rdata)) + rdata
    return header + query[12 : end + 4] + record


def serve(address, port, provider, certificate):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    # The uplink namespace sets ip_nonlocal_bind, so the address may still lack a carrier.
    with socket.socket(family, socket.SOCK_DGRAM) as server:
        server.bind((address, port))
        while True:
            query, client = server.recvfrom(4096)
            response = answer(query, provider, certificate)
            if response is not None:
                server.sendto(response, client)


def main(argv):
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    address, port, provider, path = argv
    with open(path, "rb") as source:
        certificate = source.read()
    if len(certificate) != 124 or certificate[:4] != b"DNSC":
        print(f"certserver: {path} is not a 124-byte DNSCrypt certificate", file=sys.stderr)
        return 2
    serve(address, int(port), provider, certificate)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
