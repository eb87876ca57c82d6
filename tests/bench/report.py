"""Render the results of a benchmark run as docs/benchmarks.md (pure: no lab, no I/O)."""

import datetime

from .stats import median, ratio

# Targets the figures are checked against.
NOOP_FRACTION_MAX = 0.10
NOOP_CALLS_MAX = 10
CHAIN_FRACTION_MIN = 0.85
COLD_START_MAX = 1.0

# The original hand-written design of this service, counted by reading its build SLS:
# states whose function is cmd.run (5: three qvm-ls existence checks, the qvm-ls ||
# qvm-create of sys-dns, a summary of three qvm-prefs reads) or qvm.run (8: apt-get
# update and install, four file writes, the nft and systemd set-up, a check). None
# carries unless, onlyif or creates, so all 13 run on every apply.
ORIGINAL_CMD_RUN = 5
ORIGINAL_QVM_RUN = 8
# qvm-* calls those 13 commands make by themselves: 7 inside the cmd.run shells
# (4 qvm-ls, 3 qvm-prefs) and one qvm-run each for the qvm.run states.
ORIGINAL_DOM0_CALLS = 7 + ORIGINAL_QVM_RUN


def seconds(value, digits=1):
    return "n/a" if value is None else f"{value:.{digits}f} s"


def milliseconds(value, digits=2):
    return "n/a" if value is None else f"{value * 1000:.{digits}f} ms"


def percent(value):
    return "n/a" if value is None else f"{value * 100:.0f} %"


def count(value):
    return "n/a" if value is None else f"{value:,.0f}"


def verdict(met):
    return "met" if met else "**not met**"


