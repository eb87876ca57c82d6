"""Tests of the check functions behind the tests SLS, against an in-memory Qubes."""

import pytest

from tests.unit.sysdns_fakes import FakeQubes, load_salt_module, qube

COUNTERS_TEMPLATE = """table inet sysdns {{
	counter redirected {{
		packets {redirected} bytes 100
	}}
	counter forwarded {{
		packets 0 bytes 0
	}}
	counter leak_dropped {{
		packets {leak_dropped} bytes 0
	}}
	counter leaked {{
		packets {leaked} bytes 0
	}}
	counter upstream_replies {{
		packets {upstream_replies} bytes 0
	}}
}}
"""


class CheckQubes(FakeQubes):
    """FakeQubes whose sys-dns reports counters and whose clients resolve names."""

    def __init__(self, qubes, counters_sequence, resolvable=("www.lab.test",)):
        super().__init__(qubes)
        self.counters_sequence = list(counters_sequence)
        self.resolvable = set(resolvable)
        # Response codes the upstream probe gets, one per name it asks for, in order.
        self.probe_rcodes = ["3"]

    def run(self, name, command, user="root", stdin=None, autostart=True, timeout=900, check=True):
        self.runs.append((name, command, stdin))
        if command.startswith("nft list counters"):
            if self.qubes[name]["state"] != "Running":
                return {"retcode": 1, "stdout": "", "stderr": "qube not running"}
            values = self.counters_sequence.pop(0)
            return {"retcode": 0, "stdout": COUNTERS_TEMPLATE.format(**values), "stderr": ""}
        if command.endswith("/probe-upstream"):
            # Like probe-upstream: one line per name, stopping at NOERROR or NXDOMAIN.
            lines = []
            for _name, rcode in zip(stdin.split(), self.probe_rcodes, strict=False):
                lines.append("rcode {}".format(rcode))
                if rcode in ("0", "3"):
                    break
            return {"retcode": 0, "stdout": "".join(line + "\n" for line in lines), "stderr": ""}
        if command.startswith("while read"):
            lines = []
            for requested in stdin.split():
                if requested in self.resolvable:
                    lines.append("ok {} 192.0.2.80 {}".format(requested, requested))
                else:
                    lines.append("fail {} 2".format(requested))
            return {"retcode": 0, "stdout": "\n".join(lines) + "\n", "stderr": ""}
        return super().run(name, command, user, stdin, autostart, timeout, check)


def counters(redirected=0, leaked=0, upstream_replies=0, leak_dropped=0):
    return dict(redirected=redirected, leaked=leaked, upstream_replies=upstream_replies, leak_dropped=leak_dropped)


QUBES = [
    qube("sys-net", state="Running", provides_network=True),
    qube("sys-dns", state="Running", netvm="sys-net", provides_network=True),
    qube("sys-firewall", state="Running", netvm="sys-dns", provides_network=True),
    qube("personal", state="Running", netvm="sys-firewall"),
]


def checks(fake):
    return load_salt_module("_modules/sysdns.py", __salt__=fake.salt_functions(), __context__={})


def window(fake, names=("www.lab.test",)):
    return checks(fake).measure("sys-dns", ["personal", "work"], list(names))


def test_parse_counters_reads_packets():
    parsed = load_salt_module("_modules/sysdns.py").parse_counters(COUNTERS_TEMPLATE.format(**counters(5, 1, 2, 3)))
    assert parsed["redirected"] == 5
    assert parsed["leaked"] == 1
    assert parsed["upstream_replies"] == 2
    assert parsed["leak_dropped"] == 3


def test_window_passes_on_healthy_counts():
    fake = CheckQubes(QUBES, [counters(10, 0, 4), counters(12, 0, 9)])
    measured = window(fake)
    module = checks(fake)
    assert measured["lookups"] == 2
    assert measured["skipped"] == ["work (no such qube)"]
    assert module.check_resolve(measured) == []
    assert module.check_no_plaintext(measured) == []
    assert module.check_upstream(measured) == []


def test_resolve_fails_for_unknown_name():
    fake = CheckQubes(QUBES, [counters(), counters(2, 0, 1)])
    problems = checks(fake).check_resolve(window(fake, names=("missing.lab.test",)))
    assert problems == [
        "personal: resolving missing.lab.test failed (expected an address, got: getent exit 2); fix: "
        "qubesctl sysdns.diagnose names the cause; check the name in sysdns:tests:names"
    ]


def test_leak_counter_fails_check():
    fake = CheckQubes(QUBES, [counters(0, 3), counters(2, 4, 1)])
    problems = checks(fake).check_no_plaintext(window(fake))
    assert len(problems) == 1
    assert "1 plaintext port-53 packets left" in problems[0]


def test_bypassed_redirect_fails_check():
    fake = CheckQubes(QUBES, [counters(5), counters(5, 0, 1)])
    problems = checks(fake).check_no_plaintext(window(fake))
    assert len(problems) == 1
    assert "bypassed sys-dns's redirect" in problems[0]


def test_no_upstream_reply_fails_check():
    fake = CheckQubes(QUBES, [counters(0, 0, 7), counters(2, 0, 7)])
    problems = checks(fake).check_upstream(window(fake))
    assert len(problems) == 1
    assert "no packet came back from an upstream resolver" in problems[0]


@pytest.mark.parametrize("rcode", ["2", "none"])
def test_probe_without_upstream_answer_fails_check(rcode):
    fake = CheckQubes(QUBES, [counters(0, 0, 7), counters(2, 0, 9)])
    fake.probe_rcodes = [rcode] * 3
    measured = window(fake)
    problems = checks(fake).check_upstream(measured)
    assert len(problems) == 1
    assert "dnscrypt-proxy got no upstream answer for the random names" in problems[0]
    seen = "response code 2" if rcode == "2" else "no answer"
    assert "got {0}, {0}, {0})".format(seen) in problems[0]
    for name in measured["upstream_probes"]:
        assert name in problems[0]


