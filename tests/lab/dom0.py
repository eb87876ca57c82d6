"""Emulated dom0 tools (qvm-* and qubes-prefs) backed by the lab's store.

Options, output formats, messages and exit codes follow the tools of
QubesOS/qubes-core-admin-client v4.2.18 (qubesadmin/tools/qvm_*.py,
qubes_prefs.py and qubesadmin/tools/__init__.py). Values and errors follow what
qubesd v4.2.39 returns to them (qubes/api/admin.py). Every call appends one JSON
line to the run's calls.log: time, argv, exit code and duration.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time

from . import firewall, qubesdb
from .layout import RunLayout
from .runtime import CommandError, Runtime
from .store import (
    ALL_CLASSES,
    GLOBAL_PROPERTIES,
    LABELS,
    Domain,
    LabLimitError,
    NoSuchDomainError,
    NoSuchPropertyError,
    QubesError,
    Store,
    VMInUseError,
    VMNotStartedError,
    format_value,
    validate_tag,
)


class QubesArgumentParser(argparse.ArgumentParser):
    """argparse with the common options and error helpers of qubesadmin.tools."""

    def __init__(self, vmname_nargs=None, **kwargs):
        super().__init__(add_help=False, **kwargs)
        self.vmname_nargs = vmname_nargs
        self.add_argument("--verbose", "-v", action="count", default=1, help="increase verbosity")
        self.add_argument("--quiet", "-q", action="count", default=0, help="decrease verbosity")
        self.add_argument("--force-root", action="store_true", help=argparse.SUPPRESS)
        self.add_argument("--help", "-h", action="help", help="show this help message and exit")
        if vmname_nargs in ("*", "+"):
            group = self.add_mutually_exclusive_group(required=vmname_nargs == "+")
            group.add_argument("--all", action="store_true", dest="all_domains", help="perform the action on all qubes")
            self.add_argument("--exclude", action="append", default=[], help="exclude the qube from --all")
            group.add_argument("VMNAME", nargs="*", default=[])
        elif vmname_nargs is not None:
            self.add_argument("VMNAME", nargs=vmname_nargs)

    def error_runtime(self, message, exit_code=1):
        self.exit(exit_code, f"{self.prog}: error: {message}\n")

    def resolve_domains(self, args, app):
        """Turn VMNAME arguments into Domains (parser.error for unknown names)."""
        if getattr(args, "all_domains", False):
            return [vm for vm in app.domains() if vm.klass != "AdminVM" and vm.name not in args.exclude]
        if getattr(args, "exclude", None):
            self.error("--exclude can only be used with --all")
        if isinstance(args.VMNAME, list):
            names = args.VMNAME
        elif args.VMNAME is not None:
            names = [args.VMNAME]
        else:
            names = []
        domains = []
        for name in names:
            try:
                domains.append(app.domain(name))
            except NoSuchDomainError:
                self.error(f"no such domain: {name!r}")
        return domains


class ToolLog:
    """qubesadmin's console logging: "name: message" on stderr when verbose."""

    def __init__(self, args):
        self.verbosity = getattr(args, "verbose", 1) - getattr(args, "quiet", 0)

    def emit(self, name, message, level="info"):
        if self.verbosity >= 1:
            print(f"{name}: {message}", file=sys.stderr)
        elif level in ("warning", "error"):
            print(message, file=sys.stderr)


def client_value(holder_get, name):
    """Return a property value as qubesadmin gives it to a tool.

    qubesd serialises None as an empty string: the client turns it into None for
    VM and label properties, '' for strings and AttributeError for bool and int
    (qubesadmin/base.py _parse_type_value).
    """
    prop, value = holder_get(name)
    if value is None:
        if prop.kind in ("vm", "label"):
            return None
        if prop.kind in ("bool", "int"):
            raise AttributeError(name)
        return ""
    if isinstance(value, Domain):
        return value.name
    return value


def _vm_getter(vm):
    def getter(name):
        prop = vm.prop_def(name)
        return prop, vm.get(name)

    return getter


def _app_getter(app):
    def getter(name):
        prop = app.global_prop(name)
        return prop, app.get_global(name)

    return getter


def _text(value):
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


