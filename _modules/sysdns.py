"""
Check from dom0 that sys-dns does its job: the netvm chain, client resolution, no
plaintext DNS leaving sys-dns, and encrypted upstream sessions of dnscrypt-proxy.

The checks read the named counters of the formula's nft table ``inet sysdns`` in
sys-dns before and after one test window in which every client qube resolves the test
names. A counter that did not move during real traffic cannot pass for silence.
"""

import datetime
import hashlib
import logging
import re
import uuid

from salt.exceptions import CommandExecutionError

log = logging.getLogger(__name__)

__virtualname__ = "sysdns"

# Named counters of the table written by sysdns_config.render_nft_ruleset.
COUNTER_NAMES = ("redirected", "forwarded", "leak_dropped", "leaked", "upstream_replies")
COUNTERS_COMMAND = "nft list counters table inet sysdns"
PROBE_COMMAND = "/usr/lib/sysdns/probe-upstream"
# DNS response codes that only an upstream server's answer produces for a name no
# cache holds; dnscrypt-proxy answers SERVFAIL (2) when no server replied.
UPSTREAM_RCODES = {0: "NOERROR", 3: "NXDOMAIN"}
# Random names the upstream probe may ask for: a later one gives a single failed
# upstream exchange (a lost packet, a dropped TCP session) another chance, while a
# blocked upstream fails every one.
UPSTREAM_PROBE_ATTEMPTS = 3

# Reads one name per line on stdin and prints "ok NAME ADDRESS..." or "fail NAME EXIT".
# getent exits 2 for a name that does not exist (getent(1)). timeout exits 124 when a
# lookup takes longer than LOOKUP_TIMEOUT_S, so a dead resolver cannot stretch the window.
LOOKUP_TIMEOUT_S = 5
RESOLVE_COMMAND = (
    "while read -r name; do "
    "if out=$(timeout " + str(LOOKUP_TIMEOUT_S) + ' getent hosts "$name"); then echo "ok $name" $out; '
    'else echo "fail $name $?"; fi; done'
)

_COUNTER_RE = re.compile(r"counter\s+(\S+)\s*\{\s*packets\s+(\d+)\s+bytes\s+(\d+)", re.S)


BUILD_COMMAND = "sudo qubesctl --show-output state.sls qubes.network.sys-dns"


def add_problem(problems, what, fix):
    """
    Append one problem, "WHAT; fix: FIX", to ``problems``: every problem this module
    reports names what to do. Raises ValueError for an empty ``fix``.
    """
    if not fix:
        raise ValueError("problem {!r} has no fix".format(what))
    problems.append("{}; fix: {}".format(what, fix))


def __virtual__():
    if "sysdns_qvm.run" in __salt__:
        return __virtualname__
    return (False, "the sysdns module needs the sysdns_qvm module (Qubes dom0 only)")


def parse_counters(output):
    """Parse ``nft list counters`` output into ``{name: packets}``."""
    return {name: int(packets) for name, packets, _ in _COUNTER_RE.findall(output)}


def read_counters(qube):
    """
    Return the packet counts of the formula's named counters in ``qube``.

    Raises CommandExecutionError when the qube is not running or the table is missing.
    """
    result = __salt__["sysdns_qvm.run"](qube, COUNTERS_COMMAND, autostart=False, check=False)
    if result["retcode"] != 0:
        raise CommandExecutionError(
            "cannot read the counters of table inet sysdns in {}: {}".format(
                qube, (result["stderr"] or result["stdout"]).strip() or "exit code {}".format(result["retcode"])
            )
        )
    counters = parse_counters(result["stdout"])
    missing = [name for name in COUNTER_NAMES if name not in counters]
    if missing:
        raise CommandExecutionError(
            "table inet sysdns in {} lacks the counters {}: re-run qubes.network.sys-dns".format(
                qube, ", ".join(missing)
            )
        )
    return counters


def parse_probe_output(result):
    """
    Return the response codes printed by PROBE_COMMAND, one per name it asked for, in
    order; None stands for a name that got no answer.
    """
    rcodes = []
    for line in (result.get("stdout") or "").splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "rcode":
            rcodes.append(int(words[1]) if words[1].isdigit() else None)
    return rcodes


def upstream_rcode(rcodes):
    """Return the first code that proves an upstream answer, else the last code seen."""
    for rcode in rcodes:
        if rcode in UPSTREAM_RCODES:
            return rcode
    return rcodes[-1] if rcodes else None


def parse_resolve_output(output):
    """Parse RESOLVE_COMMAND output into ``{name: (ok, detail)}``."""
    results = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("ok", "fail"):
            results[words[1]] = (words[0] == "ok", " ".join(words[2:]))
    return results


