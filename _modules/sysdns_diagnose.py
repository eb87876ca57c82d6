"""
Diagnose from dom0 why sys-dns does not do its job, and name for each failure the likely
cause and the fix.

The checks of the tests SLS (``sysdns.chain``, ``sysdns.measure`` and ``sysdns.check_*``)
find what is wrong, and the probes here find why. One ``qvm-ls`` gives the state and netvm of
every qube, and one ``qvm-run`` of ``/usr/lib/sysdns/diagnose`` in sys-dns gives the state
of dnscrypt-proxy, its sockets, the formula's nft tables, the uplink, an answer for a
random name, the DNSCrypt certificates of the upstream resolvers and the end of
dnscrypt-proxy's journal. The pure functions below turn those facts into findings.

Facts about dnscrypt-proxy cite its 2.1.8 sources.
"""

import hashlib
import logging
import re
import struct
import time
import uuid

from salt.exceptions import CommandExecutionError, SaltInvocationError

log = logging.getLogger(__name__)

__virtualname__ = "sysdns_diagnose"

DIAGNOSE_COMMAND = "/usr/lib/sysdns/diagnose"
BUILD_COMMAND = "sudo qubesctl --show-output state.sls qubes.network.sys-dns"
# Seconds dom0 waits for the diagnose helper, so that an unreachable upstream yields a
# diagnosis rather than a timeout. The base covers the rest of its work. The upstream
# probe takes 15 s at most (SYSDNS_PROBE_TIMEOUT in probe-upstream.sh). The helper
# fetches certificates one after another, each in 6 s at most (SYSDNS_DIAGNOSE_TIMEOUT
# + 1 in diagnose.sh).
DIAGNOSE_BASE_TIMEOUT_S = 60
DIAGNOSE_PROBE_TIMEOUT_S = 15
DIAGNOSE_CERT_TIMEOUT_S = 6

OK = "ok"
FAIL = "fail"
WARN = "warn"
SKIP = "skip"

# A qube clock further than this from dom0's is reported. Qubes sets the clock of a
# qube from dom0's (qvm-sync-clock, qubes-core-agent-linux), so a larger offset means
# that this synchronization failed.
CLOCK_TOLERANCE_S = 60
# How far back the journal counts dnscrypt-proxy's refusals of clients.
LOG_WINDOW_S = 900

# Log lines of dnscrypt-proxy 2.1.8: proxy.go logs the first when a query arrives
# while max_clients queries are in flight (UDP queries are then answered from the cache
# only, TCP connections are closed), and the other two after each refresh of the
# server list; serversInfo.go and dnscrypt_certs.go log "[NAME] OK (PROTO)" for each
# server that answered. A DNSCrypt certificate outside its validity window is logged
# only at debug level, which the formula's unit does not enable, so the diagnosis
# fetches the certificates itself.
TOO_MANY_CLIENTS_RE = re.compile(r"Too many incoming connections \(max=(\d+)\)")
READY_RE = re.compile(r"dnscrypt-proxy is ready - live servers: (\d+)")
WAITING_TEXT = "dnscrypt-proxy is waiting for at least one server to be reachable"
SERVER_OK_RE = re.compile(r"\[([^\]]+)\] OK \((DNSCrypt|DoH|ODoH)\)")
STARTED_RE = re.compile(r"\] dnscrypt-proxy \d+\.\d+\.\d+$")
SEVERE_RE = re.compile(r"\[(FATAL|CRITICAL|ERROR)\] (.*)")

# DNS record type TXT (RFC 1035), which carries DNSCrypt certificates. The answers
# are read by sysdns.parse_certificate_response, shared with sysdns.status.
TYPE_TXT = 16


def __virtual__():
    if "sysdns_qvm.run" in __salt__:
        return __virtualname__
    return (False, "the sysdns_diagnose module needs the sysdns_qvm module (Qubes dom0 only)")


# ---------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------


def finding(check, status, detail, cause="", fix=""):
    """Return one finding: what was checked, its status, what was seen, why, and the fix."""
    return {"check": check, "status": status, "detail": detail, "cause": cause, "fix": fix}


def _failed(findings, *checks):
    return [item for item in findings if item["check"] in checks and item["status"] == FAIL]


# ---------------------------------------------------------------------------
# DNSCrypt certificates
# ---------------------------------------------------------------------------


