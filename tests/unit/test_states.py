"""Branch tests of the sysdns states against an in-memory Qubes."""

import pytest

from tests.unit.sysdns_fakes import FakeQubes, load_salt_module, qube, unpack_files

BASE_QUBES = [
    qube("dom0", "AdminVM", "Running"),
    qube("debian-12-minimal", "TemplateVM"),
    qube("sys-net", "AppVM", "Running", provides_network=True),
    qube(
        "sys-firewall",
        "AppVM",
        "Running",
        netvm="sys-net",
        provides_network=True,
        template="debian-12-minimal",
        label="green",
    ),
    qube("personal", "AppVM", "Running", netvm="sys-firewall", template="debian-12-minimal"),
    qube("whonix-gateway-17", "TemplateVM"),
    qube("sys-whonix", "AppVM", "Running", netvm="sys-firewall", template="whonix-gateway-17", provides_network=True),
]

# personal follows the global default_netvm (sys-firewall), as on a fresh Qubes install.
BASE_DEFAULTS = {"personal": {"netvm"}}

PACKAGES = ["dnscrypt-proxy", "nftables"]
FILES = {"/etc/systemd/system/dnscrypt-proxy.service": {"content": "[Unit]\n", "mode": "0644"}}
LINKS = {"/etc/systemd/system/dnscrypt-proxy.socket": "/dev/null"}
BACKPORT = True
CONFIG = {"dnscrypt-proxy.toml": "listen_addresses = []\n", "sysdns.nft": "table inet sysdns\n"}


@pytest.fixture
def fake():
    return FakeQubes(BASE_QUBES, defaults=BASE_DEFAULTS)


def states(fake, test=False):
    return load_salt_module(
        "_states/sysdns.py",
        __salt__=fake.salt_functions(),
        __opts__={"test": test},
        __context__={},
    )


def build_sequence(module):
    """Apply the builder's states in SLS order and return their results."""
    return [
        module.template_present("tpl-sys-dns", "debian-12-minimal"),
        module.template_configured("tpl-sys-dns", PACKAGES, FILES, LINKS, BACKPORT),
        module.qube_present(
            "sys-dns",
            "tpl-sys-dns",
            "orange",
            prefs={"netvm": "sys-net", "provides_network": True, "autostart": True},
            features={"service.sysdns": "1"},
        ),
        module.running("sys-dns"),
        module.config_applied("sys-dns", CONFIG),
        module.netvm("sys-firewall", "sys-dns"),
    ]


def test_template_present_clones_missing(fake):
    ret = states(fake).template_present("tpl-sys-dns", "debian-12-minimal")
    assert ret["result"] is True
    assert ret["changes"] == {"template": {"old": None, "new": "clone of debian-12-minimal"}}
    assert ("clone", "debian-12-minimal", "tpl-sys-dns") in fake.changes


def test_template_present_existing_is_noop(fake):
    ret = states(fake).template_present("debian-12-minimal", "debian-12-minimal", clone=False)
    assert ret["result"] is True
    assert ret["changes"] == {}
    assert fake.changes == []


def test_template_present_rejects_appvm_name(fake):
    ret = states(fake).template_present("personal", "debian-12-minimal")
    assert ret["result"] is False
    assert "exists but its class is AppVM, not TemplateVM" in ret["comment"]
    assert fake.changes == []


def test_template_present_missing_source(fake):
    ret = states(fake).template_present("tpl-sys-dns", "debian-13-minimal")
    assert ret["result"] is False
    assert "qvm-template install debian-13-minimal" in ret["comment"]


def test_template_present_test_mode(fake):
    ret = states(fake, test=True).template_present("tpl-sys-dns", "debian-12-minimal")
    assert ret["result"] is None
    assert "would have been cloned" in ret["comment"]
    assert fake.changes == []


def test_template_configured_installs_and_records(fake):
    module = states(fake)
    module.template_present("tpl-sys-dns", "debian-12-minimal")
    ret = module.template_configured("tpl-sys-dns", PACKAGES, FILES, LINKS, BACKPORT)
    assert ret["result"] is True, ret["comment"]
    assert ret["changes"]["packages"] == {"old": None, "new": PACKAGES}
    assert fake.qubes["tpl-sys-dns"]["state"] == "Halted"
    assert "sysdns.template" in fake.features_of["tpl-sys-dns"]