class Tools:
    """The tool implementations; each method returns an exit code."""

    def __init__(self, layout):
        self.layout = layout
        self.store = Store(layout)
        self.runtime = Runtime(layout)

    # qvm-prefs / qubes-prefs

    def _prefs_parser(self, prog, vmname_nargs):
        parser = QubesArgumentParser(prog=prog, vmname_nargs=vmname_nargs)
        parser.add_argument(
            "--help-properties", action="store_true", help="list all available properties with short descriptions"
        )
        parser.add_argument(
            "--hide-default", action="store_true", help="Do not show properties that are set to the default value."
        )
        parser.add_argument("--get", "-g", action="store_true", help="Ignored.")
        parser.add_argument("--set", "-s", action="store_true", help="Ignored.")
        parser.add_argument("property", metavar="PROPERTY", nargs="?")
        parser.add_argument("value", metavar="VALUE", nargs="?")
        parser.add_argument(
            "--default", "-D", dest="delete", action="store_true", help="reset property to its default value"
        )
        return parser

    def qvm_prefs(self, argv):
        parser = self._prefs_parser("qvm-prefs", 1)
        args = parser.parse_args(argv)
        if args.property is not None:
            args.property = args.property.replace("-", "_")
        if args.value is not None or args.delete:
            with self.store.transaction() as app:
                vm = parser.resolve_domains(args, app)[0]
                return self._prefs_change(parser, args, app, vm)
        app = self.store.read()
        vm = parser.resolve_domains(args, app)[0]
        return self._prefs_show(parser, args, vm.property_list(), _vm_getter(vm), vm.is_default, vm.prop_def)

    def qubes_prefs(self, argv):
        parser = self._prefs_parser("qubes-prefs", None)
        args = parser.parse_args(argv)
        if args.property is not None:
            args.property = args.property.replace("-", "_")
        if args.value is not None or args.delete:
            with self.store.transaction() as app:
                return self._prefs_change(parser, args, app, None)
        app = self.store.read()
        names = sorted(prop.name for prop in GLOBAL_PROPERTIES)
        return self._prefs_show(parser, args, names, _app_getter(app), app.global_is_default, app.global_prop)

    def _prefs_show(self, parser, args, names, getter, is_default, prop_def):
        if args.help_properties:
            width = max(len(name) for name in names)
            for name in names:
                print(f"{name:{width}s}  {prop_def(name).doc}")
            return 0
        if args.property is None:
            width = max(len(name) for name in names)
            for name in names:
                try:
                    value = client_value(getter, name)
                except AttributeError:
                    print(f"{name:{width}s}  U")
                    continue
                if not is_default(name):
                    print(f"{name:{width}s}  -  {value!s}")
                elif not args.hide_default:
                    print(f"{name:{width}s}  D  {value!s}")
            return 0
        try:
            value = client_value(getter, args.property)
        except NoSuchPropertyError:
            parser.error(f"no such property: {args.property!r}")
        except AttributeError:
            # qvm-prefs does not catch the plain AttributeError the client raises
            # for an unset bool or int property: Python prints a traceback.
            print(f"AttributeError: {args.property}", file=sys.stderr)
            return 1
        if value is not None:
            print(_text(value))
        return 0

    def _prefs_change(self, parser, args, app, vm):
        name = args.property
        if name is None:
            parser.error("the following arguments are required: PROPERTY")
        if args.value is not None:
            value = args.value
            if value.lower() == "none" and name in ("default_dispvm", "netvm", "template", "guivm", "audiovm"):
                value = ""
            try:
                if vm is None:
                    app.set_global(name, value)
                else:
                    self._set_vm_property(app, vm, name, value)
            except NoSuchPropertyError:
                parser.error(f"no such property: {name!r}")
            except QubesError as error:
                parser.error_runtime(error)
            return 0
        try:
            if vm is None:
                app.reset_global(name)
            else:
                self._reset_vm_property(app, vm, name)
        except NoSuchPropertyError:
            parser.error(f"no such property: {name!r}")
        except QubesError as error:
            parser.error_runtime(error)
        return 0

    def _set_vm_property(self, app, vm, name, value):
        old_netvm = vm.get("netvm") if name == "netvm" else None
        if name == "netvm" and value and app.is_running(vm.name) and value in app and not app.is_running(value):
            raise VMNotStartedError(value, f"Cannot dynamically attach to stopped qube {value}")
        vm.set(name, value)
        self._after_property_change(app, vm, name, old_netvm)

    def _reset_vm_property(self, app, vm, name):
        old_netvm = vm.get("netvm") if name == "netvm" else None
        if name == "netvm" and app.is_running(vm.name):
            default = vm.prop_def("netvm").default(vm)
            if default is not None and not app.is_running(default.name):
                raise VMNotStartedError(default.name, f"Cannot dynamically attach to stopped qube {default.name}")
        vm.reset(name)
        self._after_property_change(app, vm, name, old_netvm)

    def _after_property_change(self, app, vm, name, old_netvm):
        if name != "netvm":
            return
        new_netvm = vm.get("netvm")
        if new_netvm == old_netvm:
            return
        self.runtime.change_netvm(app, vm, old_netvm, new_netvm)

    # qvm-features / qvm-service / qvm-tags

    def qvm_features(self, argv):
        parser = QubesArgumentParser(prog="qvm-features", vmname_nargs=1, description="manage domain's features")
        parser.add_argument("feature", metavar="FEATURE", nargs="?")
        parser.add_argument("value", metavar="VALUE", nargs="?")
        parser.add_argument(
            "--unset", "--default", "--delete", "-D", dest="delete", action="store_true", help="unset the feature"
        )
        args = parser.parse_args(argv)
        if args.feature is None:
            if args.delete:
                parser.error("--unset requires a feature")
            vm = parser.resolve_domains(args, self.store.read())[0]
            print_table(vm.features.items())
            return 0
        if args.delete:
            if args.value is not None:
                parser.error("cannot both set and unset a value")
            with self.store.transaction() as app:
                vm = parser.resolve_domains(args, app)[0]
                if args.feature in vm.features:
                    vm.features.delete(args.feature)
                    self._refresh_services(app, vm)
            return 0
        if args.value is None:
            vm = parser.resolve_domains(args, self.store.read())[0]
            if args.feature not in vm.features:
                return 1
            print(vm.features[args.feature])
            return 0
        with self.store.transaction() as app:
            vm = parser.resolve_domains(args, app)[0]
            try:
                vm.features.set(args.feature, args.value)
            except QubesError as error:
                parser.error_runtime(error)
            self._refresh_services(app, vm)
        return 0

    def qvm_service(self, argv):
        parser = QubesArgumentParser(
            prog="qvm-service",
            vmname_nargs=1,
            argument_default=argparse.SUPPRESS,
            description="manage domain's services",
        )
        parser.add_argument("service", metavar="SERVICE", nargs="?")
        parser.add_argument("value", metavar="VALUE", nargs="?")
        parser.add_argument("--unset", "--default", "--delete", "-D", dest="delete", default=False, action="store_true")
        parser.add_argument("--list", "-l", dest="list", action="store_true")
        parser.add_argument("--enable", "-e", dest="value", action="store_const", const="1")
        parser.add_argument("--disable", "-d", dest="value", action="store_const", const="0")
        args = parser.parse_args(argv)

        service = getattr(args, "service", None)
        value = getattr(args, "value", None)
        if service is None:
            if args.delete:
                parser.error("--unset requires a feature")
            vm = parser.resolve_domains(args, self.store.read())[0]
            print_table(
                [
                    (key[len("service.") :], "on" if feature else "off")
                    for key, feature in vm.features.items()
                    if key.startswith("service.")
                ]
            )
            return 0

        key = "service." + service
        if args.delete:
            if value is not None:
                parser.error("cannot both set and unset a value")
            with self.store.transaction() as app:
                vm = parser.resolve_domains(args, app)[0]
                if key in vm.features:
                    vm.features.delete(key)
                    self._refresh_services(app, vm)
            return 0
        if value is not None:
            with self.store.transaction() as app:
                vm = parser.resolve_domains(args, app)[0]
                try:
                    vm.features.set(key, parse_service_value(value))
                except QubesError as error:
                    parser.error_runtime(str(error))
                self._refresh_services(app, vm)
            return 0
        vm = parser.resolve_domains(args, self.store.read())[0]
        if key not in vm.features:
            return 1
        print("on" if vm.features[key] else "off")
        return 0

    def _refresh_services(self, app, vm):
        """Update /qubes-service/ and /vm-config/ of a running qube (services.py)."""
        if app.power_state(vm.name) not in ("Running", "Transient"):
            return
        directory = self.runtime.qubesdb_dir(vm.name)
        entries = qubesdb.read_tree(directory)
        fresh = qubesdb.qube_entries(app, vm)
        for key in list(entries):
            if key.startswith(("/qubes-service/", "/vm-config/")):
                del entries[key]
        entries.update(
            {key: value for key, value in fresh.items() if key.startswith(("/qubes-service/", "/vm-config/"))}
        )
        qubesdb.write_tree(directory, entries)

    def qvm_tags(self, argv):
        parser = QubesArgumentParser(prog="qvm-tags", vmname_nargs=1, description="manage domain's tags")
        sub = parser.add_subparsers(dest="command", title="commands")
        list_parser = sub.add_parser("list", aliases=["ls", "l"], help="list tags")
        list_parser.add_argument("tag", nargs="?", default=None)
        add_parser = sub.add_parser("add", aliases=["a", "set"], help="add tag")
        add_parser.add_argument("tag", nargs="+")
        del_parser = sub.add_parser("del", aliases=["d", "unset", "u"], help="delete tag")
        del_parser.add_argument("tag", nargs=1)
        args = parser.parse_args(argv)

        command = {"ls": "list", "l": "list", "a": "add", "set": "add", "d": "del", "unset": "del", "u": "del"}.get(
            args.command, args.command or "list"
        )
        if command == "list":
            vm = parser.resolve_domains(args, self.store.read())[0]
            tag = getattr(args, "tag", None)
            if tag is None:
                if vm.tags:
                    print("\n".join(sorted(vm.tags)))
                return 0
            if tag not in vm.tags:
                return 1
            print(tag)
            return 0
        with self.store.transaction() as app:
            vm = parser.resolve_domains(args, app)[0]
            try:
                for tag in args.tag:
                    validate_tag(tag)
                    if command == "add" and tag not in vm.tags:
                        vm.tags.append(tag)
                    elif command == "del" and tag in vm.tags:
                        vm.tags.remove(tag)
            except QubesError as error:
                parser.error_runtime(error)
        return 0

    # qvm-ls

    def qvm_ls(self, argv):
        parser = QubesArgumentParser(
            prog="qvm-ls", vmname_nargs="*", description="List Qubes domains and their parameters."
        )
        parser.add_argument("--help-columns", action="store_true")
        parser.add_argument("--help-formats", action="store_true")
        formats = parser.add_mutually_exclusive_group()
        formats.add_argument("--format", "-o", choices=sorted(LS_FORMATS), default="simple")
        formats.add_argument("--fields", "-O")
        parser.add_argument("--tags", nargs="+")
        for state in ("running", "paused", "halted"):
            parser.add_argument(f"--{state}", action="store_true")
        parser.add_argument("--raw-data", action="store_true")
        parser.add_argument("--tree", "-t", action="store_const", const="tree")
        parser.add_argument("--spinner", action="store_true", dest="spinner")
        parser.add_argument("--no-spinner", action="store_false", dest="spinner")
        parser.add_argument("--raw-list", action="store_true")
        parser.add_argument("--disk", "-d", action="store_const", dest="format", const="disk")
        parser.add_argument("--network", "-n", action="store_const", dest="format", const="network")
        parser.add_argument("--kernel", "-k", action="store_const", dest="format", const="kernel")
        args = parser.parse_args(argv)

        if args.help_formats:
            width = max(len(name) for name in LS_FORMATS)
            print("Available formats:")
            for name in sorted(LS_FORMATS):
                print(f"  {name:{width}s}  {','.join(LS_FORMATS[name]).upper()}")
            return 0
        if args.help_columns:
            print("Available columns:")
            for head in sorted(LS_SPECIAL_COLUMNS):
                print(f"  {head}")
            print(
                "\nAdditionally any VM property may be used as a column, see "
                "qvm-prefs --help-properties for available values"
            )
            return 0

        app = self.store.read()
        domains = parser.resolve_domains(args, app)
        if args.raw_list:
            args.raw_data = True
            args.fields = "name"
        columns = (
            [column.strip() for column in args.fields.split(",")] if args.fields else list(LS_FORMATS[args.format])
        )
        if args.all_domains:
            domains = [vm for vm in app.domains() if vm.name not in args.exclude]
        elif not args.VMNAME:
            domains = app.domains()
        if args.tags:
            domains = [vm for vm in domains if set(vm.tags) & set(args.tags)]
        wanted_states = [state for state in ("running", "paused", "halted") if getattr(args, state)]
        if wanted_states:
            domains = [vm for vm in domains if power_state(app, vm).lower() in wanted_states]
        domains = sorted(domains, key=lambda vm: vm.name)

        rows = [[ls_cell(app, vm, column) for column in columns] for vm in domains]
        if args.raw_data:
            for row in rows:
                print("|".join(row))
            return 0
        heads = [ls_head(column) for column in columns]
        if args.tree:
            domains_rows = tree_rows(app, domains, columns)
            print_table([heads] + domains_rows)
        else:
            print_table([heads] + rows)
        return 0

    # qvm-firewall

    def qvm_firewall(self, argv):
        """qvm-firewall of qubesadmin/tools/qvm_firewall.py (v4.2.18)."""
        parser = QubesArgumentParser(
            prog="qvm-firewall",
            vmname_nargs=1,
            epilog=FIREWALL_EPILOG,
            formatter_class=argparse.RawTextHelpFormatter,
        )
        commands = parser.add_subparsers(dest="command", help="command (default: list)")
        add_parser = commands.add_parser("add", help="append or insert a rule")
        add_parser.add_argument(
            "--before", type=int, default=None, help="insert the rule before rule number N instead of appending it"
        )
        add_parser.add_argument("rule", metavar="match", nargs="+", help="rule elements")
        del_parser = commands.add_parser("del", help="delete a rule")
        del_parser.add_argument("--rule-no", dest="rule_no", type=int, help="rule number")
        del_parser.add_argument("rule", metavar="match", nargs="*", help="elements of the rule to delete")
        commands.add_parser("list", help="print the rules")
        commands.add_parser("reset", help="replace all rules by the default rule, action=accept")
        parser.add_argument(
            "--reload",
            "-r",
            action="store_true",
            help="with list: apply the rules again in the netvm (resolves host names again)",
        )
        parser.add_argument("--raw", action="store_true", help="print rules as NAME=VALUE lines instead of a table")
        args = parser.parse_args(argv)

        if args.command in (None, "list"):
            vm = parser.resolve_domains(args, self.store.read())[0]
            rules = [rule for rule in self._firewall_rules(vm) if not rule.expired]
            if args.raw:
                for rule in rules:
                    print(firewall.client_rule(rule))
            else:
                header = ["NO", "ACTION", "HOST", "PROTOCOL", "PORT(S)", "SPECIAL TARGET", "ICMP TYPE", "EXPIRE"]
                header.append("COMMENT")
                print_table([header] + [[str(number)] + firewall.client_row(rule) for number, rule in enumerate(rules)])
            if args.reload:
                self._publish_firewall(vm.name)
            return 0

        # Each command edits the rule list as qubesadmin received it (expired rules
        # left out) and sends the whole list back (admin.vm.firewall.Set).
        new_rule = None
        if args.command != "reset" and args.rule:
            new_rule = parse_rule_arguments(parser, args.rule)
        with self.store.transaction() as app:
            vm = parser.resolve_domains(args, app)[0]
            rules = [rule for rule in self._firewall_rules(vm) if not rule.expired]
            if args.command == "add":
                if args.before is not None:
                    rules.insert(args.before, new_rule)
                else:
                    rules.append(new_rule)
            elif args.command == "del":
                remove_rule(rules, args.rule_no, new_rule)
            else:
                rules = [firewall.Rule(action="accept")]
            firewall.store_rules(vm, rules)
        self._publish_firewall(vm.name)
        return 0

    @staticmethod
    def _firewall_rules(vm):
        if vm.klass == "AdminVM":
            raise QubesError(f"{vm.name} has no firewall")
        return firewall.stored_rules(vm)

    def _publish_firewall(self, name):
        """Write the client's rules to its netvm's QubesDB and tell its qubes-firewall.

        The firewall-changed handler of NetVMMixin in qubes/vm/mix/net.py
        (v4.2.39) does this only while the qube runs and has a netvm, and
        reload_firewall_for_vm only while that netvm runs. Qubes' agent applies the
        rules asynchronously from its QubesDB watch; the lab applies them before
        qvm-firewall returns, so tests need not poll.
        """
        with self.store.transaction() as app:
            vm = app.domain(name)
            netvm = vm.get("netvm") if "netvm" in vm.property_defs() else None
            if netvm is None or not app.is_running(vm.name) or not app.is_running(netvm.name):
                return
            qubesdb.write_tree(self.runtime.qubesdb_dir(netvm.name), qubesdb.qube_entries(app, netvm))
        self.runtime.agent_event(self.store.read(), netvm.name, "firewall-changed")

    # qvm-create / qvm-clone / qvm-remove

    def qvm_create(self, argv):
        parser = QubesArgumentParser(prog="qvm-create")
        parser.add_argument("--class", "-C", dest="cls", default="AppVM")
        parser.add_argument("--standalone", action="store_true")
        parser.add_argument("--disp", action="store_true")
        parser.add_argument(
            "--property", "--prop", action="append", default=[], dest="properties", metavar="NAME=VALUE"
        )
        parser.add_argument("--pool", "-p", action="append", metavar="VOLUME_NAME=POOL_NAME")
        parser.add_argument("-P", metavar="POOL_NAME", dest="one_pool", default="")
        parser.add_argument("--template", "-t")
        parser.add_argument("--label", "-l")
        parser.add_argument("--help-classes", action="store_true")
        root = parser.add_mutually_exclusive_group()
        root.add_argument("--root-copy-from", "-r", metavar="FILENAME")
        root.add_argument("--root-move-from", "-R", metavar="FILENAME")
        root.add_argument("--no-root", action="store_true", help=argparse.SUPPRESS)
        parser.add_argument("name", metavar="VMNAME", nargs="?")
        args = parser.parse_args(argv)

        if args.help_classes:
            print("\n".join(sorted(ALL_CLASSES)))
            return 0
        properties = {}
        for token in args.properties:
            if "=" not in token:
                parser.error(f"invalid property token: {token!r}")
            key, value = token.split("=", 1)
            properties[key] = value
        for pool in args.pool or []:
            if "=" not in pool:
                parser.error("Pool argument must be of form: -p volume_name=pool_name")

        label = args.label
        if args.disp:
            label = label or "red"
            args.cls = "DispVM"
        if args.standalone:
            args.cls = "StandaloneVM"
        label = label or properties.pop("label", None)
        if label is None:
            parser.error("--label option is mandatory")
        if args.name is None:
            parser.error("VMNAME is mandatory")
        if args.root_copy_from or args.root_move_from:
            parser.error("--root-copy-from/--root-move-from: importing a root image is not reproduced in the lab")
        if label not in LABELS and not (label.isdigit() and int(label) in LABELS.values()):
            parser.error(f"no such label: {label!r}; available: {', '.join(LABELS)}")
        if label.isdigit():
            label = {index: name for name, index in LABELS.items()}[int(label)]
        if args.cls not in ALL_CLASSES:
            parser.error(f"no such domain class: {args.cls!r}")
        template = args.template or properties.pop("template", None)

        log = ToolLog(args)
        with self.store.transaction() as app:
            try:
                if args.cls == "StandaloneVM" and template is not None:
                    vm = self._clone(app, template, args.name, "StandaloneVM", ignore_errors=False, private=False)
                    vm.props["label"] = label
                else:
                    vm = app.add_vm(args.cls, args.name, label, template)
            except QubesError as error:
                log.emit("app", f"Error creating VM: {error}", "error")
                return 1
            self.runtime.rw_dir(vm.name).mkdir(parents=True, exist_ok=True)
            code = 0
            for key, value in properties.items():
                try:
                    self._set_vm_property(app, vm, key.replace("-", "_"), value)
                except QubesError as error:
                    log.emit("app", f"Error setting property {key} (but VM created): {error}", "error")
                    code = 2
        return code

    def qvm_clone(self, argv):
        parser = QubesArgumentParser(prog="qvm-clone", vmname_nargs=1)
        parser.add_argument("new_name", metavar="NEWVM")
        parser.add_argument("--class", "-C", dest="cls", default=None)
        parser.add_argument("--ignore-errors", action="store_true")
        pools = parser.add_mutually_exclusive_group()
        pools.add_argument("-P", metavar="POOL", dest="one_pool", default="")
        pools.add_argument("-p", "--pool", action="append", metavar="VOLUME=POOL")
        args = parser.parse_args(argv)
        for pool in args.pool or []:
            if "=" not in pool:
                parser.error("Pool argument must be of form: -p volume_name=pool_name")
        with self.store.transaction() as app:
            source = parser.resolve_domains(args, app)[0]
            try:
                self._clone(app, source.name, args.new_name, args.cls, ignore_errors=args.ignore_errors, private=True)
            except QubesError as error:
                parser.error_runtime(error)
        return 0

    def _clone(self, app, source_name, new_name, new_class, ignore_errors, private):
        """Clone a qube as qubesadmin.app.clone_vm does, copying its volumes."""
        source = app.domain(source_name)
        new_class = new_class or source.klass
        template = source.template_or_none()
        if new_class in ("TemplateVM", "StandaloneVM"):
            template = None
        vm = app.add_vm(new_class, new_name, source.get("label").name, template.name if template is not None else None)
        skip = {"name", "qid", "template", "label", "uuid", "installed_by_rpm", "dispid"}
        for name in source.property_list():
            if name in skip or source.is_default(name) or name not in vm.property_defs():
                continue
            raw = source.props[name]
            try:
                vm.set(name, "" if raw is None else _text(raw))
            except QubesError as error:
                print(f"{new_name}: Failed to set {name} property: {error}", file=sys.stderr)
                if not ignore_errors:
                    raise
        for tag in source.tags:
            if not tag.startswith("created-by-") and tag not in vm.tags:
                vm.tags.append(tag)
        for feature, value in source.features.items():
            vm.features.set(feature, value)
        # qubesadmin.app.QubesBase.clone_vm copies the firewall rules too.
        firewall.copy_rules(source, vm)
        self._copy_volumes(source, vm, private)
        return vm

    def _copy_volumes(self, source, vm, private):
        source_dir = self.layout.qube_dir(source.name)
        target_dir = self.layout.qube_dir(vm.name)
        target_dir.mkdir(parents=True, exist_ok=True)
        if private and (source_dir / "rw").exists():
            subprocess.run(["cp", "-a", "--", str(source_dir / "rw"), str(target_dir / "rw")], check=True)
        else:
            (target_dir / "rw").mkdir(exist_ok=True)
        if source.klass in ("TemplateVM", "StandaloneVM") and vm.klass in ("TemplateVM", "StandaloneVM"):
            vm.lab["image"] = source.lab.get("image")
            layers = list(source.lab.get("layers", []))
            if layers:
                (target_dir / "layers").mkdir(exist_ok=True)
            for layer in layers:
                subprocess.run(
                    ["cp", "-a", "--", str(source_dir / "layers" / layer), str(target_dir / "layers" / layer)],
                    check=True,
                )
            vm.lab["layers"] = layers

    def qvm_remove(self, argv):
        parser = QubesArgumentParser(prog="qvm-remove", vmname_nargs="+")
        parser.add_argument("--force", "-f", action="store_true", dest="no_confirm")
        args = parser.parse_args(argv)
        app = self.store.read()
        domains = parser.resolve_domains(args, app)
        if not args.no_confirm:
            print("This will completely remove the selected VM(s)...")
            for vm in domains:
                print(" ", vm.name)
            try:
                answer = input("Are you sure? [y/N] ").upper()
            except EOFError:
                answer = ""
            if answer != "Y":
                print("Remove cancelled.")
                return 1
        for vm in domains:
            with self.store.transaction() as app:
                try:
                    app.remove_vm(vm.name)
                except VMInUseError as error:
                    dependencies = app.dependencies(app.domain(vm.name)) if vm.name in app else []
                    if dependencies:
                        print(f"VM {vm.name} cannot be removed. It is in use as:")
                        for holder, prop in dependencies:
                            if holder is not None:
                                print(f" - {prop} for {holder.name}")
                            else:
                                print(f" - global property {prop}")
                    parser.error_runtime(error)
                except QubesError as error:
                    parser.error_runtime(error)
            shutil.rmtree(self.layout.qube_dir(vm.name), ignore_errors=True)
        return 0

    # qvm-start / qvm-shutdown / qvm-kill / qvm-check

    def qvm_start(self, argv):
        parser = QubesArgumentParser(prog="qvm-start", vmname_nargs="+", description="start a domain")
        parser.add_argument("--skip-if-running", action="store_true")
        drive = parser.add_mutually_exclusive_group()
        drive.add_argument("--drive", metavar="DRIVE")
        drive.add_argument("--hddisk", metavar="IMAGE")
        drive.add_argument("--cdrom", metavar="IMAGE")
        drive.add_argument("--install-windows-tools", action="store_true")
        args = parser.parse_args(argv)
        domains = parser.resolve_domains(args, self.store.read())
        if args.drive or args.hddisk or args.cdrom or args.install_windows_tools:
            parser.error_runtime("attaching drives is not reproduced in the lab")
        exit_code = 0
        for vm in domains:
            self.runtime.reconcile()
            if self.store.read().power_state(vm.name) == "Running":
                if args.skip_if_running:
                    continue
                print(f"domain {vm.name} is already running", file=sys.stderr)
                return 1
            try:
                self.runtime.start(vm.name)
            except (QubesError, CommandError, OSError) as error:
                exit_code = 1
                print(str(error), file=sys.stderr)
        return exit_code

    def qvm_shutdown(self, argv):
        parser = QubesArgumentParser(prog="qvm-shutdown", vmname_nargs="+")
        parser.add_argument("--wait", action="store_true")
        parser.add_argument("--timeout", type=float, default=60)
        parser.add_argument("--force", action="store_true")
        parser.add_argument("--dry-run", action="store_true", dest="dry_run")
        args = parser.parse_args(argv)
        domains = parser.resolve_domains(args, self.store.read())
        log = ToolLog(args)

        force = args.force or bool(args.all_domains)
        remaining = list(domains)
        for _ in range(len(domains)):
            this_round = list(remaining)
            if not this_round:
                break
            remaining = []
            if not args.dry_run:
                for vm in this_round:
                    try:
                        self.runtime.shutdown(vm.name, force=force)
                    except VMNotStartedError:
                        pass
                    except QubesError as error:
                        if not args.wait:
                            log.emit(vm.name, f"Shutdown error: {error}", "error")
                        else:
                            remaining.append(vm)
            if not args.wait:
                return 0
            this_round = [vm for vm in this_round if vm not in remaining]
            if not this_round:
                break
            self._wait_halted(this_round, args.timeout, args.dry_run, parser)
        if args.wait:
            app = self.store.read()
            failed = [vm.name for vm in domains if app.power_state(vm.name) != "Halted" and vm.name in app]
            if failed:
                parser.error_runtime("Failed to shut down: " + ", ".join(failed), len(failed))
        return 0

    def _wait_halted(self, domains, timeout, dry_run, parser):
        deadline = time.monotonic() + timeout
        pending = [vm.name for vm in domains]
        while pending and time.monotonic() < deadline:
            self.runtime.reconcile()
            app = self.store.read()
            pending = [name for name in pending if name in app and app.power_state(name) != "Halted"]
            if pending:
                time.sleep(0.1)
        if dry_run:
            return
        for name in pending:
            try:
                self.runtime.kill(name)
            except VMNotStartedError:
                pass
            except QubesError as error:
                parser.error_runtime(error)

    def qvm_kill(self, argv):
        parser = QubesArgumentParser(prog="qvm-kill", vmname_nargs="+", description="forceful shutdown of a domain")
        args = parser.parse_args(argv)
        domains = parser.resolve_domains(args, self.store.read())
        exit_code = 0
        for vm in domains:
            try:
                self.runtime.kill(vm.name)
            except VMNotStartedError:
                pass
            except (QubesError, OSError) as error:
                exit_code = 1
                print(f"Failed to kill '{vm.name}': {error}", file=sys.stderr)
        return exit_code

    def qvm_check(self, argv):
        parser = QubesArgumentParser(prog="qvm-check")
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--all", action="store_true", dest="all_domains")
        parser.add_argument("--exclude", action="append", default=[])
        group.add_argument("VMNAME", nargs="*", default=[])
        for flag in ("running", "paused", "template", "networked"):
            parser.add_argument(f"--{flag}", action="store_true")
        args = parser.parse_args(argv)
        self.runtime.reconcile()
        app = self.store.read()
        log = ToolLog(args)

        if args.all_domains:
            domains = [vm for vm in app.domains() if vm.klass != "AdminVM" and vm.name not in args.exclude]
            invalid = []
        else:
            if args.exclude:
                parser.error("--exclude can only be used with --all")
            domains = [app.domain(name) for name in args.VMNAME if name in app]
            invalid = [name for name in args.VMNAME if name not in app]

        checks = []
        if args.running:
            checks.append(("running", lambda vm: power_state(app, vm) == "Running"))
        if args.paused:
            checks.append(("paused", lambda vm: False))
        if args.template:
            checks.append(("template", lambda vm: vm.klass == "TemplateVM"))
        if args.networked:
            checks.append(("networked", lambda vm: vm.klass != "AdminVM" and vm.is_networked()))

        code = 0
        if checks:
            matching = set(domains)
            for _, check in checks:
                matching &= {vm for vm in domains if check(vm)}
            if matching != set(domains):
                code = 1 if not matching else 3
            self._print_check(log, matching, [status for status, _ in checks])
        else:
            if not domains:
                code = 1
            else:
                self._print_check(log, domains, ["exists"])
        if invalid:
            for name in invalid:
                log.emit("qvm-check", f"{name}: non-existent!", "warning")
            code = 1
        return code

    @staticmethod
    def _print_check(log, domains, statuses):
        if not domains:
            log.emit("qvm-check", f"None of qubes: {', '.join(statuses)}")
        for vm in sorted(domains, key=lambda item: item.name):
            log.emit("qvm-check", f"{vm.name}: {', '.join(statuses)}")

    # qvm-run

    def qvm_run(self, argv):
        parser = QubesArgumentParser(prog="qvm-run")
        parser.add_argument("--user", "-u", metavar="USER")
        parser.add_argument("--autostart", "--auto", "-a", action="store_true", default=True)
        parser.add_argument("--no-autostart", "--no-auto", "-n", action="store_false", dest="autostart")
        parser.add_argument("--pass-io", "-p", action="store_true", dest="passio")
        parser.add_argument("--localcmd", metavar="COMMAND")
        parser.add_argument("--gui", action="store_true", default=None)
        parser.add_argument("--no-gui", "--nogui", action="store_false", dest="gui")
        parser.add_argument("--colour-output", "--color-output", dest="color_output", default=None)
        parser.add_argument("--colour-stderr", "--color-stderr", dest="color_stderr", default=None)
        parser.add_argument("--no-colour-output", "--no-color-output", action="store_false", dest="color_output")
        parser.add_argument("--no-colour-stderr", "--no-color-stderr", action="store_false", dest="color_stderr")
        parser.add_argument(
            "--filter-escape-chars", action="store_true", dest="filter_esc", default=os.isatty(sys.stdout.fileno())
        )
        parser.add_argument("--no-filter-escape-chars", action="store_false", dest="filter_esc")
        parser.add_argument("--service", action="store_true")
        parser.add_argument("--no-shell", action="store_true")
        target = parser.add_mutually_exclusive_group()
        target.add_argument("--dispvm", nargs="?", const=True, metavar="BASE_APPVM")
        parser.add_argument("VMNAME", nargs="?")
        target.add_argument("--all", action="store_true", dest="all_domains")
        parser.add_argument("--exclude", action="append", default=[])
        parser.add_argument("cmd", metavar="COMMAND")
        parser.add_argument("cmd_args", nargs=argparse.REMAINDER, metavar="ARG")
        args = parser.parse_args(argv)

        if args.service:
            parser.error_runtime("running qrexec services is not reproduced in the lab")
        if args.localcmd:
            parser.error_runtime("--localcmd is not reproduced in the lab")
        if args.color_output and not args.filter_esc:
            parser.error("--color-output must be used with --filter-escape-chars")
        if args.passio:
            if args.color_output is None and args.filter_esc:
                args.color_output = 31
            if args.color_stderr is None and os.isatty(sys.stderr.fileno()):
                args.color_stderr = 31
        if args.dispvm is not None and args.VMNAME is not None:
            args.cmd_args.insert(0, args.cmd)
            args.cmd = args.VMNAME
            args.VMNAME = None

        app = self.store.read()
        if args.dispvm:
            domains = [self._create_dispvm(args.dispvm)]
        elif args.all_domains:
            domains = [
                vm
                for vm in app.domains()
                if vm.klass != "AdminVM" and vm.name not in args.exclude and app.is_running(vm.name)
            ]
        else:
            if args.VMNAME is None:
                parser.error("the following arguments are required: VMNAME")
            domains = parser.resolve_domains(args, app)
        if len(domains) > 1 and args.passio:
            parser.error("--passio cannot be used when more than 1 qube is chosen and no --localcmd is used")

        verbose = args.verbose - args.quiet - (1 if args.passio else 0)
        if args.cmd_args or args.no_shell:
            shell_command = " ".join(shlex.quote(arg) for arg in [args.cmd] + args.cmd_args)
        else:
            shell_command = args.cmd

        log = ToolLog(args)
        retcode = 0
        try:
            for vm in domains:
                if vm.klass == "AdminVM":
                    log.emit(vm.name, "running commands in dom0 through qvm-run is not reproduced in the lab", "error")
                    return 255
                state = self.store.read().power_state(vm.name)
                if not args.autostart and state != "Running":
                    if verbose > 0:
                        print(f"Qube '{vm.name}' not started", file=sys.stderr)
                    retcode = max(retcode, 1)
                    continue
                if verbose > 0:
                    print(f"Running '{args.cmd}' on {vm.name}", file=sys.stderr)
                try:
                    if state != "Running":
                        self.runtime.start(vm.name)
                    code = self._run_shell(vm, args, shell_command)
                except (QubesError, CommandError) as error:
                    log.emit(vm.name, str(error), "error")
                    return 255
                if code and verbose > 0:
                    print(f"{vm.name}: command failed with code: {code}", file=sys.stderr)
                retcode = max(retcode, code)
        finally:
            if args.dispvm:
                for vm in domains:
                    self._cleanup_dispvm(vm.name)
        return retcode

    def _create_dispvm(self, base):
        with self.store.transaction() as app:
            if base is True:
                template = app.get_global("default_dispvm")
                if template is None:
                    raise QubesError("No default DispVM template set")
                base = template.name
            vm = app.add_vm("DispVM", f"disp{app.new_dispid()}", "red", base)
            vm.props["auto_cleanup"] = True
            vm.props["label"] = app.domain(base).get("label").name
            vm.tags.append("disp-created-by-dom0")
            return vm

    def _cleanup_dispvm(self, name):
        try:
            self.runtime.shutdown(name, force=True, wait=True, timeout=30)
        except VMNotStartedError:
            with self.store.transaction() as app:
                if name in app and app.power_state(name) == "Halted":
                    del app.data["qubes"][name]
            shutil.rmtree(self.layout.qube_dir(name), ignore_errors=True)

    def _run_shell(self, vm, args, shell_command):
        """Run a command as qubes.VMShell does: bash reading "CMD; exit" then stdin."""
        app = self.store.read()
        user = args.user or vm.get("default_user")
        argv = self.runtime.container_argv(
            self.runtime.init_pid(app, vm.name),
            ["/bin/bash"],
            user=user,
            extra_env={"QREXEC_REMOTE_DOMAIN": "dom0", "QREXEC_SERVICE_FULL_NAME": "qubes.VMShell"},
        )
        argv[argv.index("/usr/bin/env") + 1 : argv.index("/usr/bin/env") + 1] = [
            "-C",
            "/root" if user == "root" else f"/home/{user}",
        ]

        command = shell_command.rstrip("\n").encode("utf-8") + b"; exit\n"
        stdout = None if args.passio else subprocess.DEVNULL
        if args.color_output:
            sys.stdout.write(f"\033[0;{args.color_output}m")
            sys.stdout.flush()

        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=stdout, stderr=stdout)
        process.stdin.write(command)
        process.stdin.flush()
        if args.passio:
            copier = threading.Thread(target=copy_stdin, args=(process.stdin,), daemon=True)
            copier.start()
        else:
            process.stdin.close()
        try:
            code = process.wait()
        finally:
            if args.color_output:
                sys.stdout.write("\033[0m")
                sys.stdout.flush()
        return code


