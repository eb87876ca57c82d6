"""
The custom modules and states loaded by Salt's own loader (pytest-salt-factories
``Loaders``), as ``qubesctl saltutil.sync_all`` and ``state.sls`` load them in dom0,
against the lab's emulated dom0 tools and a lab store without containers.

The tests in test_states.py call the state functions with hand-made dunders. These
tests catch what only the loader shows: a ``__virtual__`` that rejects or accepts
wrongly, a ``__salt__`` key that names no loaded function, ``__opts__["test"]`` as
``state.single`` passes it, and ``__context__`` shared between the modules. Branches
that need a running qube (qvm-run into a container) are left to the lab tests in
tests/integration.
"""

import hashlib
import json
import os
import re
import shutil

import pytest
import salt._logging.impl
import salt.config
from saltfactories.utils.functional import Loaders

from tests.lab.lab import build_estate
from tests.lab.layout import REPO_DIR, RUN_ENV, TOOLS_DIR, RunLayout
from tests.lab.runtime import Runtime
from tests.lab.store import Store

PREVIOUS = "sysdns.previous-netvm"
# dom0 tools that change the estate whatever their arguments.
WRITE_TOOLS = {"qvm-create", "qvm-clone", "qvm-remove", "qvm-start", "qvm-shutdown", "qvm-kill", "qvm-run"}


def minion_opts(root):
    """
    Return a masterless minion configuration whose file_roots serve the formula as
    qubesctl loads it: the SLS tree and the repository's _modules and _states.
    """
    roots = root / "file_roots"
    roots.mkdir()
    # Links rather than the repository root, so that sync_all does not walk the venvs.
    (roots / "_modules").symlink_to(REPO_DIR / "_modules")
    (roots / "_states").symlink_to(REPO_DIR / "_states")
    (roots / "qubes").symlink_to(REPO_DIR / "qubes-sysdns-formula" / "qubes")
    salt_dir = root / "salt"
    pillar_dir = salt_dir / "pillar"
    pillar_dir.mkdir(parents=True)
    (pillar_dir / "top.sls").write_text("base: {}\n", encoding="utf-8")
    opts = salt.config.minion_config(None)
    opts.update(
        {
            "id": "dom0",
            "file_client": "local",
            "file_roots": {"base": [str(roots)]},
            "pillar_roots": {"base": [str(pillar_dir)]},
            "cachedir": str(salt_dir / "cache"),
            "pki_dir": str(salt_dir / "pki"),
            "sock_dir": str(salt_dir / "sock"),
            "extension_modules": str(salt_dir / "extmods"),
        }
    )
    return opts


class StoreRun:
    """A lab run with only store.json and calls.log: the dom0 tools work, no qube boots."""

    def __init__(self, run_dir):
        self.layout = RunLayout(run_dir)

    def reset(self):
        """Write the default estate of a Qubes 4.2 install, every qube halted."""
        shutil.rmtree(self.layout.run_dir, ignore_errors=True)
        (self.layout.run_dir / "qubes").mkdir(parents=True)
        app = build_estate()
        runtime = Runtime(self.layout)
        for vm in app.domains():
            if vm.klass != "AdminVM":
                runtime.rw_dir(vm.name).mkdir(parents=True, exist_ok=True)
        Store(self.layout).create(app)

    def calls(self):
        try:
            lines = self.layout.calls_log.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line)["argv"] for line in lines if line.strip()]

    def write_calls(self):
        """Return the calls that could change a qube, its properties or its features."""
        found = []
        for argv in self.calls():
            positional = [arg for arg in argv[1:] if not arg.startswith("-")]
            if argv[0] in WRITE_TOOLS:
                found.append(argv)
            elif argv[0] == "qvm-prefs" and (len(positional) > 2 or "--default" in argv):
                found.append(argv)
            elif argv[0] == "qvm-features" and (len(positional) > 2 or "--unset" in argv):
                found.append(argv)
        return found

    def store(self):
        return Store(self.layout).read()


@pytest.fixture(scope="module")
def store_run(tmp_path_factory):
    run = StoreRun(tmp_path_factory.mktemp("lab") / "slloader")
    run.reset()
    return run