def chain(qube="sys-dns", netvm="sys-net", rewired=("sys-firewall",)):
    """
    Check the netvm chain: each rewired qube uses ``qube``, ``qube`` uses ``netvm`` and
    provides network. Returns ``{"ok": bool, "problems": [...], "seen": {...}}``.

    CLI Example:

    .. code-block:: bash

        qubesctl sysdns.chain sys-dns sys-net '["sys-firewall"]'
    """
    qubes = __salt__["sysdns_qvm.list_qubes"](refresh=True)
    problems = []
    seen = {}
    service = qubes.get(qube)
    if service is None:
        add_problem(problems, "qube {} not found".format(qube), "run the build: " + BUILD_COMMAND)
    else:
        seen[qube] = {"netvm": service["netvm"], "provides_network": service["provides_network"]}
        if service["netvm"] != netvm:
            add_problem(
                problems,
                "{}: netvm is {}, expected {}".format(qube, service["netvm"], netvm),
                "qvm-prefs {} netvm {}".format(qube, netvm),
            )
        if not service["provides_network"]:
            add_problem(
                problems,
                "{}: provides_network is False, expected True".format(qube),
                "qvm-prefs {} provides_network True".format(qube),
            )
    for name in rewired:
        client = qubes.get(name)
        if client is None:
            add_problem(
                problems,
                "qube {} not found".format(name),
                "create it, or remove it from sysdns:rewire and re-run the build",
            )
            continue
        seen[name] = {"netvm": client["netvm"]}
        if client["netvm"] != qube:
            add_problem(
                problems,
                "{}: netvm is {}, expected {}".format(name, client["netvm"], qube),
                "qvm-prefs {} netvm {}".format(name, qube),
            )
    return {"ok": not problems, "problems": problems, "seen": seen}


def netvm_chain(qubes, name):
    """
    Return the qubes that traffic of ``name`` passes on its way out: ``name``, its
    netvm, that qube's netvm and so on, read from ``qubes`` (list_qubes rows). The
    chain ends at a qube without netvm, at one missing from ``qubes`` or before a loop.
    """
    chain = [name]
    netvm = (qubes.get(name) or {}).get("netvm")
    while netvm and netvm not in chain:
        chain.append(netvm)
        netvm = (qubes.get(netvm) or {}).get("netvm")
    return chain


def measure(
    qube="sys-dns",
    clients=("personal", "work", "pro", "untrusted"),
    names=("qubes-os.org",),
    start_clients=True,
    refresh=False,
):
    """
    Run one test window and return what it saw: the counters of ``qube`` before and
    after, and for each client the result of resolving each name.

    Each client also resolves one random name under the first test name, and sys-dns
    itself asks dnscrypt-proxy for another one over TCP (PROBE_COMMAND), so that
    dnscrypt-proxy has to ask an upstream server during the window: its cache cannot
    answer a name never asked before. The result is cached for the rest of the run.

    qube
        The DNS service qube.
    clients
        Client qubes; those that do not exist are skipped.
    names
        Names every client must resolve.
    start_clients
        Start halted clients (qvm-run does); False skips them.
    """
    key = "sysdns.measure"
    if not refresh and key in __context__:
        return __context__[key]

    qubes = __salt__["sysdns_qvm.list_qubes"](refresh=True)
    before = read_counters(qube)
    probe = "sysdns-probe-{}.{}".format(uuid.uuid4().hex[:12], names[0])
    results = {}
    chains = {}
    skipped = []
    lookups = 0
    for client in clients:
        info = qubes.get(client)
        if info is None:
            skipped.append("{} (no such qube)".format(client))
            continue
        if info["state"] != "Running" and not start_clients:
            skipped.append("{} (halted)".format(client))
            continue
        chains[client] = netvm_chain(qubes, client)
        stdin = "".join(name + "\n" for name in list(names) + [probe])
        result = __salt__["sysdns_qvm.run"](client, RESOLVE_COMMAND, user="user", stdin=stdin, check=False, timeout=120)
        parsed = parse_resolve_output(result["stdout"])
        lookups += len(names) + 1
        results[client] = {
            name: {
                "ok": parsed.get(name, (False, ""))[0],
                "detail": parsed.get(name, (False, "no output; exit code {}".format(result["retcode"])))[1],
            }
            for name in names
        }
    upstream_probes = [
        "sysdns-probe-{}.{}".format(uuid.uuid4().hex[:12], names[0]) for _ in range(UPSTREAM_PROBE_ATTEMPTS)
    ]
    probe_result = __salt__["sysdns_qvm.run"](
        qube,
        PROBE_COMMAND,
        stdin="".join(name + "\n" for name in upstream_probes),
        autostart=False,
        check=False,
        timeout=30 + 20 * UPSTREAM_PROBE_ATTEMPTS,
    )
    upstream_rcodes = parse_probe_output(probe_result)
    after = read_counters(qube)

    window = {
        "qube": qube,
        "before": before,
        "after": after,
        "delta": {name: after[name] - before[name] for name in COUNTER_NAMES},
        "results": results,
        "chains": chains,
        "skipped": skipped,
        "lookups": lookups,
        "probe": probe,
        "upstream_probes": upstream_probes[: max(len(upstream_rcodes), 1)],
        "upstream_rcodes": upstream_rcodes,
        "upstream_rcode": upstream_rcode(upstream_rcodes),
    }
    __context__[key] = window
    return window