def table(header, rows):
    """Return a Markdown table of *rows*, whose cells are text already."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def runs_of(entry):
    """Return a list of runs whether *entry* is one run (a dict) or several."""
    return entry if isinstance(entry, list) else [entry]


def median_of(entries, key):
    return median([entry[key] for entry in runs_of(entries)])


def apply_section(results):
    apply = results["apply"]
    first = apply["first"]
    noop_seconds = median_of(apply["noop"], "seconds")
    noop_calls = max(entry["calls"] for entry in apply["noop"])
    baseline = median(apply["baseline"])
    render = median(apply.get("render") or [None])
    noop_fraction = ratio(noop_seconds, first["seconds"])
    own_fraction = ratio(
        None if noop_seconds is None or baseline is None else noop_seconds - baseline,
        None if baseline is None else first["seconds"] - baseline,
    )
    state_fraction = ratio(median_of(apply["noop"], "state_seconds"), first["state_seconds"])

    rows = []
    for label, entries in (
        ("`test=True` on the fresh estate", apply["test_fresh"]),
        ("first build", first),
        ("no-op re-run", apply["noop"]),
        ("`test=True` on the built estate", apply["test_built"]),
        ("configuration change (new pillar, restart of dnscrypt-proxy)", apply.get("reconfigure", [])),
    ):
        entries = runs_of(entries)
        if not entries:
            continue
        rows.append(
            [
                label,
                len(entries),
                seconds(median_of(entries, "seconds")),
                seconds(median_of(entries, "state_seconds")),
                count(median_of(entries, "calls")),
                seconds(median_of(entries, "call_seconds")),
                count(median_of(entries, "changes")),
            ]
        )
    rows.append(["`qubesctl test.ping` (Salt start-up alone)", len(apply["baseline"]), seconds(baseline)] + [""] * 4)
    if apply.get("render"):
        rows.append(
            [
                "`qubesctl state.show_sls` (start-up and rendering)",
                len(apply["render"]),
                seconds(median(apply["render"])),
            ]
            + [""] * 4
        )

    return [
        "## 1. Apply cost",
        "",
        "`qubesctl state.sls qubes.network.sys-dns` in a fresh lab with 5 running client qubes. "
        "Wall time is that of the emulated `qubesctl` (two `salt-call --local` processes: "
        "`saltutil.sync_all`, then the state run). State time is the sum of Salt's per-state "
        "`duration`. dom0 calls are the lab's calls.log entries other than `qubesctl`.",
        "",
        table(
            ["run", "runs", "wall (median)", "state time", "dom0 calls", "time in dom0 calls", "states changed"],
            rows,
        ),
        "",
        f"- No-op re-run / first build, wall time: {percent(noop_fraction)} "
        f"(target under {percent(NOOP_FRACTION_MAX)}: {verdict(noop_fraction is not None and noop_fraction < NOOP_FRACTION_MAX)}).",
        f"- The same without Salt's own start-up (wall minus `test.ping`): {percent(own_fraction)}; "
        f"state time only: {percent(state_fraction)}.",
        f"- A no-op re-run takes {seconds(noop_seconds)}. Salt's start-up and module sync alone take "
        f"{seconds(baseline)} (`test.ping`), start-up plus rendering the SLS takes {seconds(render)} "
        f"(`state.show_sls`), and the states themselves take {seconds(median_of(apply['noop'], 'state_seconds'))}. "
        "The first build's states install packages in the template and start sys-dns, so this fixed "
        "cost is most of a no-op but only part of a first build.",
        f"- dom0 calls of a no-op re-run: at most {noop_calls} "
        f"(target at most {NOOP_CALLS_MAX}: {verdict(noop_calls <= NOOP_CALLS_MAX)}).",
        f"- The original hand-written design (cmd.run states) re-executes {ORIGINAL_CMD_RUN + ORIGINAL_QVM_RUN} "
        f"commands on every run: {ORIGINAL_CMD_RUN} `cmd.run` states and {ORIGINAL_QVM_RUN} `qvm.run` states. "
        "They were counted by reading its build SLS, and none has an `unless`, `onlyif` or `creates` guard. "
        "Among them are `apt-get update` and `apt-get install` in sys-dns and `systemctl enable --now`. "
        f"These commands alone make at least {ORIGINAL_DOM0_CALLS} dom0 tool calls (7 inside the shell "
        "commands, one `qvm-run` per `qvm.run` state), and its `qvm.prefs` states add more. Its re-run "
        "was not timed, because it needs network access from sys-dns and Qubes' own `qvm` state module.",
        "",
    ]


def dns_section(results):
    dns = results["dns"]
    cached = dns["cached"]
    labels = {
        "chain": "client qube -> sys-firewall -> sys-dns (whole chain)",
        "proxy": "dnscrypt-proxy directly, inside sys-dns",
        "plain": "uplink's plain resolver (unbound) directly",
    }
    rows = []
    for target, label in labels.items():
        runs = cached.get(target, [])
        if runs:
            rows.append(
                [
                    label,
                    len(runs),
                    count(median_of(runs, "qps")),
                    milliseconds(median_of(runs, "p50"), 3),
                    milliseconds(median_of(runs, "p99"), 3),
                    count(sum(run["lost"] for run in runs)),
                ]
            )
    chain_fraction = ratio(median_of(cached["chain"], "qps"), median_of(cached["proxy"], "qps"))
    plain_fraction = ratio(median_of(cached["proxy"], "qps"), median_of(cached["plain"], "qps"))

    unique_rows = []
    for label, name in (("doh", "DoH only"), ("dnscrypt", "DNSCrypt only")):
        runs = dns["unique"].get(label, [])
        if runs:
            rss = dns["rss"].get(label, {})
            unique_rows.append(
                [
                    name,
                    len(runs),
                    count(median_of(runs, "qps")),
                    milliseconds(median_of(runs, "p50"), 3),
                    milliseconds(median_of(runs, "p99"), 3),
                    count(sum(run["lost"] for run in runs)),
                    f"{count((rss.get('before') or 0) / 1024)} -> {count((rss.get('after') or 0) / 1024)} MiB",
                ]
            )
    seconds_per_run = results["plan"]["dnsperf_seconds"]
    return [
        "## 2. DNS throughput and latency",
        "",
        f"dnsperf over UDP, {seconds_per_run} s per run, 4 clients, at most 100 queries outstanding, `-v` "
        "(one line per query). p50 and p99 are nearest-rank percentiles of those per-query latencies, "
        "because dnsperf 2.10 reports only their mean, standard deviation, minimum and maximum. "
        "Runs of the three targets are interleaved so that load from elsewhere hits them alike. "
        "dnsperf runs with `ip netns exec` in the lab's namespaces: `personal` for the chain, "
        "sys-dns for dnscrypt-proxy (127.0.0.1:53), the uplink for unbound (192.0.2.1:53).",
        "",
        "Cached name (`www.lab.test A`, answered from dnscrypt-proxy's cache after the first query):",
        "",
        table(["target", "runs", "QPS (median)", "p50", "p99", "lost (all runs)"], rows),
        "",
        f"- Chain / dnscrypt-proxy directly: {percent(chain_fraction)} "
        f"(target at least {percent(CHAIN_FRACTION_MIN)}: "
        f"{verdict(chain_fraction is not None and chain_fraction >= CHAIN_FRACTION_MIN)}).",
        "- The chain adds two forwarding hops (sys-firewall's DNS DNAT and sys-dns's redirect, over "
        "two veth pairs), handled by the kernel on the same 2 cores that run dnsperf and dnscrypt-proxy; "
        "the runs did not separate that cost further.",
        f"- dnscrypt-proxy's cache / unbound's plain answers: {percent(plain_fraction)}.",
        "",
        "New names (each name asked once, `u<random>-<n>.lab.test`, so every query goes upstream), "
        "with one resolver in the pillar; resident memory of dnscrypt-proxy before and after the runs:",
        "",
        table(["resolver", "runs", "QPS (median)", "p50", "p99", "lost (all runs)", "dnscrypt-proxy RSS"], unique_rows),
        "",
    ]


def overload_section(results):
    overload = results["overload"]
    plan = results["plan"]
    rows = []
    for key, label in (("default", "250 (default)"), ("small", str(plan["small_max_clients"]))):
        runs = overload.get(key, [])
        for run in runs:
            burst = run["burst"]
            rows.append(
                [
                    label,
                    burst["sent"],
                    burst["completed"],
                    burst["lost"],
                    ", ".join(f"{code} {number}" for code, number in sorted(burst["rcodes"].items())) or "none",
                    milliseconds(burst["max_answered"], 1),
                    milliseconds(burst["run_time"], 0),
                    run["limit_warnings"],
                    "yes" if run["same_process"] else "**no**",
                    ("NOERROR in " + milliseconds(run["after_latency"], 1)) if run["after_ok"] else "**no answer**",
                ]
            )
    healthy = all(run["same_process"] and run["after_ok"] for runs in overload.values() for run in runs)
    all_answered = all(run["burst"]["lost"] == 0 for runs in overload.values() for run in runs)
    return [
        "## 3. Overload",
        "",
        f"A burst of {plan['burst_size']} queries for new names, all sent at once (dnsperf `-q "
        f"{plan['burst_size']} -n 1`, 5 s timeout) from `personal` through the chain, so every one "
        "needs an upstream exchange; then one more new name. One row per run.",
        "",
        table(
            [
                "max_clients",
                "sent",
                "answered",
                "lost",
                "response codes",
                "slowest answer",
                "burst duration",
                "limit warnings logged",
                "same process after",
                "next query",
            ],
            rows,
        ),
        "",
        f"- No crash and no hang (same dnscrypt-proxy process, next query answered): {verdict(healthy)}.",
        f"- Every query answered or refused: {verdict(all_answered)}. A lost query is one dnsperf "
        "saw no reply to within its 5 s timeout. In these runs dnscrypt-proxy 2.1.8 sent no reply (no "
        "REFUSED, no SERVFAIL) to the queries beyond max_clients and logged "
        '"Too many incoming connections", so a client waits for its own timeout (5 s by default in '
        "glibc's resolver) and retries. The formula cannot change that behaviour; max_clients "
        "only sets where it starts.",
        "",
    ]


def cold_start_section(results):
    runs = results.get("cold_start", [])
    rows = [
        [
            index + 1,
            seconds(run["booted"], 2),
            seconds(run["unit_started"], 2),
            seconds(run["answered"], 2),
            seconds(None if run["unit_started"] is None else run["answered"] - run["unit_started"], 2),
            run["attempts"],
        ]
        for index, run in enumerate(runs)
    ]
    from_unit = median(
        [run["answered"] - run["unit_started"] for run in runs if run["unit_started"] is not None] or [None]
    )
    rows.append(
        [
            "median",
            seconds(median_of(runs, "booted"), 2),
            seconds(median_of(runs, "unit_started"), 2),
            seconds(median_of(runs, "answered"), 2),
            seconds(from_unit, 2),
            "",
        ]
    )
    return [
        "## 4. Cold start",
        "",
        "`qvm-shutdown --force sys-dns`, then `qvm-start sys-dns` while `personal` queries "
        "`www.lab.test` through the chain every 10 ms (10 ms timeout each). The resolver pillar names "
        "the lab's DoH resolver only. Times are seconds after `qvm-start` was called; the start of "
        "dnscrypt-proxy.service comes from the journal inside sys-dns (same clock).",
        "",
        table(
            [
                "run",
                "qvm-start returned",
                "dnscrypt-proxy.service started",
                "first answer",
                "first answer after service start",
                "queries sent",
            ],
            rows,
        ),
        "",
        f"- From the start of dnscrypt-proxy to the first answered client query: {seconds(from_unit, 2)} "
        f"(target under {seconds(COLD_START_MAX, 0)}: {verdict(from_unit is not None and from_unit < COLD_START_MAX)}).",
        "- The lab's `qvm-start` returns once the container's systemd reports the boot finished, "
        "which can be after the first answer.",
        "",
    ]


def growth_section(results):
    rows = []
    for size in sorted(results["growth"], key=int):
        entry = results["growth"][size]
        if "error" in entry:
            rows.append([size, "failed: " + entry["error"].replace("|", "/").replace("\n", " ")] + [""] * 6)
            continue
        build = entry["build"]
        rows.append(
            [
                size,
                entry["tested_clients"],
                seconds(build["seconds"]),
                build["calls"],
                seconds(median_of(entry["noop"], "seconds")),
                count(median_of(entry["noop"], "calls")),
                seconds(median_of(entry["tests"], "seconds")),
                count(median_of(entry["tests"], "calls")),
            ]
        )
    return [
        "## 5. Growth with the number of client qubes",
        "",
        "Each size is a fresh lab whose client qubes (the default four, then `bench-client-NN` AppVMs "
        "on debian-12-xfce behind sys-firewall) all run. The 5-client row is the lab of sections 1 to 4 "
        "(its no-op column is the median of section 1); every other cell is one run. `tests:clients` lists "
        "every running client (the pillar accepts up to 64), so the tests SLS resolves from each. It "
        "makes one `qvm-run` per tested client (`sysdns.measure`); the build reads the estate with one "
        "batched `qvm-ls`. On a shared host compare the dom0 calls: the times follow the host's load, "
        "which changed during the run (see the load line above).",
        "",
        table(
            [
                "running clients",
                "clients tested",
                "first build",
                "dom0 calls",
                "no-op re-run",
                "dom0 calls",
                "tests SLS",
                "dom0 calls",
            ],
            rows,
        ),
        "",
    ]


def max_clients_text(results, default_runs, small_runs):
    """Return the paragraph that weighs dnscrypt:max_clients against the overload figures."""
    burst = results["plan"]["burst_size"]
    small = results["plan"]["small_max_clients"]
    default_lost = sum(run["burst"]["lost"] for run in default_runs)
    small_lost = sum(run["burst"]["lost"] for run in small_runs)
    small_warnings = sum(run["limit_warnings"] for run in small_runs)
    text = f"- `dnscrypt:max_clients: 250`. With 250, the bursts of {burst} new names lost {default_lost} queries "
    text += f"over {len(default_runs)} runs. With {small}, they lost {small_lost} over {len(small_runs)} runs "
    text += f'and dnscrypt-proxy logged {small_warnings} "Too many incoming connections" warnings'
    if small_lost:
        text += ": a query beyond the limit gets no reply, so its client waits for its own timeout."
    else:
        text += "."
    if default_lost:
        text += " **The default lost queries in a burst that a busy desktop can reach: raise it.**"
    else:
        text += (
            " A limit above the concurrency of a desktop's qubes costs nothing while idle and keeps "
            "bursts from being dropped, so the figures give no reason to change it."
        )
    return text


def defaults_section(results):
    """Return the section that weighs the defaults of dnscrypt-proxy's settings against the figures."""
    dns = results["dns"]
    overload = results["overload"]
    default_runs = overload.get("default", [])
    small_runs = overload.get("small", [])
    unique_p99 = max(
        (median_of(runs, "p99") for runs in dns["unique"].values() if runs and median_of(runs, "p99") is not None),
        default=None,
    )
    rss_after = max((entry.get("after") or 0 for entry in dns["rss"].values()), default=0)
    cached_qps = median_of(dns["cached"]["chain"], "qps")
    unique_names = min(dns.get("unique_names", {}).values(), default=None)
    unique_qps = median([median_of(runs, "qps") for runs in dns["unique"].values() if runs])
    return [
        "## Defaults of `_modules/sysdns_config.py`",
        "",
        "The three defaults below equal those of dnscrypt-proxy 2.1.8's example configuration "
        "(Debian package dnscrypt-proxy 2.1.8+ds1-1+b4, `example-dnscrypt-proxy.toml`).",
        "",
        max_clients_text(results, default_runs, small_runs),
        f"- `dnscrypt:cache:size: 4096` entries. A cache hit through the chain runs at "
        f"{count(cached_qps)} QPS against {count(unique_qps)} QPS for names that need an upstream "
        f"exchange. After {count(unique_names)} new names (the cache holds 4096) dnscrypt-proxy's resident "
        f"memory was at most {count(rss_after / 1024)} MiB, small beside the 400 MiB qube. A few thousand names cover a "
        "desktop's working set between TTL expiries, so the figures give no reason to change it; "
        "the lab cannot measure the hit rate of real browsing.",
        f"- `dnscrypt:timeout_ms: 5000`. The lab's resolvers are one hop away (p99 of new names "
        f"{milliseconds(unique_p99, 1)}), so no figure here tests the timeout; it bounds how long a "
        "client waits when a real resolver does not reply. dnscrypt-proxy 2.1.8's example "
        "configuration advises against a value below 5000. Unchanged.",
        "",
    ]