def test_template_configured_pins_trixie_on_debian_12(fake):
    module = states(fake)
    module.template_present("tpl-sys-dns", "debian-12-minimal")
    module.template_configured("tpl-sys-dns", PACKAGES, FILES, LINKS, BACKPORT)
    archive = [stdin for name, command, stdin in fake.runs if command.endswith("setup-template")][0]
    files = unpack_files(archive)
    assert "deb http://deb.debian.org/debian trixie main" in files["etc/apt/sources.list.d/sysdns-trixie.list"]
    assert "Pin-Priority: -10" in files["etc/apt/preferences.d/sysdns-dnscrypt-proxy"]
    assert files["etc/sysdns/packages"] == "dnscrypt-proxy\nnftables\n"


def test_template_configured_no_pin_on_debian_13(fake):
    fake.os_release = 'ID=debian\nVERSION_ID="13"\nVERSION_CODENAME=trixie\n'
    fake.sources = "deb http://deb.debian.org/debian trixie main\n"
    module = states(fake)
    module.template_present("tpl-sys-dns", "debian-12-minimal")
    module.template_configured("tpl-sys-dns", PACKAGES, FILES, LINKS, BACKPORT)
    archive = [stdin for name, command, stdin in fake.runs if command.endswith("setup-template")][0]
    assert not any("sysdns-trixie" in path for path in unpack_files(archive))


def test_template_configured_without_mirror_fails(fake):
    fake.sources = "# no sources\n"
    module = states(fake)
    module.template_present("tpl-sys-dns", "debian-12-minimal")
    ret = module.template_configured("tpl-sys-dns", PACKAGES, FILES, LINKS, BACKPORT)
    assert ret["result"] is False
    assert "no 'deb' line for bookworm" in ret["comment"]
    assert "sysdns.template" not in fake.features_of.get("tpl-sys-dns", {})


def test_template_configured_second_run_starts_nothing(fake):
    module = states(fake)
    module.template_present("tpl-sys-dns", "debian-12-minimal")
    module.template_configured("tpl-sys-dns", PACKAGES, FILES, LINKS, BACKPORT)
    fake.changes.clear()
    fake.runs.clear()
    ret = states(fake).template_configured("tpl-sys-dns", PACKAGES, FILES, LINKS, BACKPORT)
    assert ret["result"] is True
    assert ret["changes"] == {}
    assert fake.changes == []
    assert fake.runs == []


def test_template_configured_reports_changed_file(fake):
    module = states(fake)
    module.template_present("tpl-sys-dns", "debian-12-minimal")
    module.template_configured("tpl-sys-dns", PACKAGES, FILES, LINKS, BACKPORT)
    changed = {"/etc/systemd/system/dnscrypt-proxy.service": {"content": "[Unit]\nX=1\n", "mode": "0644"}}
    ret = states(fake, test=True).template_configured("tpl-sys-dns", PACKAGES, changed, LINKS, BACKPORT)
    assert ret["result"] is None
    assert list(ret["changes"]) == ["files"]
    assert ret["changes"]["files"]["/etc/systemd/system/dnscrypt-proxy.service"]["old"] is not None


def test_qube_present_rejects_other_class(fake):
    ret = states(fake).qube_present("sys-firewall", "debian-12-minimal", "green", klass="DispVM")
    assert ret["result"] is False
    assert "cannot change a qube's class" in ret["comment"]
    assert fake.changes == []


def test_qube_present_class_message_grammar(fake):
    ret = states(fake).qube_present("sys-firewall", "debian-12-minimal", "green", klass="DispVM")

    assert "qube sys-firewall has class AppVM but the state requests class DispVM" in ret["comment"]
    assert "a AppVM" not in ret["comment"]


SYS_DNS = qube(
    "sys-dns",
    "AppVM",
    "Running",
    netvm="sys-net",
    provides_network=True,
    ip="10.137.0.16",
    visible_ip="10.137.0.16",
    ip6="fd09:24ef:4179::a89:10",
)


