"""
Branch tests of the takeover of a sys-dns built by the original hand-written design:
sysdns.legacy_removed, the previous netvm recorded for a qube routed by hand, and the
template change of a running sys-dns.
"""

import copy

import pytest

from tests.unit.sysdns_fakes import FakeQubes, load_salt_module, qube

PREVIOUS = "sysdns.previous-netvm"
LIST = "sh -s list"
REMOVE = "sh -s remove"
ARTIFACTS = {
    "/rw/config/nft-dnscrypt.sh",
    "unit dnscrypt-nft.service",
    "nft table ip dnscrypt",
    "nft rule in ip qubes dnat-dns: udp dport 53 dnat to 127.0.0.1",
    "/etc/dnscrypt-proxy/dnscrypt-proxy.toml",
}


def original_estate(state="Running"):
    """The estate the original design leaves: sys-dns on the plain template, sys-firewall behind it."""
    fake = FakeQubes(
        [
            qube("debian-12-hard-min", "TemplateVM"),
            qube("sys-net", "AppVM", "Running", provides_network=True),
            qube(
                "sys-dns",
                "AppVM",
                state,
                template="debian-12-hard-min",
                netvm="sys-net",
                provides_network=True,
                autostart=True,
                label="blue",
            ),
            qube("sys-firewall", "AppVM", "Running", netvm="sys-dns", provides_network=True),
        ]
    )
    fake.legacy_artifacts["sys-dns"] = set(ARTIFACTS)
    return fake


def states(fake, test=False):
    return load_salt_module(
        "_states/sysdns.py",
        __salt__=fake.salt_functions(),
        __opts__={"test": test},
        __context__={},
    )


def commands(fake):
    return [command for _name, command, _stdin in fake.runs]


def test_legacy_removed_reports_each_artifact():
    fake = original_estate()

    ret = states(fake).legacy_removed("sys-dns")

    assert ret["result"] is True
    assert ret["changes"] == {artifact: {"old": "present", "new": "removed"} for artifact in ARTIFACTS}
    assert fake.legacy_artifacts["sys-dns"] == set()
    assert ("legacy-remove", "sys-dns") in fake.changes
    for artifact in ARTIFACTS:
        assert artifact in ret["comment"]


def test_legacy_removed_sends_script_on_stdin():
    fake = original_estate()

    states(fake).legacy_removed("sys-dns")

    script = fake.salt_files["salt://qubes/network/sys-dns/files/legacy-artifacts.sh"]
    assert [stdin for _name, _command, stdin in fake.runs] == [script, script]
    assert commands(fake) == [LIST, REMOVE]


def test_legacy_removed_second_run_noop():
    fake = original_estate()
    states(fake).legacy_removed("sys-dns")
    changes_before = list(fake.changes)

    ret = states(fake).legacy_removed("sys-dns")

    assert ret["result"] is True
    assert ret["changes"] == {}
    assert fake.changes == changes_before
    assert commands(fake)[-1] == LIST


def test_legacy_removed_test_mode_predicts():
    fake = original_estate()
    real = states(original_estate()).legacy_removed("sys-dns")

    ret = states(fake, test=True).legacy_removed("sys-dns")

    assert ret["result"] is None
    assert ret["changes"] == real["changes"]
    assert "would have been" in ret["comment"]
    assert fake.changes == []
    assert commands(fake) == [LIST]
    assert fake.legacy_artifacts["sys-dns"] == ARTIFACTS


def test_legacy_removed_missing_qube():
    fake = FakeQubes([qube("sys-net", "AppVM", "Running")])

    ret = states(fake).legacy_removed("sys-dns")

    assert ret["result"] is True
    assert ret["changes"] == {}
    assert fake.runs == []


def test_legacy_removed_clean_running_qube():
    fake = original_estate()
    fake.legacy_artifacts["sys-dns"] = set()

    ret = states(fake).legacy_removed("sys-dns")

    assert ret["result"] is True
    assert ret["changes"] == {}
    assert fake.changes == []


def test_legacy_removed_defers_halted_hand_made_qube():
    fake = original_estate(state="Halted")
    fake.legacy_artifacts["sys-dns"] = {"/rw/config/nft-dnscrypt.sh"}
    module = states(fake)

    ret = module.legacy_removed("sys-dns")

    assert ret["result"] is True
    assert ret["changes"] == {}
    assert "once it runs on the formula's template" in ret["comment"]
    assert fake.changes == []
    assert fake.runs == []
    assert fake.legacy_artifacts["sys-dns"] == {"/rw/config/nft-dnscrypt.sh"}


