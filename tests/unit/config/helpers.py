"""Helpers of the sysdns_config unit tests: the module itself, dnscrypt-proxy -check and nft -c."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
# dom0 loads _modules through Salt; the tests import the file directly.
sys.path.insert(0, str(REPO / "_modules"))

import sysdns_config as config  # noqa: E402  (needs the path above)

TOOLS_DIR = pathlib.Path(os.environ.get("SYSDNS_LAB_CACHE", "/var/cache/sysdns-lab")) / "tools"
DNSCRYPT_PROXY = TOOLS_DIR / "dnscrypt-proxy"
FETCH_SCRIPT = REPO / "tests" / "tools" / "fetch-dnscrypt-proxy.sh"
PACKAGES = {"ip": "iproute2", "nft": "nftables", "unshare": "util-linux"}


def require_dnscrypt_proxy():
    if not os.access(DNSCRYPT_PROXY, os.X_OK):
        pytest.fail(
            f"{DNSCRYPT_PROXY} is missing: run {FETCH_SCRIPT} (it unpacks Debian "
            "trixie's dnscrypt-proxy 2.1.8 .deb there, installing nothing)"
        )
    return DNSCRYPT_PROXY


def require_root_tool(name):
    if shutil.which(name) is None:
        pytest.fail(f"{name} is missing: install the Debian package {PACKAGES.get(name, name)}")
    if os.geteuid() != 0:
        pytest.fail(f"these tests need root to run {name} in network namespaces")


def run_check(toml_text, workdir):
    """Run `dnscrypt-proxy -check` on a config, in a network namespace with no route out."""
    binary = require_dnscrypt_proxy()
    require_root_tool("unshare")
    path = pathlib.Path(workdir) / "dnscrypt-proxy.toml"
    path.write_text(toml_text)
    # -check never needs the network for [static] servers, and an empty namespace
    # makes sure nothing could leave if it tried.
    return subprocess.run(
        ["unshare", "--net", str(binary), "-check", "-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_check_passes(toml_text, workdir):
    result = run_check(toml_text, workdir)
    assert result.returncode == 0, f"dnscrypt-proxy -check failed:\n{result.stdout}{result.stderr}\n{toml_text}"
    assert "Configuration successfully checked" in result.stdout + result.stderr


def nft_check(ruleset_text, workdir):
    require_root_tool("nft")
    path = pathlib.Path(workdir) / "sysdns.nft"
    path.write_text(ruleset_text)
    return subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True, timeout=60, check=False)


def assert_nft_check_passes(ruleset_text, workdir):
    result = nft_check(ruleset_text, workdir)
    assert result.returncode == 0, f"nft -c failed:\n{result.stderr}\n{ruleset_text}"


def validation_errors(pillar):
    """Return the error lines validate() raises for a pillar (fails if it accepts it)."""
    with pytest.raises(config.SaltInvocationError) as raised:
        config.validate(pillar)
    lines = str(raised.value).splitlines()
    assert lines[0].startswith("the sysdns pillar has ")
    return lines[1:]
