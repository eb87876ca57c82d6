"""
Read and change Qubes qubes from dom0 through the qvm-* command-line tools.

Every call passes an argument list (never a shell string built from pillar data),
and file content reaches a qube on the standard input of ``qvm-run -p``. Reads are
batched: one ``qvm-ls`` for the properties of all qubes and one ``qvm-features`` per
qube, cached in ``__context__`` until this module changes something.
"""

import base64
import io
import ipaddress
import json
import logging
import tarfile
import time

import salt.utils.path
from salt.exceptions import CommandExecutionError

log = logging.getLogger(__name__)

__virtualname__ = "sysdns_qvm"

# Properties read for every qube in one qvm-ls call. qvm-ls accepts any qube property
# as a field and prints "-" for None, an empty value or a property the class lacks
# (qubesadmin/tools/qvm_ls.py, Column.cell, qubes-core-admin-client 4.2). Its own
# columns win over properties of the same name: MEMORY is the memory a running qube
# uses now, not the memory property, which get_pref reads instead.
QUBE_FIELDS = (
    "name",
    "class",
    "state",
    "template",
    "netvm",
    "label",
    "provides_network",
    "autostart",
    "maxmem",
    "vcpus",
    "template_for_dispvms",
    "default_dispvm",
    "ip",
    "visible_ip",
    "ip6",
    "visible_ip6",
)
# Address properties of a qube that a forwarding rule must not name: a rule that
# forwards to sys-dns itself reaches its own dnscrypt-proxy, which forwards again.
ADDRESS_FIELDS = ("ip", "visible_ip", "ip6", "visible_ip6")
BOOL_FIELDS = frozenset({"provides_network", "autostart", "template_for_dispvms"})
INT_FIELDS = frozenset({"memory", "maxmem", "vcpus", "qrexec_timeout", "shutdown_timeout"})

REQUIRED_TOOLS = ("qvm-ls", "qvm-prefs", "qvm-features", "qvm-run", "qvm-start")


def __virtual__():
    missing = [tool for tool in REQUIRED_TOOLS if not salt.utils.path.which(tool)]
    if missing:
        return (
            False,
            "sysdns_qvm needs Qubes dom0 tools that are not on PATH: " + ", ".join(missing),
        )
    return __virtualname__


def _call(argv, stdin=None, timeout=None, check=True):
    """
    Run one dom0 tool and return Salt's ``cmd.run_all`` result dict.

    With ``check``, a non-zero exit raises CommandExecutionError naming the command
    and its output.
    """
    log.debug("sysdns_qvm: running %s", argv)
    started = time.monotonic()
    result = __salt__["cmd.run_all"](
        argv,
        python_shell=False,
        stdin=stdin,
        ignore_retcode=True,
        output_loglevel="quiet",
        timeout=timeout,
        rstrip=False,
    )
    log.debug(
        "sysdns_qvm: %s exited %s after %.2f s",
        argv[0],
        result["retcode"],
        time.monotonic() - started,
    )
    if check and result["retcode"] != 0:
        raise CommandExecutionError(_describe_failure(argv, result))
    return result


def _describe_failure(argv, result):
    output = (result.get("stderr") or "").strip() or (result.get("stdout") or "").strip()
    if len(output) > 2000:
        output = "..." + output[-2000:]
    return "command {} failed with exit code {}: {}".format(" ".join(argv), result["retcode"], output or "(no output)")


def _forget():
    """Drop cached reads after a change."""
    for key in list(__context__):
        if key.startswith("sysdns_qvm."):
            del __context__[key]


def _parse_value(field, raw):
    if raw == "-":
        return None
    if field in BOOL_FIELDS:
        return raw == "True"
    if field in INT_FIELDS:
        try:
            return int(raw)
        except ValueError:
            return raw
    return raw