def check_resolve(window):
    """Return problems with client resolution in a measured window (empty when fine)."""
    problems = []
    if not window["results"]:
        add_problem(
            problems,
            "no client qube was tested ({})".format(", ".join(window["skipped"]) or "empty list"),
            "set sysdns:tests:clients to existing qubes",
        )
    for client, names in sorted(window["results"].items()):
        # A client whose netvm chain misses sys-dns resolves through another qube's
        # resolver, so a resolved name proves nothing about sys-dns.
        chain = window.get("chains", {}).get(client)
        if chain is not None and window["qube"] not in chain:
            add_problem(
                problems,
                "{client}: its DNS queries bypass {qube} (netvm chain {path}), so its answers do not "
                "come through {qube}".format(
                    client=client, qube=window["qube"], path=" -> ".join(chain + ([] if len(chain) > 1 else ["none"]))
                ),
                "set its netvm to a qube behind {qube} (qvm-prefs {client} netvm QUBE), add it to "
                "sysdns:rewire, or remove it from sysdns:tests:clients".format(client=client, qube=window["qube"]),
            )
        for name, outcome in sorted(names.items()):
            if not outcome["ok"]:
                add_problem(
                    problems,
                    "{}: resolving {} failed (expected an address, got: getent exit {})".format(
                        client, name, outcome["detail"] or "unknown"
                    ),
                    "qubesctl sysdns.diagnose names the cause; check the name in sysdns:tests:names",
                )
    return problems


def check_no_plaintext(window):
    """
    Return problems with plaintext DNS leaving sys-dns in a measured window.

    The window counts only when the redirect counter moved by at least the number of
    lookups made: then the queries passed through sys-dns's ruleset, and the leak
    counter, which counts every port-53 packet leaving through the uplink to other
    than a forwarding-rule address, had the chance to count.
    """
    problems = []
    delta = window["delta"]
    if delta["leaked"] != 0:
        add_problem(
            problems,
            "{}: {} plaintext port-53 packets left through the uplink during the test window (expected 0)".format(
                window["qube"], delta["leaked"]
            ),
            "re-run the build, which reloads the tables: " + BUILD_COMMAND,
        )
    if window["lookups"] and delta["redirected"] < window["lookups"]:
        add_problem(
            problems,
            "{}: the redirect counted {} queries for {} client lookups, so queries "
            "bypassed sys-dns's redirect (expected at least {})".format(
                window["qube"], delta["redirected"], window["lookups"], window["lookups"]
            ),
            "qubesctl sysdns.diagnose names the qubes that bypass it; re-run the build: " + BUILD_COMMAND,
        )
    return problems


def check_upstream(window):
    """
    Return problems with encrypted upstream sessions in a measured window.

    dnscrypt-proxy must have answered the random name of the upstream probe with a
    code that only an upstream answer gives, and packets must have come back from the
    resolvers of its stamps during the window.
    """
    problems = []
    rcode = window["upstream_rcode"]
    if rcode not in UPSTREAM_RCODES:
        seen = ", ".join(
            "no answer" if code is None else "response code {}".format(code) for code in window["upstream_rcodes"]
        )
        add_problem(
            problems,
            "{}: dnscrypt-proxy got no upstream answer for the random names {} (expected "
            "NOERROR or NXDOMAIN, got {})".format(
                window["qube"], ", ".join(window["upstream_probes"]), seen or "no answer"
            ),
            "check that sys-net is connected and the clock is right (qubesctl sysdns.diagnose checks both)",
        )
    if window["delta"]["upstream_replies"] <= 0:
        add_problem(
            problems,
            "{}: no packet came back from an upstream resolver during the test window (expected at least one)".format(
                window["qube"]
            ),
            "check that sys-net is connected (qubesctl sysdns.diagnose names the cause)",
        )
    return problems


# ---------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------

STATUS_COMMAND = "/usr/lib/sysdns/status"
# Seconds dom0 waits for the status helper. Its certificate fetches run in parallel
# and each gives up after 5 s (SYSDNS_CERT_TIMEOUT in status.sh).
STATUS_TIMEOUT_S = 60

# Report lines of /usr/lib/sysdns/report and what each means when it is healthy.
_HEALTHY_REPORT = {
    "service": "active",
    "firewall": "loaded",
    "ruleset": "as-loaded",
    "guard": "loaded",
    "guard-ruleset": "as-loaded",
    "input-accept": "present",
}

# Effect of a missing or incomplete part of the firewall, quoted in the status problems.
_REPORT_EFFECT = {
    "firewall": "so downstream DNS is not redirected to dnscrypt-proxy (table inet sysdns)",
    "guard": "so the fail-closed guard (table inet sysdns_guard) does not stop plaintext DNS from leaving "
    "while table inet sysdns is missing",
    "input-accept": "so Qubes' input chain rejects the redirected queries",
}

# Log lines of dnscrypt-proxy 2.1.8: "[TIME] [LEVEL] MESSAGE" (dlog), and the
# messages about servers from serversInfo.go and dnscrypt_certs.go.
_LOG_LINE_RE = re.compile(r"^\[(?P<time>[^\]]*)\] \[(?P<level>[A-Z]+)\] (?P<message>.*)$")
_SERVER_OK_RE = re.compile(r"^\[(?P<name>[^\]]+)\] OK \((?P<proto>[A-Za-z]+)\) - rtt: (?P<rtt>\d+)ms")
_LATENCY_RE = re.compile(r"^-\s+(?P<rtt>\d+)ms (?P<name>\S+)$")
_LOWEST_RE = re.compile(r"^Server with the lowest initial latency: (?P<name>\S+) \(rtt: (?P<rtt>\d+)ms\)")
_SERVER_MESSAGE_RE = re.compile(r"^\[(?P<name>[^\]]+)\]:? (?P<text>.*)$")

# Layout of a DNSCrypt certificate, as dnscrypt_certs.go of dnscrypt-proxy 2.1.8
# reads it. It starts with the magic "DNSC", es_version, a minor version and a
# 64-byte signature. The signed part follows: resolver key (32 bytes), client magic
# (8), then serial, ts_start and ts_end as big-endian 32-bit integers. Both
# sysdns.status and sysdns.diagnose read certificates with parse_certificate_response.
_CERT_MAGIC = b"DNSC"
_CERT_MIN_LENGTH = 124
# The es_versions dnscrypt-proxy supports; it skips a certificate of any other.
_CERT_CONSTRUCTIONS = {1: "XSalsa20Poly1305", 2: "XChacha20Poly1305"}
_DNS_TYPE_TXT = 16


def parse_status_output(output):
    """
    Parse the output of STATUS_COMMAND into a dict: ``files`` (name: SHA-256), the
    report lines (``service``, ``firewall``, ``ruleset``, ``guard``,
    ``input-accept``), ``version``, ``clock`` (int or None), ``counters`` (table:
    {name: packets}), ``log`` (lines) and ``certificates`` (name: hex or
    ``{"error": reason}``).
    """
    status = {key: None for key in _HEALTHY_REPORT}
    status.update(files={}, version=None, clock=None, counters={}, log=[], certificates={})
    table = None
    table_lines = []
    for line in output.splitlines():
        if table is not None:
            if line == "end counters " + table:
                status["counters"][table] = parse_counters("\n".join(table_lines))
                table = None
            else:
                table_lines.append(line)
            continue
        key, _, rest = line.partition(" ")
        if key == "begin" and rest.startswith("counters "):
            table = rest[len("counters ") :]
            table_lines = []
        elif key == "file":
            words = rest.split()
            if len(words) == 2:
                status["files"][words[1]] = words[0]
        elif key in _HEALTHY_REPORT:
            status[key] = rest.strip()
        elif key == "version":
            status["version"] = rest.strip()
        elif key == "clock":
            status["clock"] = int(rest) if rest.strip().isdigit() else None
        elif key == "log":
            status["log"].append(rest)
        elif key == "certificate":
            name, _, value = rest.partition(" ")
            if value.startswith("none"):
                status["certificates"][name] = {"error": value[len("none") :].strip() or "no answer"}
            else:
                status["certificates"][name] = value.strip()
    return status


def parse_server_log(lines):
    """
    Read dnscrypt-proxy's log lines about its servers.

    Returns ``{"live": [...] or None, "reached": {name: {"protocol", "rtt_ms"}},
    "messages": {name: last warning or notice}, "other": [...]}``. ``live`` comes
    from the last refresh summary ("Sorted latencies" block, or "Server with the
    lowest initial latency" alone when one server is live); None when no refresh
    finished yet. dnscrypt-proxy 2.1.8 keeps a server it once reached in that list
    after a later refresh fails (refreshServer in serversInfo.go), so "live" means
    reached since dnscrypt-proxy started.
    """
    live = None
    block = []
    reached = {}
    messages = {}
    other = []
    for line in lines:
        match = _LOG_LINE_RE.match(line)
        level, message = (match.group("level"), match.group("message")) if match else ("", line)
        ok = _SERVER_OK_RE.match(message)
        latency = _LATENCY_RE.match(message)
        lowest = _LOWEST_RE.match(message)
        if ok:
            reached[ok.group("name")] = {"protocol": ok.group("proto"), "rtt_ms": int(ok.group("rtt"))}
        elif message == "Sorted latencies:":
            block = []
        elif latency:
            block.append(latency.group("name"))
        elif lowest:
            live = sorted(block) if block else [lowest.group("name")]
            block = []
        elif _SERVER_MESSAGE_RE.match(message):
            named = _SERVER_MESSAGE_RE.match(message)
            messages[named.group("name")] = "{} {}".format(level, named.group("text")).strip()
        elif level in ("WARNING", "ERROR", "CRITICAL", "FATAL"):
            other.append("{} {}".format(level, message))
    return {"live": live, "reached": reached, "messages": messages, "other": other}


def _skip_dns_name(data, pos):
    """Return the offset after the (possibly compressed) DNS name at ``pos``."""
    while True:
        if pos >= len(data):
            raise ValueError("a name runs past the end of the message")
        length = data[pos]
        if length & 0xC0 == 0xC0:
            if pos + 2 > len(data):
                raise ValueError("a name runs past the end of the message")
            return pos + 2
        if length == 0:
            return pos + 1
        pos += 1 + length


def _txt_data(rdata):
    """Join the character-strings of one TXT record, as dnscrypt-proxy does before it reads a certificate."""
    text = b""
    index = 0
    while index < len(rdata):
        size = rdata[index]
        if index + 1 + size > len(rdata):
            raise ValueError("a TXT string of {} bytes runs past the end of its record".format(size))
        text += rdata[index + 1 : index + 1 + size]
        index += 1 + size
    return text


