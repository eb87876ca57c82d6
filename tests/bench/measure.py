"""Measurements in a running lab: qubesctl runs, dnsperf runs, cold starts and bursts.

Every query stays inside the lab's own network namespaces: dnsperf and the poller run
with `ip netns exec` in a namespace of the lab, against a lab address.
"""

import json
import logging
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.formula_lab import apply_sls, changes_by_state, failed_states
from tests.lab import layout as layout_module
from tests.lab.store import Store

from . import stats

log = logging.getLogger(__name__)

BUILD = "qubes.network.sys-dns"
TESTS = "qubes.tests.sys-dns"
# The address every downstream qube uses as its DNS server (Qubes' virtual DNS,
# rewritten by dnat-dns in its netvm).
CLIENT_DNS = "10.139.1.1"
CACHED_NAME = "www.lab.test"
# dnscrypt-proxy listens on [::]:53 in sys-dns (sysdns_config.LISTEN_ADDRESSES).
PROXY_ADDRESS = "127.0.0.1"


class BenchError(RuntimeError):
    """A step of the benchmark failed, so its figure would be meaningless."""


# qubesctl


def timed_apply(lab, sls, *extra):
    """Run `qubesctl state.sls SLS EXTRA` and return its cost.

    The dict has seconds (wall time of qubesctl), calls (dom0 tool calls other than
    qubesctl, from calls.log), call_seconds (their summed durations), state_seconds
    (sum of Salt's per-state durations) and changes (states that reported changes).
    Raise BenchError when a state failed.
    """
    before = len(lab.calls())
    started = time.monotonic()
    code, states, output = apply_sls(lab, sls, *extra)
    seconds = time.monotonic() - started
    if states is None or failed_states(states) or code != 0:
        failed = failed_states(states) if states else None
        raise BenchError(f"qubesctl state.sls {sls} {' '.join(extra)} failed (exit code {code}): {failed or output}")
    calls = [entry for entry in lab.calls(before) if entry["argv"][0] != "qubesctl"]
    return {
        "seconds": seconds,
        "calls": len(calls),
        "call_seconds": sum(entry["duration"] for entry in calls),
        "state_seconds": sum(float(ret.get("duration", 0)) for ret in states.values()) / 1000,
        "changes": len(changes_by_state(states)),
    }


def timed_show_sls(lab, sls):
    """Return the wall time of `qubesctl state.show_sls SLS`: start-up plus rendering, no state runs."""
    started = time.monotonic()
    result = lab.qubesctl("state.show_sls", sls, "--out=json")
    if result.returncode != 0:
        raise BenchError(f"qubesctl state.show_sls {sls} failed: {result.stderr.strip()}")
    return time.monotonic() - started


def salt_baseline(lab):
    """Return the wall time of `qubesctl test.ping`: Salt's start-up and module sync alone."""
    started = time.monotonic()
    result = lab.qubesctl("test.ping")
    if result.returncode != 0:
        raise BenchError(f"qubesctl test.ping failed: {result.stderr.strip()}")
    return time.monotonic() - started


# dnsperf


def write_names(path, names):
    path.write_text("".join(f"{name} A\n" for name in names), encoding="ascii")
    return path


def unique_names(count):
    """Return *count* names never asked before; every *.lab.test name has an A record."""
    token = secrets.token_hex(4)
    return [f"u{token}-{index}.{CACHED_NAME.split('.', 1)[1]}" for index in range(count)]


def run_dnsperf(namespace, server, datafile, seconds=None, runs=None, outstanding=100, clients=4, timeout=5):
    """Run dnsperf -v in lab namespace *namespace* against *server*; return the parsed summary.

    The summary replaces the per-query latencies by their p50 and p99 (seconds).
    """
    argv = ["ip", "netns", "exec", namespace, "dnsperf", "-v", "-s", server, "-d", str(datafile)]
    argv += ["-q", str(outstanding), "-c", str(clients), "-t", str(timeout)]
    if seconds is not None:
        argv += ["-l", str(seconds)]
    if runs is not None:
        argv += ["-n", str(runs)]
    limit = (seconds or 0) + timeout + 60
    result = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
    if result.returncode != 0:
        raise BenchError(f"dnsperf in {namespace} failed (exit code {result.returncode}): {result.stderr.strip()}")
    summary = stats.parse_dnsperf(result.stdout)
    latencies = summary.pop("latencies")
    summary["p50"] = stats.percentile(latencies, 0.5)
    summary["p99"] = stats.percentile(latencies, 0.99)
    summary["max_answered"] = max(latencies) if latencies else None
    return summary


# sys-dns inside


def proxy_state(lab):
    """Return dnscrypt-proxy's main PID, unit state and resident memory (KiB) in sys-dns."""
    script = (
        "pid=$(systemctl show -p MainPID --value dnscrypt-proxy); "
        'echo "$pid"; systemctl is-active dnscrypt-proxy; '
        "sed -n 's/^VmRSS:[[:space:]]*\\([0-9]*\\) kB$/\\1/p' /proc/$pid/status"
    )
    result = lab.exec("sys-dns", script)
    lines = result.stdout.split()
    if len(lines) < 2:
        raise BenchError(f"cannot read dnscrypt-proxy's state in sys-dns: {result.stdout!r} {result.stderr!r}")
    return {
        "pid": int(lines[0]),
        "active": lines[1],
        "rss_kib": int(lines[2]) if len(lines) > 2 else None,
    }


