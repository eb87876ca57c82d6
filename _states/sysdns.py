"""
Build and wire a DNS service qube (sys-dns) from dom0: its template, the qube, its
configuration and the netvm of the qubes that route through it.

Each state reads what exists through the ``sysdns_qvm`` execution module, computes a
``{key: {"old": ..., "new": ...}}`` diff, returns early when it is empty, predicts the
same diff under ``test=True`` without changing anything, and only then acts.
"""

import hashlib
import logging

from salt.exceptions import CommandExecutionError, SaltInvocationError

log = logging.getLogger(__name__)

__virtualname__ = "sysdns"

# Features in which the formula records what it applied, so that a run can tell from
# dom0 alone, without starting a halted qube, whether anything needs doing.
TEMPLATE_FEATURE = "sysdns.template"
CONFIG_FEATURE = "sysdns.config"
PREVIOUS_NETVM_FEATURE = "sysdns.previous-netvm"
# Value of PREVIOUS_NETVM_FEATURE for a netvm that followed the global default_netvm.
# Qubes rejects "default" and "none" as qube names (validate_name in
# qubes/vm/__init__.py, qubes-core-admin 4.2), so the value never collides with a
# recorded name. Records written before this value existed contain a name, or "" for none.
DEFAULT_NETVM = "default"

# __context__ key (shared by the states of one run): qubes that qube_present
# restarted on a new template in this run.
RESTARTED_ON_TEMPLATE = "sysdns.restarted_on_template"

HELPER_DIR = "/usr/lib/sysdns"

# Constant commands run in qubes; data travels on standard input, never in these strings.
TEMPLATE_FACTS_COMMAND = (
    "cat /etc/os-release; echo '--- sources'; "
    "cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null; true"
)
TEMPLATE_SETUP_COMMAND = "base64 -d | tar -x -f - -C / --no-same-owner && " + HELPER_DIR + "/setup-template"
INSTALL_CONFIG_COMMAND = HELPER_DIR + "/install-config"
STORE_CONFIG_COMMAND = "SYSDNS_STORE_ONLY=1 " + INSTALL_CONFIG_COMMAND
REPORT_COMMAND = HELPER_DIR + "/report"
# Last line setup-template prints; without it the template setup did not finish.
TEMPLATE_SETUP_DONE = "sysdns: template setup complete"

WHONIX_FEATURES = ("whonix-gw", "whonix-ws")


def __virtual__():
    if "sysdns_qvm.list_qubes" in __salt__:
        return __virtualname__
    return (False, "the sysdns states need the sysdns_qvm execution module (Qubes dom0 only)")


def _ret(name, comment=""):
    return {"name": name, "result": True, "changes": {}, "comment": comment}


def _fail(ret, comment):
    ret["result"] = False
    ret["comment"] = comment
    return ret


def _sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _resolve_files(files):
    """Return ``{path: {"content", "mode"}}``, reading entries given as ``source``."""
    resolved = {}
    for path, spec in files.items():
        if "content" in spec:
            content = spec["content"]
        else:
            content = __salt__["cp.get_file_str"](spec["source"])
            if content is False or content is None:
                raise SaltInvocationError(
                    "file {} for {} was not found on the Salt file server".format(spec["source"], path)
                )
        mode = spec.get("mode", "0644")
        if isinstance(mode, int):
            mode = "{:04o}".format(mode)
        resolved[path] = {"content": content, "mode": mode}
    return resolved


def preflight(name, klass, rewire=None, forwarding_rules=None, disposable_template=None):
    """
    Check the pillar against the qubes of this machine before any other state runs,
    and change nothing. The SLS renders without calling a qvm-* tool (state.show_sls
    must not), so these checks run as the build's first state, with ``failhard: True``
    so that a failure stops every later state. Runs in full under ``test=True``.

    name
        Name of sys-dns (``sysdns:qube:name``).
    klass
        Its class (``sysdns:qube:class``): an existing qube of another class fails.
    rewire
        Qubes to route through sys-dns: each must exist.
    forwarding_rules
        Validated ``sysdns:dnscrypt:forwarding_rules``: no server may be an address of
        the existing sys-dns.
    disposable_template
        Disposable template of a DispVM sys-dns: an existing one must be an AppVM.
    """
    ret = _ret(name, "The pillar fits the qubes of this machine")
    try:
        problems = __salt__["sysdns_qvm.preflight_problems"](
            name, klass, list(rewire or []), list(forwarding_rules or []), disposable_template
        )
    except (CommandExecutionError, SaltInvocationError) as exc:
        return _fail(ret, "the pillar could not be checked against the qubes: {}".format(exc))
    if problems:
        return _fail(ret, "the build was stopped before any change:\n" + "\n".join(problems))
    return ret


def template_present(name, source, clone=True):
    """
    Ensure the template of sys-dns exists, cloned from ``source`` when missing.

    name
        Template name, e.g. ``tpl-sys-dns``.
    source
        Template to clone, e.g. ``debian-12-minimal``.
    clone
        False uses ``source`` itself (then ``name`` must equal ``source``).

    .. code-block:: yaml

        tpl-sys-dns:
          sysdns.template_present:
            - source: debian-12-minimal
    """
    ret = _ret(name, "Template {} is present".format(name))
    try:
        qube = __salt__["sysdns_qvm.get_qube"](name)
        if qube is not None:
            if qube["class"] != "TemplateVM":
                return _fail(
                    ret,
                    "qube {} exists but its class is {}, not TemplateVM: rename it or choose "
                    "another name in sysdns:template:name".format(name, qube["class"]),
                )
            return ret

        if not clone or source == name:
            return _fail(
                ret,
                "template {} not found: install it (qvm-template install {}) or set sysdns:template:source".format(
                    name, name
                ),
            )
        origin = __salt__["sysdns_qvm.get_qube"](source)
        if origin is None or origin["class"] != "TemplateVM":
            return _fail(
                ret,
                "template {} to clone from not found: install it (qvm-template install "
                "{}) or set sysdns:template:source".format(source, source),
            )

        ret["changes"] = {"template": {"old": None, "new": "clone of {}".format(source)}}
        if __opts__["test"]:
            ret["result"] = None
            ret["comment"] = "Template {} would have been cloned from {}".format(name, source)
            return ret

        __salt__["sysdns_qvm.clone"](source, name)
        ret["comment"] = "Template {} has been cloned from {}".format(name, source)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["changes"] = {}
        return _fail(ret, str(exc))
    return ret