def copy_stdin(stream):
    """Forward our stdin to the command until EOF, as qvm-run --pass-io does."""
    try:
        while True:
            data = os.read(0, 65536)
            if not data:
                break
            stream.write(data)
            stream.flush()
    except (OSError, ValueError):
        pass
    finally:
        try:
            stream.close()
        except (OSError, ValueError):
            pass


def parse_service_value(value):
    lowered = value.lower()
    if lowered in ("0", "no", "false", "off"):
        return False
    if lowered in ("1", "yes", "true", "on"):
        return True
    raise QubesError(f"Invalid literal for boolean value: {value!r}")


def print_table(rows):
    """Print rows aligned like `column -t` (two spaces between columns)."""
    rows = [[str(cell) for cell in row] for row in rows]
    if not rows:
        return
    widths = [
        max(len(row[index]) for row in rows if index < len(row)) for index in range(max(len(row) for row in rows))
    ]
    for row in rows:
        cells = [cell.ljust(widths[index]) for index, cell in enumerate(row)]
        print("  ".join(cells).rstrip())


# qvm-firewall, from qubesadmin/tools/qvm_firewall.py (v4.2.18)

FIREWALL_EPILOG = """
A rule is a list of elements, by position or as NAME=VALUE:
    ACTION [DSTHOST [PROTO [DSTPORTS | ICMPTYPE]]]
    action=accept|drop [dsthost=ADDRESS/PREFIX|HOSTNAME] [proto=tcp|udp|icmp]
    [dstports=PORT|FIRST-LAST] [icmptype=NUMBER] [specialtarget=dns]
    [expire=SECONDS_SINCE_1970|+SECONDS] [comment=TEXT]
dst4= and dst6= are other names for dsthost=. dstports needs proto tcp or udp,
icmptype needs proto icmp, and specialtarget=dns means the DNS servers of the qube.
"""


