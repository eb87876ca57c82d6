"""
The builder in the lab, from a fresh estate: a test run that changes nothing and
predicts the real run's changes state by state, a build that wires the chain and
closes the leak, a second run that changes nothing, and a reboot of sys-dns after
which DNS works again without Salt.
"""

import pytest

from tests.integration.formula_lab import apply_sls, changes_by_state, failed_states, lab_pillar

pytestmark = pytest.mark.lab

BUILD = "qubes.network.sys-dns"
# dom0 tools whose calls change the estate; a test run must call none of them.
MUTATING_TOOLS = {"qvm-create", "qvm-clone", "qvm-remove", "qvm-start", "qvm-shutdown", "qvm-kill"}
# Commands that states run in qubes under test=True, which only read.
READ_ONLY = {"/usr/lib/sysdns/report", "sh -s list"}
ENCRYPTED_ENDPOINTS = {"uplink-dnscrypt", "uplink-doh", "uplink-doh-unbound"}


def estate(lab):
    """Every qube's properties and features, and which qubes run."""
    listing = lab.qvm(
        "qvm-ls",
        "--raw-data",
        "--fields",
        "name,class,state,template,netvm,label,provides_network,autostart,memory,vcpus",
        check=True,
    ).stdout
    snapshot = {"qubes": sorted(listing.splitlines())}
    for line in listing.splitlines():
        name = line.split("|")[0]
        snapshot["features:" + name] = lab.qvm("qvm-features", name, check=True).stdout
    return snapshot


def dom0_calls(lab, since):
    return [call["argv"] for call in lab.calls(since) if call["argv"][0] != "qubesctl"]


def mutating(calls):
    found = []
    for argv in calls:
        tool = argv[0]
        if tool in MUTATING_TOOLS:
            found.append(argv)
        elif tool == "qvm-prefs" and (
            len([arg for arg in argv[1:] if not arg.startswith("-")]) > 2 or {"--default", "-D"} & set(argv)
        ):
            found.append(argv)
        elif tool == "qvm-features" and (
            len([arg for arg in argv[1:] if not arg.startswith("-")]) > 2 or "--unset" in argv
        ):
            found.append(argv)
        elif tool == "qvm-run":
            found.append(argv)
    return found


def resolves_encrypted(lab, client):
    """Resolve through the whole chain from ``client`` and return the answering endpoint."""
    address = lab.dns_query(client, "www.lab.test")
    assert address["status"] == "answer", address
    assert address["answers"], address
    txt = lab.dns_query(client, "www.lab.test", rtype="TXT")
    assert txt["status"] == "answer", txt
    return " ".join(str(answer) for answer in txt["answers"])


@pytest.mark.parametrize("template", ["debian-12-hard-min", "debian-13-minimal"])
def test_build_from_fresh_lab(fresh_lab, template):
    lab = fresh_lab()
    lab.write_pillar("sysdns", lab_pillar(lab, template={"source": template}))

    # test=True changes nothing and predicts every change.
    before = estate(lab)
    calls_before = len(lab.calls())
    code, predicted, output = apply_sls(lab, BUILD, "test=True")
    assert predicted is not None, output
    assert failed_states(predicted) == {}
    assert mutating(dom0_calls(lab, calls_before)) == []
    assert estate(lab) == before
    assert all(ret["result"] is None for ret in predicted.values() if ret["changes"])

    # The real run reports exactly the predicted changes.
    code, applied, output = apply_sls(lab, BUILD)
    assert applied is not None, output
    assert failed_states(applied) == {}
    assert code == 0
    assert changes_by_state(applied) == changes_by_state(predicted)

    assert lab.qvm("qvm-prefs", "sys-firewall", "netvm").stdout.strip() == "sys-dns"
    assert lab.qvm("qvm-prefs", "sys-dns", "netvm").stdout.strip() == "sys-net"
    assert lab.qvm("qvm-prefs", "sys-dns", "provides_network").stdout.strip() == "True"
    assert lab.qvm("qvm-prefs", "sys-dns", "autostart").stdout.strip() == "True"
    assert lab.qvm("qvm-prefs", "sys-dns", "template").stdout.strip() == "tpl-sys-dns"
    # The pillar's default maxmem, 0: no memory balancing.
    assert lab.qvm("qvm-prefs", "sys-dns", "maxmem").stdout.strip() == "0"
    assert lab.qvm("qvm-prefs", "sys-whonix", "netvm").stdout.strip() == "sys-firewall"

    with lab.observe("sys-dns") as observer:
        endpoint = resolves_encrypted(lab, "personal")
        observation = observer.stop()
    assert any(name in endpoint for name in ENCRYPTED_ENDPOINTS), endpoint
    assert observation.dns_queries == [], observation.summary()

    # A second run changes nothing, starts or stops nothing, and reads little.
    calls_before = len(lab.calls())
    code, again, output = apply_sls(lab, BUILD)
    assert code == 0, output
    assert changes_by_state(again) == {}
    calls = dom0_calls(lab, calls_before)
    assert mutating([argv for argv in calls if argv[0] != "qvm-run"]) == []
    assert len(calls) <= 10, calls

    # After a reboot of sys-dns, DNS works again without Salt, and nothing leaks.
    # Qubes refuses to shut down a netvm with running clients unless forced, and
    # attaches them again when it starts (qubes/vm/mix/net.py, qubes-core-admin 4.2).
    assert lab.qvm("qvm-shutdown", "--wait", "sys-dns").returncode != 0
    assert lab.qvm("qvm-shutdown", "--wait", "--force", "sys-dns").returncode == 0
    assert lab.qvm("qvm-start", "sys-dns").returncode == 0
    with lab.observe("sys-dns") as observer:
        endpoint = resolves_encrypted(lab, "work")
        observation = observer.stop()
    assert any(name in endpoint for name in ENCRYPTED_ENDPOINTS), endpoint
    assert observation.dns_queries == [], observation.summary()