def parse_template_facts(output):
    """
    Parse the output of TEMPLATE_FACTS_COMMAND into os-release fields and the apt
    mirror of the template's main Debian source.
    """
    release_text, _, sources_text = output.partition("--- sources")
    release = {}
    for line in release_text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            release[key.strip()] = value.strip().strip('"')

    mirror = None
    for line in sources_text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 3 or words[0] != "deb":
            continue
        # Skip options such as [arch=amd64 signed-by=...].
        rest = [word for word in words[1:] if not (word.startswith("[") or word.endswith("]") or "=" in word)]
        if len(rest) >= 2 and rest[1] == release.get("VERSION_CODENAME") and "security" not in rest[0]:
            mirror = rest[0]
            break
    return release, mirror


def template_configured(name, packages, files, links=None, debian_backport=True):
    """
    Ensure the template of sys-dns has the packages and unit files it needs, then shut
    it down so that qubes based on it pick up the change at their next start.

    What was applied is recorded in the template's feature ``sysdns.template``; a run
    whose packages and files match that record does not start the template.

    name
        Template name.
    packages
        Package names to install (apt or dnf inside the template).
    files
        ``{path: {"content": str} or {"source": salt://...}, "mode": "0644"}`` written
        into the template before the packages are installed.
    links
        ``{path: target}`` symlinks, e.g. units masked with /dev/null.
    debian_backport
        On a Debian release without dnscrypt-proxy (Debian 12), take it from trixie
        through the template's own mirror, pinned so that nothing else comes from
        trixie (``sysdns_config.render_apt_sources``).
    """
    ret = _ret(name, "Template {} already has the sys-dns packages and files".format(name))
    links = links or {}
    try:
        files = _resolve_files(files)
        wanted = {
            "packages": sorted(packages),
            "files": {path: _sha256(spec["mode"] + "\0" + spec["content"]) for path, spec in files.items()},
            "links": dict(links),
            "debian_backport": bool(debian_backport),
        }
        recorded = {}
        if __salt__["sysdns_qvm.get_qube"](name) is not None:
            recorded = __salt__["sysdns_qvm.json_feature"](name, TEMPLATE_FEATURE) or {}

        changes = {}
        for key in ("packages", "files", "links", "debian_backport"):
            if key == "files":
                old_files = recorded.get("files") or {}
                file_changes = {
                    path: {"old": old_files.get(path), "new": wanted["files"].get(path)}
                    for path in sorted(set(old_files) | set(wanted["files"]))
                    if old_files.get(path) != wanted["files"].get(path)
                }
                if file_changes:
                    changes["files"] = file_changes
            elif recorded.get(key) != wanted[key]:
                changes[key] = {"old": recorded.get(key), "new": wanted[key]}
        if not changes:
            return ret

        ret["changes"] = changes
        if __opts__["test"]:
            ret["result"] = None
            ret["comment"] = "Template {} would have been updated and shut down".format(name)
            return ret

        facts = __salt__["sysdns_qvm.run"](name, TEMPLATE_FACTS_COMMAND)["stdout"]
        release, mirror = parse_template_facts(facts)
        archive_files = dict(files)
        archive_files["/etc/sysdns/packages"] = {
            "content": "".join(package + "\n" for package in sorted(packages)),
            "mode": "0644",
        }
        if debian_backport and release.get("ID") == "debian":
            archive_files.update(_debian_backport_files(name, release, mirror))

        archive = __salt__["sysdns_qvm.pack_files"](archive_files, links)
        setup = __salt__["sysdns_qvm.run"](name, TEMPLATE_SETUP_COMMAND, stdin=archive, timeout=1800)
        if TEMPLATE_SETUP_DONE not in setup["stdout"]:
            raise CommandExecutionError(
                "template {}: the package and unit setup did not finish (the qube may have "
                "been shut down or killed during it); run the state again. Its last "
                "output: {}".format(name, (setup["stdout"] + setup["stderr"]).strip()[-1000:] or "(none)")
            )
        __salt__["sysdns_qvm.shutdown"](name)
        __salt__["sysdns_qvm.set_json_feature"](name, TEMPLATE_FEATURE, wanted)
        ret["comment"] = "Template {} has been updated and shut down".format(name)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["changes"] = {}
        return _fail(ret, str(exc))
    return ret


def _debian_backport_files(name, release, mirror):
    """Return the apt source and pin files a Debian template needs for dnscrypt-proxy."""
    suite = release.get("VERSION_CODENAME")
    if not mirror:
        # Suites that ship dnscrypt-proxy need no extra source, so no mirror either.
        needed = __salt__["sysdns_config.render_apt_sources"]("http://deb.debian.org/debian", suite)
        if not needed:
            return {}
        raise CommandExecutionError(
            "template {}: no 'deb' line for {} found in its apt sources, so the trixie "
            "source for dnscrypt-proxy cannot follow its mirror; add one to "
            "/etc/apt/sources.list".format(name, suite)
        )
    rendered = __salt__["sysdns_config.render_apt_sources"](mirror, suite)
    return {path: {"content": content, "mode": "{:04o}".format(mode)} for path, (content, mode) in rendered.items()}