def parse_rule_arguments(parser, words):
    """Return the Rule that qvm-firewall's RuleAction builds from *words*.

    A malformed element is a usage error (exit 2), as RuleAction raises
    argparse.ArgumentError. A value that qubesadmin's Rule rejects escapes
    qvm-firewall v4.2.18 as an uncaught ValueError (a traceback, exit 1); the lab
    prints its message and exits 1.
    """
    assumed_order = ["action", "dsthost", "proto", "dstports", "icmptype"]
    allowed = assumed_order + ["specialtarget", "comment", "expire"]
    elements = {}
    for word in words:
        if word.endswith("="):
            parser.error(f"invalid rule description: {word}")
        parts = word.split("=")
        if len(parts) == 2:
            key, value = parts
        elif len(parts) == 1 and assumed_order:
            key, value = assumed_order[0], word
        elif len(parts) == 1:
            parser.error_runtime(f"too many positional rule elements: {word!r}")
        else:
            parser.error(f"invalid rule description: {word}")
        if key in ("dst4", "dst6"):
            key = "dsthost"
        if key not in allowed:
            parser.error(f"Invalid rule element: {word}")
        if key == "expire" and value.startswith("+"):
            if not value[1:].isdigit():
                parser.error_runtime(f"invalid expire value {value!r}: expected +SECONDS or seconds since 1970")
            value = str(int(time.time()) + int(value[1:]))
        elements[key] = value
        if key in assumed_order:
            assumed_order.remove(key)
        if key == "proto" and value in ("tcp", "udp") and "icmptype" in assumed_order:
            assumed_order.remove("icmptype")
        elif key == "proto" and value == "icmp" and "dstports" in assumed_order:
            assumed_order.remove("dstports")
    try:
        rule = firewall.Rule(**elements)
        # save_rules sends qubesadmin's form of the rule; qubesd parses it again.
        return firewall.Rule.from_api_string(firewall.client_rule(rule))
    except firewall.RuleError as error:
        parser.error_runtime(f"invalid rule {' '.join(words)!r}: {error}")