def test_legacy_removed_after_start_cleans_deferred_qube():
    fake = original_estate(state="Halted")
    fake.legacy_artifacts["sys-dns"] = {"/rw/config/nft-dnscrypt.sh"}
    module = states(fake)
    module.legacy_removed("sys-dns")
    fake.qubes["sys-dns"]["state"] = "Running"

    ret = module.legacy_removed("sys-dns", after_start=True)

    assert ret["result"] is True
    assert ret["changes"] == {"/rw/config/nft-dnscrypt.sh": {"old": "present", "new": "removed"}}
    assert commands(fake) == [LIST, REMOVE]
    assert fake.legacy_artifacts["sys-dns"] == set()


def test_legacy_removed_after_start_skips_undeferred_qube():
    fake = original_estate()

    ret = states(fake).legacy_removed("sys-dns", after_start=True)

    assert ret["result"] is True
    assert ret["changes"] == {}
    assert fake.runs == []
    assert fake.legacy_artifacts["sys-dns"] == ARTIFACTS


def test_legacy_removed_after_start_halted_fails():
    fake = original_estate(state="Halted")
    module = states(fake)
    module.legacy_removed("sys-dns")

    ret = module.legacy_removed("sys-dns", after_start=True)

    assert ret["result"] is False
    assert "qvm-start sys-dns" in ret["comment"]
    assert fake.runs == []
    assert fake.changes == []


def test_legacy_removed_halted_test_mode_changes_nothing():
    fake = original_estate(state="Halted")
    module = states(fake, test=True)

    first = module.legacy_removed("sys-dns")
    second = module.legacy_removed("sys-dns", after_start=True)

    assert first["result"] is True
    assert first["changes"] == {}
    assert second["result"] is None
    assert second["changes"] == {}
    assert "would have been inspected" in second["comment"]
    assert fake.changes == []
    assert fake.runs == []


def test_legacy_removed_leaves_halted_formula_qube():
    fake = original_estate(state="Halted")
    fake.features_of["sys-dns"] = {"service.sysdns": "1"}

    ret = states(fake).legacy_removed("sys-dns")

    assert ret["result"] is True
    assert ret["changes"] == {}
    assert fake.runs == []
    assert fake.changes == []


def test_legacy_removed_fails_when_removal_differs():
    fake = original_estate()
    original_run = fake.run

    def run_losing_one(name, command, **kwargs):
        result = original_run(name, command, **kwargs)
        if command == REMOVE:
            lines = result["stdout"].splitlines()[1:]
            result = dict(result, stdout="".join(line + "\n" for line in lines))
        return result

    fake.run = run_losing_one
    ret = states(fake).legacy_removed("sys-dns")

    assert ret["result"] is False
    assert ret["changes"] == {}
    assert "run the state again" in ret["comment"]


def test_legacy_removed_missing_script():
    fake = original_estate()
    fake.salt_files.clear()

    ret = states(fake).legacy_removed("sys-dns")

    assert ret["result"] is False
    assert "legacy-artifacts.sh" in ret["comment"]
    assert "not found on the Salt file server" in ret["comment"]
    assert fake.changes == []


def test_legacy_removed_command_error():
    fake = original_estate()
    fake.fail_commands[LIST] = "command qvm-run failed with exit code 1: nft: permission denied"

    ret = states(fake).legacy_removed("sys-dns")

    assert ret["result"] is False
    assert "nft: permission denied" in ret["comment"]
    assert fake.changes == []


@pytest.mark.parametrize(
    "output, status, expected",
    [
        ("present a\npresent b c\nnoise\n", "present", ["a", "b c"]),
        ("removed x\npresent y\n", "removed", ["x"]),
        ("present a\npresent a\n", "present", ["a"]),
        ("", "present", []),
    ],
)
def test_parse_legacy_output(output, status, expected):
    module = states(original_estate())
    assert module.parse_legacy_output(output, status) == expected


def test_netvm_records_previous_of_hand_routed_qube():
    fake = original_estate()

    ret = states(fake).netvm("sys-firewall", "sys-dns")

    assert ret["result"] is True
    assert ret["changes"] == {"features": {PREVIOUS: {"old": None, "new": "sys-net"}}}
    assert fake.features_of["sys-firewall"][PREVIOUS] == "sys-net"
    assert fake.qubes["sys-firewall"]["netvm"] == "sys-dns"


def test_netvm_hand_routed_test_mode_predicts():
    fake = original_estate()
    real = states(original_estate()).netvm("sys-firewall", "sys-dns")

    ret = states(fake, test=True).netvm("sys-firewall", "sys-dns")

    assert ret["result"] is None
    assert ret["changes"] == real["changes"]
    assert fake.changes == []