def _compare_prefs(name, qube, prefs):
    changes = {}
    for prop, value in sorted(prefs.items()):
        if qube is None:
            have = None
        elif prop in qube:
            have = qube[prop]
        else:
            # Properties qvm-ls cannot print, such as memory, cost one qvm-prefs call.
            have = __salt__["sysdns_qvm.get_pref"](name, prop)
        if have != value:
            changes[prop] = {"old": have, "new": value}
    return changes


def _pinned_defaults(name, prefs, pref_changes):
    """
    Return changes that set explicitly the requested properties of a qube that still
    follow their default with the requested value.

    A qube the formula creates gets every property set explicitly. A qube it adopts
    (one built by hand, without the feature ``service.sysdns``) gets the same, so that
    a later change of a default, such as the template's memory, reaches neither.
    """
    defaults = __salt__["sysdns_qvm.default_prefs"](name)
    return {
        prop: {"old": "{} (default)".format(value), "new": value}
        for prop, value in sorted(prefs.items())
        if prop in defaults and prop not in pref_changes
    }


def qube_present(name, template, label, klass="AppVM", prefs=None, features=None):
    """
    Ensure a qube exists with the class, template, label, properties and features given.

    name
        Qube name.
    template
        Its template (for a DispVM: its disposable template).
    label
        Label color.
    klass
        AppVM or DispVM. An existing qube of another class is an error: Qubes cannot
        change a qube's class.
    prefs
        Properties, typed as Qubes stores them (bool, int, qube names).
    features
        Features, as strings; None unsets one. When they set ``service.sysdns`` on an
        existing qube that lacks it, the qube is adopted. Every requested property
        that follows its default is then set explicitly, and the feature
        ``sysdns.adopted`` records the template the qube had, so that the rollback
        keeps the qube.

    .. code-block:: yaml

        sys-dns:
          sysdns.qube_present:
            - template: tpl-sys-dns
            - label: orange
            - prefs:
                netvm: sys-net
                provides_network: true
    """
    ret = _ret(name, "Qube {} is in the requested state".format(name))
    prefs = dict(prefs or {})
    features = dict(features or {})
    try:
        qube = __salt__["sysdns_qvm.get_qube"](name)
        changes = {}
        if qube is None:
            # Every property of a new qube is set, even one equal to None (netvm none),
            # because Qubes would otherwise give it the default (default_netvm).
            changes["qube"] = {
                "old": None,
                "new": {"class": klass, "template": template, "label": label, "prefs": dict(prefs)},
            }
            have_features = {}
        else:
            if qube["class"] != klass:
                return _fail(
                    ret,
                    "qube {} has class {} but the state requests class {}, and Qubes cannot "
                    "change a qube's class: choose another name, or remove the qube once "
                    "no other qube uses it".format(name, qube["class"], klass),
                )
            prefs = dict(prefs, template=template, label=label)
            have_features = __salt__["sysdns_qvm.features"](name)

        # A qube that exists without the build's marker was made by hand: the build
        # adopts it and records that, so that the rollback keeps it.
        adopted = qube is not None and BUILT_FEATURE in features and BUILT_FEATURE not in have_features
        if adopted:
            features.setdefault(ADOPTED_FEATURE, qube.get("template") or "")
        if qube is None:
            pref_changes = {prop: {"old": None, "new": value} for prop, value in prefs.items()}
        else:
            pref_changes = _compare_prefs(name, qube, prefs)
            if adopted:
                pref_changes.update(_pinned_defaults(name, prefs, pref_changes))
        if pref_changes and qube is not None:
            changes["prefs"] = pref_changes
        feature_changes = {
            feature: {"old": have_features.get(feature), "new": value}
            for feature, value in sorted(features.items())
            if have_features.get(feature) != value
        }
        if feature_changes:
            changes["features"] = feature_changes
        if not changes:
            return ret

        # Qubes rejects a new template for a running qube, so the qube is shut down
        # for it and started again, and the change is part of this state's report.
        restart = qube is not None and "template" in pref_changes and qube["state"] != "Halted"
        if restart:
            changes["state"] = {"old": qube["state"], "new": "restarted on the new template"}
            # A later `running` state that watches the template needs no second restart.
            __context__.setdefault(RESTARTED_ON_TEMPLATE, set()).add(name)
        ret["changes"] = changes
        if __opts__["test"]:
            ret["result"] = None
            ret["comment"] = "Qube {} would have been {}".format(name, "created" if qube is None else "updated")
            return ret

        if qube is None:
            __salt__["sysdns_qvm.create"](name, klass, template, label)
        elif restart:
            # Qubes also rejects the shutdown of a netvm with running downstream qubes
            # unless forced, and attaches them again when the netvm starts
            # (qubes/vm/mix/net.py, qubes-core-admin 4.2).
            __salt__["sysdns_qvm.shutdown"](name, force=True)
        for prop, change in sorted(pref_changes.items()):
            __salt__["sysdns_qvm.set_pref"](name, prop, change["new"])
        # The adoption record goes before BUILT_FEATURE, because a later run cannot
        # tell that the qube was adopted once BUILT_FEATURE is set.
        for feature, change in sorted(feature_changes.items(), key=lambda item: item[0] != ADOPTED_FEATURE):
            __salt__["sysdns_qvm.set_feature"](name, feature, change["new"])
        if restart:
            __salt__["sysdns_qvm.start"](name)
        ret["comment"] = "Qube {} has been {}".format(name, "created" if qube is None else "updated")
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["changes"] = {}
        return _fail(ret, str(exc))
    return ret


