"""Branch tests of the rollback states (netvm_restored, absent) against an in-memory Qubes."""

import copy
import json

import pytest

from tests.unit.sysdns_fakes import FakeQubes, load_salt_module, qube, qvm_module
from tests.unit.test_sls_render import salt_env  # noqa: F401 (pytest fixture)
from tests.unit.test_states import (
    BASE_DEFAULTS,
    BASE_QUBES,
    CONFIG,
    FILES,
    LINKS,
    PACKAGES,
    build_sequence,
    states,
)

PREVIOUS = "sysdns.previous-netvm"


@pytest.fixture
def fake():
    return FakeQubes(BASE_QUBES, defaults=BASE_DEFAULTS)


@pytest.fixture
def built(fake):
    """The estate after a build of sys-dns that rewired sys-firewall."""
    results = build_sequence(states(fake))
    assert all(ret["result"] is True for ret in results), results
    fake.changes.clear()
    return fake


def rollback_sequence(module, qubes=("sys-firewall",), disposable=None, clone=True):
    """Apply the rollback SLS's states in order, with remove_qubes true."""
    results = [module.netvm_restored("sys-dns", qubes=list(qubes))]
    results.append(module.absent("sys-dns", marker="service.sysdns"))
    removed = {"sys-dns": "service.sysdns"}
    if disposable:
        results.append(module.absent(disposable, marker="sysdns.config", removed_before=dict(removed)))
        removed[disposable] = "sysdns.config"
    if clone:
        results.append(module.absent("tpl-sys-dns", marker="sysdns.template", removed_before=dict(removed)))
    return results


def snapshot(fake):
    """
    Return the qubes, their features and the properties that follow their default; a
    qube without features or defaults has none listed.
    """
    features = {name: dict(values) for name, values in fake.features_of.items() if values}
    defaults = {name: set(props) for name, props in fake.defaults.items() if props}
    return copy.deepcopy(fake.qubes), features, defaults


def test_netvm_restored_restores_and_unsets(built):
    ret = states(built).netvm_restored("sys-dns", qubes=["sys-firewall"])

    assert ret["result"] is True, ret["comment"]
    assert ret["changes"] == {
        "sys-firewall": {
            "netvm": {"old": "sys-dns", "new": "sys-net"},
            "features": {PREVIOUS: {"old": "sys-net", "new": None}},
        }
    }
    assert built.qubes["sys-firewall"]["netvm"] == "sys-net"
    assert PREVIOUS not in built.features_of.get("sys-firewall", {})


def test_netvm_restored_sets_netvm_before_unsetting(built):
    states(built).netvm_restored("sys-dns", qubes=["sys-firewall"])

    assert built.changes == [
        ("set_pref", "sys-firewall", "netvm", "sys-net"),
        ("set_feature", "sys-firewall", PREVIOUS, None),
    ]


def test_netvm_restored_second_run_noop(built):
    states(built).netvm_restored("sys-dns", qubes=["sys-firewall"])
    built.changes.clear()

    ret = states(built).netvm_restored("sys-dns", qubes=["sys-firewall"])

    assert ret["result"] is True
    assert ret["changes"] == {}
    assert built.changes == []


def test_netvm_restored_finds_qubes_outside_pillar(built):
    # A qube rewired by an earlier pillar that no longer lists it.
    module = states(built)
    assert module.netvm("personal", "sys-dns")["result"] is True

    ret = states(built).netvm_restored("sys-dns", qubes=[])

    assert set(ret["changes"]) == {"personal", "sys-firewall"}
    assert built.qubes["personal"]["netvm"] == "sys-firewall"
    assert built.qubes["sys-firewall"]["netvm"] == "sys-net"


def test_netvm_restored_resets_default_netvm(built):
    assert states(built).netvm("personal", "sys-dns")["result"] is True
    assert built.features_of["personal"][PREVIOUS] == "default"
    built.changes.clear()

    ret = states(built).netvm_restored("sys-dns", qubes=["personal"])

    assert ret["result"] is True, ret["comment"]
    assert ret["changes"]["personal"] == {
        "netvm": {"old": "sys-dns", "new": "default"},
        "features": {PREVIOUS: {"old": "default", "new": None}},
    }
    assert ("reset_pref", "personal", "netvm") in built.changes
    assert not any(change[:2] == ("set_pref", "personal") for change in built.changes)
    assert built.qubes["personal"]["netvm"] == "sys-firewall"
    assert built.pref_is_default("personal", "netvm")