def remove_rule(rules, number, rule):
    """Remove rule *number*, or the rule equal to *rule*, as qvm-firewall del does."""
    if number is not None:
        if not -len(rules) <= number < len(rules):
            raise QubesError(f"no rule number {number}: the qube has {len(rules)} rules, numbered from 0")
        rules.pop(number)
        return
    if rule is None:
        raise QubesError("del needs --rule-no N or the rule to remove")
    wanted = firewall.client_rule(rule)
    for index, candidate in enumerate(rules):
        if firewall.client_rule(candidate) == wanted:
            del rules[index]
            return
    raise QubesError(f"no rule {wanted!r} to remove: see qvm-firewall VM list")


# qvm-ls columns, from qubesadmin/tools/qvm_ls.py

LS_FORMATS = {
    "simple": ("name", "state", "class", "label", "template", "netvm"),
    "network": ("name", "state", "netvm", "ip", "ipback", "gateway"),
    "kernel": ("name", "state", "class", "template", "kernel", "kernelopts"),
    "full": ("name", "state", "class", "label", "qid", "xid", "uuid"),
    "disk": ("name", "state", "disk", "priv-curr", "priv-max", "priv-used", "root-curr", "root-max", "root-used"),
}
LS_SPECIAL_COLUMNS = (
    "STATE",
    "CLASS",
    "GATEWAY",
    "MEMORY",
    "DISK",
    "PRIV-CURR",
    "PRIV-MAX",
    "PRIV-USED",
    "ROOT-CURR",
    "ROOT-MAX",
    "ROOT-USED",
    "FLAGS",
)