def build_cert_query(provider_name, query_id):
    """
    Return the hex of a DNS query for the TXT records of a DNSCrypt provider name, the
    query dnscrypt-proxy sends to fetch a server's certificates.

    Raises SaltInvocationError for a name that is not a valid DNS name.
    """
    labels = [label for label in provider_name.rstrip(".").split(".")]
    if not labels or any(not label or len(label) > 63 or not label.isascii() for label in labels):
        raise SaltInvocationError(f"DNSCrypt provider name {provider_name!r} is invalid: expected a DNS name")
    header = struct.pack(">HHHHHH", query_id & 0xFFFF, 0x0100, 1, 0, 0, 0)
    question = b"".join(bytes([len(label)]) + label.encode("ascii") for label in labels)
    return (header + question + b"\x00" + struct.pack(">HH", TYPE_TXT, 1)).hex()


def diagnose_timeout(server_count):
    """Return the seconds dom0 waits for the diagnose helper with ``server_count`` fetches."""
    return DIAGNOSE_BASE_TIMEOUT_S + DIAGNOSE_PROBE_TIMEOUT_S + DIAGNOSE_CERT_TIMEOUT_S * server_count


def dnscrypt_servers(cfg):
    """
    List the DNSCrypt resolvers of the pillar whose certificates the diagnosis fetches:
    ``[{"name", "ip", "port", "provider_name"}]``. Only resolvers in ``server_names``
    count, since dnscrypt-proxy uses no other. Resolvers behind anonymizing relays are
    left out, because a direct query would show them the qube's public address.
    Relays have no certificate of their own, and servers from opted-in ``[sources]``
    are not known in advance.
    """
    decode = __salt__["sysdns_config.decode_stamp"]
    used = set(cfg["dnscrypt"]["server_names"])
    anonymized = __salt__["sysdns_config.anonymized_resolvers"](cfg)
    servers = []
    for entry in cfg["dnscrypt"]["resolvers"]:
        if entry["name"] not in used or entry["name"] in anonymized:
            continue
        decoded = decode(entry["stamp"])
        if decoded["proto"] != "dnscrypt":
            continue
        servers.append(
            {
                "name": entry["name"],
                "ip": decoded["ip"],
                "port": decoded["port"],
                "provider_name": decoded["provider_name"],
            }
        )
    return servers


# ---------------------------------------------------------------------------
# The report of the script in sys-dns
# ---------------------------------------------------------------------------


def parse_report(output):
    """
    Parse the output of DIAGNOSE_COMMAND (see files/diagnose.sh) into a dict.

    Facts the script did not print stay None (or empty), so a truncated report never
    passes for a healthy one.
    """
    report = {
        "clock": None,
        "service": None,
        "listen": [],
        "tables": {},
        "redirect_chain": None,
        "redirect_rule": None,
        "input_accept": None,
        "uplink": None,
        "route": None,
        "probe_rcode": None,
        "probe_ran": False,
        "certs": {},
        "files": {},
        "files_listed": False,
        "forwards": [],
        "addresses": set(),
        "log": [],
    }
    for line in output.splitlines():
        words = line.split()
        if not words:
            continue
        key, rest = words[0], words[1:]
        if key == "clock" and rest and rest[0].isdigit():
            report["clock"] = int(rest[0])
        elif key == "service" and rest:
            padded = rest + [""] * (4 - len(rest))
            report["service"] = {
                "active": padded[0],
                "sub": padded[1],
                "pid": int(padded[2]) if padded[2].isdigit() else 0,
                "restarts": int(padded[3]) if padded[3].isdigit() else 0,
            }
        elif key == "listen" and len(rest) >= 2:
            report["listen"].append(
                {"proto": rest[0], "address": rest[1], "process": _process_name(" ".join(rest[2:]))}
            )
        elif key == "table" and len(rest) == 2:
            report["tables"][rest[0]] = rest[1] == "present"
        elif key in ("redirect-chain", "redirect-rule", "input-accept", "route") and rest:
            report[key.replace("-", "_")] = rest[-1] == "present"
        elif key == "uplink" and len(rest) == 2:
            report["uplink"] = rest[1]
        elif key == "probe" and len(rest) == 2 and rest[0] == "rcode":
            report["probe_ran"] = True
            report["probe_rcode"] = int(rest[1]) if rest[1].isdigit() else None
        elif key == "file" and len(rest) == 2:
            report["files"][rest[1]] = rest[0]
        elif key == "files" and rest == ["listed"]:
            report["files_listed"] = True
        elif key == "forward" and len(rest) == 2:
            report["forwards"].append((rest[0], rest[1].split(",")))
        elif key == "address" and len(rest) == 1:
            report["addresses"].add(rest[0])
        elif key == "cert" and len(rest) == 2:
            report["certs"][rest[0]] = None if rest[1] == "none" else rest[1]
        elif key == "log" and len(rest) >= 2 and rest[0].isdigit():
            report["log"].append((int(rest[0]), line.split(None, 2)[2]))
    return report


