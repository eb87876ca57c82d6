"""
Bad pillars end to end in one lab: a dozen entries of the validation corpus
(tests/unit/config/test_config_validate.py), one of each kind, each run through
``qubesctl state.sls qubes.network.sys-dns``. Every run fails, and its output names
the key path and the expected form. The estate is the same before and after: every
qube's properties and features, and the files of the template and of sys-dns's
configuration. calls.log shows no dom0 call that could change anything.

Pillars valid in form but wrong for this machine (a missing qube in rewire, an
existing sys-dns of another class, a forwarding rule to sys-dns's own address) pass
the render and stop at the build's first state, sysdns.preflight, with the same
guarantees: no later state runs and nothing changes.

The tests run in file order: a fresh lab first (no build yet), then a good build,
then the dozen and the preflight cases against the built estate.
"""

import hashlib
import json
import os

import pytest

from tests.conftest import _require_lab_host, _TeardownOnSigterm
from tests.integration.formula_lab import apply_sls, failed_states, lab_pillar
from tests.integration.test_rollback import estate
from tests.lab.lab import Lab
from tests.unit.config.helpers import validation_errors
from tests.unit.config.test_config_validate import BAD_INPUT

pytestmark = pytest.mark.lab

BUILD = "qubes.network.sys-dns"
CONFIG_DIR = os.path.join("rw", "config", "sysdns")

# One corpus entry of each kind, found by its key path and message fragment.
DOZEN = {
    "wrong-type": ("sysdns:qube:memory", "it is a str"),
    "out-of-range": ("sysdns:qube:memory", "expected an integer from 200 to 65536 (MiB)"),
    "invalid-port": ("sysdns:dnscrypt:forwarding_rules:0:servers:0", "out of range"),
    "shell-metacharacter": ("sysdns:qube:name", "shell metacharacter ';'"),
    "newline": ("sysdns:qube:name", "it contains a newline"),
    "quote": ("sysdns:qube:name", "it contains a quote"),
    "non-ascii": ("sysdns:qube:name", "non-ASCII character"),
    "typo-key": ("sysdns:dnscrpyt", "did you mean 'dnscrypt'?"),
    "duplicate-resolver": ("sysdns:dnscrypt:resolvers:1:name", "duplicate of sysdns:dnscrypt:resolvers:0:name"),
    "oversized-list": ("sysdns:rewire", "a list of 65 entries is invalid"),
    "truncated-stamp": ("sysdns:dnscrypt:resolvers:0:stamp", "truncated"),
    "conflicting-options": ("sysdns:template:name", "when clone is false"),
}

PREFLIGHT = "qubes.network.sys-dns - pillar fits the qubes of this machine"

# Preflight cases: the pillar overrides, given the lab, and the fragment the
# preflight state's comment must contain.
PREFLIGHT_CASES = {
    "missing-rewire-qube": (
        lambda lab: {"rewire": ["sys-firewall", "nosuchqube"]},
        "sysdns:rewire:1: qube nosuchqube not found: create it, or remove it from sysdns:rewire",
    ),
    "other-class": (
        lambda lab: {"qube": {"class": "DispVM"}},
        "sysdns:qube:name: qube sys-dns exists as an AppVM but the build needs a DispVM",
    ),
    "forward-to-itself": (
        lambda lab: {
            "dnscrypt": {
                "forwarding_rules": [
                    {"zone": "corp.lab.test", "servers": [lab.qvm("qvm-prefs", "sys-dns", "ip").stdout.strip()]}
                ]
            }
        },
        "sysdns:dnscrypt:forwarding_rules:0:servers:0: ",
    ),
}

# dom0 tools that change the estate whatever their arguments.
WRITE_TOOLS = {"qvm-create", "qvm-clone", "qvm-remove", "qvm-start", "qvm-shutdown", "qvm-kill"}


def corpus_entry(path, text):
    """Return the corpus pillar whose expected error has this key path and fragment."""
    for pillar, entry_path, entry_text in BAD_INPUT:
        if (entry_path, entry_text) == (path, text):
            return pillar
    raise LookupError(f"no corpus entry for {path} with {text!r} in test_config_validate.BAD_INPUT")


def bad_pillar(lab, name):
    """Return the lab's working pillar with the corpus entry's sections in place of its own."""
    overrides = corpus_entry(*DOZEN[name])
    return lab_pillar(lab, **overrides)


def write_calls(calls):
    """Return the dom0 calls that could change a qube, its properties or its features."""
    found = []
    for argv in calls:
        tool, positional = argv[0], [arg for arg in argv[1:] if not arg.startswith("-")]
        if tool in WRITE_TOOLS or tool == "qvm-run":
            found.append(argv)
        elif tool in ("qvm-prefs", "qubes-prefs") and (
            len(positional) > (2 if tool == "qvm-prefs" else 1) or {"--default", "-D"} & set(argv)
        ):
            found.append(argv)
        elif tool in ("qvm-features", "qvm-service", "qvm-tags") and (
            len(positional) > 2 or {"--unset", "--default", "--delete", "-D"} & set(argv)
        ):
            found.append(argv)
    return found


def tree_digest(root):
    """Return ``{relative path: digest}`` of every file, link and folder under root."""
    digests = {}
    if not os.path.isdir(root):
        return digests
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(folder, name)
            stat = os.lstat(path)
            if os.path.islink(path):
                value = "link " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as handle:
                    value = "file {:o} {}".format(stat.st_mode, hashlib.sha256(handle.read()).hexdigest())
            else:
                value = "node {:o}".format(stat.st_mode)
            digests[os.path.relpath(path, root)] = value
    return digests


