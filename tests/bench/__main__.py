"""Run the benchmarks of qubes-sysdns-formula in the offline lab and write the report.

Usage (as root, after `make images`):

    .venv/bin/python -m tests.bench --output docs/benchmarks.md
    .venv/bin/python -m tests.bench --quick --output /tmp/benchmarks.md

Each lab the run brings up is torn down at the end, also after a failure.
"""

import argparse
import dataclasses
import datetime
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from tests.integration.formula_lab import lab_pillar
from tests.lab.lab import Lab, check_host, install_signal_handlers
from tests.lab.uplink import PLAIN_ADDRESS

from . import environment, measure, report

log = logging.getLogger("tests.bench")

DEFAULT_CLIENTS = ("personal", "work", "pro", "untrusted")
# tests:clients accepts at most this many qubes (sysdns_config.MAX_TEST_CLIENTS).
MAX_TEST_CLIENTS = 64


@dataclasses.dataclass
class Plan:
    """How much to measure: repetitions, dnsperf durations and lab sizes."""

    repeats: int
    dnsperf_seconds: int
    growth_sizes: tuple
    burst_size: int
    small_max_clients: int


FULL = Plan(repeats=3, dnsperf_seconds=5, growth_sizes=(5, 20, 50), burst_size=200, small_max_clients=50)
QUICK = Plan(repeats=1, dnsperf_seconds=1, growth_sizes=(5,), burst_size=200, small_max_clients=50)


def client_names(count):
    """Return *count* client qubes: the default estate's four, then bench-client-NN."""
    extra = [f"bench-client-{index:02d}" for index in range(len(DEFAULT_CLIENTS) + 1, count + 1)]
    return list(DEFAULT_CLIENTS[:count]) + extra


def with_lab(function, *args):
    lab = Lab.up()
    log.info("lab %s is up (tear it down with `python -m tests.lab down --prefix %s`)", lab.prefix, lab.prefix)
    try:
        return function(lab, *args)
    finally:
        lab.down()


def apply_pillar(lab, clients, **overrides):
    pillar = lab_pillar(lab, **overrides)
    pillar["sysdns"].setdefault("tests", {})["clients"] = clients[:MAX_TEST_CLIENTS]
    lab.write_pillar("sysdns", pillar)