@pytest.fixture(scope="module")
def loaders(tmp_path_factory, store_run):
    """Salt's loaders with the lab's dom0 tools first on PATH, for the whole module."""
    root = tmp_path_factory.mktemp("minion")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(RUN_ENV, str(store_run.layout.run_dir))
        patch.setenv("PATH", "{}:{}".format(TOOLS_DIR, os.environ.get("PATH", "/usr/bin:/bin")))
        yield Loaders(minion_opts(root))
    # Salt buffers warnings in a temporary handler that writes them to the stream
    # pytest has closed by interpreter exit; hand them to pytest's handlers now.
    salt._logging.impl.shutdown_temp_handler()


@pytest.fixture
def lab(loaders, store_run):
    """A fresh default estate and empty loader caches (``__context__``) for each test."""
    store_run.reset()
    loaders.reset_state()
    return store_run


@pytest.fixture
def sysdns(loaders):
    return loaders.states.sysdns


def netvm_row(lab, name):
    """Return (is_default, value) of a qube's netvm as stored in store.json."""
    vm = lab.store().domain(name)
    value = vm.get("netvm")
    return vm.is_default("netvm"), value.name if value is not None else None


# __virtual__ and the names each module's callers use


def test_modules_loaded_with_dom0_tools(loaders):
    for function in (
        "sysdns_qvm.list_qubes",
        "sysdns_qvm.pref_is_default",
        "sysdns_qvm.reset_pref",
        "sysdns_config.validate",
        "sysdns_config.render_apt_sources",
        "sysdns.chain",
        "sysdns.measure",
    ):
        assert function in loaders.modules, loaders.modules.missing_fun_string(function)


def test_states_loaded_with_dom0_tools(loaders):
    for function in (
        "sysdns.template_present",
        "sysdns.template_configured",
        "sysdns.qube_present",
        "sysdns.running",
        "sysdns.config_applied",
        "sysdns.netvm",
        "sysdns.netvm_restored",
        "sysdns.absent",
        "sysdns_check.chain",
        "sysdns_check.summary",
    ):
        assert function in loaders.states, loaders.states.missing_fun_string(function)


def test_salt_keys_name_loaded_functions(loaders):
    # Every __salt__["module.function"] the custom code calls exists in the loader.
    called = set()
    for path in list((REPO_DIR / "_modules").glob("*.py")) + list((REPO_DIR / "_states").glob("*.py")):
        called.update(re.findall(r"__salt__\[\"([a-z_]+\.[a-z_]+)\"\]", path.read_text(encoding="utf-8")))
    assert called
    missing = sorted(name for name in called if name not in loaders.modules)
    assert missing == []