def test_netvm_hand_routed_second_run_noop():
    fake = original_estate()
    states(fake).netvm("sys-firewall", "sys-dns")

    ret = states(fake).netvm("sys-firewall", "sys-dns")

    assert ret["changes"] == {}
    assert ret["comment"] == "Qube sys-firewall already uses sys-dns as its netvm"


def test_netvm_hand_routed_netvm_without_netvm():
    fake = original_estate()
    fake.qubes["sys-dns"]["netvm"] = None

    ret = states(fake).netvm("sys-firewall", "sys-dns")

    assert ret["changes"] == {"features": {PREVIOUS: {"old": None, "new": ""}}}


def adopt(fake, test=False):
    return states(fake, test=test).qube_present(
        "sys-dns",
        "tpl-sys-dns",
        "orange",
        prefs={"netvm": "sys-net", "provides_network": True, "autostart": True, "memory": 400},
        features={"service.sysdns": "1"},
    )


def test_qube_present_moves_running_qube_to_template():
    fake = original_estate()
    fake.qubes["tpl-sys-dns"] = qube("tpl-sys-dns", "TemplateVM")

    ret = adopt(fake)

    assert ret["result"] is True
    assert ret["changes"]["prefs"]["template"] == {"old": "debian-12-hard-min", "new": "tpl-sys-dns"}
    assert ret["changes"]["prefs"]["label"] == {"old": "blue", "new": "orange"}
    assert fake.changes[0] == ("shutdown", "sys-dns")
    assert fake.qubes["sys-dns"]["template"] == "tpl-sys-dns"


def test_config_applied_test_mode_on_hand_made_qube():
    fake = original_estate()
    fake.missing_commands["sys-dns"] = {"/usr/lib/sysdns/report"}
    config = {"dnscrypt-proxy.toml": "listen_addresses = []\n"}

    ret = states(fake, test=True).config_applied("sys-dns", config)

    assert ret["result"] is None
    assert set(ret["changes"]) == {"files", "service", "firewall", "input-accept"}
    assert ret["changes"]["firewall"] == {"old": "missing", "new": "loaded"}
    assert fake.changes == []


def test_config_applied_missing_report_helper_fails():
    fake = original_estate()
    fake.missing_commands["sys-dns"] = {"/usr/lib/sysdns/report"}

    ret = states(fake).config_applied("sys-dns", {"dnscrypt-proxy.toml": "listen_addresses = []\n"})

    assert ret["result"] is False
    assert "exit code 127" in ret["comment"]
    assert fake.changes == []


def test_qube_present_pins_defaults_of_adopted_qube():
    fake = original_estate()
    fake.qubes["tpl-sys-dns"] = qube("tpl-sys-dns", "TemplateVM")
    fake.qubes["sys-dns"]["memory"] = 400
    fake.defaults["sys-dns"] = {"memory", "vcpus", "label"}

    ret = adopt(fake)

    assert ret["changes"]["prefs"]["memory"] == {"old": "400 (default)", "new": 400}
    assert ret["changes"]["prefs"]["label"] == {"old": "blue", "new": "orange"}
    assert "vcpus" not in ret["changes"]["prefs"]
    assert ("set_pref", "sys-dns", "memory", 400) in fake.changes


def test_qube_present_pins_nothing_on_built_qube():
    fake = original_estate()
    fake.qubes["tpl-sys-dns"] = qube("tpl-sys-dns", "TemplateVM")
    fake.qubes["sys-dns"].update(template="tpl-sys-dns", label="orange", memory=400)
    fake.features_of["sys-dns"] = {"service.sysdns": "1"}
    fake.defaults["sys-dns"] = {"memory"}

    ret = adopt(fake)

    assert ret["changes"] == {}
    assert fake.changes == []


def test_qube_present_pinning_test_mode_predicts():
    fake = original_estate()
    fake.qubes["tpl-sys-dns"] = qube("tpl-sys-dns", "TemplateVM")
    fake.qubes["sys-dns"]["memory"] = 400
    fake.defaults["sys-dns"] = {"memory"}
    real = copy.deepcopy(fake)

    ret = adopt(fake, test=True)

    assert ret["result"] is None
    assert ret["changes"] == adopt(real)["changes"]
    assert fake.changes == []


ADOPTED = "sysdns.adopted"


def test_qube_present_records_adoption():
    fake = original_estate()
    fake.qubes["tpl-sys-dns"] = qube("tpl-sys-dns", "TemplateVM")

    ret = adopt(fake)

    assert ret["changes"]["features"][ADOPTED] == {"old": None, "new": "debian-12-hard-min"}
    assert fake.features_of["sys-dns"][ADOPTED] == "debian-12-hard-min"
    # The record goes first: once service.sysdns is set, the adoption no longer shows.
    features_set = [change[2] for change in fake.changes if change[0] == "set_feature"]
    assert features_set == [ADOPTED, "service.sysdns"]


