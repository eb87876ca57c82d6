"""The pure parts of the benchmark harness: dnsperf parsing, statistics, the report."""

import pytest

from tests.bench import report, stats

DNSPERF_OUTPUT = """\
DNS Performance Testing Tool
Version 2.10.0

[Status] Command line: dnsperf -v -s 10.139.1.1 -d names.txt -q 100 -c 4 -t 5 -l 1
[Status] Sending queries (to 10.139.1.1:53)
[Status] Started at: Fri Dec  4 23:28:50 2026
[Status] Stopping after 1.000000 seconds
> NOERROR www.lab.test A 0.000400
> NOERROR www.lab.test A 0.000100
> SERVFAIL www.lab.test A 0.002000
> NOERROR www.lab.test A 0.000300
[Timeout] Query timed out: msg id 7
> NOERROR www.lab.test A 0.000200
[Status] Testing complete (time limit)

Statistics:

  Queries sent:         6
  Queries completed:    5 (83.33%)
  Queries lost:         1 (16.67%)

  Response codes:       NOERROR 4 (80.00%), SERVFAIL 1 (20.00%)
  Average packet size:  request 30, response 57
  Run time (s):         1.012626
  Queries per second:   4.937651

  Average Latency (s):  0.000600 (min 0.000100, max 0.002000)
  Latency StdDev (s):   0.000700

"""


def test_parse_dnsperf_summary():
    parsed = stats.parse_dnsperf(DNSPERF_OUTPUT)
    assert parsed["sent"] == 6
    assert parsed["completed"] == 5
    assert parsed["lost"] == 1
    assert parsed["qps"] == pytest.approx(4.937651)
    assert parsed["run_time"] == pytest.approx(1.012626)
    assert parsed["avg_latency"] == pytest.approx(0.0006)
    assert parsed["min_latency"] == pytest.approx(0.0001)
    assert parsed["max_latency"] == pytest.approx(0.002)
    assert parsed["rcodes"] == {"NOERROR": 4, "SERVFAIL": 1}


def test_parse_dnsperf_query_lines():
    parsed = stats.parse_dnsperf(DNSPERF_OUTPUT)
    assert parsed["latencies"] == [0.0004, 0.0001, 0.002, 0.0003, 0.0002]


def test_parse_dnsperf_no_answer():
    output = DNSPERF_OUTPUT.replace("  Average Latency (s):  0.000600 (min 0.000100, max 0.002000)\n", "")
    parsed = stats.parse_dnsperf(output)
    assert parsed["avg_latency"] is None
    assert parsed["max_latency"] is None


def test_parse_dnsperf_truncated_output():
    with pytest.raises(stats.DnsperfOutputError, match="'qps'"):
        stats.parse_dnsperf(DNSPERF_OUTPUT.split("  Queries per second")[0])


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [
        ([5, 1, 4, 2, 3], 0.5, 3),
        ([5, 1, 4, 2, 3], 1.0, 5),
        ([5, 1, 4, 2, 3], 0.2, 1),
        ([5, 1, 4, 2, 3], 0.21, 2),
        (list(range(1, 101)), 0.99, 99),
        (list(range(1, 1001)), 0.99, 990),
        ([7], 0.99, 7),
        ([], 0.5, None),
    ],
)
def test_percentile_nearest_rank(values, fraction, expected):
    assert stats.percentile(values, fraction) == expected


def test_percentile_bad_fraction():
    with pytest.raises(ValueError, match="out of range"):
        stats.percentile([1, 2], 0)


def test_median_skips_missing():
    assert stats.median([3.0, None, 1.0, 2.0]) == 2.0
    assert stats.median([1.0, 2.0]) == 1.5
    assert stats.median([None]) is None


def test_ratio_cases():
    assert stats.ratio(45.0, 50.0) == pytest.approx(0.9)
    assert stats.ratio(None, 50.0) is None
    assert stats.ratio(1.0, 0) is None


def apply_run(seconds, calls, state_seconds=0.5, changes=0):
    return {
        "seconds": seconds,
        "calls": calls,
        "call_seconds": 0.1,
        "state_seconds": state_seconds,
        "changes": changes,
    }


def dnsperf_run(qps, lost=0, sent=100):
    return {
        "sent": sent,
        "completed": sent - lost,
        "lost": lost,
        "qps": qps,
        "run_time": 0.05,
        "p50": 0.001,
        "p99": 0.004,
        "max_answered": 0.03,
        "rcodes": {"NOERROR": sent - lost},
    }


def burst_run(lost, warnings):
    return {
        "burst": dnsperf_run(3000, lost, sent=200),
        "after_latency": 0.0012,
        "after_ok": True,
        "limit_warnings": warnings,
        "same_process": True,
    }