def _read_certificate(text):
    """
    Return the certificate in one joined TXT record, or else the reason why
    dnscrypt-proxy would skip the record, as a string.
    """
    if len(text) < _CERT_MIN_LENGTH:
        return "a TXT record of {} bytes is shorter than a certificate ({} bytes)".format(len(text), _CERT_MIN_LENGTH)
    if text[:4] != _CERT_MAGIC:
        return "a TXT record starts with {!r}, not the certificate magic {!r}".format(text[:4], _CERT_MAGIC)
    version = int.from_bytes(text[4:6], "big")
    serial = int.from_bytes(text[112:116], "big")
    valid_from = int.from_bytes(text[116:120], "big")
    valid_until = int.from_bytes(text[120:124], "big")
    if version not in _CERT_CONSTRUCTIONS:
        return "certificate {} has es-version {}, expected 1 or 2".format(serial, version)
    if valid_from >= valid_until:
        return "certificate {} ends ({}) before it starts ({})".format(serial, _utc(valid_until), _utc(valid_from))
    return {
        "serial": serial,
        "valid_from": valid_from,
        "valid_until": valid_until,
        "es_version": version,
        "construction": _CERT_CONSTRUCTIONS[version],
    }


def parse_certificate_response(hex_text):
    """
    Parse a DNS response to a DNSCrypt certificate query, given as hexadecimal text.

    Returns a list of ``{"serial", "valid_from", "valid_until", "es_version",
    "construction"}`` (times in seconds since the epoch), one per certificate in the
    TXT answers that dnscrypt-proxy would consider before it checks the time. Like
    dnscrypt-proxy, it skips records that are not TXT, too short, without the magic,
    of an es-version other than 1 or 2, or that end before they start. Raises
    ValueError, with the reason, for a response that is not a well-formed DNS
    response or contains no such certificate.

    NOTE: the signature is not verified here (dom0's Python has no Ed25519);
    dnscrypt-proxy verifies it, and its "OK (DNSCrypt)" log line says it accepted one.
    """
    if not isinstance(hex_text, str):
        raise ValueError("the response is {}, not hexadecimal text".format(type(hex_text).__name__))
    try:
        data = bytes.fromhex(hex_text)
    except ValueError:
        raise ValueError("the response is not hexadecimal text") from None
    if len(data) < 12:
        raise ValueError("the response is shorter than a DNS header ({} bytes)".format(len(data)))
    if not data[2] & 0x80:
        raise ValueError("the message is a query, not a response")
    rcode = data[3] & 0x0F
    if rcode != 0:
        raise ValueError("the server answered with response code {}".format(rcode))
    questions, answers = int.from_bytes(data[4:6], "big"), int.from_bytes(data[6:8], "big")
    pos = 12
    for _ in range(questions):
        pos = _skip_dns_name(data, pos) + 4
        if pos > len(data):
            raise ValueError("a question runs past the end of the message")
    certificates = []
    skipped = []
    for _ in range(answers):
        pos = _skip_dns_name(data, pos)
        if pos + 10 > len(data):
            raise ValueError("an answer record runs past the end of the message")
        rtype = int.from_bytes(data[pos : pos + 2], "big")
        rdlength = int.from_bytes(data[pos + 8 : pos + 10], "big")
        if pos + 10 + rdlength > len(data):
            raise ValueError("an answer record of {} data bytes runs past the end of the message".format(rdlength))
        rdata = data[pos + 10 : pos + 10 + rdlength]
        pos += 10 + rdlength
        if rtype != _DNS_TYPE_TXT:
            continue
        certificate = _read_certificate(_txt_data(rdata))
        if isinstance(certificate, str):
            skipped.append(certificate)
        else:
            certificates.append(certificate)
    if not certificates:
        reason = "the response contains no DNSCrypt certificate"
        if skipped:
            reason += ": " + "; ".join(skipped)
        # TC: the answer did not fit in the datagram, and the server left records out.
        if data[2] & 0x02:
            reason += " (the server set the truncation flag)"
        raise ValueError(reason)
    return certificates


def select_certificate(certificates, clock):
    """
    Return the certificate dnscrypt-proxy uses at ``clock`` (seconds since the epoch),
    or None when none is valid then.

    ``certificates`` is a list from :py:func:`parse_certificate_response`. Like
    FetchCurrentDNSCryptCert in dnscrypt_certs.go of dnscrypt-proxy 2.1, this takes
    the highest serial among the certificates valid at ``clock``. For the same serial
    it takes the higher es-version, and of two equal ones the later in the response.
    """
    chosen = None
    for cert in certificates:
        if not cert["valid_from"] <= clock <= cert["valid_until"]:
            continue
        if chosen is None or (cert["serial"], cert["es_version"]) >= (chosen["serial"], chosen["es_version"]):
            chosen = cert
    return chosen