def _process_name(users):
    # ss prints users:(("dnscrypt-proxy",pid=445,fd=5)).
    match = re.search(r'\(\("([^"]+)"', users)
    return match.group(1) if match else ""


def log_facts(lines, now, window=LOG_WINDOW_S):
    """
    Summarize dnscrypt-proxy's journal lines ``[(epoch, message)]``: refusals for
    max_clients since its last start and within ``window`` seconds before ``now``, the
    live-server count of the last refresh, the servers reported OK since the last
    start, and severe messages.
    """
    facts = {"too_many": 0, "max_clients": None, "live_servers": None, "servers_ok": set(), "severe": []}
    for stamp, message in lines:
        if message.startswith("Started dnscrypt-proxy") or STARTED_RE.search(message):
            # A restart (a new configuration, perhaps a larger max_clients) makes the
            # earlier refusals and server results history.
            facts["servers_ok"] = set()
            facts["too_many"] = 0
            facts["max_clients"] = None
        match = TOO_MANY_CLIENTS_RE.search(message)
        if match and now - stamp <= window:
            facts["too_many"] += 1
            facts["max_clients"] = int(match.group(1))
        match = READY_RE.search(message)
        if match:
            facts["live_servers"] = int(match.group(1))
        if WAITING_TEXT in message:
            facts["live_servers"] = 0
        match = SERVER_OK_RE.search(message)
        if match:
            facts["servers_ok"].add(match.group(1))
        match = SEVERE_RE.search(message)
        if match:
            facts["severe"].append(match.group(2))
    return facts


def config_drift(report, wanted_files):
    """
    Return the names of the files in /rw/config/sysdns that differ from what the pillar
    renders (``wanted_files``: name to content), missing or extra, sorted. Returns
    None when the report has no file list, as from a helper older than the file lines.
    """
    if not report["files_listed"]:
        return None
    report_files = report["files"]
    wanted = {name: hashlib.sha256(content.encode("utf-8")).hexdigest() for name, content in wanted_files.items()}
    return sorted(name for name in set(wanted) | set(report_files) if wanted.get(name) != report_files.get(name))


def _server_host(server):
    """Return the IP of a forwarding-rule server: ``IP``, ``IP:PORT`` or ``[IPv6]:PORT``."""
    if server.startswith("["):
        return server[1:].partition("]")[0]
    if server.count(":") == 1:
        return server.partition(":")[0]
    return server


def self_forwards(report):
    """
    Return ``[(zone, server)]`` for the forwarding rules of the running configuration
    whose server is an address of the qube itself. dnscrypt-proxy then sends those
    queries to itself, since the qube's own port-53 traffic is redirected to it.
    """
    return [
        (zone, server)
        for zone, servers in report["forwards"]
        for server in servers
        if _server_host(server) in report["addresses"]
    ]


# ---------------------------------------------------------------------------
# Netvm chains
# ---------------------------------------------------------------------------


def _is_whonix(name):
    return "whonix" in (name or "").lower()


def netvm_path(qubes, name):
    """Return the netvm chain of a qube, itself first, stopping at a loop or a missing qube."""
    path = [name]
    current = qubes.get(name, {}).get("netvm")
    while current and current not in path:
        path.append(current)
        current = qubes.get(current, {}).get("netvm")
    return path


def bypassing_qubes(qubes, service_qube):
    """
    Return ``[(qube, path)]`` for every qube with a netvm whose chain never reaches
    ``service_qube``: its DNS leaves through another netvm, in plaintext.

    Exempt are the service qube, the qubes on its own upstream chain, and qubes whose
    chain passes a Whonix qube (their DNS goes through Tor).
    """
    upstream = set(netvm_path(qubes, service_qube))
    found = []
    for name, row in sorted(qubes.items()):
        if name in upstream or not row.get("netvm") or row.get("class") == "AdminVM":
            continue
        path = netvm_path(qubes, name)
        if service_qube in path or any(_is_whonix(hop) for hop in path):
            continue
        found.append((name, path))
    return found


# ---------------------------------------------------------------------------
# Classification: one function per check
# ---------------------------------------------------------------------------


def classify_qube(qube, row):
    check = "qube " + qube
    if row is None:
        return finding(
            check,
            FAIL,
            f"qube {qube} does not exist",
            f"{qube} was never built, or was removed",
            "sudo qubesctl --show-output state.sls qubes.network.sys-dns",
        )
    if row["state"] != "Running":
        return finding(
            check,
            FAIL,
            f"{qube} is {row['state']}; the diagnosis does not start it",
            f"{qube} is halted, so every qube behind it has neither DNS nor network",
            f"qvm-start {qube}",
        )
    return finding(check, OK, f"{qube} is running")