def running(name, restart_on_change=True):
    """
    Ensure a qube is running; a ``watch`` requisite that reports changes restarts it
    (for example after its template changed).

    name
        Qube name.
    restart_on_change
        With False, a change in a watched state does not restart the qube.
    """
    ret = _ret(name, "Qube {} is running".format(name))
    try:
        qube = __salt__["sysdns_qvm.get_qube"](name)
        if qube is None and not __opts__["test"]:
            return _fail(ret, "qube {} not found".format(name))
        # A qube that a test run predicts to be created would be halted here.
        state = qube["state"] if qube else "Halted"
        if state == "Running":
            return ret

        ret["changes"] = {"state": {"old": state, "new": "Running"}}
        if __opts__["test"]:
            ret["result"] = None
            ret["comment"] = "Qube {} would have been started".format(name)
            return ret
        __salt__["sysdns_qvm.start"](name)
        ret["comment"] = "Qube {} has been started".format(name)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["changes"] = {}
        return _fail(ret, str(exc))
    return ret


def mod_watch(name, sfun=None, restart_on_change=True, **kwargs):
    """Restart a running qube when a watched state reported changes."""
    ret = _ret(name)
    if sfun != "running":
        return _fail(ret, "sysdns.{} does not support watch".format(sfun))
    try:
        qube = __salt__["sysdns_qvm.get_qube"](name)
        if not restart_on_change or qube is None or qube["state"] != "Running":
            return running(name, restart_on_change)
        if name in __context__.get(RESTARTED_ON_TEMPLATE, ()):
            ret["comment"] = "Qube {} is running, restarted on its new template earlier in this run".format(name)
            return ret

        ret["changes"] = {"restarted": {"old": None, "new": name}}
        if __opts__["test"]:
            ret["result"] = None
            ret["comment"] = "Qube {} would have been restarted".format(name)
            return ret
        __salt__["sysdns_qvm.restart"](name)
        ret["comment"] = "Qube {} has been restarted".format(name)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["changes"] = {}
        return _fail(ret, str(exc))
    return ret


def parse_report(output):
    """Parse the output of the report helper into a dict."""
    report = {
        "files": {},
        "service": None,
        "firewall": None,
        "ruleset": None,
        "guard": None,
        "guard-ruleset": None,
        "input-accept": None,
    }
    for line in output.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "file":
            report["files"][words[2]] = words[1]
        elif len(words) == 2 and words[0] in report:
            report[words[0]] = words[1]
    return report


def _service_changes(report):
    changes = {}
    for key, good in (("service", "active"), ("firewall", "loaded"), ("guard", "loaded"), ("input-accept", "present")):
        if report.get(key) != good:
            changes[key] = {"old": report[key], "new": good}
    # A loaded table whose rules changed at runtime (nft delete rule, nft flush chain)
    # no longer matches the digest recorded when it was loaded: reload it. A report
    # without the line comes from a template built before the digests existed.
    for table, key in (("firewall", "ruleset"), ("guard", "guard-ruleset")):
        if report.get(table) == "loaded" and report.get(key) not in (None, "as-loaded"):
            changes[key] = {"old": report[key], "new": "as-loaded"}
    return changes


def _restored(file_changes, recorded, report):
    """
    Name what a run puts back because it was changed inside the qube rather than in
    the pillar. These are files whose content differs from the last applied record
    while the pillar still renders that record, rules of the loaded tables changed at
    runtime, and accept rules removed from custom-input while the table stayed loaded.
    """
    restored = []
    if recorded is not None:
        restored += [filename for filename, change in file_changes.items() if recorded.get(filename) == change["new"]]
    if report is not None:
        service_changes = _service_changes(report)
        for key, table in (("ruleset", "inet sysdns"), ("guard-ruleset", "inet sysdns_guard")):
            if key in service_changes:
                restored.append("rules of table {} ({})".format(table, report[key]))
        if report.get("firewall") == "loaded" and "input-accept" in service_changes:
            restored.append("accept rules in custom-input ({})".format(report["input-accept"]))
    return restored


# Report of a sys-dns that has just started from the formula's template without a
# configuration: only the guard, which the template contains, is loaded.
UNCONFIGURED_REPORT = {"service": "inactive", "firewall": "missing", "guard": "loaded", "input-accept": "missing"}
# Exit status of a shell command that was not found (POSIX sh, "Command Search and Execution").
COMMAND_NOT_FOUND = 127


def _read_report(name):
    result = __salt__["sysdns_qvm.run"](name, REPORT_COMMAND, autostart=False, check=False)
    if result["retcode"] == COMMAND_NOT_FOUND and __opts__["test"]:
        # The qube still runs from a template without the formula's helpers (a sys-dns
        # built by hand, before qube_present moves it to the formula's template and
        # restarts it): predict what it reports after that restart.
        return dict(UNCONFIGURED_REPORT, files={})
    if result["retcode"] != 0:
        raise CommandExecutionError(
            "in qube {}: {} failed with exit code {}: {}".format(
                name, REPORT_COMMAND, result["retcode"], (result["stderr"] or result["stdout"]).strip() or "(no output)"
            )
        )
    return parse_report(result["stdout"])


