"""
A configuration that dnscrypt-proxy or nft rejects never replaces the running one: the
state fails and says why, and sys-dns keeps answering with the old configuration.
"""

import json

import pytest

from tests.integration.formula_lab import apply_sls, failed_states, lab_pillar
from tests.lab.lab import Lab

pytestmark = pytest.mark.lab

REPORT = "/usr/lib/sysdns/report"


@pytest.fixture(scope="module")
def built_lab():
    lab = Lab.up()
    try:
        lab.write_pillar("sysdns", lab_pillar(lab))
        code, states, output = apply_sls(lab, "qubes.network.sys-dns")
        assert states is not None, output
        assert failed_states(states) == {}
        yield lab
    finally:
        lab.down()


def current_files(lab):
    listing = lab.exec("sys-dns", "cd /rw/config/sysdns && for f in *; do echo \"$f\"; done", check=True).stdout
    return {name: lab.exec("sys-dns", ["cat", "/rw/config/sysdns/" + name], check=True).stdout for name in listing.split()}


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
        ("sysdns.nft", "table inet sysdns {\n\tchain broken {\n\t\tno such rule\n\t}\n}\n", "nft rejected the new ruleset"),
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