def classify_chain(chain_result, qube, netvm):
    if chain_result["ok"]:
        return finding(
            "netvm chain",
            OK,
            ", ".join(f"{name} -> {seen['netvm']}" for name, seen in sorted(chain_result["seen"].items())),
        )
    fixes = []
    for name, seen in sorted(chain_result["seen"].items()):
        if name == qube:
            if seen["netvm"] != netvm:
                fixes.append(f"qvm-prefs {qube} netvm {netvm}")
            if not seen["provides_network"]:
                fixes.append(f"qvm-prefs {qube} provides_network True")
        elif seen["netvm"] != qube:
            fixes.append(f"qvm-prefs {name} netvm {qube}")
    return finding(
        "netvm chain",
        FAIL,
        "; ".join(chain_result["problems"]),
        "a netvm was changed after the build, so queries do not pass through " + qube,
        "; ".join(fixes) or "sudo qubesctl --show-output state.sls qubes.network.sys-dns",
    )


def classify_bypass(bypass, qube, rewired):
    if not bypass:
        return finding("bypass", OK, f"every qube with a netvm reaches {qube}")
    target = rewired[0] if rewired else qube
    detail = "; ".join(f"{name}: {' -> '.join(path)}" for name, path in bypass)
    return finding(
        "bypass",
        FAIL,
        detail,
        f"these qubes reach the uplink without passing {qube}, so their DNS leaves in "
        "plaintext through their netvm's resolvers",
        "; ".join(f"qvm-prefs {name} netvm {target}" for name, _ in bypass)
        + f" (a qube that provides network may also use {qube} as its netvm)",
    )


def classify_service(report, logs, qube):
    service = report["service"]
    if service is None:
        return finding(
            "dnscrypt-proxy",
            FAIL,
            "no service state in the report",
            "the report was cut short",
            "run the diagnosis again; if it persists, re-apply qubes.network.sys-dns to reinstall " + DIAGNOSE_COMMAND,
        )
    state = f"{service['active']} ({service['sub']}), {service['restarts']} restarts"
    if service["active"] == "active":
        return finding("dnscrypt-proxy", OK, "dnscrypt-proxy.service is " + state)
    severe = "; ".join(logs["severe"][-3:])
    holders = sorted({item["process"] for item in report["listen"] if item["process"] != "dnscrypt-proxy"})
    if holders and "address already in use" in severe:
        cause = f"port 53 is taken by {', '.join(holders)}, so dnscrypt-proxy cannot bind it"
        fix = f"stop and disable {', '.join(holders)} in {qube} (or its template), then restart dnscrypt-proxy"
    elif severe:
        cause = "dnscrypt-proxy stopped with: " + severe
        fix = (
            "re-apply the configuration: sudo qubesctl --show-output state.sls qubes.network.sys-dns; "
            f"read the log: qvm-run -p -u root {qube} 'journalctl -u dnscrypt-proxy -b'"
        )
    else:
        cause = f"dnscrypt-proxy is not running in {qube} (stopped, or it never started)"
        fix = f"qvm-run -u root {qube} 'systemctl restart dnscrypt-proxy'"
    return finding("dnscrypt-proxy", FAIL, "dnscrypt-proxy.service is " + state, cause, fix)


def classify_listening(report, service_ok, qube):
    check = "port 53"
    if not service_ok:
        return finding(check, SKIP, "dnscrypt-proxy is not running")
    ours = {item["proto"] for item in report["listen"] if item["process"] == "dnscrypt-proxy"}
    if ours >= {"udp", "tcp"}:
        return finding(check, OK, "dnscrypt-proxy listens on port 53 (UDP and TCP)")
    missing = [proto.upper() for proto in ("udp", "tcp") if proto not in ours]
    others = sorted(
        {f"{item['process']} ({item['proto']})" for item in report["listen"] if item["process"] != "dnscrypt-proxy"}
    )
    detail = f"dnscrypt-proxy runs but does not listen on port 53 over {' and '.join(missing)}"
    if others:
        detail += "; port 53 is held by " + ", ".join(others)
    return finding(
        check,
        FAIL,
        detail,
        "its listen_addresses do not include port 53 (a changed dnscrypt-proxy.toml), or another "
        "program holds the port, so the redirect sends queries to a closed port",
        "re-apply the configuration: sudo qubesctl --show-output state.sls qubes.network.sys-dns, then "
        f"qvm-run -u root {qube} 'systemctl restart dnscrypt-proxy'",
    )