def test_build_disposable_sys_dns(fresh_lab):
    """sys-dns as a named disposable: its configuration lives in its disposable template."""
    lab = fresh_lab()
    lab.write_pillar("sysdns", lab_pillar(lab, qube={"class": "DispVM"}))

    code, applied, output = apply_sls(lab, BUILD)
    assert applied is not None, output
    assert failed_states(applied) == {}
    assert code == 0
    assert lab.qvm("qvm-ls", "--raw-data", "--fields", "class", "sys-dns").stdout.strip() == "DispVM"
    assert lab.qvm("qvm-prefs", "sys-dns", "template").stdout.strip() == "sys-dns-dvm"
    assert lab.qvm("qvm-prefs", "sys-dns-dvm", "template_for_dispvms").stdout.strip() == "True"
    assert lab.qvm("qvm-prefs", "sys-dns-dvm", "netvm").stdout.strip() == ""

    code, checks, output = apply_sls(lab, "qubes.tests.sys-dns")
    assert checks is not None, output
    assert failed_states(checks) == {}
    assert code == 0

    code, again, output = apply_sls(lab, BUILD)
    assert code == 0, output
    assert changes_by_state(again) == {}


def test_template_change_on_running_sys_dns(fresh_lab):
    """A new template for a running sys-dns, whose downstream qubes run, applies in one build."""
    lab = fresh_lab()
    lab.write_pillar("sysdns", lab_pillar(lab))
    code, _, output = apply_sls(lab, BUILD)
    assert code == 0, output
    assert lab.qvm("qvm-check", "--running", "sys-firewall").returncode == 0

    lab.write_pillar("sysdns", lab_pillar(lab, template={"source": "debian-13-minimal", "name": "tpl-sys-dns-13"}))
    since = len(lab.calls())
    code, predicted, output = apply_sls(lab, BUILD, "test=True")
    assert predicted is not None, output
    assert failed_states(predicted) == {}
    # A test run may read sys-dns (its report, the takeover's listing) but run nothing else.
    writes = [argv for argv in mutating(dom0_calls(lab, since)) if argv[0] != "qvm-run" or argv[-1] not in READ_ONLY]
    assert writes == []

    since = len(lab.calls())
    code, applied, output = apply_sls(lab, BUILD)
    assert applied is not None, output
    assert failed_states(applied) == {}
    assert code == 0
    assert changes_by_state(applied) == changes_by_state(predicted)
    # One restart moves sys-dns to the new template; the watch adds no second one.
    shutdowns = [argv for argv in dom0_calls(lab, since) if argv[0] == "qvm-shutdown" and argv[-1] == "sys-dns"]
    assert len(shutdowns) == 1, shutdowns
    assert lab.qvm("qvm-prefs", "sys-dns", "template").stdout.strip() == "tpl-sys-dns-13"
    assert lab.qvm("qvm-check", "--running", "sys-dns").returncode == 0
    assert lab.qvm("qvm-prefs", "sys-firewall", "netvm").stdout.strip() == "sys-dns"

    code, checks, output = apply_sls(lab, "qubes.tests.sys-dns")
    assert checks is not None, output
    assert failed_states(checks) == {}
    assert code == 0

    code, again, output = apply_sls(lab, BUILD)
    assert code == 0, output
    assert changes_by_state(again) == {}