def test_netvm_restored_default_follows_new_default(built):
    # The netvm follows default_netvm as it is at rollback time, not as it was.
    states(built).netvm("personal", "sys-dns")
    built.global_prefs["default_netvm"] = "sys-net"

    states(built).netvm_restored("sys-dns", qubes=["personal"])

    assert built.qubes["personal"]["netvm"] == "sys-net"
    assert built.pref_is_default("personal", "netvm")


def test_netvm_restored_default_test_mode(built):
    states(built).netvm("personal", "sys-dns")
    built.changes.clear()
    before = snapshot(built)

    predicted = states(built, test=True).netvm_restored("sys-dns", qubes=["personal"])

    assert predicted["result"] is None
    assert built.changes == []
    assert snapshot(built) == before
    applied = states(built).netvm_restored("sys-dns", qubes=["personal"])
    assert applied["changes"] == predicted["changes"]


def test_netvm_restored_keeps_netvm_reset_by_hand(built):
    # A netvm reset to its default by hand, while default_netvm is sys-dns, is the
    # user's choice: the rollback only unsets the record.
    states(built).netvm("personal", "sys-dns")
    built.global_prefs["default_netvm"] = "sys-dns"
    built.reset_pref("personal", "netvm")
    built.changes.clear()

    ret = states(built).netvm_restored("sys-dns", qubes=["personal"])

    assert ret["changes"]["personal"] == {"features": {PREVIOUS: {"old": "default", "new": None}}}
    assert [change for change in built.changes if change[1] == "personal"] == [
        ("set_feature", "personal", PREVIOUS, None)
    ]
    assert built.qubes["personal"]["netvm"] == "sys-dns"


def test_netvm_restored_old_record_format(fake):
    # A record written before "default" existed holds the netvm's name: it is set
    # explicitly, as that record cannot tell whether it was the default.
    fake.qubes["sys-dns"] = qube("sys-dns", provides_network=True)
    fake.qubes["personal"]["netvm"] = "sys-dns"
    fake.defaults["personal"].discard("netvm")
    fake.features_of["personal"] = {PREVIOUS: "sys-firewall"}

    ret = states(fake).netvm_restored("sys-dns")

    assert ret["changes"]["personal"]["netvm"] == {"old": "sys-dns", "new": "sys-firewall"}
    assert fake.changes[0] == ("set_pref", "personal", "netvm", "sys-firewall")
    assert not fake.pref_is_default("personal", "netvm")


def test_rollback_restores_default_netvm_estate(fake):
    before = snapshot(fake)
    module = states(fake)
    build_sequence(module)
    assert module.netvm("personal", "sys-dns")["result"] is True
    assert not fake.pref_is_default("personal", "netvm")

    results = rollback_sequence(states(fake), qubes=("sys-firewall", "personal"))

    assert all(ret["result"] is True for ret in results), results
    assert snapshot(fake) == before


def test_netvm_restored_empty_record_means_no_netvm(fake):
    fake.qubes["offline"] = qube("offline", netvm="sys-dns")
    fake.qubes["sys-dns"] = qube("sys-dns", provides_network=True)
    fake.features_of["offline"] = {PREVIOUS: ""}

    ret = states(fake).netvm_restored("sys-dns")

    assert ret["changes"]["offline"]["netvm"] == {"old": "sys-dns", "new": None}
    assert fake.qubes["offline"]["netvm"] is None


def test_netvm_restored_keeps_netvm_changed_by_hand(built):
    built.qubes["sys-vpn"] = qube("sys-vpn", netvm="sys-dns", provides_network=True)
    built.qubes["sys-firewall"]["netvm"] = "sys-vpn"

    ret = states(built).netvm_restored("sys-dns", qubes=["sys-firewall"])

    assert ret["changes"] == {"sys-firewall": {"features": {PREVIOUS: {"old": "sys-net", "new": None}}}}
    assert built.qubes["sys-firewall"]["netvm"] == "sys-vpn"


def test_netvm_restored_leaves_hand_wired_qube(built):
    built.qubes["personal"]["netvm"] = "sys-dns"

    ret = states(built).netvm_restored("sys-dns", qubes=["sys-firewall"])

    assert set(ret["changes"]) == {"sys-firewall"}
    assert built.qubes["personal"]["netvm"] == "sys-dns"