def redirect_fix(qube, drift, guard_loaded=True):
    """
    Return the fix for a missing or broken redirect. apply-firewall loads
    /rw/config/sysdns/sysdns.nft as it is, so when that file differs from the pillar
    (``drift`` lists names) only the build, which rewrites the file, repairs it. It
    does not load the guard table inet sysdns_guard either, which the build restores.
    """
    if drift or not guard_loaded:
        return (
            f"re-run the build, which restores /rw/config/sysdns from the pillar and reloads the tables: "
            f"{BUILD_COMMAND} (apply-firewall alone would reload the edited file)"
        )
    return f"qvm-run -u root {qube} /usr/lib/sysdns/apply-firewall, or re-run the build: {BUILD_COMMAND}"


def _drift_text(drift):
    if not drift:
        return ""
    return "; /rw/config/sysdns differs from what the pillar renders: " + ", ".join(drift)


def classify_redirect(report, qube, drift=None):
    check = "redirect"
    fix = redirect_fix(qube, drift, report["tables"].get("sysdns_guard") is not False)
    if not report["tables"].get("sysdns"):
        if report["tables"].get("sysdns_guard"):
            guard = "the guard table inet sysdns_guard drops it, so it does not leave"
        else:
            guard = "table inet sysdns_guard is missing too, so nothing stops it from leaving"
        return finding(
            check,
            FAIL,
            f"table inet sysdns is missing in {qube}" + _drift_text(drift),
            f"the formula's nft table was deleted or failed to load, so downstream DNS is not "
            f"redirected to dnscrypt-proxy ({guard})",
            fix,
        )
    if not report["redirect_chain"] or not report["redirect_rule"]:
        part = (
            "chain redirect_downstream" if not report["redirect_chain"] else "the redirect rule of redirect_downstream"
        )
        return finding(
            check,
            FAIL,
            f"table inet sysdns lacks {part}" + _drift_text(drift),
            "the redirect was flushed or edited by hand, so downstream DNS is not redirected to dnscrypt-proxy",
            fix,
        )
    if not report["input_accept"]:
        return finding(
            check,
            FAIL,
            "the formula's accept rule is missing from ip qubes custom-input" + _drift_text(drift),
            "Qubes' input chain rejects the redirected queries without it",
            fix,
        )
    return finding(check, OK, "table inet sysdns redirects downstream port 53 to dnscrypt-proxy")


def _format_time(epoch):
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _certificate_status(answer_hex, now):
    """
    Return ``(status, certificates, reason)``: status is "none", "unreadable", "valid"
    or "invalid" at ``now``; reason says why an answer is unreadable.
    """
    if answer_hex is None:
        return "none", [], ""
    try:
        certificates = __salt__["sysdns.parse_certificate_response"](answer_hex)
    except ValueError as error:
        return "unreadable", [], str(error)
    if __salt__["sysdns.select_certificate"](certificates, now) is not None:
        return "valid", certificates, ""
    return "invalid", certificates, ""


def classify_clock(report, dom0_clock, servers, qube):
    check = "clock"
    qube_clock = report["clock"]
    if qube_clock is None:
        return finding(check, SKIP, "the report has no clock")
    offset = qube_clock - dom0_clock
    skewed = abs(offset) > CLOCK_TOLERANCE_S
    direction = "ahead of" if offset > 0 else "behind"
    clock_text = f"the clock of {qube} reads {_format_time(qube_clock)}, {abs(offset)} s {direction} dom0's"

    valid = []
    invalid = []
    unanswered = []
    unreadable = []
    for server in servers:
        status, certificates, reason = _certificate_status(report["certs"].get(server["name"]), qube_clock)
        if status == "valid":
            valid.append(server["name"])
        elif status == "invalid":
            newest = max(certificates, key=lambda cert: cert["valid_until"])
            invalid.append((server["name"], newest))
        elif status == "none":
            unanswered.append(server["name"])
        elif status == "unreadable":
            unreadable.append(f"{server['name']} ({reason})")

    if invalid:
        parts = []
        for name, cert in invalid:
            if qube_clock < cert["valid_from"]:
                parts.append(
                    f"{name}: certificate valid from {_format_time(cert['valid_from'])}, "
                    f"{cert['valid_from'] - qube_clock} s after the qube's clock"
                )
            else:
                parts.append(
                    f"{name}: certificate expired at {_format_time(cert['valid_until'])}, "
                    f"{qube_clock - cert['valid_until']} s before the qube's clock"
                )
        if skewed:
            cause = (
                f"clock skew: {clock_text}, so dnscrypt-proxy rejects the DNSCrypt certificates "
                "as not valid at the current date"
            )
            fix = f"qvm-run -u root {qube} qvm-sync-clock (sets the qube's clock from dom0's)"
        else:
            if all(qube_clock < cert["valid_from"] for _, cert in invalid):
                wrong = "the system clock is behind: the certificates are not valid yet"
            else:
                wrong = "the system clock is ahead, or the server let its certificate expire"
            cause = (
                f"clock skew: {wrong}. The clock of {qube} agrees with dom0's, so dom0's clock is wrong "
                "too, and dnscrypt-proxy rejects the DNSCrypt certificates as not valid at the current date"
            )
            fix = (
                "compare `date -u` in dom0 with a trusted clock; dom0 takes its time from the clockvm "
                "(qubes-prefs clockvm) over NTP: check its network, then run qvm-sync-clock in "
                f"{qube}. If the clock is right, drop the server from sysdns:dnscrypt:resolvers"
            )
        return finding(check, FAIL, "; ".join(parts) + "; " + clock_text, cause, fix)

    if skewed:
        return finding(
            check,
            WARN,
            clock_text,
            "time synchronization of sys-dns failed; DNSCrypt certificates, valid for about a day, "
            "break once the offset grows past their validity window",
            f"qvm-run -u root {qube} qvm-sync-clock",
        )
    detail = clock_text
    if valid:
        detail += "; DNSCrypt certificates valid at its clock: " + ", ".join(valid)
    if unanswered:
        detail += "; no certificate answer from " + ", ".join(unanswered)
    if unreadable:
        detail += "; certificate answer rejected from " + ", ".join(unreadable)
    if servers and not valid:
        # Agreement with dom0's clock proves nothing when dom0's clock is wrong too:
        # only a certificate valid at the qube's clock does.
        return finding(
            check,
            SKIP,
            detail + "; no DNSCrypt certificate could be checked against the clock, so the check cannot pass",
        )
    return finding(check, OK, detail)