def test_qube_present_adoption_second_run_noop():
    fake = original_estate()
    fake.qubes["tpl-sys-dns"] = qube("tpl-sys-dns", "TemplateVM")
    adopt(fake)
    fake.changes.clear()

    ret = adopt(fake)

    assert ret["changes"] == {}
    assert fake.changes == []
    assert fake.features_of["sys-dns"][ADOPTED] == "debian-12-hard-min"


def test_qube_present_new_qube_not_adopted():
    fake = original_estate()
    fake.qubes["tpl-sys-dns"] = qube("tpl-sys-dns", "TemplateVM")
    del fake.qubes["sys-dns"]

    ret = adopt(fake)

    assert ret["changes"]["qube"]["old"] is None
    assert ADOPTED not in ret["changes"]["features"]
    assert ADOPTED not in fake.features_of["sys-dns"]


def adopted_estate():
    """The estate after a build over the original design's sys-dns, with a template clone."""
    fake = original_estate()
    fake.qubes["debian-12-minimal"] = qube("debian-12-minimal", "TemplateVM")
    module = states(fake)
    results = [
        module.template_present("tpl-sys-dns", "debian-12-minimal"),
        module.template_configured("tpl-sys-dns", ["dnscrypt-proxy"], {"/etc/x": {"content": "x\n"}}),
        module.legacy_removed("sys-dns"),
        adopt(fake),
        module.netvm("sys-firewall", "sys-dns"),
    ]
    assert all(ret["result"] is True for ret in results), results
    assert fake.features_of["sys-dns"][ADOPTED] == "debian-12-hard-min"
    fake.changes.clear()
    return fake


def rollback(fake, test=False):
    """Apply the rollback SLS's states in order, with remove_qubes true."""
    module = states(fake, test=test)
    return [
        module.netvm_restored("sys-dns", qubes=["sys-firewall"]),
        module.absent("sys-dns", marker="service.sysdns"),
        module.absent("tpl-sys-dns", marker="sysdns.template", removed_before={"sys-dns": "service.sysdns"}),
    ]


def test_rollback_keeps_adopted_qube():
    fake = adopted_estate()

    restored, sys_dns, template = rollback(fake)

    assert restored["result"] is True, restored["comment"]
    assert fake.qubes["sys-firewall"]["netvm"] == "sys-net"
    assert sys_dns["result"] is True
    assert sys_dns["changes"] == {}
    assert sys_dns["comment"] == (
        "Qube sys-dns is kept because it existed before the build, which adopted it "
        "(feature sysdns.adopted; its template then: debian-12-hard-min)"
    )
    assert "sys-dns" in fake.qubes
    # The kept sys-dns still uses the template clone, which therefore stays.
    assert template["result"] is False
    assert "tpl-sys-dns is not removed because it is still in use as template of sys-dns" in template["comment"]
    assert "tpl-sys-dns" in fake.qubes
    assert [change for change in fake.changes if change[0] in ("remove", "shutdown")] == []


def test_rollback_adopted_test_mode_predicts():
    fake = adopted_estate()
    before = (copy.deepcopy(fake.qubes), copy.deepcopy(fake.features_of))

    predicted = rollback(fake, test=True)

    assert fake.changes == []
    assert (fake.qubes, fake.features_of) == before
    assert [ret["result"] for ret in predicted] == [None, True, False]
    applied = rollback(fake)
    assert [ret["result"] for ret in applied] == [True, True, False]
    assert [ret["changes"] for ret in applied] == [ret["changes"] for ret in predicted]
    assert [ret["comment"] for ret in applied[1:]] == [ret["comment"] for ret in predicted[1:]]


def test_rollback_adopted_moved_back_removes_template():
    # The fix for the template clone: move the kept sys-dns back to its template of
    # then, and the next rollback removes the clone.
    fake = adopted_estate()
    rollback(fake)
    fake.set_pref("sys-dns", "template", fake.features_of["sys-dns"][ADOPTED])

    again = rollback(fake)

    assert [ret["result"] for ret in again] == [True, True, True], again
    assert "tpl-sys-dns" not in fake.qubes
    assert "sys-dns" in fake.qubes


def test_absent_removes_after_adoption_unset():
    # Without the record the qube counts as the build's own again.
    fake = adopted_estate()
    rollback(fake)
    fake.set_feature("sys-dns", ADOPTED, None)

    ret = states(fake).absent("sys-dns", marker="service.sysdns")

    assert ret["result"] is True, ret["comment"]
    assert "sys-dns" not in fake.qubes
