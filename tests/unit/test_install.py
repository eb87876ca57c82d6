"""
`make install DESTDIR=...` lays the formula out as Qubes' formula RPMs do: one file root
under /srv/formulas (FORMULA formula_dir) holding the SLS tree, _modules, _states and
.top files, plus a minion.d file that adds that root to file_roots.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MINION_CONF = Path("etc/salt/minion.d/sysdns-formula.conf")
SPEC_IN = REPO / "rpm_spec" / "qubes-mgmt-salt-dom0-sysdns.spec.in"


def formula():
    return yaml.safe_load((REPO / "FORMULA").read_text(encoding="utf-8"))


def tree_files(root):
    """Return the relative paths of the regular files under ``root``, without caches."""
    return {
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def destdir(tmp_path_factory):
    destdir = tmp_path_factory.mktemp("destdir")
    result = subprocess.run(
        ["make", "--no-print-directory", "-s", "install", f"DESTDIR={destdir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return destdir


@pytest.fixture(scope="module")
def formula_root(destdir):
    return destdir / formula()["formula_dir"].lstrip("/")


def test_formula_dir_is_own_file_root():
    assert formula()["formula_dir"] == "/srv/formulas/base/" + formula()["name"]


def test_install_writes_nothing_else(destdir):
    installed = tree_files(destdir)
    root = formula()["formula_dir"].lstrip("/") + "/"
    outside = sorted(path for path in installed if not path.startswith(root))
    assert outside == [MINION_CONF.as_posix()]
    assert not (destdir / "srv" / "salt").exists()


def test_install_copies_sls_tree_unchanged(formula_root):
    source = REPO / "qubes-sysdns-formula"
    expected = tree_files(source)
    assert "qubes/network/sys-dns.sls" in expected
    assert "qubes/tests/sys-dns.sls" in expected
    assert "qubes/network/sys-dns/map.jinja" in expected
    for relative in expected:
        assert (formula_root / relative).read_bytes() == (source / relative).read_bytes(), relative


@pytest.mark.parametrize("folder", ["_modules", "_states"])
def test_install_copies_salt_modules(formula_root, folder):
    expected = tree_files(REPO / folder)
    assert expected, folder
    assert tree_files(formula_root / folder) == expected
    for relative in expected:
        assert (formula_root / folder / relative).read_bytes() == (REPO / folder / relative).read_bytes()


def test_install_leaves_no_bytecode(destdir):
    assert list(destdir.rglob("__pycache__")) == []
    assert list(destdir.rglob("*.pyc")) == []


def test_top_files_for_every_state_top(formula_root):
    """Each SLS named under FORMULA state-tops has a .top for `qubesctl top.enable`."""
    names = [name for action in formula()["state-tops"]["base"].values() for name in action]
    assert "qubes.network.sys-dns" in names
    for name in names:
        top_path = formula_root / (name.replace(".", "/") + ".top")
        assert top_path.is_file(), top_path
        top = yaml.safe_load(top_path.read_text(encoding="utf-8"))
        assert top == {"base": {"dom0": [{"match": "nodegroup"}, name]}}, top_path
        assert top_path.with_suffix(".sls").is_file(), name


def test_minion_conf_adds_formula_root(destdir):
    conf = yaml.safe_load((destdir / MINION_CONF).read_text(encoding="utf-8"))
    assert conf == {"file_roots": {"base": [formula()["formula_dir"]]}}


def test_minion_conf_merges_with_qubes_defaults(destdir, tmp_path):
    """
    Salt reads the minion.d files as dom0 does and keeps /srv/salt next to the formula
    root: a file_roots that replaced the Qubes default would hide every other state.
    """
    config_dir = tmp_path / "salt"
    (config_dir / "minion.d").mkdir(parents=True)
    stand_in_srv_salt = str(tmp_path / "srv-salt")
    minion = {
        "id": "dom0",
        "file_client": "local",
        "default_include": "minion.d/*.conf",
        "cachedir": str(tmp_path / "cache"),
        "pki_dir": str(tmp_path / "pki"),
        "sock_dir": str(tmp_path / "sock"),
        "log_file": str(tmp_path / "minion.log"),
    }
    (config_dir / "minion").write_text(json.dumps(minion) + "\n", encoding="utf-8")
    # The file_roots line of Qubes' minion.d/f_defaults.conf (QubesOS/qubes-mgmt-salt).
    defaults = {"file_roots": {"base": [stand_in_srv_salt], "user": ["/srv/user_salt"]}}
    (config_dir / "minion.d" / "f_defaults.conf").write_text(json.dumps(defaults) + "\n", encoding="utf-8")
    (config_dir / "minion.d" / MINION_CONF.name).write_bytes((destdir / MINION_CONF).read_bytes())

    salt_call = [sys.executable, "-c", "import salt.scripts; salt.scripts.salt_call()"]
    result = subprocess.run(
        [*salt_call, "--local", "-c", str(config_dir), "--out=json", "config.get", "file_roots"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    file_roots = json.loads(result.stdout)["local"]
    assert sorted(file_roots["base"]) == sorted([stand_in_srv_salt, formula()["formula_dir"]])
    assert file_roots["user"] == ["/srv/user_salt"]


def test_rpm_spec_matches_formula():
    spec = SPEC_IN.read_text(encoding="utf-8")
    tags = dict(re.findall(r"^([A-Z][A-Za-z]*):\s*(.*?)\s*$", spec, flags=re.MULTILINE))
    assert tags["Name"] == formula()["package-name"]
    assert tags["Version"] == "@VERSION@"
    assert "make install DESTDIR=%{buildroot}" in spec
    assert "qubesctl saltutil.sync_all" in spec.split("%post\n", 1)[1].split("\n%", 1)[0]
    assert "%dir " + formula()["formula_dir"] in spec
    assert "%config(noreplace) /" + MINION_CONF.as_posix() in spec