def config_applied(name, files, restart_qube=None):
    """
    Ensure sys-dns's configuration in /rw/config/sysdns matches ``files``, that the
    firewall is loaded and that dnscrypt-proxy runs with it.

    A running sys-dns is checked for real (files by SHA-256, service, nft table), so
    hand edits are found and restored. For a halted qube, the record in the feature
    ``sysdns.config`` replaces that reading. New files replace the old ones only after
    the qube's ``dnscrypt-proxy -check`` and ``nft -c`` accept them, and in an AppVM
    dnscrypt-proxy restarts without a restart of the qube.

    name
        The qube whose /rw contains the configuration: sys-dns itself, or for a named
        disposable its disposable template.
    files
        ``{filename: content}`` for /rw/config/sysdns.
    restart_qube
        The named disposable that runs the configuration stored in ``name``. When it
        runs an outdated configuration, it is restarted (forced, since downstream
        qubes are connected to it; Qubes attaches them again when it starts).
    """
    ret = _ret(name, "Configuration of {} is up to date and dnscrypt-proxy runs".format(name))
    try:
        wanted = {filename: _sha256(content) for filename, content in files.items()}
        qube = __salt__["sysdns_qvm.get_qube"](name)
        holds_service = restart_qube is None
        recorded = __salt__["sysdns_qvm.json_feature"](name, CONFIG_FEATURE) if qube else None

        # The files to compare are those the service runs with: sys-dns's own, or for a
        # named disposable those of the running disposable.
        service_qube = name if holds_service else restart_qube
        report = None
        if __salt__["sysdns_qvm.is_running"](service_qube):
            report = _read_report(service_qube)
            have = report["files"]
        elif holds_service:
            have = recorded or {}
            if recorded is None:
                # Never configured: once started, the qube will show what a fresh
                # template gives: the guard, but a stopped service and no firewall.
                report = {
                    "service": "inactive",
                    "firewall": "missing",
                    "ruleset": "missing",
                    "guard": "loaded",
                    "guard-ruleset": "as-loaded",
                    "input-accept": "missing",
                }
        else:
            have = recorded or {}

        changes = {}
        file_changes = {
            filename: {"old": have.get(filename), "new": wanted.get(filename)}
            for filename in sorted(set(have) | set(wanted))
            if have.get(filename) != wanted.get(filename)
        }
        if file_changes:
            changes["files"] = file_changes
        if report is not None:
            changes.update(_service_changes(report))
        store_needed = not holds_service and recorded != wanted
        if store_needed and not file_changes:
            changes["stored"] = {"old": recorded, "new": wanted}
        if not changes:
            if report is None:
                # Halted: only the record was compared, and the service state is
                # unknown until the qube runs.
                ret["comment"] = (
                    "Configuration recorded in feature {} of {} matches the pillar; {} is halted, so "
                    "whether dnscrypt-proxy runs is unknown until it starts".format(CONFIG_FEATURE, name, service_qube)
                )
            return ret

        ret["changes"] = changes
        restored = _restored(file_changes, recorded, report)
        suffix = "; restored after changes inside the qube: " + ", ".join(restored) if restored else ""
        if __opts__["test"]:
            ret["result"] = None
            ret["comment"] = "Configuration of {} would have been applied{}".format(name, suffix)
            return ret

        archive = __salt__["sysdns_qvm.pack_files"](
            {filename: {"content": content, "mode": "0644"} for filename, content in files.items()}
        )
        if holds_service:
            __salt__["sysdns_qvm.run"](name, INSTALL_CONFIG_COMMAND, stdin=archive, timeout=300)
            __salt__["sysdns_qvm.set_json_feature"](name, CONFIG_FEATURE, wanted)
        else:
            if store_needed:
                # A disposable template only stores the files, and its named
                # disposable starts from the private volume of its last shutdown.
                __salt__["sysdns_qvm.run"](name, STORE_CONFIG_COMMAND, stdin=archive, timeout=300)
                __salt__["sysdns_qvm.shutdown"](name)
                __salt__["sysdns_qvm.set_json_feature"](name, CONFIG_FEATURE, wanted)
            if report is not None and (file_changes or _service_changes(report)):
                __salt__["sysdns_qvm.restart"](restart_qube)
        ret["comment"] = "Configuration of {} has been applied{}".format(name, suffix)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["changes"] = {}
        return _fail(ret, str(exc))
    return ret


# A fixed script lists or removes what the original hand-written sys-dns design left
# in sys-dns. It travels on standard input, so it runs on any template.
LEGACY_SCRIPT = "salt://qubes/network/sys-dns/files/legacy-artifacts.sh"
LEGACY_LIST_COMMAND = "sh -s list"
LEGACY_REMOVE_COMMAND = "sh -s remove"
# Feature that qube_present sets on every sys-dns the formula builds.
BUILT_FEATURE = "service.sysdns"
# __context__ key: halted hand-made qubes that legacy_removed leaves to its instance
# with after_start.
LEGACY_DEFERRED = "sysdns.legacy_deferred"
# Feature that qube_present sets on a qube it adopts: one that existed before the
# build without BUILT_FEATURE, such as a sys-dns made by hand. Its value is the
# template the qube had then. The rollback keeps a qube that carries it.
ADOPTED_FEATURE = "sysdns.adopted"


def parse_legacy_output(output, status):
    """Return the sorted artifact IDs on the lines ``STATUS ID`` of the legacy script's output."""
    prefix = status + " "
    return sorted({line[len(prefix) :].strip() for line in output.splitlines() if line.startswith(prefix)})


def _legacy_artifacts(name, script, command):
    result = __salt__["sysdns_qvm.run"](name, command, stdin=script, autostart=False, timeout=300)
    return parse_legacy_output(result["stdout"], "present" if command == LEGACY_LIST_COMMAND else "removed")


