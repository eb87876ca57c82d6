"""
Check from dom0 that sys-dns does its job: the netvm chain, client resolution, no
plaintext DNS leaving sys-dns, and encrypted upstream sessions of dnscrypt-proxy.

The checks read the named counters of the formula's nft table ``inet sysdns`` in
sys-dns before and after one test window in which every client qube resolves the test
names. A counter that did not move during real traffic cannot pass for silence.
"""

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
        problems.append("qube {} not found: run qubes.network.sys-dns".format(qube))
    else:
        seen[qube] = {"netvm": service["netvm"], "provides_network": service["provides_network"]}
        if service["netvm"] != netvm:
            problems.append("{}: netvm is {}, expected {}".format(qube, service["netvm"], netvm))
        if not service["provides_network"]:
            problems.append("{}: provides_network is False, expected True".format(qube))
    for name in rewired:
        client = qubes.get(name)
        if client is None:
            problems.append("qube {} not found".format(name))
            continue
        seen[name] = {"netvm": client["netvm"]}
        if client["netvm"] != qube:
            problems.append("{}: netvm is {}, expected {}".format(name, client["netvm"], qube))
    return {"ok": not problems, "problems": problems, "seen": seen}


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
        problems.append(
            "no client qube was tested ({}): set sysdns:tests:clients to existing qubes".format(
                ", ".join(window["skipped"]) or "empty list"
            )
        )
    for client, names in sorted(window["results"].items()):
        for name, outcome in sorted(names.items()):
            if not outcome["ok"]:
                problems.append(
                    "{}: resolving {} failed (expected an address, got: getent exit {})".format(
                        client, name, outcome["detail"] or "unknown"
                    )
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
        problems.append(
            "{}: {} plaintext port-53 packets left through the uplink during the test window (expected 0)".format(
                window["qube"], delta["leaked"]
            )
        )
    if window["lookups"] and delta["redirected"] < window["lookups"]:
        problems.append(
            "{}: the redirect counted {} queries for {} client lookups, so queries "
            "bypassed sys-dns's redirect (expected at least {})".format(
                window["qube"], delta["redirected"], window["lookups"], window["lookups"]
            )
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
        problems.append(
            "{}: dnscrypt-proxy got no upstream answer for the random names {} (expected "
            "NOERROR or NXDOMAIN, got {}); check that sys-net is connected and the "
            "clock is right".format(window["qube"], ", ".join(window["upstream_probes"]), seen or "no answer")
        )
    if window["delta"]["upstream_replies"] <= 0:
        problems.append(
            "{}: no packet came back from an upstream resolver during the test window (expected at least one)".format(
                window["qube"]
            )
        )
    return problems


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