def header_section(results):
    machine = results["machine"]
    versions = results["versions"]
    before, after = results["load_before"], results["load_after"]
    generated = results.get("generated") or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    version_text = ", ".join(f"{name} {value}" for name, value in versions.items())
    return [
        "# Benchmarks",
        "",
        f"Measured in the offline lab (`docs/lab.md`) with `{results['command']}` on {generated}; "
        f"the whole run took {seconds(results.get('elapsed'), 0)}. "
        f"Each table gives the number of runs behind its medians ({results['plan']['repeats']} for the "
        "cheap figures).",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"{machine['os']}, kernel {machine['kernel']}.",
        f"- Versions: {version_text}. sys-dns runs on the lab's debian-12-hard-min template clone.",
        f"- Load: load average {' / '.join(str(value) for value in before['loadavg'])} (1/5/15 min) "
        f"before and {' / '.join(str(value) for value in after['loadavg'])} after, with "
        f"{before['lab_runs']} lab runs on the host when it started (other engineers' labs). "
        "Figures from a busy host are noisy; compare ratios rather than absolute numbers.",
        "",
    ]


def render(results):
    """Return docs/benchmarks.md for *results*, the dict `python -m tests.bench` collects."""
    sections = (
        header_section(results)
        + apply_section(results)
        + dns_section(results)
        + overload_section(results)
        + cold_start_section(results)
        + growth_section(results)
        + defaults_section(results)
    )
    return "\n".join(sections).rstrip("\n") + "\n"