def sample_results(noop_seconds=2.0, chain_qps=45000.0):
    return {
        "plan": {"repeats": 3, "dnsperf_seconds": 5, "burst_size": 200, "small_max_clients": 50},
        "command": "make bench",
        "generated": "2026-12-05 00:00 UTC",
        "elapsed": 540.0,
        "machine": {"cpu": "Test CPU", "cores": 2, "memory_gib": 23.5, "kernel": "6.1", "os": "Debian 12"},
        "versions": {"dnsperf": "2.10.0", "dnscrypt-proxy": "2.1.8"},
        "load_before": {"loadavg": [5.0, 4.0, 3.0], "lab_runs": 6},
        "load_after": {"loadavg": [4.0, 4.0, 3.0], "lab_runs": 6},
        "apply": {
            "test_fresh": apply_run(30.0, 20),
            "first": apply_run(25.0, 28, state_seconds=12.0, changes=6),
            "noop": [apply_run(noop_seconds, 6), apply_run(noop_seconds + 1, 6), apply_run(noop_seconds - 1, 6)],
            "test_built": [apply_run(20.0, 6)],
            "baseline": [1.0, 1.0, 1.0],
            "render": [1.5],
            "reconfigure": [apply_run(22.0, 9, changes=1)],
        },
        "dns": {
            "cached": {
                "chain": [dnsperf_run(chain_qps)],
                "proxy": [dnsperf_run(50000.0)],
                "plain": [dnsperf_run(100000.0)],
            },
            "unique": {"doh": [dnsperf_run(11000.0)], "dnscrypt": [dnsperf_run(10000.0)]},
            "unique_names": {"doh": 55000, "dnscrypt": 50000},
            "rss": {"doh": {"before": 20480, "after": 40960}, "dnscrypt": {"before": 20480, "after": 30720}},
        },
        "overload": {"default": [burst_run(0, 0)], "small": [burst_run(120, 150)]},
        "cold_start": [
            {"booted": 3.6, "unit_started": 2.5, "ready_line": None, "answered": 3.3, "attempts": 300},
            {"booted": 3.8, "unit_started": 2.6, "ready_line": None, "answered": 3.9, "attempts": 320},
        ],
        "growth": {
            5: {
                "build": apply_run(25.0, 28),
                "noop": [apply_run(2.0, 6)],
                "tests": [apply_run(9.0, 14)],
                "tested_clients": 5,
            },
            50: {
                "build": apply_run(40.0, 28),
                "noop": [apply_run(3.0, 6)],
                "tests": [apply_run(30.0, 70)],
                "tested_clients": 32,
            },
        },
    }


def test_report_apply_ratios():
    text = report.render(sample_results(noop_seconds=2.0))
    assert "No-op re-run / first build, wall time: 8 % (target under 10 %: met)" in text
    assert "without Salt's own start-up (wall minus `test.ping`): 4 %" in text
    assert "dom0 calls of a no-op re-run: at most 6 (target at most 10: met)" in text
    assert "re-executes 13 commands on every run" in text


def test_report_target_not_met():
    text = report.render(sample_results(noop_seconds=20.0, chain_qps=40000.0))
    assert "wall time: 80 % (target under 10 %: **not met**)" in text
    assert "Chain / dnscrypt-proxy directly: 80 % (target at least 85 %: **not met**)" in text


def test_report_dns_table_row():
    text = report.render(sample_results())
    assert "| client qube -> sys-firewall -> sys-dns (whole chain) | 1 | 45,000 | 1.000 ms | 4.000 ms | 0 |" in text
    assert "Chain / dnscrypt-proxy directly: 90 % (target at least 85 %: met)" in text
    assert "| DoH only | 1 | 11,000 | 1.000 ms | 4.000 ms | 0 | 20 -> 40 MiB |" in text


def test_report_cold_start_median():
    text = report.render(sample_results())
    assert "| median | 3.70 s | 2.55 s | 3.60 s | 1.05 s |  |" in text
    assert "From the start of dnscrypt-proxy to the first answered client query: 1.05 s" in text
    assert "(target under 1 s: **not met**)" in text


def test_report_overload_and_growth():
    text = report.render(sample_results())
    assert "| 50 | 200 | 80 | 120 | NOERROR 80 |" in text
    assert "Every query answered or refused: **not met**" in text
    assert "| 50 | 32 | 40.0 s | 28 | 3.0 s | 6 | 30.0 s | 70 |" in text


def test_report_header_and_table_shape():
    text = report.render(sample_results())
    assert text.startswith("# Benchmarks\n")
    assert "with `make bench` on 2026-12-05 00:00 UTC" in text
    assert "6 lab runs on the host" in text
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.endswith("|"), line


def test_report_cache_default_text():
    text = report.render(sample_results())
    assert "After 50,000 new names (the cache holds 4096)" in text
    assert "memory was at most 40 MiB" in text


def test_report_failed_growth_size():
    results = sample_results()
    results["growth"][20] = {"error": "lab qubes failed to start: bench-client-09: no readiness report"}
    text = report.render(results)
    assert "| 20 | failed: lab qubes failed to start: bench-client-09: no readiness report |" in text


def test_bench_client_cap_matches_validator():
    from tests.bench.__main__ import MAX_TEST_CLIENTS
    from tests.unit.sysdns_fakes import config_module

    assert MAX_TEST_CLIENTS == config_module.MAX_TEST_CLIENTS
    clients = ["client{}".format(index) for index in range(config_module.MAX_TEST_CLIENTS)]
    config_module.validate({"tests": {"clients": clients}})
