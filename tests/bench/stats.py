"""Pure parts of the benchmark: dnsperf output parsing and summary statistics."""

import re
import statistics

# With -v, dnsperf 2.10 prints one line per completed query, "> RCODE NAME TYPE SECONDS"
# (as seen in the lab); a line without latency is skipped.
_QUERY_LINE = re.compile(r"^> (?P<rcode>[A-Z0-9]+) (?P<name>\S+) (?P<type>\S+)(?: (?P<latency>[0-9.]+))?$")
_SUMMARY_FIELDS = {
    "sent": re.compile(r"^\s*Queries sent:\s+(\d+)", re.M),
    "completed": re.compile(r"^\s*Queries completed:\s+(\d+)", re.M),
    "lost": re.compile(r"^\s*Queries lost:\s+(\d+)", re.M),
    "qps": re.compile(r"^\s*Queries per second:\s+([0-9.]+)", re.M),
    "run_time": re.compile(r"^\s*Run time \(s\):\s+([0-9.]+)", re.M),
}
_AVERAGE_LATENCY = re.compile(r"^\s*Average Latency \(s\):\s+([0-9.]+) \(min ([0-9.]+), max ([0-9.]+)\)", re.M)
_RESPONSE_CODES = re.compile(r"^\s*Response codes:\s+(.*)$", re.M)


class DnsperfOutputError(ValueError):
    """dnsperf printed no statistics block, so the run cannot be summarized."""


def parse_dnsperf(output):
    """Parse the standard output of `dnsperf -v` into a dict.

    Keys: sent, completed, lost (counts), qps, run_time (seconds), avg_latency,
    min_latency, max_latency (seconds, from dnsperf's summary; None when no query
    completed), rcodes ({code: count}) and latencies (seconds, one per completed query,
    from the -v lines, in output order). Raise DnsperfOutputError when the
    statistics block is missing, with the end of the output.
    """
    result = {}
    for key, pattern in _SUMMARY_FIELDS.items():
        match = pattern.search(output)
        if match is None:
            tail = "\n".join(output.strip().splitlines()[-5:])
            raise DnsperfOutputError(f"dnsperf output has no {key!r} line; it ended with:\n{tail}")
        value = match.group(1)
        result[key] = float(value) if key in ("qps", "run_time") else int(value)

    average = _AVERAGE_LATENCY.search(output)
    result["avg_latency"], result["min_latency"], result["max_latency"] = (
        tuple(float(value) for value in average.groups()) if average else (None, None, None)
    )

    rcodes = {}
    codes = _RESPONSE_CODES.search(output)
    if codes:
        for code, count in re.findall(r"([A-Z0-9]+) (\d+) \(", codes.group(1)):
            rcodes[code] = int(count)
    result["rcodes"] = rcodes

    latencies = []
    for line in output.splitlines():
        match = _QUERY_LINE.match(line)
        if match and match.group("latency") is not None:
            latencies.append(float(match.group("latency")))
    result["latencies"] = latencies
    return result


def percentile(values, fraction):
    """Return the nearest-rank percentile of *values* (fraction 0 < f <= 1), or None if empty."""
    if not 0 < fraction <= 1:
        raise ValueError(f"percentile fraction {fraction!r} is out of range: expected 0 < fraction <= 1")
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-int(round(fraction * 1_000_000)) * len(ordered) // 1_000_000))
    return ordered[rank - 1]


def median(values):
    """Return the median of the values that are not None, or None when there are none."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def ratio(numerator, denominator):
    """Return numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator
