"""
A configuration that dnscrypt-proxy or nft rejects never replaces the running one: the
state fails and says why, and sys-dns keeps answering with the old configuration.
"""

import json

import pytest

from tests.integration.formula_lab import apply_sls, built_lab

pytestmark = pytest.mark.lab

REPORT = "/usr/lib/sysdns/report"


@pytest.fixture(scope="module", name="built_lab")
def built_lab_fixture():
    with built_lab() as lab:
        yield lab


def current_files(lab):
    listing = lab.exec("sys-dns", 'cd /rw/config/sysdns && for f in *; do echo "$f"; done', check=True).stdout
    return {
        name: lab.exec("sys-dns", ["cat", "/rw/config/sysdns/" + name], check=True).stdout for name in listing.split()
    }


def apply_files(lab, files):
    """Run sysdns.config_applied on sys-dns with ``files`` through qubesctl state.single."""
    result = lab.qubesctl(
        "state.single", "sysdns.config_applied", "name=sys-dns", "files=" + json.dumps(files), "--out=json"
    )
    data = json.loads(result.stdout)["local"]
    return result.returncode, next(iter(data.values()))


@pytest.mark.parametrize(
    "broken_file, content, reason",
    [
        ("dnscrypt-proxy.toml", "no_such_option = true\n", "dnscrypt-proxy rejected the new configuration"),
        (
            "sysdns.nft",
            "table inet sysdns {\n\tchain broken {\n\t\tno such rule\n\t}\n}\n",
            "nft rejected the new ruleset",
        ),
    ],
)
def test_rejected_config_keeps_running_one(built_lab, broken_file, content, reason):
    lab = built_lab
    before = current_files(lab)
    report_before = lab.exec("sys-dns", REPORT, check=True).stdout

    code, ret = apply_files(lab, dict(before, **{broken_file: content}))

    assert code != 0
    assert ret["result"] is False
    assert reason in ret["comment"]
    assert ret["changes"] == {}
    assert current_files(lab) == before
    assert lab.exec("sys-dns", REPORT, check=True).stdout == report_before
    answer = lab.dns_query("personal", "www.lab.test")
    assert answer["status"] == "answer", answer
    assert answer["answers"], answer


def test_rejected_config_leaves_record_unchanged(built_lab):
    lab = built_lab
    record = lab.qvm("qvm-features", "sys-dns", "sysdns.config", check=True).stdout
    before = current_files(lab)
    apply_files(lab, dict(before, **{"dnscrypt-proxy.toml": "no_such_option = true\n"}))
    assert lab.qvm("qvm-features", "sys-dns", "sysdns.config", check=True).stdout == record
    code, states, output = apply_sls(lab, "qubes.network.sys-dns")
    assert code == 0, output
    assert all(not ret["changes"] for ret in states.values()), states


def test_broken_ruleset_at_boot_fails_closed(built_lab):
    """With the formula's table unloadable at boot, the guard still keeps DNS in."""
    lab = built_lab
    lab.exec("sys-dns", "echo 'this is not nft' >> /rw/config/sysdns/sysdns.nft", check=True)
    assert lab.qvm("qvm-shutdown", "--wait", "--force", "sys-dns").returncode == 0
    assert lab.qvm("qvm-start", "sys-dns").returncode == 0
    assert lab.exec("sys-dns", "nft list table inet sysdns").returncode != 0
    assert lab.exec("sys-dns", "nft list table inet sysdns_guard").returncode == 0

    with lab.observe("sys-dns") as observer:
        answer = lab.dns_query("personal", "boot-leak.lab.test", rtype="TXT")
        observation = observer.stop()
    assert answer["status"] != "answer" or not any("uplink-plain" in str(item) for item in answer.get("answers", [])), (
        answer
    )
    assert observation.dns_queries == [], observation.summary()

    # The next build finds the broken file and the missing table, and repairs both.
    code, states, output = apply_sls(lab, "qubes.network.sys-dns")
    assert code == 0, output
    changes = states["qubes.network.sys-dns - configuration of sys-dns applied"]["changes"]
    assert list(changes["files"]) == ["sysdns.nft"]
    assert changes["firewall"] == {"old": "missing", "new": "loaded"}
    assert lab.dns_query("personal", "www.lab.test")["status"] == "answer"