def classify_max_clients(logs, configured, qube, loops=()):
    check = "max_clients"
    if not logs["too_many"]:
        return finding(check, OK, f"no refused client in the last {LOG_WINDOW_S // 60} minutes")
    limit = logs["max_clients"] or configured
    detail = (
        f"dnscrypt-proxy logged 'Too many incoming connections (max={limit})' "
        f"{logs['too_many']} times in the last {LOG_WINDOW_S // 60} minutes"
    )
    if loops:
        rules = ", ".join(f"zone {zone} -> {server}" for zone, server in loops)
        return finding(
            check,
            FAIL,
            detail,
            f"forwarding loop: the forwarding rules ({rules}) name an address of {qube} itself, so "
            "dnscrypt-proxy forwards those queries to itself until max_clients is exhausted",
            "point the rule at another resolver, or remove it, in sysdns:dnscrypt:forwarding_rules and "
            f"re-run the build, which also restores a hand-edited file: {BUILD_COMMAND}",
        )
    return finding(
        check,
        FAIL,
        detail,
        f"max_clients exhausted: {limit} queries were in flight at once, so dnscrypt-proxy answered "
        "further UDP queries from its cache only and closed further TCP connections",
        f"raise sysdns:dnscrypt:max_clients (now {configured}) in the pillar and re-apply "
        "qubes.network.sys-dns; if one qube floods sys-dns, find it with "
        f"qvm-run -p -u root {qube} 'ss -tn state established sport = :53'",
    )


def classify_upstream(report, logs, findings, qube_row, qube):
    check = "upstream"
    if _failed(findings, "dnscrypt-proxy", "port 53"):
        return finding(check, SKIP, "needs dnscrypt-proxy running and listening on port 53")
    rcode = report["probe_rcode"]
    if rcode in (0, 3):
        return finding(check, OK, f"dnscrypt-proxy answered a random name with response code {rcode}")

    seen = "no answer" if rcode is None else f"response code {rcode}"
    detail = f"dnscrypt-proxy got no upstream answer for a random name ({seen})"
    if logs["live_servers"] == 0:
        detail += "; its log shows it waiting for at least one server to be reachable"
    if _failed(findings, "max_clients"):
        return finding(
            check, FAIL, detail, "max_clients exhausted: dnscrypt-proxy refused the probe itself", "see max_clients"
        )
    if _failed(findings, "clock") and not logs["servers_ok"]:
        return finding(
            check, FAIL, detail, "clock skew: no upstream certificate is valid at the qube's clock", "see clock"
        )
    if qube_row is not None and not qube_row.get("netvm"):
        return finding(
            check,
            FAIL,
            detail,
            f"{qube} has no netvm, so no upstream resolver is reachable",
            f"qvm-prefs {qube} netvm sys-net",
        )
    if report["uplink"] != "up" or not report["route"]:
        return finding(
            check,
            FAIL,
            detail + f"; uplink eth0 {report['uplink']}, default route {'present' if report['route'] else 'missing'}",
            f"{qube} has no working link to its netvm",
            f"restart {qube}: qvm-shutdown --wait --force {qube} && qvm-start {qube} (downstream qubes "
            "lose network meanwhile)",
        )
    unanswered = sorted(name for name, answer in report["certs"].items() if answer is None)
    if unanswered:
        detail += "; no DNSCrypt certificate answer from " + ", ".join(unanswered)
    return finding(
        check,
        FAIL,
        detail,
        f"no upstream reachable: {qube}'s netvm ({qube_row['netvm'] if qube_row else 'unknown'}) is set but "
        "the encrypted resolvers do not answer, so something between sys-dns and them blocks the "
        "traffic or the network is down",
        "check that the netvm is online (qvm-run -p sys-net 'ip route'); check qvm-firewall "
        f"{qube} and any network filter for the resolvers' ports (443 and those in their stamps); "
        "if the resolvers are gone, change sysdns:dnscrypt:resolvers",
    )