def legacy_removed(name, script=LEGACY_SCRIPT, after_start=False):
    """
    Ensure sys-dns contains nothing that the original hand-written sys-dns design left:
    its DNAT script /rw/config/nft-dnscrypt.sh, the unit dnscrypt-nft.service, the nft
    table ``ip dnscrypt``, its port-53 DNAT rules in Qubes' ``ip qubes dnat-dns`` and
    ``ip qubes prerouting`` chains (only those rules, matched by their whole text), and
    its dnscrypt-proxy.toml and forwarding-rules.txt in /etc/dnscrypt-proxy.

    Each artifact removed is one change, ``{ID: {"old": "present", "new": "removed"}}``.
    A running qube is inspected at every run (one read-only ``qvm-run``). A halted qube
    built by the formula (feature ``service.sysdns``) is left alone.

    A halted qube that lacks that feature was made by hand, and its /rw can only be
    read from inside. Starting it as it is would attach the downstream qubes that still
    run to a qube without the formula's port-53 guard. So this state only records it,
    and a second instance with ``after_start: true``, placed after the states that move
    the qube to the formula's template and start it, inspects it there. At that point
    only the script in /rw is left (the rest lived in the root volume), and the
    formula's guard and redirect are loaded at boot.

    name
        The qube to clean, e.g. ``sys-dns``.
    script
        The script that lists and removes the artifacts, on the Salt file server.
    after_start
        ``false`` (default): inspect a running qube, and record a halted hand-made one.
        ``true``: inspect only a qube that an earlier instance of this state recorded
        in the same run. Under ``test=True`` that qube is still halted, so the
        prediction names the inspection but not what its /rw contains.

    .. code-block:: yaml

        sys-dns legacy artifacts removed:
          sysdns.legacy_removed:
            - name: sys-dns

        sys-dns legacy artifacts removed after start:
          sysdns.legacy_removed:
            - name: sys-dns
            - after_start: true
            - require:
              - sysdns: sys-dns running
    """
    ret = _ret(name, "Qube {} contains nothing of the original hand-written sys-dns design".format(name))
    try:
        # The states of one run share __context__: the first instance records here the
        # halted hand-made qubes that the instance with after_start inspects.
        deferred = __context__.setdefault(LEGACY_DEFERRED, set())
        if after_start and name not in deferred:
            return ret

        qube = __salt__["sysdns_qvm.get_qube"](name, refresh=after_start)
        if qube is None:
            return ret

        if qube["state"] != "Running":
            if after_start:
                if not __opts__["test"]:
                    raise CommandExecutionError(
                        "qube {} is {} where it should run on the formula's template; start it "
                        "(qvm-start {}) and apply the build again".format(name, qube["state"], name)
                    )
                ret["result"] = None
                ret["comment"] = (
                    "Qube {} would have been inspected for what the original hand-written sys-dns "
                    "design left in its /rw once it runs on the formula's template".format(name)
                )
                return ret
            if BUILT_FEATURE in __salt__["sysdns_qvm.features"](name):
                return ret
            deferred.add(name)
            ret["comment"] = (
                "Qube {} is halted and was made by hand: it is inspected for what the original "
                "hand-written sys-dns design left in its /rw once it runs on the formula's "
                "template".format(name)
            )
            return ret

        changes = {}
        content = _resolve_files({"script": {"source": script}})["script"]["content"]
        present = _legacy_artifacts(name, content, LEGACY_LIST_COMMAND)
        for artifact in present:
            changes[artifact] = {"old": "present", "new": "removed"}
        if not changes:
            return ret

        ret["changes"] = changes
        if __opts__["test"]:
            ret["result"] = None
            ret["comment"] = "Removed from {} would have been: {}".format(name, ", ".join(present))
            return ret

        removed = _legacy_artifacts(name, content, LEGACY_REMOVE_COMMAND)
        if removed != present:
            raise CommandExecutionError(
                "qube {}: the original design's artifacts changed while they were removed "
                "(found: {}; removed: {}); run the state again".format(
                    name, ", ".join(present) or "none", ", ".join(removed) or "none"
                )
            )
        ret["comment"] = "Removed from {}: {}".format(name, ", ".join(present))
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["changes"] = {}
        return _fail(ret, str(exc))
    return ret


def _whonix_reason(qube_name):
    qube = __salt__["sysdns_qvm.get_qube"](qube_name)
    names = [qube_name]
    if qube and qube.get("template"):
        names.append(qube["template"])
    for candidate in names:
        if "whonix" in candidate.lower():
            return "{} is a Whonix qube".format(candidate)
    if qube and qube.get("template"):
        template_features = __salt__["sysdns_qvm.features"](qube["template"])
        for feature in WHONIX_FEATURES:
            if template_features.get(feature):
                return "its template {} has the Whonix feature {}".format(qube["template"], feature)
    return None


def _adopt_netvm(ret, name, netvm):
    """
    Record the previous netvm of a qube that was routed through ``netvm`` by hand (as
    the original hand-written sys-dns design does with sys-firewall), so that the
    rollback can restore it like after a build of the formula.

    The qube it had before is taken to be the netvm of ``netvm``, because a DNS qube
    inserted by hand sits between the qube and that netvm. The original design's own
    rollback does the same: it sets sys-firewall's netvm back to sys-net, the netvm of
    its sys-dns.
    """
    if PREVIOUS_NETVM_FEATURE in __salt__["sysdns_qvm.features"](name):
        return ret
    upstream = __salt__["sysdns_qvm.get_qube"](netvm)
    previous = (upstream or {}).get("netvm") or ""
    if previous == name:
        previous = ""

    ret["changes"] = {"features": {PREVIOUS_NETVM_FEATURE: {"old": None, "new": previous}}}
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = "Qube {}, routed through {} by hand, would have recorded {!r} as its previous netvm".format(
            name, netvm, previous
        )
        return ret

    __salt__["sysdns_qvm.set_feature"](name, PREVIOUS_NETVM_FEATURE, previous)
    ret["comment"] = "Qube {}, routed through {} by hand, has recorded {!r} as its previous netvm".format(
        name, netvm, previous
    )
    return ret


