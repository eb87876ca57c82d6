"""A minimal DNS server for network-namespace tests: answers every A query with one address.

Usage: dns_stub.py --answer IP --log FILE LISTEN [LISTEN ...]
LISTEN is IP:PORT or [IPv6]:PORT; each gets a UDP socket and a TCP listener. Every
query is logged as one JSON line: transport, client address, local address, name.
"""

import argparse
import json
import socket
import socketserver
import struct
import threading

import dns.message
import dns.rdatatype
import dns.rrset


def parse_listen(text):
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


class Stub:
    def __init__(self, answer, log_path):
        self.answer = answer
        self.log_path = log_path
        self.lock = threading.Lock()

    def respond(self, wire, transport, client, local):
        query = dns.message.from_wire(wire)
        name = query.question[0].name
        with self.lock, open(self.log_path, "a", encoding="ascii") as log:
            record = {"transport": transport, "client": client[0], "local": local, "name": name.to_text()}
            log.write(json.dumps(record) + "\n")
        response = dns.message.make_response(query)
        if query.question[0].rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", self.answer))
        return response.to_wire()


def serve_udp(stub, host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    while True:
        wire, client = sock.recvfrom(65535)
        sock.sendto(stub.respond(wire, "udp", client, f"{host}:{port}"), client)


def serve_tcp(stub, host, port):
    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            length = struct.unpack("!H", self.request.recv(2))[0]
            wire = b""
            while len(wire) < length:
                wire += self.request.recv(length - len(wire))
            reply = stub.respond(wire, "tcp", self.client_address, f"{host}:{port}")
            self.request.sendall(struct.pack("!H", len(reply)) + reply)

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    Server((host, port), Handler).serve_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--answer", required=True, help="IPv4 address of every A answer")
    parser.add_argument("--log", required=True, help="file that receives one JSON line per query")
    parser.add_argument("listen", nargs="+", help="IP:PORT or [IPv6]:PORT")
    args = parser.parse_args()
    stub = Stub(args.answer, args.log)
    threads = []
    for text in args.listen:
        host, port = parse_listen(text)
        for target in (serve_udp, serve_tcp):
            thread = threading.Thread(target=target, args=(stub, host, port), daemon=True)
            thread.start()
            threads.append(thread)
    print("ready", flush=True)
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