def full_estate(lab):
    """Return the estate of the rollback test plus the template's and sys-dns's files."""
    snapshot = estate(lab)
    snapshot["files:tpl-sys-dns"] = tree_digest(lab.layout.qube_dir("tpl-sys-dns") / "layers")
    snapshot["files:sys-dns"] = tree_digest(lab.layout.qube_dir("sys-dns") / CONFIG_DIR)
    return snapshot


def render_errors(stdout):
    """
    Return the text of the errors a failed ``state.sls --out=json`` printed: Salt
    prints a list of error strings under "local" when an SLS fails to render.
    """
    local = json.loads(stdout)["local"]
    assert isinstance(local, list), f"the SLS rendered and ran states: {local}"
    return "\n".join(local)


def assert_rejected_unchanged(lab, name):
    """Apply the bad pillar ``name`` and check the run fails and changes nothing."""
    pillar = bad_pillar(lab, name)
    path, text = DOZEN[name]
    expected_lines = [line for line in validation_errors(pillar["sysdns"]) if line.startswith(path + ": ")]
    assert expected_lines, f"the validator reports nothing for {path}"
    lab.write_pillar("sysdns", pillar)
    before = full_estate(lab)
    calls_before = len(lab.calls())

    result = lab.qubesctl("state.sls", BUILD, "--out=json")

    assert result.returncode != 0, result.stdout + result.stderr
    errors = render_errors(result.stdout)
    assert path in errors
    assert text in errors
    # The whole error line: key path, the value and the expected form.
    assert any(line in errors for line in expected_lines), (expected_lines, errors)
    calls = [call["argv"] for call in lab.calls(calls_before) if call["argv"][0] != "qubesctl"]
    assert write_calls(calls) == []
    assert full_estate(lab) == before


def assert_preflight_unchanged(lab, name):
    """Apply the preflight case ``name`` and check it stops at the first state and changes nothing."""
    overrides, text = PREFLIGHT_CASES[name]
    pillar = lab_pillar(lab, **overrides(lab))
    lab.write_pillar("sysdns", pillar)
    before = full_estate(lab)
    calls_before = len(lab.calls())

    code, states, output = apply_sls(lab, BUILD)

    assert code != 0, output
    assert states is not None, output
    # failhard: the run stops after the failed preflight state.
    assert list(states) == [PREFLIGHT], states
    assert states[PREFLIGHT]["result"] is False
    assert text in states[PREFLIGHT]["comment"]
    calls = [call["argv"] for call in lab.calls(calls_before) if call["argv"][0] != "qubesctl"]
    assert write_calls(calls) == []
    assert [argv[0] for argv in calls].count("qvm-ls") == 1, calls
    assert full_estate(lab) == before


@pytest.fixture(scope="module")
def bad_pillar_lab():
    """A lab shared by this module and torn down at its end; built_estate builds sys-dns in it."""
    _require_lab_host()
    with _TeardownOnSigterm():
        lab = Lab.up()
        try:
            yield lab
        finally:
            lab.down()


@pytest.fixture(scope="module")
def built_estate(bad_pillar_lab):
    """The module's lab after a good build of sys-dns."""
    lab = bad_pillar_lab
    lab.write_pillar("sysdns", lab_pillar(lab))
    code, states, output = apply_sls(lab, BUILD)
    assert states is not None, output
    assert failed_states(states) == {}
    assert code == 0, output
    return lab


def test_fresh_lab_rejects_bad_pillar(bad_pillar_lab):
    # Before any build: no sys-dns, no template clone, and still nothing changes.
    assert bad_pillar_lab.qvm("qvm-check", "tpl-sys-dns").returncode != 0

    assert_rejected_unchanged(bad_pillar_lab, "shell-metacharacter")


def test_fresh_lab_preflight_rejects_missing_qube(bad_pillar_lab):
    # The tester's case: on a fresh lab this pillar cloned the template, created and
    # started sys-dns and rewired sys-firewall before it failed.
    assert_preflight_unchanged(bad_pillar_lab, "missing-rewire-qube")


@pytest.mark.parametrize("name", sorted(DOZEN))
def test_bad_pillar_rejected_unchanged(built_estate, name):
    assert_rejected_unchanged(built_estate, name)


@pytest.mark.parametrize("name", sorted(PREFLIGHT_CASES))
def test_preflight_rejects_unchanged(built_estate, name):
    assert_preflight_unchanged(built_estate, name)


def test_corpus_lookup_names_missing_entry():
    with pytest.raises(LookupError, match="no corpus entry for sysdns:nosuch"):
        corpus_entry("sysdns:nosuch", "x")


def test_estate_check_detects_changes(built_estate):
    # The estate comparison and the call filter of the tests above see a change of
    # each kind they claim to cover.
    lab = built_estate
    lab.write_pillar("sysdns", lab_pillar(lab))
    before = full_estate(lab)
    calls_before = len(lab.calls())
    config_file = "/rw/config/sysdns/" + sorted(before["files:sys-dns"])[0]
    try:
        lab.qvm("qvm-features", "personal", "sysdns.lab-probe", "1", check=True)
        lab.exec("sys-dns", ["sh", "-c", 'echo "# probe" >> "$1"', "sh", config_file], check=True)

        changed = full_estate(lab)
        calls = [call["argv"] for call in lab.calls(calls_before)]
        assert changed["features:personal"] != before["features:personal"]
        assert changed["files:sys-dns"] != before["files:sys-dns"]
        assert write_calls(calls) == [["qvm-features", "personal", "sysdns.lab-probe", "1"]]
    finally:
        lab.qvm("qvm-features", "--unset", "personal", "sysdns.lab-probe")
    code, states, output = apply_sls(lab, BUILD)
    assert failed_states(states or {}) == {}, output
    assert code == 0, output
