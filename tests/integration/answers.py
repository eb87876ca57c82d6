"""
Helpers that send lab clients' DNS queries through the built chain and check the answers.

The lab's resolvers answer a TXT query for any *.lab.test name with a record that
names the uplink endpoint that answered: dnscrypt-proxy's upstreams (DNSCrypt, DoH)
or the plain resolver, whose answer means a query left sys-dns in plaintext.
"""

import uuid

ENCRYPTED_ENDPOINTS = {"uplink-dnscrypt", "uplink-doh"}
# NOTE: the lab's dnsdist 1.7 closes about half of the DNSCrypt-over-TCP connections
# of dnscrypt-proxy 2.1.8 without a reply (seen for 387-byte padded queries, not for
# 195-byte ones), and dnscrypt-proxy then closes the client's TCP connection too.
# The formula cannot change that, and every such failure is closed. A TCP query may
# therefore need several tries.
TCP_ATTEMPTS = 8
UDP_ATTEMPTS = 2


def unique_name(zone="lab.test"):
    """Return a name no cache holds, so the query must reach an upstream."""
    return f"n{uuid.uuid4().hex[:12]}.{zone}"


def endpoint(result):
    return " ".join(str(answer) for answer in result.get("answers", []))


def is_encrypted_answer(result):
    return result["status"] == "answer" and result["rcode"] == 0 and endpoint(result) in ENCRYPTED_ENDPOINTS


def is_fail_closed(result):
    """A query that got no answer, an error code, or an answer from dnscrypt-proxy."""
    if result["status"] != "answer":
        return True
    if result["rcode"] != 0:
        return True
    return endpoint(result) in ENCRYPTED_ENDPOINTS


def query_txt(lab, client, server="10.139.1.1", tcp=False, name=None, timeout=2.0):
    return lab.dns_query(client, name or unique_name(), "TXT", server=server, tcp=tcp, timeout=timeout)


def resolve_encrypted(lab, client, server, tcp):
    """Query until an encrypted answer comes and return the attempts.

    Every attempt must fail closed. The check fails when no attempt gets an encrypted answer.
    """
    attempts = []
    for _ in range(TCP_ATTEMPTS if tcp else UDP_ATTEMPTS):
        result = query_txt(lab, client, server=server, tcp=tcp)
        attempts.append(result)
        assert is_fail_closed(result), f"{client} -> {server} tcp={tcp}: {result}"
        if is_encrypted_answer(result):
            return attempts
    raise AssertionError(f"{client} -> {server} tcp={tcp}: no encrypted answer in {attempts}")