def test_netvm_restored_skips_missing_pillar_qube(built):
    ret = states(built).netvm_restored("sys-dns", qubes=["sys-firewall", "gone"])

    assert ret["result"] is True, ret["comment"]
    assert set(ret["changes"]) == {"sys-firewall"}


def missing_previous(built):
    """Route personal through sys-dns too, then make sys-firewall's recorded netvm a removed qube."""
    assert states(built).netvm("personal", "sys-dns")["result"] is True
    built.features_of["sys-firewall"][PREVIOUS] = "sys-net-old"
    built.changes.clear()
    return built


def test_netvm_restored_missing_previous_netvm(built):
    missing_previous(built)

    ret = states(built).netvm_restored("sys-dns", qubes=["sys-firewall", "personal"])

    assert ret["result"] is False
    assert ret["changes"] == {
        "personal": {
            "netvm": {"old": "sys-dns", "new": "default"},
            "features": {PREVIOUS: {"old": "default", "new": None}},
        }
    }
    assert "Previous netvm of personal has been restored" in ret["comment"]
    assert "qube sys-firewall still uses sys-dns" in ret["comment"]
    assert "previous netvm sys-net-old" in ret["comment"]
    assert "qvm-prefs sys-firewall netvm QUBE" in ret["comment"]
    assert "run the rollback again" in ret["comment"]
    assert built.qubes["personal"]["netvm"] == "sys-firewall"
    assert built.qubes["sys-firewall"]["netvm"] == "sys-dns"
    assert built.features_of["sys-firewall"][PREVIOUS] == "sys-net-old"
    assert not any(change[1] == "sys-firewall" for change in built.changes)


def test_netvm_restored_names_each_missing(built):
    missing_previous(built)
    built.features_of["personal"][PREVIOUS] = "sys-vpn-old"

    ret = states(built).netvm_restored("sys-dns", qubes=["sys-firewall", "personal"])

    assert ret["result"] is False
    assert ret["changes"] == {}
    assert "qube personal still uses sys-dns because its previous netvm sys-vpn-old" in ret["comment"]
    assert "qube sys-firewall still uses sys-dns because its previous netvm sys-net-old" in ret["comment"]
    assert built.changes == []


def test_netvm_restored_missing_test_mode(built):
    missing_previous(built)
    before = snapshot(built)

    predicted = states(built, test=True).netvm_restored("sys-dns", qubes=["sys-firewall", "personal"])

    assert predicted["result"] is False
    assert "Previous netvm of personal would have been restored" in predicted["comment"]
    assert "qube sys-firewall still uses sys-dns" in predicted["comment"]
    assert built.changes == []
    assert snapshot(built) == before
    applied = states(built).netvm_restored("sys-dns", qubes=["sys-firewall", "personal"])
    assert applied["result"] is False
    assert applied["changes"] == predicted["changes"]


def test_netvm_restored_missing_fixed_by_hand(built):
    missing_previous(built)
    states(built).netvm_restored("sys-dns", qubes=["sys-firewall", "personal"])
    # The fix the failure names: the user picks a netvm, then runs the rollback again.
    built.set_pref("sys-firewall", "netvm", "sys-net")
    built.changes.clear()

    ret = states(built).netvm_restored("sys-dns", qubes=["sys-firewall", "personal"])

    assert ret["result"] is True, ret["comment"]
    assert ret["changes"] == {"sys-firewall": {"features": {PREVIOUS: {"old": "sys-net-old", "new": None}}}}
    assert built.changes == [("set_feature", "sys-firewall", PREVIOUS, None)]


def test_absent_rejects_qube_of_unrestored_client(built):
    missing_previous(built)
    states(built).netvm_restored("sys-dns", qubes=["sys-firewall", "personal"])
    built.changes.clear()

    for test in (True, False):
        ret = states(built, test=test).absent("sys-dns", marker="service.sysdns")

        assert ret["result"] is False, test
        assert "still in use as netvm of sys-firewall" in ret["comment"], test
    assert built.changes == []
    assert "sys-dns" in built.qubes


def test_absent_test_mode_counts_unrestorable_client(built):
    # netvm_restored leaves sys-firewall on sys-dns, so a test run must not ignore it.
    missing_previous(built)

    ret = states(built, test=True).absent("sys-dns", marker="service.sysdns")

    assert ret["result"] is False
    assert "still in use as netvm of sys-firewall" in ret["comment"]
    assert "personal" not in ret["comment"]