def _utc(seconds):
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_certificate(fetched, clock):
    """
    Describe the certificates of one DNSCrypt server against the qube's clock.

    fetched
        The hexadecimal response from the status helper, or ``{"error": reason}``.
    clock
        The qube's time in seconds since the epoch, or None when unknown.

    Returns a dict with ``valid_now`` (True, False or None when unknown), the window
    of the certificate dnscrypt-proxy uses now (else of the newest one) and ``problem``.
    """
    if isinstance(fetched, dict):
        return {"valid_now": None, "problem": "certificate not fetched: {}".format(fetched.get("error"))}
    try:
        certificates = parse_certificate_response(fetched)
    except ValueError as error:
        return {"valid_now": None, "problem": "certificate unreadable: {}".format(error)}
    chosen = None if clock is None else select_certificate(certificates, clock)
    if chosen is None:
        chosen = max(certificates, key=lambda cert: (cert["serial"], cert["es_version"]))
    described = {
        "valid_now": None if clock is None else chosen["valid_from"] <= clock <= chosen["valid_until"],
        "valid_from": _utc(chosen["valid_from"]),
        "valid_until": _utc(chosen["valid_until"]),
        "serial": chosen["serial"],
        "construction": chosen["construction"],
        "certificates": len(certificates),
    }
    if clock is None:
        described["problem"] = "the clock of the qube is unknown"
    elif described["valid_now"]:
        described["days_left"] = round((chosen["valid_until"] - clock) / 86400, 1)
    else:
        described["problem"] = (
            "no certificate is valid at the qube's time {} (newest: {} to {}): check the clock of the qube".format(
                _utc(clock), described["valid_from"], described["valid_until"]
            )
        )
    return described


def _netvm_path(qubes, name):
    """Return ``[name, its netvm, that qube's netvm, ...]`` until a qube without one."""
    path = [name]
    current = qubes.get(name)
    while current and current.get("netvm") and current["netvm"] not in path:
        path.append(current["netvm"])
        current = qubes.get(current["netvm"])
    return path


def _service_qube_status(qubes, cfg, problems):
    name = cfg["qube"]["name"]
    row = qubes.get(name)
    if row is None:
        add_problem(problems, "qube {} not found".format(name), "run the build: " + BUILD_COMMAND)
        return {"name": name, "exists": False}
    described = {
        "name": name,
        "exists": True,
        "class": row["class"],
        "template": row["template"],
        "state": row["state"],
        "netvm": row["netvm"],
        "provides_network": row["provides_network"],
    }
    if row["class"] != cfg["qube"]["class"]:
        add_problem(
            problems,
            "{}: class is {}, the pillar asks for {}".format(name, row["class"], cfg["qube"]["class"]),
            "Qubes cannot change a qube's class, so set sysdns:qube:class to {}, or remove the qube "
            "(qvm-remove {}) and re-run the build".format(row["class"], name),
        )
    if row["netvm"] != cfg["qube"]["netvm"]:
        add_problem(
            problems,
            "{}: netvm is {}, expected {}".format(name, row["netvm"], cfg["qube"]["netvm"]),
            "qvm-prefs {} netvm {}".format(name, cfg["qube"]["netvm"]),
        )
    if not row["provides_network"]:
        add_problem(
            problems,
            "{}: provides_network is False, expected True".format(name),
            "qvm-prefs {} provides_network True".format(name),
        )
    if row["state"] != "Running":
        add_problem(
            problems,
            "{} is {}, so downstream qubes have no DNS (status does not start it)".format(name, row["state"]),
            "qvm-start {}".format(name),
        )
    return described


def _chain_status(qubes, cfg, problems):
    """Describe, for each qube the pillar rewires, its netvm path and whether it passes through sys-dns."""
    service = cfg["qube"]["name"]
    chain = {}
    for name in cfg["rewire"]:
        row = qubes.get(name)
        if row is None:
            chain[name] = {"exists": False, "through_sysdns": False}
            add_problem(
                problems,
                "qube {} (sysdns:rewire) not found".format(name),
                "create it, or remove it from sysdns:rewire and re-run the build",
            )
            continue
        path = _netvm_path(qubes, name)
        through = service in path[1:]
        chain[name] = {
            "netvm": row["netvm"],
            "path": " -> ".join(path),
            "through_sysdns": through,
            "state": row["state"],
        }
        if not through:
            add_problem(
                problems,
                "{}: netvm is {}, so its DNS does not pass through {}".format(name, row["netvm"], service),
                "qvm-prefs {} netvm {}, or re-run the build: {}".format(name, service, BUILD_COMMAND),
            )
    return chain


def _endpoint(ip, port):
    if ip is None:
        return None
    return "[{}]:{}".format(ip, port) if ":" in ip else "{}:{}".format(ip, port)


def configured_servers(cfg):
    """
    Return ``{name: {...}}`` for the resolvers in ``server_names`` and the relays of
    the validated pillar ``cfg``, decoded from their stamps: kind, protocol, address
    (IP and port dnscrypt-proxy connects to), and the provider name or host. Each
    entry also carries ``_fetch`` (IP, port, provider name) for
    :py:func:`certificate_requests`, which collect_status removes from its output.
    """
    used = set(cfg["dnscrypt"]["server_names"])
    anonymized = __salt__["sysdns_config.anonymized_resolvers"](cfg)
    servers = {}
    for kind, entries in (("resolver", cfg["dnscrypt"]["resolvers"]), ("relay", cfg["dnscrypt"]["relays"])):
        for entry in entries:
            if kind == "resolver" and entry["name"] not in used:
                continue
            decoded = __salt__["sysdns_config.decode_stamp"](entry["stamp"])
            server = {"kind": kind, "protocol": decoded["proto"], "address": _endpoint(decoded["ip"], decoded["port"])}
            if decoded["provider_name"]:
                server["provider_name"] = decoded["provider_name"]
            if decoded["host"]:
                server["host"] = decoded["host"]
            if kind == "resolver" and entry["name"] in anonymized:
                server["anonymized"] = True
            servers[entry["name"]] = server
            server["_fetch"] = (decoded["ip"], decoded["port"], decoded["provider_name"])
    return servers