def rule(*servers, zone="corp.example"):
    return {"zone": zone, "servers": list(servers)}


@pytest.fixture
def built():
    return FakeQubes(BASE_QUBES + [SYS_DNS], defaults=BASE_DEFAULTS)


@pytest.mark.parametrize("test", [False, True])
def test_preflight_passes_good_pillar(built, test):
    ret = states(built, test=test).preflight(
        "sys-dns",
        "AppVM",
        rewire=["sys-firewall"],
        forwarding_rules=[rule("10.139.1.1:53", "10.139.1.2:53", "[2001:db8::53]:53")],
    )

    assert ret["result"] is True, ret["comment"]
    assert ret["changes"] == {}
    assert built.changes == []


@pytest.mark.parametrize("test", [False, True])
def test_preflight_rejects_missing_rewire_qube(fake, test):
    ret = states(fake, test=test).preflight("sys-dns", "AppVM", rewire=["sys-firewall", "nosuchqube"])

    assert ret["result"] is False
    assert "sysdns:rewire:1: qube nosuchqube not found: create it, or remove it from sysdns:rewire" in ret["comment"]
    assert "sys-firewall" not in ret["comment"]
    assert fake.changes == []


@pytest.mark.parametrize("test", [False, True])
def test_preflight_rejects_other_class(built, test):
    ret = states(built, test=test).preflight("sys-dns", "DispVM", disposable_template="sys-dns-dvm")

    assert ret["result"] is False
    assert "sysdns:qube:name: qube sys-dns exists as an AppVM but the build needs a DispVM" in ret["comment"]
    assert "sysdns:rollback:remove_qubes: true" in ret["comment"]
    assert "a AppVM" not in ret["comment"]
    assert built.changes == []


def test_preflight_rejects_disposable_template_class(fake):
    ret = states(fake).preflight("sys-dns", "DispVM", disposable_template="debian-12-minimal")

    assert ret["result"] is False
    assert (
        "sysdns:qube:disposable_template: qube debian-12-minimal exists as a TemplateVM but the build needs an AppVM"
        in ret["comment"]
    )


def test_preflight_accepts_missing_sys_dns(fake):
    # A first build: no class to compare and no address of sys-dns to forward to.
    ret = states(fake).preflight("sys-dns", "DispVM", forwarding_rules=[rule("10.137.0.16:53")])

    assert ret["result"] is True, ret["comment"]


@pytest.mark.parametrize(
    ("server", "field"),
    [
        ("10.137.0.16:53", "ip 10.137.0.16"),
        ("10.137.0.16:5353", "ip 10.137.0.16"),
        ("[fd09:24ef:4179::a89:10]:53", "ip6 fd09:24ef:4179::a89:10"),
    ],
)
def test_preflight_rejects_forwarding_to_itself(built, server, field):
    ret = states(built).preflight(
        "sys-dns", "AppVM", forwarding_rules=[rule("192.0.2.53:53"), rule("192.0.2.54:53", server, zone="lab.example")]
    )

    assert ret["result"] is False
    assert (
        f"sysdns:dnscrypt:forwarding_rules:1:servers:1: {server} is the address of sys-dns itself (its {field})"
        in ret["comment"]
    )
    assert "use the address of another DNS server" in ret["comment"]
    assert "forwarding_rules:0" not in ret["comment"]


def test_preflight_rejects_visible_ip(fake):
    fake.qubes["sys-dns"] = dict(SYS_DNS, ip="10.137.0.16", visible_ip="10.137.0.99")

    ret = states(fake).preflight("sys-dns", "AppVM", forwarding_rules=[rule("10.137.0.99:53")])

    assert ret["result"] is False
    assert "(its visible_ip 10.137.0.99)" in ret["comment"]


def test_preflight_reports_every_problem(built):
    ret = states(built).preflight("sys-dns", "DispVM", rewire=["nosuchqube"], forwarding_rules=[rule("10.137.0.16:53")])

    assert ret["comment"].count("\nsysdns:") == 3, ret["comment"]