def _unguarded_finding(report, qube):
    """
    Return the failed plaintext finding when both formula tables are missing in
    ``qube``, else None. Then no rule redirects or drops port-53 traffic, and Qubes'
    dnat-dns sends the queries to the netvm's resolver in plaintext.
    """
    tables = report["tables"] if report else {}
    if tables.get("sysdns") is not False or tables.get("sysdns_guard") is not False:
        return None
    return finding(
        "no plaintext DNS",
        FAIL,
        f"tables inet sysdns and inet sysdns_guard are both missing in {qube}",
        f"nothing stops port-53 traffic from leaving {qube}: without the redirect and the guard, "
        "queries go in plaintext to the netvm's resolver",
        f"re-run the build: {BUILD_COMMAND}",
    )


def classify_tests(window, error, findings, qube, report=None):
    """Turn the tests SLS checks of a measured window into findings, naming root causes."""
    checks = ("clients resolve", "no plaintext DNS", "encrypted upstream sessions")
    roots = _failed(
        findings, "netvm chain", "bypass", "dnscrypt-proxy", "port 53", "redirect", "clock", "max_clients", "upstream"
    )
    unguarded = _unguarded_finding(report, qube)
    if window is None:
        reason = error or ("skipped: " + ", ".join(item["check"] for item in roots) + " failed")
        return [
            unguarded if check == "no plaintext DNS" and unguarded else finding(check, SKIP, reason) for check in checks
        ]
    results = (
        __salt__["sysdns.check_resolve"](window),
        __salt__["sysdns.check_no_plaintext"](window),
        __salt__["sysdns.check_upstream"](window),
    )
    found = []
    for check, problems in zip(checks, results, strict=True):
        if not problems:
            found.append(finding(check, OK, f"passed ({window['lookups']} lookups)"))
            continue
        if roots:
            cause = "; ".join(item["cause"] for item in roots)
            fix = "fix " + ", ".join(item["check"] for item in roots) + " first"
        elif check == "no plaintext DNS":
            cause = f"plaintext DNS left {qube} or bypassed its redirect although the ruleset looks complete"
            fix = f"read the counters: qvm-run -p -u root {qube} 'nft list table inet sysdns'; re-apply the build"
        elif check == "clients resolve":
            cause = "clients fail although sys-dns answers: their path to sys-dns (sys-firewall) or their names"
            fix = "check the client's netvm and the names in sysdns:tests:names"
        else:
            cause = "dnscrypt-proxy answered, but no reply from an upstream resolver was counted"
            fix = "run the diagnosis again; if it persists, re-apply qubes.network.sys-dns"
        found.append(finding(check, FAIL, "; ".join(problems), cause, fix))
    return found


def classify(facts):
    """
    Turn collected facts into findings. ``facts`` has the keys ``qube``, ``netvm``,
    ``rewired``, ``row`` (the qvm-ls row of the service qube or None), ``chain``,
    ``bypass``, ``report`` (parsed, or None when the qube does not run), ``dom0_clock``,
    ``servers``, ``max_clients``, ``drift`` (see config_drift; absent or None when
    unknown), and ``window``/``window_error`` of the tests SLS.
    """
    qube = facts["qube"]
    findings = [
        classify_qube(qube, facts["row"]),
        classify_chain(facts["chain"], qube, facts["netvm"]),
        classify_bypass(facts["bypass"], qube, facts["rewired"]),
    ]
    report = facts["report"]
    if report is None:
        reason = f"{qube} is not running" if facts["row"] else f"{qube} does not exist"
        for check in ("dnscrypt-proxy", "port 53", "redirect", "clock", "max_clients", "upstream"):
            findings.append(finding(check, SKIP, reason))
        findings += [
            finding(check, SKIP, reason)
            for check in ("clients resolve", "no plaintext DNS", "encrypted upstream sessions")
        ]
        return findings

    logs = log_facts(report["log"], report["clock"] or facts["dom0_clock"])
    service = classify_service(report, logs, qube)
    findings.append(service)
    findings.append(classify_listening(report, service["status"] == OK, qube))
    findings.append(classify_redirect(report, qube, facts.get("drift")))
    findings.append(classify_clock(report, facts["dom0_clock"], facts["servers"], qube))
    findings.append(classify_max_clients(logs, facts["max_clients"], qube, self_forwards(report)))
    findings.append(classify_upstream(report, logs, findings, facts["row"], qube))
    findings += classify_tests(facts["window"], facts["window_error"], findings, qube, report)
    return findings