def main_lab(lab, plan, workdir, results):
    """Apply cost, DNS throughput, overload and cold start in one lab with 5 clients."""
    clients = client_names(plan.growth_sizes[0])
    measure.add_clients(lab, [name for name in clients if name not in DEFAULT_CLIENTS])
    apply_pillar(lab, clients)

    log.info("apply cost: test=True on the fresh estate, first build, no-op runs")
    apply = results["apply"]
    apply["test_fresh"] = measure.timed_apply(lab, measure.BUILD, "test=True")
    apply["first"] = measure.timed_apply(lab, measure.BUILD)
    apply["noop"] = [measure.timed_apply(lab, measure.BUILD) for _ in range(plan.repeats)]
    # One run each of the slower kinds keeps `make bench` near 10 minutes on 2 cores.
    apply["test_built"] = [measure.timed_apply(lab, measure.BUILD, "test=True")]
    apply["baseline"] = [measure.salt_baseline(lab) for _ in range(plan.repeats)]
    apply["render"] = [measure.timed_show_sls(lab, measure.BUILD)]
    results["growth"][len(clients)] = {
        "build": apply["first"],
        "noop": apply["noop"],
        "tests": [measure.timed_apply(lab, measure.TESTS)],
        "tested_clients": min(len(clients), MAX_TEST_CLIENTS),
    }
    results["versions"].update(environment.lab_versions(lab))

    log.info("DNS: cached name through the chain, at dnscrypt-proxy, at the uplink's plain resolver")
    cached = measure.write_names(Path(workdir) / "cached.txt", [measure.CACHED_NAME])
    targets = {
        "chain": (lab.netns("personal"), measure.CLIENT_DNS),
        "proxy": (lab.netns("sys-dns"), measure.PROXY_ADDRESS),
        "plain": (lab.layout.uplink_netns, PLAIN_ADDRESS),
    }
    measure.run_dnsperf(targets["chain"][0], targets["chain"][1], cached, runs=1, outstanding=1, clients=1)
    dns = results["dns"]
    for _ in range(plan.repeats):
        # Interleaved, so that a burst of load from elsewhere hits every target alike.
        for target, (namespace, server) in targets.items():
            summary = measure.run_dnsperf(namespace, server, cached, seconds=plan.dnsperf_seconds)
            dns["cached"].setdefault(target, []).append(summary)

    log.info("overload at the default max_clients")
    results["overload"]["default"] = [
        measure.burst(lab, workdir, plan.burst_size, "personal") for _ in range(plan.repeats)
    ]

    for label, resolver in (("doh", "lab-doh"), ("dnscrypt", "lab-dnscrypt")):
        log.info("DNS: new names with the %s resolver only", label)
        apply_pillar(lab, clients, resolvers=(resolver,))
        results["apply"].setdefault("reconfigure", []).append(measure.timed_apply(lab, measure.BUILD))
        rss_before = measure.proxy_state(lab)["rss_kib"]
        for _ in range(plan.repeats):
            names = measure.unique_names(20000 * plan.dnsperf_seconds)
            datafile = measure.write_names(Path(workdir) / f"unique-{label}.txt", names)
            summary = measure.run_dnsperf(
                lab.netns("personal"), measure.CLIENT_DNS, datafile, seconds=plan.dnsperf_seconds, runs=1
            )
            dns["unique"].setdefault(label, []).append(summary)
        dns["unique_names"][label] = sum(run["completed"] for run in dns["unique"][label])
        dns["rss"][label] = {"before": rss_before, "after": measure.proxy_state(lab)["rss_kib"]}
        if label == "doh":
            log.info("cold start with the DoH resolver")
            results["cold_start"] = [measure.cold_start(lab, "personal") for _ in range(plan.repeats)]

    log.info("overload at max_clients %d", plan.small_max_clients)
    apply_pillar(lab, clients, dnscrypt={"max_clients": plan.small_max_clients})
    results["apply"]["reconfigure"].append(measure.timed_apply(lab, measure.BUILD))
    results["overload"]["small"] = [
        measure.burst(lab, workdir, plan.burst_size, "personal") for _ in range(plan.repeats)
    ]


def growth_lab(lab, size, plan, results):
    """Build and tests-SLS cost with *size* running client qubes."""
    clients = client_names(size)
    started = time.monotonic()
    measure.add_clients(lab, [name for name in clients if name not in DEFAULT_CLIENTS])
    log.info("started %d client qubes in %.1f s", size, time.monotonic() - started)
    apply_pillar(lab, clients)
    results["growth"][size] = {
        "build": measure.timed_apply(lab, measure.BUILD),
        "noop": [measure.timed_apply(lab, measure.BUILD)],
        "tests": [measure.timed_apply(lab, measure.TESTS)],
        "tested_clients": min(size, MAX_TEST_CLIENTS),
    }


def run(plan, command):
    results = {
        "plan": dataclasses.asdict(plan),
        "command": command,
        "apply": {},
        "dns": {"cached": {}, "unique": {}, "unique_names": {}, "rss": {}},
        "overload": {},
        "growth": {},
        "versions": environment.host_versions(),
        "machine": environment.machine(),
    }
    results["load_before"] = environment.load()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sysdns-bench-") as workdir:
        with_lab(main_lab, plan, workdir, results)
        for size in plan.growth_sizes[1:]:
            log.info("growth: %d client qubes", size)
            try:
                with_lab(growth_lab, size, plan, results)
            except (RuntimeError, OSError) as error:
                # One failed size (a qube that did not boot in time on a busy host)
                # is reported in its row; the figures measured so far stay.
                log.exception("growth with %d client qubes failed", size)
                results["growth"][size] = {"error": str(error)[:300]}
    results["elapsed"] = time.monotonic() - started
    results["generated"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results["load_after"] = environment.load()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition, 1 s dnsperf runs, no growth labs")
    parser.add_argument("--output", type=Path, required=True, help="Markdown file to write, e.g. docs/benchmarks.md")
    parser.add_argument("--json", type=Path, help="also write the raw results to this JSON file")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    check_host()
    install_signal_handlers()
    command = "make bench" if not args.quick else "python -m tests.bench --quick"
    results = run(QUICK if args.quick else FULL, command)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    args.output.write_text(report.render(results), encoding="utf-8")
    log.info("wrote %s (%.0f s)", args.output, results["elapsed"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