def test_rollback_missing_previous_keeps_qubes(built):
    missing_previous(built)

    results = rollback_sequence(states(built), qubes=("sys-firewall", "personal"))

    assert [ret["result"] for ret in results] == [False, False, False], results
    assert "still in use as netvm of sys-firewall" in results[1]["comment"]
    assert "template of sys-dns" in results[2]["comment"]
    assert "sys-dns" in built.qubes
    assert "tpl-sys-dns" in built.qubes
    assert built.qubes["sys-firewall"]["netvm"] == "sys-dns"


def test_netvm_restored_test_mode(built):
    before = snapshot(built)

    predicted = states(built, test=True).netvm_restored("sys-dns", qubes=["sys-firewall"])

    assert predicted["result"] is None
    assert "would have been restored" in predicted["comment"]
    assert built.changes == []
    assert snapshot(built) == before
    applied = states(built).netvm_restored("sys-dns", qubes=["sys-firewall"])
    assert applied["changes"] == predicted["changes"]


def test_absent_missing_qube_noop(fake):
    ret = states(fake).absent("sys-dns", marker="service.sysdns")

    assert ret["result"] is True
    assert ret["changes"] == {}
    assert fake.changes == []


def test_absent_keeps_qube_without_marker(fake):
    fake.qubes["sys-dns"] = qube("sys-dns", template="debian-12-minimal")

    ret = states(fake).absent("sys-dns", marker="service.sysdns")

    assert ret["result"] is True
    assert ret["changes"] == {}
    assert "lacks the feature service.sysdns" in ret["comment"]
    assert "sys-dns" in fake.qubes


def test_absent_shuts_down_then_removes(built):
    states(built).netvm_restored("sys-dns", qubes=["sys-firewall"])
    built.changes.clear()

    ret = states(built).absent("sys-dns", marker="service.sysdns")

    assert ret["result"] is True, ret["comment"]
    assert ret["changes"] == {
        "qube": {"old": {"class": "AppVM", "template": "tpl-sys-dns", "state": "Running"}, "new": None}
    }
    assert built.changes == [("shutdown", "sys-dns"), ("remove", "sys-dns")]


def test_absent_rejects_qube_in_use(built):
    ret = states(built).absent("sys-dns", marker="service.sysdns")

    assert ret["result"] is False
    assert ret["changes"] == {}
    assert "still in use as netvm of sys-firewall" in ret["comment"]
    assert "sysdns:rollback:remove_qubes" in ret["comment"]
    assert built.changes == []


def test_absent_rejects_template_of_user_qube(built):
    built.qubes["mine"] = qube("mine", template="tpl-sys-dns")
    module = states(built)
    module.netvm_restored("sys-dns", qubes=["sys-firewall"])
    module.absent("sys-dns", marker="service.sysdns")

    ret = module.absent("tpl-sys-dns", marker="sysdns.template", removed_before={"sys-dns": "service.sysdns"})

    assert ret["result"] is False
    assert "template of mine" in ret["comment"]
    assert "tpl-sys-dns" in built.qubes


def test_absent_rejects_global_property(built):
    built.global_prefs["default_netvm"] = "sys-dns"
    states(built).netvm_restored("sys-dns", qubes=["sys-firewall"])

    ret = states(built).absent("sys-dns", marker="service.sysdns")

    assert ret["result"] is False
    assert "global property default_netvm" in ret["comment"]
    assert "sys-dns" in built.qubes


def test_absent_test_mode_ignores_earlier_removals(built):
    # In a test run nothing is removed, so sys-dns still uses the template.
    ret = states(built, test=True).absent(
        "tpl-sys-dns", marker="sysdns.template", removed_before={"sys-dns": "service.sysdns"}
    )

    assert ret["result"] is None, ret["comment"]
    assert built.changes == []


def test_absent_test_mode_still_rejects_other_uses(built):
    built.qubes["mine"] = qube("mine", template="tpl-sys-dns")

    ret = states(built, test=True).absent(
        "tpl-sys-dns", marker="sysdns.template", removed_before={"sys-dns": "service.sysdns"}
    )

    assert ret["result"] is False
    assert "template of mine" in ret["comment"]


