"""
Checks of the tests SLS: each state proves one claim about a built sys-dns and fails
with the qube, what was expected and what was seen. Checks change nothing, so they
run the same under ``test=True``, except that halted client qubes are not started.
"""

import logging

from salt.exceptions import CommandExecutionError, SaltInvocationError

log = logging.getLogger(__name__)

__virtualname__ = "sysdns_check"


def __virtual__():
    if "sysdns.measure" in __salt__:
        return __virtualname__
    return (False, "the sysdns_check states need the sysdns execution module (Qubes dom0 only)")


def _record(name, ok, detail):
    __context__.setdefault("sysdns_check.results", []).append((name, ok, detail))


def _finish(name, claim, problems):
    ret = {"name": name, "changes": {}, "result": not problems}
    if problems:
        ret["comment"] = "FAILED: {}\n".format(claim) + "\n".join("- " + problem for problem in problems)
    else:
        ret["comment"] = "passed: {}".format(claim)
    _record(claim, not problems, problems)
    return ret


def _window(qube, clients, dns_names):
    return __salt__["sysdns.measure"](qube=qube, clients=clients, names=dns_names, start_clients=not __opts__["test"])


def chain(name, netvm="sys-net", rewired=("sys-firewall",)):
    """
    Check that each rewired qube uses ``name`` as its netvm, that ``name`` uses
    ``netvm`` and provides network.

    name
        The DNS service qube, e.g. ``sys-dns``.
    """
    claim = "the chain {} -> {} -> {}".format(", ".join(rewired), name, netvm)
    try:
        outcome = __salt__["sysdns.chain"](name, netvm, list(rewired))
    except (CommandExecutionError, SaltInvocationError) as exc:
        return _finish(name, claim, [str(exc)])
    return _finish(name, claim, outcome["problems"])


def clients_resolve(name, clients, dns_names):
    """
    Check that every client qube that exists resolves every test name.

    name
        The DNS service qube.
    clients
        Client qube names.
    dns_names
        DNS names each client must resolve (Salt reserves the argument ``names``).
    """
    claim = "clients resolve through {}".format(name)
    try:
        window = _window(name, clients, dns_names)
    except (CommandExecutionError, SaltInvocationError) as exc:
        return _finish(name, claim, [str(exc)])
    return _finish(name, claim, __salt__["sysdns.check_resolve"](window))


def no_plaintext_leak(name, clients, dns_names):
    """
    Check that no plaintext port-53 packet left ``name`` through its uplink during the
    test window, and that the window's queries passed through its redirect.
    """
    claim = "no plaintext DNS leaves {}".format(name)
    try:
        window = _window(name, clients, dns_names)
    except (CommandExecutionError, SaltInvocationError) as exc:
        return _finish(name, claim, [str(exc)])
    return _finish(name, claim, __salt__["sysdns.check_no_plaintext"](window))


def upstream_encrypted(name, clients, dns_names):
    """
    Check that dnscrypt-proxy in ``name`` exchanged packets with its encrypted upstream
    resolvers during the test window.
    """
    claim = "dnscrypt-proxy in {} holds encrypted upstream sessions".format(name)
    try:
        window = _window(name, clients, dns_names)
    except (CommandExecutionError, SaltInvocationError) as exc:
        return _finish(name, claim, [str(exc)])
    return _finish(name, claim, __salt__["sysdns.check_upstream"](window))


def summary(name):
    """Report the checks of this run, one line each; fails when any of them failed."""
    results = __context__.get("sysdns_check.results", [])
    failed = [claim for claim, ok, _ in results if not ok]
    lines = ["{}: {}".format("PASS" if ok else "FAIL", claim) for claim, ok, _ in results]
    ret = {"name": name, "changes": {}, "result": bool(results) and not failed}
    if not results:
        ret["comment"] = "no check ran before the summary"
    else:
        ret["comment"] = "{} of {} checks passed\n".format(len(results) - len(failed), len(results)) + "\n".join(lines)
    return ret