def parse_qvm_ls(output, fields=QUBE_FIELDS):
    """
    Parse ``qvm-ls --raw-data --fields ...`` output into ``{name: {field: value}}``.

    Booleans and integers come back as Python types, "-" as None.
    """
    qubes = {}
    for line in output.splitlines():
        if not line.strip():
            continue
        cells = line.split("|")
        if len(cells) != len(fields):
            raise CommandExecutionError(
                "qvm-ls printed a row with {} fields where {} were requested: {!r}".format(
                    len(cells), len(fields), line
                )
            )
        row = {field: _parse_value(field, cell) for field, cell in zip(fields, cells, strict=True)}
        qubes[row["name"]] = row
    return qubes


def parse_qvm_features(output):
    """Parse the two-column table that ``qvm-features QUBE`` prints into a dict."""
    features = {}
    for line in output.splitlines():
        if not line.strip():
            continue
        parts = line.split(None, 1)
        features[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    return features


def list_qubes(refresh=False):
    """
    Return the properties of every qube, read with one qvm-ls call.

    refresh
        Read again even when this run already read the list.

    CLI Example:

    .. code-block:: bash

        salt-call sysdns_qvm.list_qubes
    """
    key = "sysdns_qvm.qubes"
    if refresh or key not in __context__:
        argv = ["qvm-ls", "--raw-data", "--fields", ",".join(QUBE_FIELDS)]
        __context__[key] = parse_qvm_ls(_call(argv)["stdout"])
    return __context__[key]


def get_qube(name, refresh=False):
    """
    Return the properties of one qube, or None when it does not exist.

    name
        Qube name.
    """
    return list_qubes(refresh=refresh).get(name)


def is_running(name, refresh=False):
    """Return True when the qube exists and is running."""
    qube = get_qube(name, refresh=refresh)
    return bool(qube) and qube["state"] == "Running"


def features(name, refresh=False):
    """
    Return the features of one qube as a dict of strings, read with one qvm-features call.

    name
        Qube name.
    """
    key = "sysdns_qvm.features." + name
    if refresh or key not in __context__:
        __context__[key] = parse_qvm_features(_call(["qvm-features", name])["stdout"])
    return __context__[key]


def get_pref(name, prop, refresh=False):
    """
    Return one property of a qube read with ``qvm-prefs``, typed like list_qubes rows.

    name
        Qube name.
    prop
        Property name, e.g. ``memory``.
    """
    key = "sysdns_qvm.pref.{}.{}".format(name, prop)
    if refresh or key not in __context__:
        raw = _call(["qvm-prefs", name, prop])["stdout"].strip()
        __context__[key] = _parse_value(prop, raw if raw else "-")
    return __context__[key]


def parse_qvm_prefs(output):
    """
    Parse the table that ``qvm-prefs QUBE`` prints into ``{property: is_default}``.

    Each row is the name, "D" for a property at its default or "-" for a value set on
    the qube, then the value. A property without a value shows only "U"
    (qubesadmin/tools/qvm_prefs.py, qubes-core-admin-client 4.2 and 4.3).
    """
    defaults = {}
    for line in output.splitlines():
        words = line.split(None, 2)
        if len(words) >= 2 and words[1] in ("D", "-"):
            defaults[words[0]] = words[1] == "D"
    return defaults


def pref_is_default(name, prop, refresh=False):
    """
    Return True when a property of a qube follows its default, e.g. a netvm that
    follows the global ``default_netvm``.

    Reads the whole ``qvm-prefs QUBE`` table in one call, because Qubes 4.2's
    qvm-prefs shows whether one property is at its default only there.

    name
        Qube name.
    prop
        Property name, e.g. ``netvm``.
    """
    key = "sysdns_qvm.prefs_default." + name
    if refresh or key not in __context__:
        __context__[key] = parse_qvm_prefs(_call(["qvm-prefs", name])["stdout"])
    if prop not in __context__[key]:
        raise CommandExecutionError("qvm-prefs {} printed no value for the property {}".format(name, prop))
    return __context__[key][prop]


def default_prefs(name):
    """
    Return the names of a qube's properties that follow their default, read with one
    ``qvm-prefs`` call.

    name
        Qube name.
    """
    return {prop for prop, is_default in parse_qvm_prefs(_call(["qvm-prefs", name])["stdout"]).items() if is_default}


def format_pref(value):
    """Format a property value the way qvm-prefs takes it on its command line."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if value is None:
        return ""
    return str(value)


def set_pref(name, prop, value):
    """
    Set one property of a qube.

    name
        Qube name.
    prop
        Property name, e.g. ``netvm``.
    value
        New value; booleans as True/False, None for no qube (e.g. netvm none).
    """
    argv = ["qvm-prefs", name, prop, format_pref(value)]
    _call(argv)
    log.info("sysdns_qvm: set %s of qube %s to %r", prop, name, value)
    _forget()


def reset_pref(name, prop):
    """
    Reset one property of a qube to its default with ``qvm-prefs --default``, so that
    it follows the default again (for netvm: the global ``default_netvm``).

    name
        Qube name.
    prop
        Property name, e.g. ``netvm``.
    """
    _call(["qvm-prefs", "--default", name, prop])
    log.info("sysdns_qvm: reset %s of qube %s to its default", prop, name)
    _forget()


def set_feature(name, feature, value):
    """
    Set one feature of a qube; None unsets it.

    name
        Qube name.
    feature
        Feature name, e.g. ``service.qubes-firewall``.
    value
        String value, or None to unset.
    """
    if value is None:
        argv = ["qvm-features", "--unset", name, feature]
    else:
        argv = ["qvm-features", name, feature, str(value)]
    _call(argv)
    log.info("sysdns_qvm: set feature %s of qube %s to %r", feature, name, value)
    _forget()


def create(name, klass, template, label, prefs=None):
    """
    Create a qube with ``qvm-create``.

    name
        Qube name.
    klass
        Qube class: AppVM, DispVM, TemplateVM or StandaloneVM.
    template
        Its template (for a DispVM: its disposable template).
    label
        Label color.
    prefs
        Properties set at creation, as a dict.
    """
    argv = ["qvm-create", "--class", klass, "--label", label]
    if template:
        argv += ["--template", template]
    for prop, value in sorted((prefs or {}).items()):
        argv += ["--prop", "{}={}".format(prop, format_pref(value))]
    argv.append(name)
    _call(argv)
    log.info("sysdns_qvm: created %s %s from %s", klass, name, template)
    _forget()


def clone(source, name):
    """
    Clone a qube with ``qvm-clone``.

    source
        Existing qube, usually a template.
    name
        Name of the copy.
    """
    _call(["qvm-clone", source, name], timeout=3600)
    log.info("sysdns_qvm: cloned %s to %s", source, name)
    _forget()


def start(name):
    """Start a qube unless it runs already."""
    _call(["qvm-start", "--skip-if-running", name], timeout=600)
    log.info("sysdns_qvm: started %s", name)
    _forget()


def shutdown(name, timeout=120, force=False):
    """
    Shut a qube down and wait until it has halted.

    timeout
        Seconds to wait before qvm-shutdown gives up.
    force
        Shut down a netvm even while qubes are connected to it (qvm-shutdown --force).
    """
    argv = ["qvm-shutdown", "--wait", "--timeout", str(int(timeout))]
    if force:
        argv.append("--force")
    _call(argv + [name], timeout=timeout + 30)
    log.info("sysdns_qvm: shut down %s", name)
    _forget()


def restart(name, timeout=120):
    """
    Shut a qube down, wait, and start it again.

    Qubes refuses to shut down a netvm whose downstream qubes run, and attaches them
    again when the netvm starts (qubes/vm/mix/net.py, qubes-core-admin 4.2), so the
    shutdown is forced: downstream qubes lose DNS and network only until the start.
    """
    shutdown(name, timeout=timeout, force=True)
    start(name)


def run(name, command, user="root", stdin=None, autostart=True, timeout=900, check=True):
    """
    Run a command in a qube with ``qvm-run -p`` and return the cmd.run_all result.

    name
        Qube name.
    command
        Command line run by the qube's shell. Callers pass constant strings; data goes
        through ``stdin``.
    user
        User inside the qube.
    stdin
        Text sent to the command's standard input.
    autostart
        Start the qube when it is halted (as qvm-run does); False adds --no-autostart.
    check
        Raise CommandExecutionError on a non-zero exit code.
    """
    argv = ["qvm-run", "--pass-io", "--no-gui", "--user", user]
    if not autostart:
        argv.append("--no-autostart")
    argv += [name, command]
    result = _call(argv, stdin=stdin, timeout=timeout, check=False)
    if autostart:
        # qvm-run may have started the qube.
        __context__.pop("sysdns_qvm.qubes", None)
    if check and result["retcode"] != 0:
        raise CommandExecutionError("in qube {}: {}".format(name, _describe_failure(argv, result)))
    return result


def pack_files(files, links=None):
    """
    Pack files into a base64-encoded tar archive for ``base64 -d | tar -x`` in a qube.

    files
        Dict of path to ``{"content": str, "mode": "0644"}``; paths are relative to the
        extraction folder (a leading "/" is dropped).
    links
        Dict of path to symlink target, e.g. a unit masked with a link to /dev/null.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path, spec in sorted(files.items()):
            data = spec["content"].encode("utf-8")
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size = len(data)
            info.mode = int(spec.get("mode", "0644"), 8)
            archive.addfile(info, io.BytesIO(data))
        for path, target in sorted((links or {}).items()):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return base64.b64encode(buffer.getvalue()).decode("ascii") + "\n"


def set_json_feature(name, feature, value):
    """Store a JSON-serializable value in a feature, in a canonical form."""
    set_feature(name, feature, json.dumps(value, sort_keys=True, separators=(",", ":")))


def json_feature(name, feature):
    """Return a feature written by set_json_feature, or None when unset or unreadable."""
    raw = features(name).get(feature)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        log.warning("sysdns_qvm: feature %s of qube %s is not valid JSON; ignoring it", feature, name)
        return None


# Global properties that name a qube; qvm-remove fails while one of them names the
# qube to remove (qubesadmin/utils.py vm_dependencies, qubes-core-admin-client 4.2).
GLOBAL_QUBE_PROPERTIES = (
    "clockvm",
    "default_audiovm",
    "default_dispvm",
    "default_guivm",
    "default_netvm",
    "default_template",
    "management_dispvm",
    "updatevm",
)
# Properties of a qube, read by list_qubes, that can name another qube.
QUBE_REFERENCE_FIELDS = ("template", "netvm", "default_dispvm")


def parse_qubes_prefs(output):
    """
    Parse the table that ``qubes-prefs`` prints (name, "-" or "D", value) into a dict.

    A value of "None" or an empty value becomes None.
    """
    prefs = {}
    for line in output.splitlines():
        words = line.split(None, 2)
        if len(words) < 2:
            continue
        value = words[2].strip() if len(words) == 3 else ""
        prefs[words[0]] = None if value in ("", "None") else value
    return prefs


def dependents(name):
    """
    Return the properties that still name a qube, as ``[(holder, property)]`` pairs,
    holder None for a global property.

    Reads the cached qvm-ls listing and one ``qubes-prefs`` call. Properties outside
    QUBE_REFERENCE_FIELDS and GLOBAL_QUBE_PROPERTIES (audiovm, guivm of single qubes)
    are not checked, so qvm-remove may still fail for them.

    name
        Qube name.
    """
    found = []
    for holder, row in sorted(list_qubes().items()):
        if holder == name:
            continue
        for prop in QUBE_REFERENCE_FIELDS:
            if row.get(prop) == name:
                found.append((holder, prop))
    key = "sysdns_qvm.global_prefs"
    if key not in __context__:
        __context__[key] = parse_qubes_prefs(_call(["qubes-prefs"])["stdout"])
    for prop in GLOBAL_QUBE_PROPERTIES:
        if __context__[key].get(prop) == name:
            found.append((None, prop))
    return found


def remove(name):
    """
    Remove a halted qube with ``qvm-remove --force`` (no confirmation prompt).

    Qubes rejects the removal of a running qube and of a qube that another qube or a
    global property still uses (as template, netvm, default_dispvm...). The error is
    raised as CommandExecutionError with qvm-remove's list of those uses.

    name
        Qube name.
    """
    _call(["qvm-remove", "--force", name], timeout=600)
    log.info("sysdns_qvm: removed %s", name)
    _forget()


def _with_article(klass):
    return ("an " if klass[:1] in "AEIOU" else "a ") + klass


def _rewire_problems(qubes, rewire):
    return [
        "sysdns:rewire:{}: qube {} not found: create it, or remove it from sysdns:rewire".format(index, name)
        for index, name in enumerate(rewire)
        if name not in qubes
    ]


def _class_problems(qubes, qube, klass, disposable_template):
    problems = []
    wanted = [("sysdns:qube:name", qube, klass)]
    if disposable_template:
        wanted.append(("sysdns:qube:disposable_template", disposable_template, "AppVM"))
    for key, name, expected in wanted:
        row = qubes.get(name)
        if row is None or row["class"] == expected:
            continue
        problems.append(
            "{}: qube {} exists as {} but the build needs {}, and Qubes cannot change a "
            "qube's class. Choose another name in {}, or remove the qube first: if the "
            "formula built it, apply qubes.network.sys-dns.rollback with the pillar that "
            "built it and sysdns:rollback:remove_qubes: true, which rewires its clients "
            "before it removes the qube; otherwise give its clients another netvm and "
            "run qvm-remove {}".format(key, name, _with_article(row["class"]), _with_article(expected), key, name)
        )
    return problems


def _own_addresses(row):
    """Return ``{address: property}`` for the IP addresses qvm-ls reports for a qube."""
    addresses = {}
    for field in ADDRESS_FIELDS:
        value = row.get(field)
        if not value:
            continue
        try:
            addresses.setdefault(ipaddress.ip_address(value), field)
        except ValueError:
            log.warning("sysdns_qvm: qvm-ls printed %r as %s of %s, not an IP address", value, field, row["name"])
    return addresses


def _loop_problems(qubes, qube, forwarding_rules):
    row = qubes.get(qube)
    if row is None:
        return []
    own = _own_addresses(row)
    problems = []
    for index, rule in enumerate(forwarding_rules):
        for position, server in enumerate(rule["servers"]):
            host = server.rsplit(":", 1)[0].strip("[]")
            field = own.get(ipaddress.ip_address(host))
            if field is None:
                continue
            problems.append(
                "sysdns:dnscrypt:forwarding_rules:{}:servers:{}: {} is the address of {} itself "
                "(its {} {}), so dnscrypt-proxy would forward the zone {} to itself in a loop: "
                "use the address of another DNS server".format(
                    index, position, server, qube, field, row[field], rule["zone"]
                )
            )
    return problems


def find_preflight_problems(qubes, qube, klass, rewire=(), forwarding_rules=(), disposable_template=None):
    """
    Return what stops the build on this machine, as messages that name the pillar key
    path, the value and the fix: an empty list when the build can run.

    qubes
        The listing of list_qubes.
    qube, klass
        Name and class of sys-dns (sysdns:qube:name and sysdns:qube:class).
    rewire
        Qubes to route through sys-dns, which must exist.
    forwarding_rules
        Validated rules of sysdns:dnscrypt:forwarding_rules, servers as "IP:port".
    disposable_template
        Name of the disposable template when sys-dns is a DispVM, which must be an AppVM.
    """
    return (
        _rewire_problems(qubes, rewire)
        + _class_problems(qubes, qube, klass, disposable_template)
        + _loop_problems(qubes, qube, forwarding_rules)
    )


def preflight_problems(qube, klass, rewire=(), forwarding_rules=(), disposable_template=None):
    """
    Check pillar values against the qubes of this machine and return what stops the
    build, with one qvm-ls call whose listing later reads of this run reuse. Changes nothing.

    CLI Example:

    .. code-block:: bash

        salt-call sysdns_qvm.preflight_problems sys-dns AppVM rewire='[sys-firewall]'
    """
    return find_preflight_problems(list_qubes(), qube, klass, rewire, forwarding_rules, disposable_template)