def summarize(findings):
    """Return ``(result, lines)``: False when a finding failed, and one line per finding."""
    lines = []
    for item in findings:
        line = f"{item['status'].upper():4} {item['check']}: {item['detail']}"
        if item["status"] in (FAIL, WARN):
            line += f" | cause: {item['cause']} | fix: {item['fix']}"
        lines.append(line)
    failed = [item["check"] for item in findings if item["status"] == FAIL]
    result = not failed
    lines.append("result: all checks passed" if result else "result: failed: " + ", ".join(failed))
    return result, lines


# ---------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------


def _probe_requests(servers, names):
    lines = ["probe sysdns-diagnose-{}.{}".format(uuid.uuid4().hex[:12], names[0])]
    for index, server in enumerate(servers):
        query = build_cert_query(server["provider_name"], 0x5D00 + index)
        lines.append(f"cert {server['name']} {server['ip']} {server['port']} {query}")
    return "".join(line + "\n" for line in lines)


def collect(cfg):
    """Collect the facts classify() reads: qvm-ls, one qvm-run in sys-dns, the tests SLS window."""
    qube = cfg["qube"]["name"]
    netvm = cfg["qube"]["netvm"]
    rewired = list(cfg["rewire"])
    chain_result = __salt__["sysdns.chain"](qube, netvm, rewired)
    qubes = __salt__["sysdns_qvm.list_qubes"]()
    row = qubes.get(qube)
    servers = dnscrypt_servers(cfg)
    facts = {
        "qube": qube,
        "netvm": netvm,
        "rewired": rewired,
        "row": row,
        "chain": chain_result,
        "bypass": bypassing_qubes(qubes, qube),
        "report": None,
        "dom0_clock": int(time.time()),
        "servers": servers,
        "max_clients": cfg["dnscrypt"]["max_clients"],
        "drift": None,
        "window": None,
        "window_error": None,
    }
    if row is None or row["state"] != "Running":
        return facts

    started = time.time()
    result = __salt__["sysdns_qvm.run"](
        qube,
        DIAGNOSE_COMMAND,
        stdin=_probe_requests(servers, cfg["tests"]["names"]),
        autostart=False,
        check=False,
        timeout=diagnose_timeout(len(servers)),
    )
    if result["retcode"] != 0:
        # 127: the shell found no such command, so the template predates the helper.
        advice = (
            "re-apply qubes.network.sys-dns to install it"
            if result["retcode"] == 127
            else "check that {} responds to qvm-run".format(qube)
        )
        raise CommandExecutionError(
            f"{DIAGNOSE_COMMAND} failed in {qube} with exit code {result['retcode']}: "
            f"{(result['stderr'] or result['stdout']).strip()[-500:]}; {advice}"
        )
    # The qube read its clock at the start of the script.
    facts["dom0_clock"] = int(started)
    facts["report"] = parse_report(result["stdout"])

    report = facts["report"]
    facts["drift"] = config_drift(report, __salt__["sysdns_config.config_files"](cfg))
    service = report["service"] or {}
    listening = any(item["process"] == "dnscrypt-proxy" for item in report["listen"])
    redirect = report["tables"].get("sysdns") and report["redirect_chain"] and report["redirect_rule"]
    # Without these the checks of the tests SLS can only fail, after a lookup timeout
    # per client and name, for a cause the findings already name.
    if not redirect or service.get("active") != "active" or not listening:
        return facts
    try:
        facts["window"] = __salt__["sysdns.measure"](
            qube, cfg["tests"]["clients"], cfg["tests"]["names"], start_clients=False, refresh=True
        )
    except CommandExecutionError as error:
        facts["window_error"] = str(error)
    return facts


def run():
    """
    Diagnose sys-dns with the ``sysdns`` pillar; see :py:func:`sysdns.diagnose`.
    """
    cfg = __salt__["sysdns_config.validate"]()
    facts = collect(cfg)
    findings = classify(facts)
    result, lines = summarize(findings)
    for item in findings:
        if item["status"] == FAIL:
            log.info("sysdns diagnose: %s failed: %s", item["check"], item["cause"])
    if not result:
        __context__["retcode"] = 1
    return {"result": result, "summary": lines, "findings": findings}
