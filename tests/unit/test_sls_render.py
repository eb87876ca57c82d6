"""
Salt-level tests: the SLS files render through a real ``salt-call --local`` with the
formula's modules synced, and rendering calls no dom0 tool.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOM0_TOOLS = (
    "qvm-ls qvm-prefs qvm-features qvm-service qvm-tags qvm-create qvm-clone qvm-remove "
    "qvm-start qvm-shutdown qvm-kill qvm-check qvm-run qubes-prefs"
).split()


@pytest.fixture(scope="module")
def salt_env(tmp_path_factory):
    """A salt-call config with the formula's file roots and stub dom0 tools that log."""
    base = tmp_path_factory.mktemp("salt")
    bin_dir = base / "bin"
    bin_dir.mkdir()
    calls = base / "calls.log"
    for tool in DOM0_TOOLS:
        stub = bin_dir / tool
        stub.write_text('#!/bin/sh\necho "$0 $*" >>{}\nexit 1\n'.format(calls))
        stub.chmod(0o755)
    pillar_dir = base / "pillar"
    pillar_dir.mkdir()
    (pillar_dir / "top.sls").write_text("base:\n  '*':\n    - sysdns\n")
    config_dir = base / "etc"
    config_dir.mkdir()
    (config_dir / "minion").write_text(
        textwrap.dedent(
            """\
            file_client: local
            id: dom0
            root_dir: {base}/root
            cachedir: {base}/cache
            log_file: {base}/minion.log
            file_roots:
              base:
                - {root}/qubes-sysdns-formula
                - {root}
            pillar_roots:
              base:
                - {pillar}
            """
        ).format(base=base, root=ROOT, pillar=pillar_dir)
    )
    env = dict(os.environ, PATH="{}:{}".format(bin_dir, os.environ["PATH"]))
    salt_call = [sys.executable, "-c", "import salt.scripts; salt.scripts.salt_call()"]

    def run(*args, pillar=None):
        (pillar_dir / "sysdns.sls").write_text(yaml.safe_dump({"sysdns": pillar or {}}))
        argv = (
            salt_call
            + ["--local", "--config-dir", str(config_dir), "--out", "json", "--retcode-passthrough"]
            + list(args)
        )
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)

    sync = run("saltutil.sync_all")
    assert sync.returncode == 0, sync.stderr
    return run, calls


def test_show_sls_calls_no_dom0_tool(salt_env):
    run, calls = salt_env
    if calls.exists():
        calls.unlink()
    result = run("state.show_sls", "qubes.network.sys-dns")
    assert result.returncode == 0, result.stderr + result.stdout
    states = json.loads(result.stdout)["local"]
    assert "qubes.network.sys-dns - qube sys-dns present" in states
    assert "qubes.network.sys-dns - sys-firewall routed through sys-dns" in states
    assert not calls.exists(), calls.read_text()


def test_show_sls_tests_renders(salt_env):
    run, calls = salt_env
    result = run("state.show_sls", "qubes.tests.sys-dns")
    assert result.returncode == 0, result.stderr + result.stdout
    states = json.loads(result.stdout)["local"]
    assert "qubes.tests.sys-dns - summary" in states


def test_bad_pillar_stops_render(salt_env):
    run, calls = salt_env
    if calls.exists():
        calls.unlink()
    result = run("state.sls", "qubes.network.sys-dns", pillar={"qube": {"name": "sys dns;rm -rf /"}})
    assert result.returncode != 0
    assert "sysdns:qube:name" in result.stdout + result.stderr
    assert not calls.exists(), calls.read_text()


def test_disposable_class_renders(salt_env):
    run, calls = salt_env
    result = run("state.show_sls", "qubes.network.sys-dns", pillar={"qube": {"class": "DispVM"}})
    assert result.returncode == 0, result.stderr + result.stdout
    states = json.loads(result.stdout)["local"]
    assert any("disposable template" in state for state in states)


def _qube_prefs(states):
    present = states["qubes.network.sys-dns - qube sys-dns present"]["sysdns"]
    for argument in present:
        if isinstance(argument, dict) and "prefs" in argument:
            return argument["prefs"]
    raise AssertionError(f"no prefs in {present}")


@pytest.mark.parametrize("pillar, expected", [({}, 0), ({"qube": {"maxmem": 8000}}, 8000)])
def test_maxmem_reaches_qube_prefs(salt_env, pillar, expected):
    run, calls = salt_env
    result = run("state.show_sls", "qubes.network.sys-dns", pillar=pillar)
    assert result.returncode == 0, result.stderr + result.stdout
    prefs = _qube_prefs(json.loads(result.stdout)["local"])
    assert prefs["maxmem"] == expected