def test_absent_remove_failure_reported(built):
    states(built).netvm_restored("sys-dns", qubes=["sys-firewall"])
    built.qubes["mine"] = qube("mine", netvm="sys-dns")
    # qvm-remove also rejects uses that dependents does not read, such as an audiovm.
    module = load_salt_module(
        "_states/sysdns.py",
        __salt__=dict(built.salt_functions(), **{"sysdns_qvm.dependents": lambda name: []}),
        __opts__={"test": False},
        __context__={},
    )

    ret = module.absent("sys-dns", marker="service.sysdns")

    assert ret["result"] is False
    assert ret["changes"] == {}
    assert "Domain is in use" in ret["comment"]


def test_rollback_restores_estate(fake):
    before = snapshot(fake)
    build_sequence(states(fake))

    results = rollback_sequence(states(fake))

    assert all(ret["result"] is True for ret in results), results
    assert snapshot(fake) == before


def test_rollback_disposable_class(fake):
    before = snapshot(fake)
    module = states(fake)
    module.template_present("tpl-sys-dns", "debian-12-minimal")
    module.template_configured("tpl-sys-dns", PACKAGES, FILES, LINKS, True)
    module.qube_present("sys-dns-dvm", "tpl-sys-dns", "orange", prefs={"template_for_dispvms": True, "netvm": None})
    module.config_applied("sys-dns-dvm", CONFIG, restart_qube="sys-dns")
    module.qube_present(
        "sys-dns",
        "sys-dns-dvm",
        "orange",
        klass="DispVM",
        prefs={"netvm": "sys-net", "provides_network": True},
        features={"service.sysdns": "1"},
    )
    module.running("sys-dns")
    module.netvm("sys-firewall", "sys-dns")

    results = rollback_sequence(states(fake), disposable="sys-dns-dvm")

    assert [ret["result"] for ret in results] == [True, True, True, True], results
    assert snapshot(fake) == before


def test_rollback_without_clone_keeps_template(fake):
    module = states(fake)
    module.template_configured("debian-12-minimal", PACKAGES, FILES, LINKS, True)
    module.qube_present(
        "sys-dns",
        "debian-12-minimal",
        "orange",
        prefs={"netvm": "sys-net", "provides_network": True},
        features={"service.sysdns": "1"},
    )
    module.netvm("sys-firewall", "sys-dns")

    results = rollback_sequence(states(fake), clone=False)

    assert all(ret["result"] is True for ret in results), results
    assert "debian-12-minimal" in fake.qubes
    assert "sys-dns" not in fake.qubes


def test_rollback_test_mode_predicts_real_run(built):
    before = snapshot(built)

    predicted = rollback_sequence(states(built, test=True))

    assert built.changes == []
    assert snapshot(built) == before
    assert [ret["result"] for ret in predicted] == [None, None, None]
    applied = rollback_sequence(states(built))
    assert [ret["changes"] for ret in applied] == [ret["changes"] for ret in predicted]


def test_rollback_second_run_noop(built):
    rollback_sequence(states(built))
    built.changes.clear()

    again = rollback_sequence(states(built))

    assert [ret["changes"] for ret in again] == [{}, {}, {}]
    assert all(ret["result"] is True for ret in again)
    assert built.changes == []


class _Recorder:
    """A __salt__ cmd.run_all that returns canned output per tool and records argv."""

    def __init__(self, outputs):
        self.outputs = outputs
        self.calls = []

    def __call__(self, argv, **kwargs):
        self.calls.append(list(argv))
        retcode, stdout = self.outputs.get(argv[0], (0, ""))
        return {"retcode": retcode, "stdout": stdout, "stderr": "" if retcode == 0 else "qvm error"}


def qvm(outputs):
    recorder = _Recorder(outputs)
    module = load_salt_module("_modules/sysdns_qvm.py", __salt__={"cmd.run_all": recorder}, __context__={})
    return module, recorder


def test_qvm_remove_argv():
    module, recorder = qvm({})

    module.remove("sys-dns")

    assert recorder.calls == [["qvm-remove", "--force", "sys-dns"]]


def test_qvm_remove_failure_raises():
    module, recorder = qvm({"qvm-remove": (1, "")})

    with pytest.raises(qvm_module.CommandExecutionError, match="qvm-remove --force sys-dns failed"):
        module.remove("sys-dns")