def proxy_journal(lab):
    """Return [(unix time, message)] of dnscrypt-proxy.service in sys-dns's current boot."""
    result = lab.exec("sys-dns", "journalctl -b -o short-unix --no-pager -u dnscrypt-proxy")
    entries = []
    for line in result.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and re.fullmatch(r"\d+\.\d+", parts[0]):
            entries.append((float(parts[0]), parts[2]))
    return entries


def count_limit_warnings(journal, since):
    """Count dnscrypt-proxy's warnings about max_clients after *since* (unix time)."""
    return sum(1 for stamp, message in journal if stamp >= since and "Too many incoming connections" in message)


# Cold start


def cold_start(lab, client):
    """Restart sys-dns and time it until *client* gets its first answer through the chain.

    The result has the seconds from `qvm-start` to: qvm-start's return (the qube booted), the
    start of dnscrypt-proxy.service, dnscrypt-proxy's "ready" log line, and the first
    answered client query; plus the query count of the poller.
    """
    result = lab.qvm("qvm-shutdown", "--wait", "--force", "sys-dns")
    if result.returncode != 0:
        raise BenchError(f"qvm-shutdown sys-dns failed: {result.stderr.strip()}")

    poller = subprocess.Popen(
        ["ip", "netns", "exec", lab.netns(client), sys.executable, "-m", "tests.bench.poll"]
        + ["--server", CLIENT_DNS, "--name", CACHED_NAME, "--interval", "0.01", "--timeout", "120"],
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(layout_module.REPO_DIR), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    try:
        if json.loads(poller.stdout.readline()).get("polling") is None:
            raise BenchError("the poller did not start")
        started = time.time()
        result = lab.qvm("qvm-start", "sys-dns")
        booted = time.time()
        if result.returncode != 0:
            raise BenchError(f"qvm-start sys-dns failed: {result.stderr.strip()}")
        outcome = json.loads(poller.stdout.readline())
        poller.wait(timeout=30)
    finally:
        if poller.poll() is None:
            poller.kill()
            poller.wait()
    if outcome["answered"] is None:
        raise BenchError(f"{client} got no answer within 120 s of qvm-start sys-dns")

    journal = proxy_journal(lab)
    unit_start = next((stamp for stamp, message in journal if "Started dnscrypt-proxy" in message), None)
    ready = next((stamp for stamp, message in journal if "dnscrypt-proxy is ready" in message), None)
    return {
        "booted": booted - started,
        "unit_started": None if unit_start is None else unit_start - started,
        "ready_line": None if ready is None else ready - started,
        "answered": outcome["answered"] - started,
        "attempts": outcome["attempts"],
    }


# Overload


def burst(lab, workdir, size, client):
    """Send *size* queries for new names at once from *client*, then one more.

    The result has the dnsperf summary of the burst, the seconds of the query after it, the
    count of dnscrypt-proxy's max_clients warnings, and whether dnscrypt-proxy kept
    its PID (no crash or restart).
    """
    before = proxy_state(lab)
    since = time.time()
    names = write_names(Path(workdir) / f"burst-{secrets.token_hex(3)}.txt", unique_names(size))
    summary = run_dnsperf(lab.netns(client), CLIENT_DNS, names, runs=1, outstanding=size, clients=min(size, 50))
    after_file = write_names(Path(workdir) / f"after-{secrets.token_hex(3)}.txt", unique_names(1))
    after = run_dnsperf(lab.netns(client), CLIENT_DNS, after_file, runs=1, outstanding=1, clients=1)
    state = proxy_state(lab)
    return {
        "burst": summary,
        "after_latency": after["max_answered"],
        "after_ok": after["rcodes"].get("NOERROR", 0) == 1,
        "limit_warnings": count_limit_warnings(proxy_journal(lab), since),
        "same_process": state["pid"] == before["pid"] and state["active"] == "active",
    }


# Growth


# Qubes started at once. Starting 46 at once on a busy 2-core host left most of them
# without a readiness report within the lab's 90 s boot timeout.
START_BATCH = 8


def add_clients(lab, names, template="debian-12-xfce"):
    """Add AppVMs *names* (netvm: the default, sys-firewall) to the lab's store and start them.

    The store is written directly, as qvm-create does, so the calls.log holds only the
    calls the formula makes. The qubes start START_BATCH at a time.
    """
    with Store(lab.layout).transaction() as app:
        for name in names:
            app.add_vm("AppVM", name, "red", template)
            lab.runtime.rw_dir(name).mkdir(parents=True, exist_ok=True)
    for first in range(0, len(names), START_BATCH):
        lab.start_all(names[first : first + START_BATCH])