def power_state(app, vm):
    if vm.klass == "AdminVM":
        return "Running"
    return app.power_state(vm.name)


def ls_head(column):
    head = column.upper().replace("_", "-")
    return head


def ls_cell(app, vm, column):
    """Format one qvm-ls cell: '-' for None, unknown or empty values."""
    special = column.upper().replace("_", "-")
    if column.upper() in LS_SPECIAL_COLUMNS or (special in LS_SPECIAL_COLUMNS and column.upper() == special):
        value = ls_special(app, vm, special)
    else:
        # qvm-ls treats any other column as a property named exactly as given,
        # so "provides-network" (with a hyphen) shows "-".
        value = ls_property(vm, column.lower())
    return value or "-"


def ls_property(vm, name):
    if name == "klass":
        return vm.klass
    try:
        value = client_value(_vm_getter(vm), name)
    except (AttributeError, QubesError):
        return None
    if value is None:
        return None
    return _text(value)


def ls_special(app, vm, head):
    if head == "STATE":
        return power_state(app, vm)
    if head == "CLASS":
        return vm.klass
    if head == "GATEWAY":
        try:
            netvm = vm.get("netvm")
        except (AttributeError, QubesError):
            return None
        return format_value(netvm.get("gateway")) if netvm is not None else None
    if head == "MEMORY":
        return None
    if head in ("DISK", "PRIV-CURR", "PRIV-MAX", "ROOT-CURR", "ROOT-MAX"):
        return "0"
    if head in ("PRIV-USED", "ROOT-USED"):
        return "0"
    if head == "FLAGS":
        return ls_flags(app, vm)
    return None


