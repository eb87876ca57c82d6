"""Send one DNS query and print the answer, for network-namespace tests.

Usage: dns_query.py [--tcp] [--type A] [--timeout S] SERVER PORT NAME
Prints one JSON object: rcode, the A addresses, the record types in the answer,
or {"error": "timeout"}.
"""

import argparse
import json

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tcp", action="store_true")
    parser.add_argument("--type", default="A")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("server")
    parser.add_argument("port", type=int)
    parser.add_argument("name")
    args = parser.parse_args()
    query = dns.message.make_query(args.name, args.type)
    send = dns.query.tcp if args.tcp else dns.query.udp
    try:
        response = send(query, args.server, port=args.port, timeout=args.timeout)
    except (dns.exception.Timeout, ConnectionError, OSError) as error:
        print(json.dumps({"error": type(error).__name__}))
        return
    addresses = [item.address for rrset in response.answer for item in rrset if hasattr(item, "address")]
    types = sorted({dns.rdatatype.to_text(rrset.rdtype) for rrset in response.answer})
    print(json.dumps({"rcode": dns.rcode.to_text(response.rcode()), "addresses": addresses, "types": types}))


if __name__ == "__main__":
    main()