def netvm(name, netvm):
    """
    Ensure a qube uses ``netvm`` as its netvm, recording the previous one in the
    feature ``sysdns.previous-netvm`` for the rollback: its name, an empty value for
    no netvm, or ``default`` when it followed the global ``default_netvm``. Whonix
    qubes are refused: they keep their Tor chain.

    name
        Qube to rewire, e.g. ``sys-firewall``.
    netvm
        New netvm, e.g. ``sys-dns``.
    """
    ret = _ret(name, "Qube {} already uses {} as its netvm".format(name, netvm))
    try:
        qube = __salt__["sysdns_qvm.get_qube"](name)
        if qube is None:
            return _fail(ret, "qube {} not found: create it or remove it from sysdns:rewire".format(name))
        reason = _whonix_reason(name)
        if reason:
            return _fail(
                ret,
                "qube {} is not rewired because {}: Whonix keeps its Tor chain; remove it from sysdns:rewire".format(
                    name, reason
                ),
            )
        if qube["netvm"] == netvm:
            return _adopt_netvm(ret, name, netvm)

        changes = {"netvm": {"old": qube["netvm"], "new": netvm}}
        recorded = __salt__["sysdns_qvm.features"](name).get(PREVIOUS_NETVM_FEATURE)
        if recorded is None:
            if __salt__["sysdns_qvm.pref_is_default"](name, "netvm"):
                previous = DEFAULT_NETVM
            else:
                previous = qube["netvm"] or ""
            changes["features"] = {PREVIOUS_NETVM_FEATURE: {"old": None, "new": previous}}
        ret["changes"] = changes
        if __opts__["test"]:
            ret["result"] = None
            ret["comment"] = "Netvm of {} would have been set to {}".format(name, netvm)
            return ret

        if recorded is None:
            __salt__["sysdns_qvm.set_feature"](name, PREVIOUS_NETVM_FEATURE, previous)
        __salt__["sysdns_qvm.set_pref"](name, "netvm", netvm)
        ret["comment"] = "Netvm of {} has been set to {}".format(name, netvm)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["changes"] = {}
        return _fail(ret, str(exc))
    return ret


def _restore_plan(name, qubes):
    """
    Return ``(plan, missing)`` for the qubes that carry the feature
    ``sysdns.previous-netvm``, among ``qubes`` and every qube whose netvm is ``name``.

    ``plan`` maps each qube the rollback can restore to its changes. ``missing`` maps
    each qube that still uses ``name`` but whose recorded netvm no longer exists to
    that name: such a qube is not in ``plan`` and keeps its netvm and its record.
    """
    candidates = list(qubes or [])
    for client, row in sorted(__salt__["sysdns_qvm.list_qubes"]().items()):
        if row.get("netvm") == name and client not in candidates:
            candidates.append(client)

    plan = {}
    missing = {}
    for client in candidates:
        row = __salt__["sysdns_qvm.get_qube"](client)
        if row is None:
            continue
        recorded = __salt__["sysdns_qvm.features"](client).get(PREVIOUS_NETVM_FEATURE)
        if recorded is None:
            continue
        previous = recorded or None
        changes = {}
        # A netvm changed by hand after the build is the user's choice and stays. The
        # build sets the netvm explicitly, so one at its default was reset by hand.
        if row.get("netvm") == name and not __salt__["sysdns_qvm.pref_is_default"](client, "netvm"):
            if previous not in (None, DEFAULT_NETVM) and __salt__["sysdns_qvm.get_qube"](previous) is None:
                missing[client] = previous
                continue
            changes["netvm"] = {"old": name, "new": previous}
        changes["features"] = {PREVIOUS_NETVM_FEATURE: {"old": recorded, "new": None}}
        plan[client] = changes
    return plan, missing


def _describe_missing(name, missing):
    return "; ".join(
        "qube {client} still uses {name} because its previous netvm {previous}, recorded in "
        "the feature {feature}, no longer exists: set its netvm by hand (qvm-prefs {client} "
        "netvm QUBE, or qvm-prefs --default {client} netvm) and run the rollback again".format(
            client=client, name=name, previous=previous, feature=PREVIOUS_NETVM_FEATURE
        )
        for client, previous in sorted(missing.items())
    )