def test_probe_sends_distinct_random_names():
    fake = CheckQubes(QUBES, [counters(0, 0, 7), counters(2, 0, 9)])
    window(fake)
    probe_stdin = [stdin for _, command, stdin in fake.runs if command.endswith("/probe-upstream")]
    assert len(probe_stdin) == 1
    names = probe_stdin[0].split()
    assert len(names) == 3
    assert len(set(names)) == 3
    for name in names:
        assert name.startswith("sysdns-probe-")
        assert name.endswith(".www.lab.test")


def test_probe_passes_after_one_failed_exchange():
    fake = CheckQubes(QUBES, [counters(0, 0, 7), counters(2, 0, 9)])
    fake.probe_rcodes = ["none", "0"]
    measured = window(fake)
    assert measured["upstream_rcodes"] == [None, 0]
    assert measured["upstream_rcode"] == 0
    assert checks(fake).check_upstream(measured) == []


def test_probe_output_parsing_keeps_order():
    module = load_salt_module("_modules/sysdns.py")
    parsed = module.parse_probe_output({"stdout": "rcode 2\nrcode none\nnoise\nrcode 3\n"})
    assert parsed == [2, None, 3]
    assert module.upstream_rcode(parsed) == 3
    assert module.upstream_rcode([2, None]) is None
    assert module.upstream_rcode([]) is None


def test_halted_sys_dns_raises():
    fake = CheckQubes([dict(QUBES[1], state="Halted")] + QUBES[2:], [])
    with pytest.raises(Exception, match="cannot read the counters of table inet sysdns in sys-dns"):
        window(fake)


def test_missing_counter_raises():
    fake = CheckQubes(QUBES, [])
    fake.run = lambda *args, **kwargs: {"retcode": 0, "stdout": "table inet sysdns {\n}\n", "stderr": ""}
    module = checks(fake)
    with pytest.raises(Exception, match="lacks the counters redirected"):
        module.read_counters("sys-dns")


def test_chain_reports_each_problem():
    qubes = [
        qube("sys-dns", state="Running", netvm="sys-firewall", provides_network=False),
        qube("sys-firewall", state="Running", netvm="sys-net"),
    ]
    outcome = checks(FakeQubes(qubes)).chain("sys-dns", "sys-net", ["sys-firewall"])
    assert outcome["ok"] is False
    assert outcome["problems"] == [
        "sys-dns: netvm is sys-firewall, expected sys-net; fix: qvm-prefs sys-dns netvm sys-net",
        "sys-dns: provides_network is False, expected True; fix: qvm-prefs sys-dns provides_network True",
        "sys-firewall: netvm is sys-net, expected sys-dns; fix: qvm-prefs sys-firewall netvm sys-dns",
    ]


def test_chain_passes():
    outcome = checks(FakeQubes(QUBES)).chain("sys-dns", "sys-net", ["sys-firewall"])
    assert outcome == {
        "ok": True,
        "problems": [],
        "seen": {"sys-dns": {"netvm": "sys-net", "provides_network": True}, "sys-firewall": {"netvm": "sys-dns"}},
    }


def test_check_states_summary():
    fake = CheckQubes(QUBES, [counters(0, 0, 0), counters(2, 1, 0)])
    module = checks(fake)
    salt = dict(fake.salt_functions())
    for name in ("measure", "chain", "check_resolve", "check_no_plaintext", "check_upstream"):
        salt["sysdns." + name] = getattr(module, name)
    state = load_salt_module("_states/sysdns_check.py", __salt__=salt, __opts__={"test": False}, __context__={})
    assert state.chain("sys-dns", "sys-net", ["sys-firewall"])["result"] is True
    assert state.clients_resolve("sys-dns", ["personal"], ["www.lab.test"])["result"] is True
    leak = state.no_plaintext_leak("sys-dns", ["personal"], ["www.lab.test"])
    assert leak["result"] is False
    assert "FAILED: no plaintext DNS leaves sys-dns" in leak["comment"]
    assert state.upstream_encrypted("sys-dns", ["personal"], ["www.lab.test"])["result"] is False
    summary = state.summary("summary")
    assert summary["result"] is False
    assert summary["comment"].splitlines()[0] == "2 of 4 checks passed"


def test_client_bypassing_sys_dns_fails_resolve():
    bypassing = QUBES + [qube("work", state="Running", netvm="sys-net")]
    fake = CheckQubes(bypassing, [counters(10, 0, 4), counters(14, 0, 9)])
    measured = window(fake)
    problems = checks(fake).check_resolve(measured)
    assert measured["chains"]["personal"] == ["personal", "sys-firewall", "sys-dns", "sys-net"]
    assert measured["chains"]["work"] == ["work", "sys-net"]
    assert len(problems) == 1
    assert problems[0].startswith("work: its DNS queries bypass sys-dns (netvm chain work -> sys-net)")
    assert "qvm-prefs work netvm QUBE" in problems[0]
    assert "sysdns:rewire" in problems[0]
    assert "sysdns:tests:clients" in problems[0]


def test_client_without_netvm_fails_resolve():
    offline = QUBES + [qube("work", state="Running")]
    fake = CheckQubes(offline, [counters(10, 0, 4), counters(14, 0, 9)])
    problems = checks(fake).check_resolve(window(fake))
    assert len(problems) == 1
    assert problems[0].startswith("work: its DNS queries bypass sys-dns (netvm chain work -> none)")
