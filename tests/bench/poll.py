"""Poll a DNS server until it answers, for the cold-start figure.

Run inside a client qube's network namespace (`ip netns exec NS python -m
tests.bench.poll ...`). Print a JSON line {"polling": time} once polling starts, then
one with the wall-clock time (time.time(), the clock of the containers' journals too)
of the first query answered NOERROR with at least one record, and the number of
queries sent.
"""

import argparse
import json
import sys
import time

from tests.lab import dnsquery


def poll(server, name, interval, deadline):
    """Query *server* for *name* every *interval* seconds until an answer or *deadline* (time.time())."""
    attempts = 0
    while time.time() < deadline:
        sent = time.time()
        attempts += 1
        result = dnsquery.query(server, name, timeout=interval)
        if result["status"] == "answer" and result["rcode"] == 0 and result["answers"]:
            return {"answered": time.time(), "sent": sent, "attempts": attempts}
        # A refused or unreachable port returns at once: wait out the rest of the interval.
        remaining = interval - (time.time() - sent)
        if remaining > 0:
            time.sleep(remaining)
    return {"answered": None, "sent": None, "attempts": attempts}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="DNS server address")
    parser.add_argument("--name", required=True, help="name to ask for (type A)")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between queries and query timeout")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to poll before giving up")
    args = parser.parse_args(argv)
    print(json.dumps({"polling": time.time()}), flush=True)
    print(json.dumps(poll(args.server, args.name, args.interval, time.time() + args.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
