"""
The builder and the tests SLS run from the tree that `make install` lays out, with the
lab's file_roots pointing at that tree alone, as a dom0 with the formula RPM serves it.
"""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integration.formula_lab import apply_sls, failed_states, lab_pillar

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]


def install_tree(destdir):
    """Run `make install DESTDIR=destdir` and return the installed formula root."""
    subprocess.run(["make", "--no-print-directory", "-s", "install", f"DESTDIR={destdir}"], cwd=REPO, check=True)
    formula_dir = yaml.safe_load((REPO / "FORMULA").read_text(encoding="utf-8"))["formula_dir"]
    return destdir / formula_dir.lstrip("/")


def test_build_from_installed_tree(fresh_lab, tmp_path):
    root = install_tree(tmp_path)
    lab = fresh_lab()
    lab.write_pillar("sysdns", lab_pillar(lab))
    lab.use_file_roots([root])

    listing = lab.qubesctl("cp.list_master", "--out=json")
    assert listing.returncode == 0, listing.stdout + listing.stderr
    served = set(json.loads(listing.stdout)["local"])
    assert "qubes/network/sys-dns.top" in served
    assert "_modules/sysdns_qvm.py" in served
    # The repository root, a file root by default, would serve the Makefile too.
    assert "Makefile" not in served

    code, states, output = apply_sls(lab, "qubes.network.sys-dns")
    assert states is not None, output
    assert failed_states(states) == {}
    assert code == 0

    code, states, output = apply_sls(lab, "qubes.tests.sys-dns")
    assert states is not None, output
    assert failed_states(states) == {}
    assert code == 0