def test_qube_present_updates_prefs_and_features(fake):
    ret = states(fake).qube_present(
        "sys-firewall",
        "debian-12-minimal",
        "green",
        prefs={"autostart": True},
        features={"service.sysdns": "1"},
    )
    assert ret["result"] is True
    assert ret["changes"]["prefs"] == {"autostart": {"old": None, "new": True}}
    # An existing qube without service.sysdns is adopted, and the record names its template.
    assert ret["changes"]["features"] == {
        "service.sysdns": {"old": None, "new": "1"},
        "sysdns.adopted": {"old": None, "new": "debian-12-minimal"},
    }


def test_qube_present_restarts_for_new_template(fake):
    ret = states(fake).qube_present("sys-firewall", "debian-12-xfce", "green")
    assert ret["result"] is True
    assert ret["changes"]["state"] == {"old": "Running", "new": "restarted on the new template"}
    shutdown = fake.changes.index(("shutdown", "sys-firewall"))
    set_template = fake.changes.index(("set_pref", "sys-firewall", "template", "debian-12-xfce"))
    start = fake.changes.index(("start", "sys-firewall"))
    assert shutdown < set_template < start
    assert fake.qubes["sys-firewall"]["template"] == "debian-12-xfce"
    assert fake.qubes["sys-firewall"]["state"] == "Running"


def test_qube_present_predicts_restart_for_new_template(fake):
    ret = states(fake, test=True).qube_present("sys-firewall", "debian-12-xfce", "green")
    assert ret["result"] is None
    assert ret["changes"]["state"] == {"old": "Running", "new": "restarted on the new template"}
    assert fake.changes == []


def test_qube_present_halted_template_change_starts_nothing(fake):
    fake.qubes["sys-firewall"]["state"] = "Halted"
    for record in fake.qubes.values():
        if record.get("netvm") == "sys-firewall":
            record["state"] = "Halted"
    ret = states(fake).qube_present("sys-firewall", "debian-12-xfce", "green")
    assert ret["result"] is True
    assert "state" not in ret["changes"]
    assert ("start", "sys-firewall") not in fake.changes


def test_running_starts_halted(fake):
    fake.qubes["sys-net"]["state"] = "Halted"
    ret = states(fake).running("sys-net")
    assert ret["changes"] == {"state": {"old": "Halted", "new": "Running"}}
    assert ("start", "sys-net") in fake.changes


def test_mod_watch_restarts_running(fake):
    ret = states(fake).mod_watch("sys-net", sfun="running")
    assert ret["result"] is True
    assert ("restart", "sys-net") in fake.changes


def test_mod_watch_test_mode(fake):
    ret = states(fake, test=True).mod_watch("sys-net", sfun="running")
    assert ret["result"] is None
    assert fake.changes == []


def test_mod_watch_skips_qube_restarted_on_template(fake):
    module = states(fake)
    module.qube_present("sys-firewall", "debian-12-xfce", "green")
    fake.changes.clear()

    ret = module.mod_watch("sys-firewall", sfun="running")

    assert ret["result"] is True
    assert ret["changes"] == {}
    assert "restarted on its new template" in ret["comment"]
    assert fake.changes == []


def test_mod_watch_test_mode_predicts_one_restart(fake):
    module = states(fake, test=True)
    module.qube_present("sys-firewall", "debian-12-xfce", "green")

    ret = module.mod_watch("sys-firewall", sfun="running")

    assert ret["result"] is True
    assert ret["changes"] == {}
    assert fake.changes == []


def test_config_applied_restores_hand_edit(fake):
    for ret in build_sequence(states(fake)):
        assert ret["result"] is True, ret["comment"]
    fake.config_files["sys-dns"]["dnscrypt-proxy.toml"] = "edited by hand\n"
    fake.changes.clear()
    ret = states(fake).config_applied("sys-dns", CONFIG)
    assert list(ret["changes"]) == ["files"]
    assert list(ret["changes"]["files"]) == ["dnscrypt-proxy.toml"]
    assert ("install-config", "sys-dns") in fake.changes


def test_config_applied_restarts_stopped_service(fake):
    build_sequence(states(fake))
    fake.service_state["sys-dns"] = ("failed", "loaded", "present")
    ret = states(fake).config_applied("sys-dns", CONFIG)
    assert ret["changes"] == {"service": {"old": "failed", "new": "active"}}