def ls_flags(app, vm):
    codes = {"AdminVM": "0", "TemplateVM": "t", "AppVM": "a", "StandaloneVM": "s", "DispVM": "d"}
    letter = codes[vm.klass]
    if letter != "0" and ls_property(vm, "virt_mode") == "hvm":
        letter = letter.upper()
    state = power_state(app, vm).lower()
    power = state[0] if state in ("running", "transient", "paused", "suspended", "halting", "dying", "crashed") else "-"

    def flag(prop, character):
        return character if ls_property(vm, prop) == "True" else "-"

    return "".join(
        [
            letter,
            power,
            flag("updateable", "U"),
            flag("provides_network", "N"),
            flag("installed_by_rpm", "R"),
            "-",
            flag("debug", "D"),
            flag("autostart", "A"),
        ]
    )


def tree_rows(app, domains, columns):
    rows = []
    remaining = list(domains)

    def add(vm, level):
        cells = [ls_cell(app, vm, column) for column in columns]
        if level and "NAME" in [ls_head(column) for column in columns]:
            index = [ls_head(column) for column in columns].index("NAME")
            cells[index] = "  " * (level - 1) + "└─" + cells[index]
        rows.append(cells)
        if vm.klass != "AdminVM":
            for child in sorted(app.connected_vms(vm), key=lambda item: item.name):
                if child in remaining:
                    remaining.remove(child)
                    add(child, level + 1)

    for vm in list(remaining):
        if vm.klass == "AdminVM" or (vm.get("netvm") is None and not vm.get("provides_network")):
            remaining.remove(vm)
            add(vm, 0)
    for vm in list(remaining):
        if vm in remaining and vm.get("netvm") is None and vm.get("provides_network"):
            remaining.remove(vm)
            add(vm, 0)
    return rows