def certificate_requests(servers):
    """
    Return the standard input of STATUS_COMMAND: one "NAME IP PORT PROVIDER" line per
    DNSCrypt resolver that dnscrypt-proxy contacts directly. Resolvers behind
    anonymizing relays are left out (``anonymized`` in their entry), because a direct
    query would show them the qube's public address. Validation rejects stamps on
    port 53, so no fetch meets the redirect of sys-dns's own port-53 traffic.
    """
    lines = []
    for name, server in sorted(servers.items()):
        ip, port, provider = server["_fetch"]
        if server["protocol"] == "dnscrypt" and not server.get("anonymized"):
            lines.append("{} {} {} {}\n".format(name, ip, port, provider))
    return "".join(lines)


def _drift_status(report, wanted_files, problems, qube):
    wanted = {name: hashlib.sha256(content.encode("utf-8")).hexdigest() for name, content in wanted_files.items()}
    have = report["files"]
    files = {}
    for name in sorted(set(wanted) | set(have)):
        if name not in have:
            files[name] = "missing"
        elif name not in wanted:
            files[name] = "not rendered by the pillar"
        elif have[name] != wanted[name]:
            files[name] = "differs from the pillar"
        else:
            files[name] = "matches"
    drifted = ["{} ({})".format(name, state) for name, state in files.items() if state != "matches"]
    if drifted:
        add_problem(
            problems,
            "{}: /rw/config/sysdns differs from what the pillar renders: {}".format(qube, ", ".join(drifted)),
            "re-run the build, which restores it: " + BUILD_COMMAND,
        )
    for key, table in (("ruleset", "inet sysdns"), ("guard-ruleset", "inet sysdns_guard")):
        if report[key] == "modified":
            add_problem(
                problems,
                "{}: the rules of table {} changed since they were loaded".format(qube, table),
                "re-run the build, which reloads them: " + BUILD_COMMAND,
            )
        elif report[key] == "unrecorded":
            add_problem(
                problems,
                "{}: table {} was loaded without a recorded digest, so runtime changes cannot be detected".format(
                    qube, table
                ),
                "re-run the build, which reloads it: " + BUILD_COMMAND,
            )
    for key in ("firewall", "guard", "input-accept"):
        if report[key] != _HEALTHY_REPORT[key]:
            add_problem(
                problems,
                "{}: {} is {}, expected {}, {}".format(
                    qube, key, report[key], _HEALTHY_REPORT[key], _REPORT_EFFECT[key]
                ),
                "re-run the build, which reloads the tables: " + BUILD_COMMAND,
            )
    return {
        "in_sync": not drifted
        and all(report[key] == _HEALTHY_REPORT[key] for key in _HEALTHY_REPORT if key != "service"),
        "files": files,
        "table inet sysdns": {"firewall": report["firewall"], "ruleset": report["ruleset"]},
        "table inet sysdns_guard": {"guard": report["guard"], "ruleset": report["guard-ruleset"]},
        "custom-input accept": report["input-accept"],
    }


def _counter_status(counters):
    main = counters.get("inet sysdns", {})
    guard = counters.get("inet sysdns_guard", {})
    return {
        "queries_redirected": main.get("redirected"),
        "plaintext_dropped_at_uplink": main.get("leak_dropped"),
        "plaintext_dropped_by_guard": guard.get("output_dropped"),
        "plaintext_leaked": main.get("leaked"),
        "tables": counters,
    }


def _server_status(servers, report, problems, qube):
    running = report["service"] == "active"
    log_view = parse_server_log(report["log"])
    live = log_view["live"] if log_view["live"] is not None else sorted(log_view["reached"])
    for name, server in servers.items():
        del server["_fetch"]
        if server["kind"] == "resolver":
            server["live"] = running and name in live
        if name in log_view["messages"]:
            server["last_message"] = log_view["messages"][name]
        if server["protocol"] == "dnscrypt" and server.get("anonymized"):
            server["certificate"] = {
                "valid_now": None,
                "note": "not fetched: dnscrypt-proxy reaches this resolver only through anonymizing relays",
            }
        elif server["protocol"] == "dnscrypt":
            if name in report["certificates"]:
                server["certificate"] = describe_certificate(report["certificates"][name], report["clock"])
                if server["certificate"].get("problem"):
                    add_problem(
                        problems,
                        "{}: server {}: {}".format(qube, name, server["certificate"]["problem"]),
                        "qubesctl sysdns.diagnose checks the clock and the path to the resolver",
                    )
            else:
                server["certificate"] = {"valid_now": None, "problem": "not fetched: the status helper printed nothing"}
                add_problem(
                    problems,
                    "{}: server {}: the status helper printed no certificate line".format(qube, name),
                    "re-run the build, which reinstalls {}: {}".format(STATUS_COMMAND, BUILD_COMMAND),
                )
    if running and not any(server.get("live") for server in servers.values()):
        add_problem(
            problems,
            "{}: dnscrypt-proxy reports no live server yet".format(qube),
            "wait a minute for its first server refresh; if it persists, qubesctl sysdns.diagnose names the cause",
        )
    return {
        "service": report["service"],
        "running": running,
        "version": report["version"],
        "live_servers": [name for name in live if name in servers] if running else [],
        "log_problems": log_view["other"][-5:],
    }