def test_config_applied_halted_uses_record(fake):
    build_sequence(states(fake))
    fake.qubes["sys-dns"]["state"] = "Halted"
    fake.changes.clear()
    fake.runs.clear()
    ret = states(fake).config_applied("sys-dns", CONFIG)
    assert ret["changes"] == {}
    assert fake.runs == []


def test_config_applied_halted_comment_under_test(fake):
    build_sequence(states(fake))
    fake.qubes["sys-dns"]["state"] = "Halted"
    fake.runs.clear()
    ret = states(fake, test=True).config_applied("sys-dns", CONFIG)
    assert ret["result"] is True
    assert ret["changes"] == {}
    assert fake.runs == []
    assert ret["comment"] == (
        "Configuration recorded in feature sysdns.config of sys-dns matches the pillar; sys-dns is halted, "
        "so whether dnscrypt-proxy runs is unknown until it starts"
    )
    assert "dnscrypt-proxy runs" not in ret["comment"].replace("whether dnscrypt-proxy runs", "")


def test_config_applied_running_comment_unchanged(fake):
    build_sequence(states(fake))
    ret = states(fake, test=True).config_applied("sys-dns", CONFIG)
    assert ret["comment"] == "Configuration of sys-dns is up to date and dnscrypt-proxy runs"


def test_config_applied_failure_keeps_record(fake):
    build_sequence(states(fake))
    fake.fail_commands["/usr/lib/sysdns/install-config"] = "dnscrypt-proxy rejected the new configuration"
    record = fake.features_of["sys-dns"]["sysdns.config"]
    ret = states(fake).config_applied("sys-dns", dict(CONFIG, **{"dnscrypt-proxy.toml": "bad\n"}))
    assert ret["result"] is False
    assert "rejected" in ret["comment"]
    assert fake.features_of["sys-dns"]["sysdns.config"] == record


def test_netvm_refuses_whonix(fake):
    ret = states(fake).netvm("sys-whonix", "sys-dns")
    assert ret["result"] is False
    assert "Whonix keeps its Tor chain" in ret["comment"]
    assert fake.changes == []


def test_netvm_records_previous_once(fake):
    fake.qubes["sys-dns"] = qube("sys-dns", state="Running", netvm="sys-net")
    ret = states(fake).netvm("sys-firewall", "sys-dns")
    assert ret["changes"]["netvm"] == {"old": "sys-net", "new": "sys-dns"}
    assert fake.features_of["sys-firewall"]["sysdns.previous-netvm"] == "sys-net"
    states(fake).netvm("sys-firewall", "sys-net")
    ret = states(fake).netvm("sys-firewall", "sys-dns")
    assert "features" not in ret["changes"]
    assert fake.features_of["sys-firewall"]["sysdns.previous-netvm"] == "sys-net"


def test_netvm_records_default_netvm(fake):
    fake.qubes["sys-dns"] = qube("sys-dns", state="Running", netvm="sys-net", provides_network=True)

    ret = states(fake).netvm("personal", "sys-dns")

    assert ret["changes"]["features"] == {"sysdns.previous-netvm": {"old": None, "new": "default"}}
    assert fake.features_of["personal"]["sysdns.previous-netvm"] == "default"
    assert fake.qubes["personal"]["netvm"] == "sys-dns"
    assert not fake.pref_is_default("personal", "netvm")


def test_netvm_records_default_test_mode(fake):
    fake.qubes["sys-dns"] = qube("sys-dns", state="Running", netvm="sys-net", provides_network=True)

    predicted = states(fake, test=True).netvm("personal", "sys-dns")

    assert predicted["result"] is None
    assert fake.changes == []
    assert states(fake).netvm("personal", "sys-dns")["changes"] == predicted["changes"]


def test_netvm_missing_qube(fake):
    ret = states(fake).netvm("work", "sys-dns")
    assert ret["result"] is False
    assert "qube work not found" in ret["comment"]