TOOLS = {
    "qvm-ls": Tools.qvm_ls,
    "qvm-prefs": Tools.qvm_prefs,
    "qubes-prefs": Tools.qubes_prefs,
    "qvm-features": Tools.qvm_features,
    "qvm-service": Tools.qvm_service,
    "qvm-tags": Tools.qvm_tags,
    "qvm-create": Tools.qvm_create,
    "qvm-clone": Tools.qvm_clone,
    "qvm-remove": Tools.qvm_remove,
    "qvm-start": Tools.qvm_start,
    "qvm-shutdown": Tools.qvm_shutdown,
    "qvm-kill": Tools.qvm_kill,
    "qvm-check": Tools.qvm_check,
    "qvm-run": Tools.qvm_run,
    "qvm-firewall": Tools.qvm_firewall,
}


def log_call(layout, argv, exit_code, started, finished):
    entry = {
        "time": round(started, 6),
        "argv": argv,
        "exit_code": exit_code,
        "duration": round(finished - started, 6),
        "pid": os.getpid(),
    }
    with open(layout.calls_log, "a", encoding="utf-8") as calls:
        calls.write(json.dumps(entry) + "\n")


def main(tool, argv=None):
    """Run emulated dom0 tool *tool*; return its exit code and log the call."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        layout = RunLayout.from_environment()
    except LookupError as error:
        print(f"{tool}: error: {error}", file=sys.stderr)
        return 1
    started = time.time()
    exit_code = 1
    try:
        exit_code = TOOLS[tool](Tools(layout), argv)
        exit_code = 0 if exit_code is None else exit_code
    except SystemExit as exit_request:
        code = exit_request.code
        if isinstance(code, int):
            exit_code = code
        elif code is None:
            exit_code = 0
        else:
            print(code, file=sys.stderr)
            exit_code = 1
    except LabLimitError as error:
        print(f"{tool}: error: {error}", file=sys.stderr)
        exit_code = 1
    except (QubesError, CommandError) as error:
        print(f"{tool}: error: {error}", file=sys.stderr)
        exit_code = 1
    except KeyboardInterrupt:
        exit_code = 130
    finally:
        log_call(layout, [tool] + argv, exit_code, started, time.time())
    return exit_code