def test_qvm_dependents_reads_listing_and_globals():
    listing = "\n".join(
        "|".join(
            {"name": name, "class": "AppVM", "state": "Halted", "template": template, "netvm": netvm}.get(field, "-")
            for field in qvm_module.QUBE_FIELDS
        )
        for name, template, netvm in (
            ("sys-dns", "tpl-sys-dns", "sys-net"),
            ("sys-firewall", "debian-12-minimal", "sys-dns"),
            ("tpl-sys-dns", "-", "-"),
        )
    )
    globals_table = "clockvm          -  sys-net\ndefault_netvm    D  sys-dns\nupdatevm         -  None\n"
    module, recorder = qvm({"qvm-ls": (0, listing), "qubes-prefs": (0, globals_table)})

    assert module.dependents("sys-dns") == [("sys-firewall", "netvm"), (None, "default_netvm")]
    assert module.dependents("tpl-sys-dns") == [("sys-dns", "template")]
    assert [argv[0] for argv in recorder.calls] == ["qvm-ls", "qubes-prefs"]


def test_qvm_parse_qubes_prefs():
    table = "default_dispvm  D  default-dvm\nupdatevm        -  None\nstats_interval  D  3\nempty  -\n"

    assert qvm_module.parse_qubes_prefs(table) == {
        "default_dispvm": "default-dvm",
        "updatevm": None,
        "stats_interval": "3",
        "empty": None,
    }


def test_qvm_reset_pref_argv():
    module, recorder = qvm({})

    module.reset_pref("personal", "netvm")

    assert recorder.calls == [["qvm-prefs", "--default", "personal", "netvm"]]


def test_qvm_pref_is_default_reads_table_once():
    # Rows as qubesadmin/tools/qvm_prefs.py prints them: name, D or -, value; U alone.
    table = "label     -  yellow\nmemory    D  400\nnetvm     D  sys-firewall\nstart_time  U\n"
    module, recorder = qvm({"qvm-prefs": (0, table)})

    assert module.pref_is_default("personal", "netvm") is True
    assert module.pref_is_default("personal", "label") is False
    assert recorder.calls == [["qvm-prefs", "personal"]]


def test_qvm_pref_is_default_explicit_none():
    module, recorder = qvm({"qvm-prefs": (0, "netvm  -  None\n")})

    assert module.pref_is_default("offline", "netvm") is False


def test_qvm_pref_is_default_missing_row_raises():
    module, recorder = qvm({"qvm-prefs": (0, "start_time  U\n")})

    with pytest.raises(qvm_module.CommandExecutionError, match="printed no value for the property netvm"):
        module.pref_is_default("personal", "netvm")


def _rollback_states(run, pillar):
    result = run("state.show_sls", "qubes.network.sys-dns.rollback", pillar=pillar)
    assert result.returncode == 0, result.stderr + result.stdout
    return json.loads(result.stdout)["local"]


def test_rollback_sls_keeps_qubes_by_default(salt_env):  # noqa: F811
    run, calls = salt_env
    if calls.exists():
        calls.unlink()

    rendered = _rollback_states(run, {})

    assert list(rendered) == ["qubes.network.sys-dns.rollback - previous netvm of qubes routed through sys-dns"]
    assert not calls.exists(), calls.read_text()


def test_rollback_sls_removes_when_asked(salt_env):  # noqa: F811
    run, calls = salt_env

    rendered = _rollback_states(run, {"rollback": {"remove_qubes": True}})

    assert set(rendered) == {
        "qubes.network.sys-dns.rollback - previous netvm of qubes routed through sys-dns",
        "qubes.network.sys-dns.rollback - qube sys-dns absent",
        "qubes.network.sys-dns.rollback - template tpl-sys-dns absent",
    }


def test_rollback_sls_disposable_class(salt_env):  # noqa: F811
    run, calls = salt_env

    rendered = _rollback_states(run, {"rollback": {"remove_qubes": True}, "qube": {"class": "DispVM"}})

    state = rendered["qubes.network.sys-dns.rollback - template tpl-sys-dns absent"]["sysdns"]
    arguments = {key: value for item in state if isinstance(item, dict) for key, value in item.items()}
    assert arguments["removed_before"] == {"sys-dns": "service.sysdns", "sys-dns-dvm": "sysdns.config"}
    assert "qubes.network.sys-dns.rollback - disposable template sys-dns-dvm absent" in rendered


def test_rollback_sls_never_removes_base_template(salt_env):  # noqa: F811
    run, calls = salt_env

    rendered = _rollback_states(
        run, {"rollback": {"remove_qubes": True}, "template": {"clone": False, "source": "debian-12-minimal"}}
    )

    assert not any("template" in state_id for state_id in rendered)