def test_test_mode_predicts_real_changes(fake):
    predicted = build_sequence(states(fake, test=True))
    assert fake.changes == []
    applied = build_sequence(states(fake))
    for test_ret, real_ret in zip(predicted, applied, strict=True):
        assert real_ret["result"] is True, real_ret["comment"]
        assert test_ret["result"] is None, test_ret["name"]
        assert test_ret["changes"] == real_ret["changes"], test_ret["name"]


def test_second_build_reports_no_changes(fake):
    build_sequence(states(fake))
    fake.changes.clear()
    for ret in build_sequence(states(fake)):
        assert ret["result"] is True, ret["comment"]
        assert ret["changes"] == {}, ret["name"]
    assert fake.changes == []


def test_qube_present_sets_none_netvm_on_create(fake):
    ret = states(fake).qube_present(
        "sys-dns-dvm", "debian-12-minimal", "orange", prefs={"template_for_dispvms": True, "netvm": None}
    )
    assert ret["result"] is True
    assert ret["changes"]["qube"]["new"]["prefs"] == {"template_for_dispvms": True, "netvm": None}
    assert "prefs" not in ret["changes"]
    assert ("set_pref", "sys-dns-dvm", "netvm", None) in fake.changes
    again = states(fake).qube_present(
        "sys-dns-dvm", "debian-12-minimal", "orange", prefs={"template_for_dispvms": True, "netvm": None}
    )
    assert again["changes"] == {}


def test_qube_present_reads_memory_with_qvm_prefs(fake):
    fake.qubes["sys-firewall"]["memory"] = 300
    ret = states(fake).qube_present("sys-firewall", "debian-12-minimal", "green", prefs={"memory": 400})
    assert ret["changes"]["prefs"] == {"memory": {"old": 300, "new": 400}}
    assert fake.qubes["sys-firewall"]["memory"] == 400


def dispvm_sequence(module, config=CONFIG):
    return [
        module.qube_present("sys-dns-dvm", "debian-12-minimal", "orange", prefs={"template_for_dispvms": True}),
        module.config_applied("sys-dns-dvm", config, restart_qube="sys-dns"),
        module.qube_present("sys-dns", "sys-dns-dvm", "orange", klass="DispVM", prefs={"netvm": "sys-net"}),
        module.running("sys-dns"),
    ]


def test_dispvm_config_change_restarts_disposable(fake):
    for ret in dispvm_sequence(states(fake)):
        assert ret["result"] is True, ret["comment"]
    # The disposable starts from the stored files, as Qubes gives it the private volume.
    fake.config_files["sys-dns"] = dict(CONFIG)
    fake.service_state["sys-dns"] = ("active", "loaded", "present")
    fake.changes.clear()
    for ret in dispvm_sequence(states(fake)):
        assert ret["changes"] == {}, ret["name"]

    changed = dict(CONFIG, **{"dnscrypt-proxy.toml": "listen_addresses = ['[::]:53']\n"})
    predicted = states(fake, test=True).config_applied("sys-dns-dvm", changed, restart_qube="sys-dns")
    assert predicted["result"] is None
    assert list(predicted["changes"]["files"]) == ["dnscrypt-proxy.toml"]
    assert fake.changes == []
    ret = states(fake).config_applied("sys-dns-dvm", changed, restart_qube="sys-dns")
    assert ret["changes"] == predicted["changes"]
    assert ("restart", "sys-dns") in fake.changes
    assert ("shutdown", "sys-dns-dvm") in fake.changes


def test_dispvm_restart_failure_keeps_change_pending(fake):
    dispvm_sequence(states(fake))
    fake.config_files["sys-dns"] = dict(CONFIG)
    fake.service_state["sys-dns"] = ("active", "loaded", "present")
    changed = dict(CONFIG, **{"sysdns.nft": "table inet sysdns {}\n"})

    def refuse(name, timeout=120):
        from salt.exceptions import CommandExecutionError

        raise CommandExecutionError("command qvm-shutdown failed with exit code 1: Failed to shut down")

    module = states(fake)
    module.__salt__["sysdns_qvm.restart"] = refuse
    ret = module.config_applied("sys-dns-dvm", changed, restart_qube="sys-dns")
    assert ret["result"] is False
    # The running disposable still has the old files, so the next run sees the change.
    again = states(fake, test=True).config_applied("sys-dns-dvm", changed, restart_qube="sys-dns")
    assert list(again["changes"]["files"]) == ["sysdns.nft"]