def collect_status(pillar=None):
    """
    Gather the state of sys-dns into a dict, read-only: one qvm-ls call, and one
    qvm-run of the status helper in sys-dns when it runs (never starting it).

    pillar
        The ``sysdns`` pillar; None reads it with ``pillar.get``.

    Keys:

    - ``ok`` and ``problems`` ("WHAT; fix: FIX" sentences, see add_problem);
    - ``qube``: class, template, state and netvm of sys-dns;
    - ``chain``: each rewired qube, its netvm path, and whether it passes through sys-dns;
    - ``dnscrypt_proxy``: service, version and live servers;
    - ``servers``: protocol, address and liveness of each server, and for DNSCrypt
      the certificate window against the qube's clock;
    - ``counters``: the nft counters since the tables were last loaded;
    - ``drift``: each file of /rw/config/sysdns against the pillar, and the loaded
      table against its digest at load time;
    - ``clock``: the qube's time.
    """
    if pillar is None:
        pillar = __salt__["pillar.get"]("sysdns", {})
    cfg = __salt__["sysdns_config.validate"](pillar)
    problems = []
    qubes = __salt__["sysdns_qvm.list_qubes"](refresh=True)
    service = _service_qube_status(qubes, cfg, problems)
    status = {
        "qube": service,
        "chain": _chain_status(qubes, cfg, problems),
        "problems": problems,
    }
    servers = configured_servers(cfg)
    name = cfg["qube"]["name"]

    report = None
    if service.get("state") == "Running":
        result = __salt__["sysdns_qvm.run"](
            name,
            STATUS_COMMAND,
            stdin=certificate_requests(servers),
            autostart=False,
            check=False,
            timeout=STATUS_TIMEOUT_S,
        )
        if result["retcode"] == 0:
            report = parse_status_output(result["stdout"])
        else:
            add_problem(
                problems,
                "{}: the status helper failed ({}); a template built before it existed lacks {}".format(
                    name,
                    (result["stderr"] or result["stdout"]).strip()[-500:] or "exit code {}".format(result["retcode"]),
                    STATUS_COMMAND,
                ),
                "run the build: " + BUILD_COMMAND,
            )

    if report is None:
        unknown = "unknown: {} is {}".format(name, service.get("state", "missing") if service["exists"] else "missing")
        for server in servers.values():
            del server["_fetch"]
        status.update(
            dnscrypt_proxy={"service": unknown, "running": False},
            servers=servers,
            counters=unknown,
            drift={"in_sync": None, "files": unknown},
            clock=None,
        )
    else:
        status["dnscrypt_proxy"] = _server_status(servers, report, problems, name)
        if not status["dnscrypt_proxy"]["running"]:
            add_problem(
                problems,
                "{}: dnscrypt-proxy is not running (service {})".format(name, report["service"]),
                "qvm-run -u root {} 'systemctl restart dnscrypt-proxy'; if it stops again, read its log: "
                "qvm-run -p -u root {} 'journalctl -u dnscrypt-proxy -b'".format(name, name),
            )
        status.update(
            servers=servers,
            counters=_counter_status(report["counters"]),
            drift=_drift_status(report, __salt__["sysdns_config.config_files"](cfg), problems, name),
            clock=_utc(report["clock"]) if report["clock"] is not None else None,
        )
    status["ok"] = not problems
    return status


def status():
    """
    Show the state of sys-dns, read-only and without starting any qube.

    The output contains the netvm chain, the class, template and power state of
    sys-dns, dnscrypt-proxy's version and live servers, each server's protocol,
    address and DNSCrypt certificate window, and the nft counters. It also says
    whether the configuration in sys-dns still matches what the pillar renders.
    Costs one qvm-ls call and, when sys-dns runs, one qvm-run call. The data comes
    from :py:func:`collect_status`.

    CLI Example:

    .. code-block:: bash

        qubesctl sysdns.status
        qubesctl sysdns.status --out=json
    """
    return collect_status()


# ---------------------------------------------------------------------------
# Diagnosis (the work is done by the sysdns_diagnose module)
# ---------------------------------------------------------------------------


def diagnose():
    """
    Diagnose sys-dns: run the checks of the tests SLS plus deeper probes, and return
    for each check its status (ok, fail, warn, skip), what was seen, the likely cause
    and the fix. Uses the ``sysdns`` pillar, starts no qube, and changes nothing. The
    exit code of ``qubesctl`` is 1 when a check failed.

    Returns ``{"result": bool, "summary": [one line per check], "findings": [{"check",
    "status", "detail", "cause", "fix"}]}``.

    CLI Example:

    .. code-block:: bash

        sudo qubesctl sysdns.diagnose
        sudo qubesctl sysdns.diagnose --out=json
    """
    return __salt__["sysdns_diagnose.run"]()