def netvm_restored(name, qubes=None):
    """
    Ensure no qube stays routed through ``name`` by the formula: every qube that
    carries the feature ``sysdns.previous-netvm`` gets that netvm back (an empty value
    means no netvm, ``default`` resets the netvm to follow the global
    ``default_netvm`` again, with ``qvm-prefs --default``), and the feature is unset.

    The qubes looked at are those in ``qubes`` and every qube whose netvm is ``name``
    in the one qvm-ls listing. Each of them costs one qvm-features read, and each that
    still uses ``name`` one qvm-prefs read. A qube whose netvm was changed by hand
    after the build (to another qube, or reset to its default) keeps that netvm and
    only loses the feature. A qube routed through ``name`` without the feature was
    wired by hand and is left alone.

    A qube whose recorded netvm no longer exists keeps ``name`` as its netvm and keeps
    the feature. The others are restored all the same, and the state then fails and
    names each such qube: once its netvm is set by hand, a new run unsets the feature.
    In the rollback SLS, ``name`` then stays: its ``absent`` state requires this one,
    and ``absent`` also rejects a qube still in use.

    name
        The qube the build routed them through, e.g. ``sys-dns``.
    qubes
        Qubes the build rewired (the pillar's ``sysdns:rewire``).

    .. code-block:: yaml

        sys-dns clients restored:
          sysdns.netvm_restored:
            - name: sys-dns
            - qubes: [sys-firewall]
    """
    ret = _ret(name, "No qube is routed through {} by the formula".format(name))
    try:
        plan, missing = _restore_plan(name, qubes)
        if not plan and not missing:
            return ret

        ret["changes"] = plan
        comments = []
        if __opts__["test"]:
            ret["result"] = None
            if plan:
                comments.append("Previous netvm of {} would have been restored".format(", ".join(sorted(plan))))
        else:
            for client, changes in sorted(plan.items()):
                # The netvm goes first, so that a failure leaves the record in place.
                if "netvm" in changes and changes["netvm"]["new"] == DEFAULT_NETVM:
                    __salt__["sysdns_qvm.reset_pref"](client, "netvm")
                elif "netvm" in changes:
                    __salt__["sysdns_qvm.set_pref"](client, "netvm", changes["netvm"]["new"])
                __salt__["sysdns_qvm.set_feature"](client, PREVIOUS_NETVM_FEATURE, None)
            if plan:
                comments.append("Previous netvm of {} has been restored".format(", ".join(sorted(plan))))
        if missing:
            ret["result"] = False
            comments.append(_describe_missing(name, missing))
        ret["comment"] = ". ".join(comments)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["changes"] = {}
        return _fail(ret, str(exc))
    return ret


def _describe_uses(uses):
    words = []
    for holder, prop in uses:
        words.append("{} of {}".format(prop, holder) if holder else "global property {}".format(prop))
    return ", ".join(words)


def _kept_reason(name, marker):
    """Return why ``absent`` keeps the existing qube ``name``, or None when it removes it."""
    features = __salt__["sysdns_qvm.features"](name)
    if marker and features.get(marker) is None:
        return "it lacks the feature {}, so the formula did not build it".format(marker)
    if features.get(ADOPTED_FEATURE) is not None:
        return "it existed before the build, which adopted it (feature {}; its template then: {})".format(
            ADOPTED_FEATURE, features[ADOPTED_FEATURE] or "unknown"
        )
    return None


def _predicted_uses(name, uses, removed_before):
    """
    Return the uses of ``name`` that remain, in a real run, after the states before
    this one: the qubes of ``removed_before`` that their own state removes are gone,
    and so is the netvm of each qube that ``netvm_restored`` restores.
    """
    removed = {
        holder
        for holder, marker in (removed_before or {}).items()
        if __salt__["sysdns_qvm.get_qube"](holder) is not None and _kept_reason(holder, marker) is None
    }
    rewired = set()
    if any(prop == "netvm" for _, prop in uses):
        plan, _missing = _restore_plan(name, [])
        rewired = {client for client, changes in plan.items() if "netvm" in changes}
    return [
        (holder, prop) for holder, prop in uses if holder not in removed and not (prop == "netvm" and holder in rewired)
    ]


def absent(name, marker=None, removed_before=None, timeout=120):
    """
    Ensure a qube the formula built is removed: shut down when it runs, then
    ``qvm-remove --force``.

    A qube without the feature ``marker`` was not built by the formula and is kept,
    and so is a qube with the feature ``sysdns.adopted``, which existed before the
    build. A qube still in use (as template, netvm or default_dispvm of another qube,
    or in a global property) is not removed. The state then fails and names those uses.

    name
        Qube name.
    marker
        Feature the formula set on the qube, e.g. ``sysdns.template``; None skips
        this check.
    removed_before
        ``{qube: marker}`` of the qubes that earlier states of the same run remove,
        with the marker each of them is given. A test run, which removes nothing,
        ignores the uses of this qube by those that their state removes (not one it
        keeps), and the netvm of qubes that ``netvm_restored`` restores first.
    timeout
        Seconds to wait for the shutdown.

    .. code-block:: yaml

        tpl-sys-dns absent:
          sysdns.absent:
            - name: tpl-sys-dns
            - marker: sysdns.template
            - removed_before:
                sys-dns: service.sysdns
    """
    ret = _ret(name, "Qube {} is absent".format(name))
    try:
        qube = __salt__["sysdns_qvm.get_qube"](name)
        if qube is None:
            return ret
        reason = _kept_reason(name, marker)
        if reason:
            ret["comment"] = "Qube {} is kept because {}".format(name, reason)
            return ret

        uses = __salt__["sysdns_qvm.dependents"](name)
        if __opts__["test"]:
            uses = _predicted_uses(name, uses, removed_before)
        if uses:
            return _fail(
                ret,
                "qube {} is not removed because it is still in use as {}: change those "
                "properties first (qvm-prefs, qubes-prefs), or set "
                "sysdns:rollback:remove_qubes to false".format(name, _describe_uses(uses)),
            )

        ret["changes"] = {
            "qube": {
                "old": {"class": qube["class"], "template": qube.get("template"), "state": qube["state"]},
                "new": None,
            }
        }
        if __opts__["test"]:
            ret["result"] = None
            ret["comment"] = "Qube {} would have been removed".format(name)
            return ret

        if qube["state"] != "Halted":
            __salt__["sysdns_qvm.shutdown"](name, timeout=timeout)
        __salt__["sysdns_qvm.remove"](name)
        ret["comment"] = "Qube {} has been removed".format(name)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["changes"] = {}
        return _fail(ret, str(exc))
    return ret