def test_template_configured_needs_completion_line(fake):
    fake.setup_output = "Unpacking dnscrypt-proxy (2.1.8+ds1-1+b4) ...\n"
    module = states(fake)
    module.template_present("tpl-sys-dns", "debian-12-minimal")
    ret = module.template_configured("tpl-sys-dns", PACKAGES, FILES, LINKS, BACKPORT)
    assert ret["result"] is False
    assert "did not finish" in ret["comment"]
    assert "sysdns.template" not in fake.features_of.get("tpl-sys-dns", {})


def test_config_applied_restores_missing_guard(fake):
    build_sequence(states(fake))
    fake.guard_state["sys-dns"] = "missing"
    ret = states(fake).config_applied("sys-dns", CONFIG)
    assert ret["changes"] == {"guard": {"old": "missing", "new": "loaded"}}
    assert fake.guard_state["sys-dns"] == "loaded"


def test_config_applied_names_restored_file(fake):
    build_sequence(states(fake))
    fake.config_files["sys-dns"]["dnscrypt-proxy.toml"] = "edited by hand\n"

    predicted = states(fake, test=True).config_applied("sys-dns", CONFIG)
    ret = states(fake).config_applied("sys-dns", CONFIG)

    suffix = "; restored after changes inside the qube: dnscrypt-proxy.toml"
    assert predicted["comment"] == "Configuration of sys-dns would have been applied" + suffix
    assert ret["comment"] == "Configuration of sys-dns has been applied" + suffix
    assert ret["changes"] == predicted["changes"]


def test_config_applied_pillar_change_is_no_restore(fake):
    build_sequence(states(fake))

    ret = states(fake).config_applied("sys-dns", dict(CONFIG, **{"dnscrypt-proxy.toml": "new\n"}))

    assert ret["comment"] == "Configuration of sys-dns has been applied"
    assert list(ret["changes"]["files"]) == ["dnscrypt-proxy.toml"]


def test_config_applied_reloads_modified_ruleset(fake):
    build_sequence(states(fake))
    fake.ruleset_state["sys-dns"] = "modified"
    fake.changes.clear()

    predicted = states(fake, test=True).config_applied("sys-dns", CONFIG)
    assert fake.changes == []
    ret = states(fake).config_applied("sys-dns", CONFIG)

    assert ret["changes"] == {"ruleset": {"old": "modified", "new": "as-loaded"}}
    assert predicted["changes"] == ret["changes"]
    assert ret["comment"].endswith("restored after changes inside the qube: rules of table inet sysdns (modified)")
    assert ("install-config", "sys-dns") in fake.changes
    assert states(fake).config_applied("sys-dns", CONFIG)["changes"] == {}


def test_config_applied_missing_table_is_no_ruleset_change(fake):
    build_sequence(states(fake))
    fake.service_state["sys-dns"] = ("active", "missing", "present")

    ret = states(fake, test=True).config_applied("sys-dns", CONFIG)

    assert ret["changes"] == {"firewall": {"old": "missing", "new": "loaded"}}
    assert ret["comment"] == "Configuration of sys-dns would have been applied"


def test_config_applied_reloads_modified_guard(fake):
    build_sequence(states(fake))
    fake.guard_ruleset_state["sys-dns"] = "modified"

    ret = states(fake).config_applied("sys-dns", CONFIG)

    assert ret["changes"] == {"guard-ruleset": {"old": "modified", "new": "as-loaded"}}
    assert ret["comment"].endswith("rules of table inet sysdns_guard (modified)")
    assert states(fake).config_applied("sys-dns", CONFIG)["changes"] == {}


def test_config_applied_restores_accept_rules(fake):
    build_sequence(states(fake))
    fake.service_state["sys-dns"] = ("active", "loaded", "incomplete")

    ret = states(fake).config_applied("sys-dns", CONFIG)

    assert ret["changes"] == {"input-accept": {"old": "incomplete", "new": "present"}}
    assert ret["comment"].endswith("restored after changes inside the qube: accept rules in custom-input (incomplete)")
