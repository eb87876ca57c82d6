"""
An in-memory stand-in for the sysdns_qvm execution module, so that state functions
can be tested branch by branch without dom0. It records every call that would change
a qube, which lets tests assert that test mode changed nothing.
"""

import base64
import copy
import hashlib
import importlib.util
import io
import json
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LEGACY_SCRIPT_PATH = "qubes-sysdns-formula/qubes/network/sys-dns/files/legacy-artifacts.sh"


def load_salt_module(relative_path, **dunders):
    """Import a custom Salt module from this repository and set its dunders."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location("sysdns_test_" + path.stem + "_" + path.parent.name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for key, value in dunders.items():
        setattr(module, key, value)
    return module


qvm_module = load_salt_module("_modules/sysdns_qvm.py")
config_module = load_salt_module("_modules/sysdns_config.py")


def unpack_files(archive_text):
    """Return ``{name: content}`` of an archive made by sysdns_qvm.pack_files."""
    data = base64.b64decode(archive_text)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {
            member.name: archive.extractfile(member).read().decode()
            for member in archive.getmembers()
            if member.isfile()
        }


def qube(name, klass="AppVM", state="Halted", **props):
    """Return a qube record shaped like sysdns_qvm.list_qubes rows."""
    record = {field: None for field in qvm_module.QUBE_FIELDS}
    record.update(name=name, **{"class": klass, "state": state})
    record.update(props)
    return record


class FakeQubes:
    """Qubes and their features, with the sysdns_qvm functions the states call."""

    def __init__(self, qubes=(), features=None, defaults=None):
        self.qubes = {record["name"]: copy.deepcopy(record) for record in qubes}
        self.features_of = copy.deepcopy(features or {})
        # Properties that follow their default, per qube (the "D" rows of qvm-prefs).
        self.defaults = {name: set(props) for name, props in (defaults or {}).items()}
        self.changes = []
        self.runs = []
        # Files in /rw/config/sysdns of running qubes, and the reported service state.
        self.config_files = {}
        self.service_state = {}
        self.os_release = 'ID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n'
        self.sources = "deb http://deb.debian.org/debian bookworm main\n"
        self.fail_commands = {}
        # Commands missing in a qube ({name: {command}}): its shell exits with 127.
        self.missing_commands = {}
        self.guard_state = {}
        # What the report helper prints on its "ruleset" line, per qube.
        self.ruleset_state = {}
        self.guard_ruleset_state = {}
        self.setup_output = "dnscrypt-proxy 2.1.8\nsysdns: template setup complete\n"
        # What the original hand-written sys-dns design left in each qube, as the IDs
        # its legacy script prints, and the files of the Salt file server.
        self.legacy_artifacts = {}
        self.salt_files = {
            "salt://qubes/network/sys-dns/files/legacy-artifacts.sh": (ROOT / LEGACY_SCRIPT_PATH).read_text(),
        }
        # Global properties (qubes-prefs) that name a qube.
        self.global_prefs = {"default_netvm": "sys-firewall", "updatevm": "sys-net", "clockvm": "sys-net"}

    # Reads
    def list_qubes(self, refresh=False):
        return copy.deepcopy(self.qubes)

    def preflight_problems(self, qube, klass, rewire=(), forwarding_rules=(), disposable_template=None):
        return qvm_module.find_preflight_problems(
            self.list_qubes(), qube, klass, rewire, forwarding_rules, disposable_template
        )

    def get_qube(self, name, refresh=False):
        return copy.deepcopy(self.qubes.get(name))

    def get_pref(self, name, prop, refresh=False):
        self._require(name)
        return self.qubes[name].get(prop)

    def pref_is_default(self, name, prop, refresh=False):
        self._require(name)
        return prop in self.defaults.get(name, set())

    def default_prefs(self, name):
        self._require(name)
        return set(self.defaults.get(name, ()))

    def is_running(self, name, refresh=False):
        return name in self.qubes and self.qubes[name]["state"] == "Running"

    def _require(self, name):
        if name not in self.qubes:
            from salt.exceptions import CommandExecutionError

            raise CommandExecutionError("command qvm-features {} failed with exit code 2: no such domain".format(name))

    def features(self, name, refresh=False):
        self._require(name)
        return dict(self.features_of.get(name, {}))

    def json_feature(self, name, feature):
        self._require(name)
        raw = self.features_of.get(name, {}).get(feature)
        return json.loads(raw) if raw else None

    # Changes
    def _change(self, *call):
        self.changes.append(call)

    def set_pref(self, name, prop, value):
        self._change("set_pref", name, prop, value)
        self.qubes[name][prop] = value
        self.defaults.get(name, set()).discard(prop)

    def reset_pref(self, name, prop):
        # Only netvm is reset by the states; its default is the global default_netvm.
        assert prop == "netvm", prop
        self._change("reset_pref", name, prop)
        self.qubes[name][prop] = self.global_prefs.get("default_netvm")
        self.defaults.setdefault(name, set()).add(prop)

    def set_feature(self, name, feature, value):
        self._change("set_feature", name, feature, value)
        if value is None:
            self.features_of.get(name, {}).pop(feature, None)
        else:
            self.features_of.setdefault(name, {})[feature] = str(value)

    def set_json_feature(self, name, feature, value):
        self.set_feature(name, feature, json.dumps(value, sort_keys=True, separators=(",", ":")))

    def create(self, name, klass, template, label, prefs=None):
        self._change("create", name, klass, template, label)
        self.qubes[name] = qube(name, klass, template=template, label=label)

    def clone(self, source, name):
        self._change("clone", source, name)
        record = copy.deepcopy(self.qubes[source])
        record["name"] = name
        record["state"] = "Halted"
        self.qubes[name] = record

    def start(self, name):
        self._change("start", name)
        self.qubes[name]["state"] = "Running"

    def shutdown(self, name, timeout=120, force=False):
        # qvm-shutdown refuses a netvm whose downstream qubes run, unless --force.
        connected = sorted(
            other
            for other, record in self.qubes.items()
            if record.get("netvm") == name and record.get("state") != "Halted"
        )
        if connected and not force:
            from salt.exceptions import CommandExecutionError

            raise CommandExecutionError(
                "command qvm-shutdown --wait {} failed with exit code 1: there are other qubes"
                " connected to this qube: {}".format(name, ", ".join(connected))
            )
        self._change("shutdown", name)
        self.qubes[name]["state"] = "Halted"

    def restart(self, name, timeout=120):
        self._change("restart", name)
        self.qubes[name]["state"] = "Running"

    def dependents(self, name):
        found = []
        for holder, record in sorted(self.qubes.items()):
            if holder == name:
                continue
            for prop in qvm_module.QUBE_REFERENCE_FIELDS:
                if record.get(prop) == name:
                    found.append((holder, prop))
        for prop, value in sorted(self.global_prefs.items()):
            if value == name:
                found.append((None, prop))
        return found

    def remove(self, name):
        from salt.exceptions import CommandExecutionError

        self._require(name)
        if self.qubes[name]["state"] != "Halted":
            raise CommandExecutionError(
                "command qvm-remove --force {} failed with exit code 1: Domain is not powered off".format(name)
            )
        if self.dependents(name):
            raise CommandExecutionError(
                "command qvm-remove --force {} failed with exit code 1: Domain is in use".format(name)
            )
        self._change("remove", name)
        del self.qubes[name]
        self.features_of.pop(name, None)

    def pack_files(self, files, links=None):
        return qvm_module.pack_files(files, links)

    def run(self, name, command, user="root", stdin=None, autostart=True, timeout=900, check=True):
        self.runs.append((name, command, stdin))
        if self.qubes[name]["state"] != "Running":
            if not autostart:
                return {"retcode": 1, "stdout": "", "stderr": "qube not running"}
            self.start(name)
        if command in self.missing_commands.get(name, ()):
            return {"retcode": 127, "stdout": "", "stderr": "sh: 1: {}: not found".format(command)}
        if command in self.fail_commands:
            from salt.exceptions import CommandExecutionError

            raise CommandExecutionError(self.fail_commands[command])
        if command.endswith("/report"):
            lines = [
                "file {} {}".format(hashlib.sha256(content.encode()).hexdigest(), filename)
                for filename, content in sorted(self.config_files.get(name, {}).items())
            ]
            state = self.service_state.get(name, ("inactive", "missing", "missing"))
            guard = self.guard_state.get(name, "loaded")
            ruleset = self.ruleset_state.get(name, "as-loaded" if state[1] == "loaded" else "missing")
            lines += ["service " + state[0], "firewall " + state[1], "ruleset " + ruleset]
            guard_ruleset = self.guard_ruleset_state.get(name, "as-loaded" if guard == "loaded" else "missing")
            lines += ["guard " + guard, "guard-ruleset " + guard_ruleset, "input-accept " + state[2]]
            return {"retcode": 0, "stdout": "\n".join(lines) + "\n", "stderr": ""}
        if command in ("sh -s list", "sh -s remove"):
            found = sorted(self.legacy_artifacts.get(name, ()))
            if command == "sh -s list":
                return {"retcode": 0, "stdout": "".join("present " + item + "\n" for item in found), "stderr": ""}
            self._change("legacy-remove", name)
            self.legacy_artifacts[name] = set()
            return {"retcode": 0, "stdout": "".join("removed " + item + "\n" for item in found), "stderr": ""}
        if command.startswith("cat /etc/os-release"):
            return {"retcode": 0, "stdout": self.os_release + "--- sources\n" + self.sources, "stderr": ""}
        if command.endswith("/install-config"):
            self._change("install-config", name)
            self.config_files[name] = unpack_files(stdin)
            self.guard_state[name] = "loaded"
            self.ruleset_state[name] = "as-loaded"
            self.guard_ruleset_state[name] = "as-loaded"
            self.service_state[name] = ("active", "loaded", "present")
        else:
            self._change("run", name, command)
            if command.endswith("/setup-template"):
                return {"retcode": 0, "stdout": self.setup_output, "stderr": ""}
        return {"retcode": 0, "stdout": "", "stderr": ""}

    def salt_functions(self):
        """Return a __salt__ dict that routes sysdns_qvm.* to this fake."""
        names = (
            "list_qubes get_qube get_pref pref_is_default is_running features json_feature set_pref reset_pref "
            "set_feature "
            "set_json_feature create clone start shutdown restart pack_files run dependents remove default_prefs"
        ).split()
        functions = {"sysdns_qvm." + name: getattr(self, name) for name in names}
        functions["sysdns_qvm.preflight_problems"] = self.preflight_problems
        functions["sysdns_config.render_apt_sources"] = config_module.render_apt_sources
        functions["cp.get_file_str"] = self.salt_files.get
        return functions
