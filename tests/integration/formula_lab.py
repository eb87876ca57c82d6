"""Drive the formula in the offline lab: pillar, qubesctl runs, and their results."""

import contextlib
import copy
import json

from tests.lab.lab import Lab

# Names the lab's uplink resolvers answer (tests/lab/uplink.py): www.lab.test has an
# A and an AAAA record; every *.lab.test name has a TXT record naming the resolver.
LAB_TEST_NAMES = ["www.lab.test"]

# One DNSCrypt and one DoH resolver of the lab's uplink, as the default pillar uses.
LAB_RESOLVERS = ("lab-dnscrypt", "lab-doh")


def lab_pillar(lab, resolvers=LAB_RESOLVERS, **overrides):
    """Return the sysdns pillar for the lab: its resolvers and test names, plus overrides.

    ``overrides`` are top-level pillar sections merged one level deep, e.g.
    ``template={"source": "debian-13-minimal"}``.
    """
    stamps = {entry["name"]: entry["stamp"] for entry in lab.stamps}
    pillar = {
        "dnscrypt": {"resolvers": [{"name": name, "stamp": stamps[name]} for name in resolvers]},
        "tests": {"names": list(LAB_TEST_NAMES)},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            merged = copy.deepcopy(pillar.get(section, {}))
            merged.update(values)
            pillar[section] = merged
        else:
            pillar[section] = values
    return {"sysdns": pillar}


def apply_sls(lab, sls, *extra, timeout=1800):
    """
    Run ``qubesctl state.sls SLS`` with JSON output and return (exit code, states).

    ``states`` maps each state ID to Salt's result dict, or is None when Salt printed
    no JSON (a render error); ``extra`` adds arguments such as ``test=True``.
    """
    result = lab.qubesctl("state.sls", sls, *extra, "--out=json", timeout=timeout)
    try:
        data = json.loads(result.stdout)
    except ValueError:
        return result.returncode, None, result.stdout + result.stderr
    local = data.get("local")
    if not isinstance(local, dict):
        return result.returncode, None, result.stdout + result.stderr
    states = {}
    for ret in local.values():
        states[ret.get("__id__", ret.get("name"))] = ret
    return result.returncode, states, result.stderr


def changes_by_state(states):
    """Return ``{state ID: changes}`` for the states that reported changes."""
    return {state_id: ret["changes"] for state_id, ret in states.items() if ret.get("changes")}


def failed_states(states):
    """Return ``{state ID: comment}`` of the states whose result is False."""
    return {state_id: ret.get("comment") for state_id, ret in states.items() if ret.get("result") is False}


@contextlib.contextmanager
def built_lab(**overrides):
    """
    Bring a lab up, build sys-dns in it with ``lab_pillar(lab, **overrides)``, yield it,
    and tear it down afterwards, also when the build fails.
    """
    lab = Lab.up()
    try:
        lab.write_pillar("sysdns", lab_pillar(lab, **overrides))
        code, states, output = apply_sls(lab, "qubes.network.sys-dns")
        assert states is not None, output
        assert failed_states(states) == {}
        assert code == 0, output
        yield lab
    finally:
        lab.down()