def test_virtual_rejects_without_dom0_tools(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    monkeypatch.delenv(RUN_ENV, raising=False)

    bare = Loaders(minion_opts(tmp_path))

    assert "sysdns_qvm.list_qubes" not in bare.modules
    assert "Qubes dom0 tools that are not on PATH: qvm-ls" in bare.modules.missing_fun_string("sysdns_qvm.list_qubes")
    # The modules and states that depend on sysdns_qvm drop out with it.
    assert "sysdns.chain" not in bare.modules
    assert "sysdns.netvm" not in bare.states
    assert "sysdns_check.chain" not in bare.states
    # The pure configuration module needs no dom0 tool.
    assert "sysdns_config.validate" in bare.modules


# Execution modules against the emulated tools


def test_qvm_reads_listing_and_defaults(loaders, lab):
    qvm = loaders.modules.sysdns_qvm

    assert qvm.get_qube("sys-firewall")["netvm"] == "sys-net"
    assert qvm.pref_is_default("personal", "netvm") is True
    assert qvm.pref_is_default("sys-firewall", "netvm") is False
    assert qvm.get_pref("sys-net", "memory") == 300


def test_qvm_context_caches_listing(loaders, lab):
    qvm = loaders.modules.sysdns_qvm

    qvm.list_qubes()
    qvm.get_qube("personal")
    qvm.features("personal")
    qvm.features("personal")

    assert [argv[0] for argv in lab.calls()] == ["qvm-ls", "qvm-features"]


def test_qvm_reset_pref_follows_default(loaders, lab):
    qvm = loaders.modules.sysdns_qvm
    qvm.set_pref("personal", "netvm", "sys-net")
    assert netvm_row(lab, "personal") == (False, "sys-net")

    qvm.reset_pref("personal", "netvm")

    assert netvm_row(lab, "personal") == (True, "sys-firewall")
    assert qvm.pref_is_default("personal", "netvm") is True


def test_config_validate_through_loader(loaders):
    config = loaders.modules.sysdns_config

    assert config.validate({})["rewire"] == ["sys-firewall"]
    with pytest.raises(Exception, match="sysdns:qube:memory"):
        config.validate({"qube": {"memory": "400"}})


# States through state.single, against the lab store


def test_template_present_branches(sysdns, lab):
    predicted = sysdns.template_present(name="tpl-sys-dns", source="debian-12-hard-min", test=True)
    assert predicted.result is None
    assert lab.write_calls() == []

    applied = sysdns.template_present(name="tpl-sys-dns", source="debian-12-hard-min")
    assert applied.result is True
    assert applied.changes == predicted.changes
    assert lab.write_calls() == [["qvm-clone", "debian-12-hard-min", "tpl-sys-dns"]]
    assert lab.store().domain("tpl-sys-dns").klass == "TemplateVM"

    again = sysdns.template_present(name="tpl-sys-dns", source="debian-12-hard-min")
    assert again.result is True
    assert again.changes == {}

    wrong = sysdns.template_present(name="personal", source="debian-12-hard-min")
    assert wrong.result is False
    assert "exists but its class is AppVM, not TemplateVM" in wrong.comment

    missing = sysdns.template_present(name="tpl-other", source="no-such-template")
    assert missing.result is False
    assert "template no-such-template to clone from not found" in missing.comment


def test_template_configured_test_mode_and_record(sysdns, loaders, lab):
    sysdns.template_present(name="tpl-sys-dns", source="debian-12-hard-min")
    files = {"/etc/sysdns/probe": {"content": "probe\n", "mode": "0644"}}
    calls_before = len(lab.write_calls())

    predicted = sysdns.template_configured(name="tpl-sys-dns", packages=["nftables"], files=files, test=True)

    assert predicted.result is None
    assert set(predicted.changes) == {"packages", "files", "links", "debian_backport"}
    assert len(lab.write_calls()) == calls_before
    # With the record of an earlier setup, nothing needs doing and no qube starts.
    record = {
        "packages": ["nftables"],
        "files": {
            "/etc/sysdns/probe": hashlib.sha256("0644\0probe\n".encode()).hexdigest(),
        },
        "links": {},
        "debian_backport": True,
    }
    loaders.modules.sysdns_qvm.set_json_feature("tpl-sys-dns", "sysdns.template", record)
    loaders.reset_state()
    done = sysdns.template_configured(name="tpl-sys-dns", packages=["nftables"], files=files)
    assert done.result is True
    assert done.changes == {}
    assert [argv for argv in lab.write_calls() if argv[0] == "qvm-run"] == []


def test_qube_present_creates_then_noop(sysdns, lab):
    prefs = {"netvm": "sys-net", "provides_network": True, "memory": 400}
    arguments = {
        "name": "sys-dns",
        "template": "debian-12-hard-min",
        "label": "orange",
        "prefs": prefs,
        "features": {"service.sysdns": "1"},
    }

    predicted = sysdns.qube_present(test=True, **arguments)
    assert predicted.result is None
    assert lab.write_calls() == []

    applied = sysdns.qube_present(**arguments)
    assert applied.result is True, applied.comment
    assert applied.changes == predicted.changes
    vm = lab.store().domain("sys-dns")
    assert vm.get("provides_network") is True
    assert vm.get("memory") == 400
    assert vm.features.get("service.sysdns") == "1"

    again = sysdns.qube_present(**arguments)
    assert again.changes == {}
    assert again.result is True


def test_qube_present_rejects_other_class(sysdns, lab):
    ret = sysdns.qube_present(name="debian-12-xfce", template="debian-12-xfce", label="orange")

    assert ret.result is False
    assert "has class TemplateVM but the state requests class AppVM" in ret.comment
    assert lab.write_calls() == []


def test_running_test_mode_and_missing(sysdns, lab):
    predicted = sysdns.running(name="sys-net", test=True)
    assert predicted.result is None
    assert predicted.changes == {"state": {"old": "Halted", "new": "Running"}}

    missing = sysdns.running(name="no-such-qube")
    assert missing.result is False
    assert "qube no-such-qube not found" in missing.comment
    assert lab.write_calls() == []


def test_config_applied_halted_uses_record(sysdns, loaders, lab):
    files = {"dnscrypt-proxy.toml": "listen_addresses = []\n"}
    sysdns.qube_present(name="sys-dns", template="debian-12-hard-min", label="orange")
    digest = hashlib.sha256(files["dnscrypt-proxy.toml"].encode()).hexdigest()
    loaders.modules.sysdns_qvm.set_json_feature("sys-dns", "sysdns.config", {"dnscrypt-proxy.toml": digest})
    loaders.reset_state()
    calls_before = len(lab.write_calls())

    current = sysdns.config_applied(name="sys-dns", files=files)
    changed = sysdns.config_applied(name="sys-dns", files={"dnscrypt-proxy.toml": "x\n"}, test=True)

    assert current.result is True
    assert current.changes == {}
    assert changed.result is None
    assert changed.changes["files"]["dnscrypt-proxy.toml"]["old"] == digest
    assert len(lab.write_calls()) == calls_before


def test_netvm_records_default_and_restores(sysdns, lab):
    sysdns.qube_present(
        name="sys-dns",
        template="debian-12-hard-min",
        label="orange",
        prefs={"netvm": "sys-net", "provides_network": True},
    )

    wired = sysdns.netvm(name="personal", netvm="sys-dns")
    assert wired.result is True, wired.comment
    assert wired.changes["features"] == {PREVIOUS: {"old": None, "new": "default"}}
    assert netvm_row(lab, "personal") == (False, "sys-dns")

    predicted = sysdns.netvm_restored(name="sys-dns", qubes=["personal"], test=True)
    assert predicted.result is None
    assert netvm_row(lab, "personal") == (False, "sys-dns")

    restored = sysdns.netvm_restored(name="sys-dns", qubes=["personal"])
    assert restored.result is True, restored.comment
    assert restored.changes == predicted.changes
    assert netvm_row(lab, "personal") == (True, "sys-firewall")
    assert ["qvm-prefs", "--default", "personal", "netvm"] in lab.write_calls()
    assert PREVIOUS not in lab.store().domain("personal").features

    again = sysdns.netvm_restored(name="sys-dns", qubes=["personal"])
    assert again.changes == {}


def test_netvm_explicit_restored_explicitly(sysdns, lab):
    sysdns.qube_present(
        name="sys-dns",
        template="debian-12-hard-min",
        label="orange",
        prefs={"netvm": "sys-net", "provides_network": True},
    )
    sysdns.netvm(name="sys-firewall", netvm="sys-dns")

    sysdns.netvm_restored(name="sys-dns", qubes=["sys-firewall"])

    assert netvm_row(lab, "sys-firewall") == (False, "sys-net")
    assert ["qvm-prefs", "sys-firewall", "netvm", "sys-net"] in lab.write_calls()


def test_netvm_refuses_whonix(sysdns, lab):
    ret = sysdns.netvm(name="sys-whonix", netvm="sys-dns")

    assert ret.result is False
    assert "Whonix keeps its Tor chain" in ret.comment
    assert lab.write_calls() == []


def test_absent_branches(sysdns, lab):
    sysdns.qube_present(
        name="sys-dns",
        template="debian-12-hard-min",
        label="orange",
        prefs={"netvm": "sys-net", "provides_network": True},
        features={"service.sysdns": "1"},
    )
    sysdns.netvm(name="sys-firewall", netvm="sys-dns")

    kept = sysdns.absent(name="personal", marker="service.sysdns")
    assert kept.result is True
    assert "lacks the feature service.sysdns" in kept.comment

    in_use = sysdns.absent(name="sys-dns", marker="service.sysdns")
    assert in_use.result is False
    assert "netvm of sys-firewall" in in_use.comment

    # A test run counts on netvm_restored to rewire the qubes it recorded.
    predicted = sysdns.absent(name="sys-dns", marker="service.sysdns", test=True)
    assert predicted.result is None

    sysdns.netvm_restored(name="sys-dns", qubes=["sys-firewall"])
    removed = sysdns.absent(name="sys-dns", marker="service.sysdns")
    assert removed.result is True, removed.comment
    assert removed.changes == predicted.changes
    assert ["qvm-remove", "--force", "sys-dns"] in lab.write_calls()
    assert "sys-dns" not in lab.store()


CHECK_SLS = """
chain checked:
  sysdns_check.chain:
    - name: sys-dns
    - netvm: sys-net
    - rewired: [sys-firewall]

summary reported:
  sysdns_check.summary:
    - name: sys-dns
"""


def test_check_chain_and_summary(loaders, sysdns, lab):
    # The summary reads the results that the checks of the same run left in
    # __context__, so both run in one state run, as in the tests SLS.
    broken = {result.id: result for result in loaders.modules.state.template_str(CHECK_SLS)}
    assert broken["chain checked"].result is False
    assert "qube sys-dns not found" in broken["chain checked"].comment
    assert broken["summary reported"].result is False
    assert "0 of 1 checks passed" in broken["summary reported"].comment

    sysdns.qube_present(
        name="sys-dns",
        template="debian-12-hard-min",
        label="orange",
        prefs={"netvm": "sys-net", "provides_network": True},
    )
    sysdns.netvm(name="sys-firewall", netvm="sys-dns")
    wired = {result.id: result for result in loaders.modules.state.template_str(CHECK_SLS)}
    assert wired["chain checked"].result is True, wired["chain checked"].comment
    assert wired["summary reported"].result is True
    assert "1 of 1 checks passed" in wired["summary reported"].comment


def test_check_summary_alone_fails(loaders, lab):
    ret = loaders.states.sysdns_check.summary(name="sys-dns")

    assert ret.result is False
    assert "no check ran before the summary" in ret.comment


def test_build_sls_test_mode_changes_nothing(loaders, lab):
    # The whole build SLS, as `qubesctl state.sls qubes.network.sys-dns test=True`.
    results = loaders.modules.state.sls("qubes.network.sys-dns", test=True)

    assert not results.failed, results.raw
    assert lab.write_calls() == []
    states = {result.id: result for result in results}
    assert states["qubes.network.sys-dns - template tpl-sys-dns present"].result is None
    assert all(result.result in (True, None) for result in results)


def test_build_sls_preflight_stops_run(loaders, lab):
    # The pillar is valid in form but wrong for this estate in each of the three
    # ways the preflight state checks. failhard stops a real run after it, and
    # under test=True, where Salt ignores failhard, every other state fails on its
    # requisite without running.
    address = loaders.modules.sysdns_qvm.get_qube("default-dvm")["ip"]
    loaders.reset_state()
    pillar = {
        "sysdns": {
            "qube": {"name": "default-dvm", "class": "DispVM"},
            "rewire": ["sys-firewall", "nosuchqube"],
            "dnscrypt": {"forwarding_rules": [{"zone": "corp.example", "servers": [address]}]},
        }
    }

    for test in (True, False):
        results = loaders.modules.state.sls("qubes.network.sys-dns", test=test, pillar=pillar)

        states = {result.id: result for result in results}
        preflight = states.pop("qubes.network.sys-dns - pillar fits the qubes of this machine")
        comment = preflight.comment
        assert preflight.result is False
        if test:
            assert states, "the test run reported no other state"
            assert all(state.comment.startswith("One or more requisite failed") for state in states.values()), states
            assert all(state.result is False and not state.changes for state in states.values()), states
        else:
            assert states == {}
        assert "sysdns:rewire:1: qube nosuchqube not found" in comment
        assert "sysdns:qube:name: qube default-dvm exists as an AppVM but the build needs a DispVM" in comment
        assert (
            "sysdns:dnscrypt:forwarding_rules:0:servers:0: {}:53 is the address of default-dvm".format(address)
            in comment
        )
        assert lab.write_calls() == []
    qvm_ls_calls = [argv for argv in lab.calls() if argv[0] == "qvm-ls"]
    assert len(qvm_ls_calls) == 3, qvm_ls_calls


def test_build_sls_preflight_passes_good_pillar(loaders, lab):
    results = loaders.modules.state.sls("qubes.network.sys-dns", test=True)

    states = {result.id: result for result in results}
    preflight = states["qubes.network.sys-dns - pillar fits the qubes of this machine"]
    assert preflight.result is True, preflight.comment
    assert len(states) > 1
    # The preflight's qvm-ls listing is the one the later states read.
    assert len([argv for argv in lab.calls() if argv[0] == "qvm-ls"]) == 1
