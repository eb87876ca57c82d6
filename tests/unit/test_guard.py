"""The fixed fail-closed table of sys-dns, loaded from the template at every boot."""

import subprocess

from tests.unit.sysdns_fakes import config_module


def test_guard_ruleset_loads_in_nft(tmp_path):
    # The host has no _dnscrypt-proxy user; nft resolves user names when it loads.
    ruleset = config_module.render_guard_ruleset().replace('"_dnscrypt-proxy"', '"root"')
    path = tmp_path / "guard.nft"
    path.write_text(ruleset)
    result = subprocess.run(
        ["unshare", "--net", "nft", "-c", "-f", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_guard_drops_forwarded_dns():
    ruleset = config_module.render_guard_ruleset()
    assert "type filter hook forward" in ruleset
    assert 'th dport 53 counter name "forward_dropped" drop' in ruleset
    assert 'meta skuid != "_dnscrypt-proxy" counter name "output_dropped" drop' in ruleset


def test_guard_unit_installed_and_enabled():
    files = config_module.render_template_files()
    unit, mode = files["/etc/systemd/system/sysdns-guard.service"]
    assert mode == 0o644
    assert "ConditionPathExists=/run/qubes-service/sysdns" in unit
    assert "ConditionPathExists=/rw" not in unit
    assert "Before=network-pre.target" in unit
    assert files[config_module.GUARD_RULESET_PATH][0] == config_module.render_guard_ruleset()
    wants = config_module.render_template_links()["wants"]
    assert wants["/etc/systemd/system/multi-user.target.wants/sysdns-guard.service"] == (
        "/etc/systemd/system/sysdns-guard.service"
    )
