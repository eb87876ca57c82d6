"""The emulated dom0's qube database (store.json) with Qubes 4.2 property rules.

Property names, types, defaults and validation follow QubesOS/qubes-core-admin
v4.2.39: qubes/vm/qubesvm.py, qubes/vm/mix/net.py, qubes/vm/appvm.py,
qubes/vm/dispvm.py, qubes/vm/templatevm.py, qubes/vm/adminvm.py and qubes/app.py.
Only explicitly set values are stored; defaults are computed on every read, as
qubesd does, so `qvm-prefs --default` and `property_is_default` behave as in Qubes.
"""

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import string
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

from . import firewall

STORE_VERSION = 1

ADMIN_CLASS = "AdminVM"
VM_CLASSES = ("AppVM", "DispVM", "StandaloneVM", "TemplateVM")
ALL_CLASSES = (ADMIN_CLASS,) + VM_CLASSES

# Standard labels and their indexes, from qubes/app.py (Qubes.__init__ labels).
LABELS = {
    "red": 1,
    "orange": 2,
    "yellow": 3,
    "green": 4,
    "gray": 5,
    "blue": 6,
    "purple": 7,
    "black": 8,
}

# From qubes/config.py (max_qid, max_dispid, qubes_ipv6_prefix, defaults).
MAX_QID = 10000
MAX_DISPID = 10000
IPV6_PREFIX = "fd09:24ef:4179:0000"
DEFAULT_MEMORY = 400
DEFAULT_MAXMEM = 4000
DEFAULT_MAC = "00:16:3e:5e:6c:00"
VIRTUAL_DNS = ("10.139.1.1", "10.139.1.2")


# Exceptions: names and messages follow qubes/exc.py.


class QubesError(Exception):
    """An error qubesd would report to the client tool."""


class NoSuchDomainError(QubesError, KeyError):
    def __init__(self, name):
        super().__init__(f"No such domain: {name!r}")
        self.name = name

    def __str__(self):
        return QubesError.__str__(self)


class NoSuchPropertyError(QubesError, AttributeError):
    def __init__(self, holder, prop):
        super().__init__(f"Invalid property {prop!r} of {holder}")
        self.prop = prop


class PropertyUnsetError(QubesError, AttributeError):
    """A property without value and without default (AttributeError in qubesd)."""

    def __init__(self, holder, prop):
        super().__init__(f"Property {prop!r} of {holder} is not set")


class QubesValueError(QubesError, ValueError):
    pass


class PropertyValueError(QubesValueError):
    def __init__(self, holder, prop, value, message=None):
        super().__init__(message or f"Invalid value {value!r} for property {prop!r} of {holder}")


class LabelNotFoundError(QubesError, KeyError):
    def __init__(self, label):
        super().__init__(f"Label does not exist: {label}")

    def __str__(self):
        return QubesError.__str__(self)


class FeatureNotFoundError(QubesError, KeyError):
    def __init__(self, vm, feature):
        super().__init__(f"Feature not set for domain {vm}: {feature}")

    def __str__(self):
        return QubesError.__str__(self)


class VMError(QubesError):
    pass


class VMInUseError(VMError):
    pass


class VMNotHaltedError(VMError):
    def __init__(self, name, message=None):
        super().__init__(message or f"Domain is not powered off: {name!r}")


class VMNotStartedError(VMError):
    def __init__(self, name, message=None):
        super().__init__(message or f"Domain is powered off: {name!r}")


class LabLimitError(QubesError):
    """A Qubes feature the lab does not reproduce; the message names it."""


# Values


@dataclass(frozen=True)
class Label:
    name: str

    @property
    def index(self):
        return LABELS[self.name]

    def __str__(self):
        return self.name


class DnsServers(tuple):
    """The `dns` property: printed space-separated (StrSerializableTuple in Qubes)."""

    def __str__(self):
        return " ".join(self)


def format_value(value):
    """Return the text qvm-prefs and qvm-ls print for a property value, or None."""
    if value is None:
        return None
    if isinstance(value, Domain):
        return value.name
    return str(value)


# Property definitions


@dataclass(frozen=True)
class Prop:
    """One property: its type, the classes that have it, its default and setter."""

    name: str
    kind: str  # str int bool vm label ipv4 ipv6 uuid
    classes: tuple
    default: Optional[Callable] = None  # callable(domain) or None: no default
    settable: bool = True
    write_once: bool = False
    allow_none: bool = False
    vmclass: Optional[tuple] = None
    doc: str = ""


def _template_or(prop, fallback):
    def default(vm):
        template = vm.template_or_none()
        if template is not None:
            with contextlib.suppress(AttributeError):
                return template.get(prop)
        return fallback(vm) if callable(fallback) else fallback

    return default


def _default_ip(vm):
    if not vm.is_networked():
        return None
    netvm = vm.get("netvm")
    return (netvm or vm).ip_for_client(vm)


def _default_ip6(vm):
    if not vm.is_networked():
        return None
    if not vm.check_with_netvm("ipv6", ""):
        return None
    netvm = vm.get("netvm")
    return (netvm or vm).ip6_for_client(vm)


def _visible_gateway(vm):
    fake = vm.check_with_template("net.fake-gateway", None)
    if fake:
        return fake
    netvm = vm.get("netvm")
    return netvm.get("gateway") if netvm is not None else None


def _visible_gateway6(vm):
    if vm.check_with_netvm("ipv6", ""):
        netvm = vm.get("netvm")
        return netvm.get("gateway6") if netvm is not None else None
    return None


def _visible_netmask(vm):
    fake = vm.check_with_template("net.fake-netmask", None)
    if fake:
        return fake
    netvm = vm.get("netvm")
    return netvm.get("netmask") if netvm is not None else None


def _gateway6(vm):
    if vm.check_with_netvm("ipv6", "") and vm.get("provides_network"):
        return vm.get("visible_ip6")
    return None


def _dns(vm):
    if vm.get("netvm") is not None or vm.get("provides_network"):
        return DnsServers(VIRTUAL_DNS)
    return None


def _xid(vm):
    runtime = vm.app.runtime(vm.name)
    if runtime and runtime.get("state") in ("Running", "Transient", "Halting"):
        return runtime.get("xid", -1)
    return -1


def _start_time(vm):
    runtime = vm.app.runtime(vm.name)
    if runtime and runtime.get("state") == "Running":
        return runtime.get("start_time")
    return None


def _icon(vm):
    label = vm.get("label").name
    if vm.klass == "TemplateVM":
        return "templatevm-" + label
    if vm.features.get("servicevm"):
        return "servicevm-" + label
    if vm.klass == "DispVM":
        return "dispvm-" + label
    if vm.klass == "StandaloneVM":
        return "standalonevm-" + label
    if vm.klass == "AppVM" and vm.get("template_for_dispvms"):
        return "templatevm-" + label
    return "appvm-" + label


def _default_virt_mode(vm):
    template = vm.template_or_none()
    return template.get("virt_mode") if template is not None else "pvh"


QUBES_VMS = VM_CLASSES
TEMPLATE_BASED = ("AppVM", "DispVM")

PROPERTIES = [
    Prop("name", "str", ALL_CLASSES, settable=False, write_once=True, doc="User-specified name of the domain."),
    Prop(
        "qid",
        "int",
        ALL_CLASSES,
        settable=False,
        write_once=True,
        doc="Internal, persistent identificator of particular domain.",
    ),
    Prop("uuid", "uuid", ALL_CLASSES, settable=False, write_once=True, doc="UUID from libvirt."),
    Prop("label", "label", ALL_CLASSES, doc="Colourful label assigned to VM."),
    Prop("icon", "str", ALL_CLASSES, default=_icon, settable=False, doc="freedesktop icon name."),
    Prop("xid", "int", ALL_CLASSES, default=_xid, settable=False, doc="Xen ID (in the lab: a counter per start)."),
    Prop(
        "default_dispvm",
        "vm",
        ALL_CLASSES,
        allow_none=True,
        default=lambda vm: vm.get("template") if vm.klass == "DispVM" else vm.app.get_global("default_dispvm"),
        doc="Default VM to be used as Disposable VM for service calls.",
    ),
    Prop(
        "include_in_backups",
        "bool",
        ALL_CLASSES,
        default=lambda vm: (not vm.get("auto_cleanup")) if vm.klass == "DispVM" else True,
        doc="If this domain is to be included in default backup.",
    ),
    Prop(
        "updateable",
        "bool",
        ALL_CLASSES,
        default=lambda vm: vm.klass != "DispVM" and vm.template_or_none() is None,
        settable=False,
        doc="True if this machine may be updated on its own.",
    ),
    Prop("keyboard_layout", "str", ALL_CLASSES, default=lambda vm: "us++", doc="Keyboard layout for this VM."),
    Prop(
        "guivm",
        "vm",
        QUBES_VMS,
        allow_none=True,
        default=lambda vm: vm.app.get_global("default_guivm"),
        doc="VM used for Gui.",
    ),
    Prop(
        "audiovm",
        "vm",
        QUBES_VMS,
        allow_none=True,
        default=lambda vm: vm.app.get_global("default_audiovm"),
        doc="VM used for Audio.",
    ),
    Prop("virt_mode", "str", QUBES_VMS, default=_default_virt_mode, doc='Virtualisation mode: "hvm", "pv" or "pvh".'),
    Prop(
        "installed_by_rpm",
        "bool",
        QUBES_VMS,
        default=lambda vm: False,
        doc="If this domain's image was installed from package tracked by package manager.",
    ),
    Prop(
        "memory",
        "int",
        QUBES_VMS,
        default=_template_or("memory", DEFAULT_MEMORY),
        doc="Memory currently available for this VM.",
    ),
    Prop(
        "maxmem",
        "int",
        QUBES_VMS,
        default=_template_or("maxmem", DEFAULT_MAXMEM),
        doc="Maximum amount of memory available for this VM.",
    ),
    Prop("stubdom_mem", "int", QUBES_VMS, default=lambda vm: None, doc="Memory amount allocated for the stubdom."),
    Prop("vcpus", "int", QUBES_VMS, default=_template_or("vcpus", 2), doc="Number of virtual CPUs for a qube."),
    Prop(
        "kernel",
        "str",
        QUBES_VMS,
        default=_template_or("kernel", lambda vm: vm.app.get_global("default_kernel")),
        doc="Kernel used by this domain.",
    ),
    Prop(
        "kernelopts",
        "str",
        QUBES_VMS,
        default=_template_or("kernelopts", "swiotlb=2048"),
        doc="Kernel command line passed to domain.",
    ),
    Prop("debug", "bool", QUBES_VMS, default=lambda vm: False, doc="Turns on debugging features."),
    Prop(
        "default_user",
        "str",
        QUBES_VMS,
        default=_template_or("default_user", "user"),
        doc="Default user to start applications as.",
    ),
    Prop(
        "qrexec_timeout",
        "int",
        QUBES_VMS,
        default=_template_or("qrexec_timeout", lambda vm: vm.app.get_global("default_qrexec_timeout")),
        doc="Time in seconds after which qrexec connection attempt is deemed failed.",
    ),
    Prop(
        "shutdown_timeout",
        "int",
        QUBES_VMS,
        default=_template_or("shutdown_timeout", lambda vm: vm.app.get_global("default_shutdown_timeout")),
        doc="Time in seconds for shutdown of the VM.",
    ),
    Prop(
        "autostart",
        "bool",
        QUBES_VMS,
        default=lambda vm: False,
        doc="Setting this to True means that VM should be autostarted on dom0 boot.",
    ),
    Prop(
        "backup_timestamp",
        "int",
        QUBES_VMS,
        default=lambda vm: None,
        doc="Time of last backup of the qube, in seconds since unix epoch.",
    ),
    Prop(
        "management_dispvm",
        "vm",
        QUBES_VMS,
        allow_none=True,
        default=_template_or("management_dispvm", lambda vm: vm.app.get_global("management_dispvm")),
        doc="Default DVM template for Disposable VM for managing this VM.",
    ),
    Prop("start_time", "str", QUBES_VMS, default=_start_time, settable=False, doc="Tell when machine was started."),
    Prop("stubdom_xid", "int", QUBES_VMS, default=lambda vm: -1, settable=False, doc="Stub domain ID."),
    Prop("mac", "str", QUBES_VMS, default=lambda vm: DEFAULT_MAC, doc="MAC address of the NIC emulated inside VM."),
    Prop("ip", "ipv4", QUBES_VMS, default=_default_ip, doc="IP address of this domain."),
    Prop("ip6", "ipv6", QUBES_VMS, default=_default_ip6, doc="IPv6 address of this domain."),
    Prop(
        "netvm",
        "vm",
        QUBES_VMS,
        allow_none=True,
        default=lambda vm: None if vm.klass == "TemplateVM" else vm.app.get_global("default_netvm"),
        doc="VM that provides network connection to this domain.",
    ),
    Prop(
        "provides_network",
        "bool",
        QUBES_VMS,
        default=lambda vm: False,
        doc="If this domain can act as network provider.",
    ),
    Prop(
        "visible_ip",
        "ipv4",
        QUBES_VMS,
        settable=False,
        default=lambda vm: vm.check_with_template("net.fake-ip", None) or vm.get("ip"),
        doc="IP address of this domain as seen by the domain.",
    ),
    Prop(
        "visible_ip6",
        "ipv6",
        QUBES_VMS,
        settable=False,
        default=lambda vm: vm.get("ip6"),
        doc="IPv6 address of this domain as seen by the domain.",
    ),
    Prop(
        "visible_gateway",
        "ipv4",
        QUBES_VMS,
        settable=False,
        default=_visible_gateway,
        doc="Default gateway of this domain as seen by the domain.",
    ),
    Prop(
        "visible_gateway6",
        "ipv6",
        QUBES_VMS,
        settable=False,
        default=_visible_gateway6,
        doc="Default (IPv6) gateway of this domain as seen by the domain.",
    ),
    Prop(
        "visible_netmask",
        "str",
        QUBES_VMS,
        settable=False,
        default=_visible_netmask,
        doc="Netmask as seen by the domain.",
    ),
    Prop(
        "gateway",
        "ipv4",
        QUBES_VMS,
        settable=False,
        default=lambda vm: vm.get("visible_ip") if vm.get("provides_network") else None,
        doc="Gateway for other domains that use this domain as netvm.",
    ),
    Prop(
        "gateway6",
        "ipv6",
        QUBES_VMS,
        settable=False,
        default=_gateway6,
        doc="Gateway (IPv6) for other domains that use this domain as netvm.",
    ),
    Prop(
        "netmask",
        "str",
        QUBES_VMS,
        settable=False,
        default=lambda vm: "255.255.255.255" if vm.is_networked() else None,
        doc="Netmask for gateway address.",
    ),
    Prop("dns", "str", QUBES_VMS, settable=False, default=_dns, doc="DNS servers set up for this domain."),
    Prop("template", "vm", ("AppVM",), vmclass=("TemplateVM",), doc="Template, on which this AppVM is based."),
    Prop("template", "vm", ("DispVM",), vmclass=("AppVM",), doc="AppVM, on which this DispVM is based."),
    Prop(
        "template_for_dispvms",
        "bool",
        ("AppVM", "StandaloneVM"),
        default=lambda vm: False,
        doc="Should this VM be allowed to start as Disposable VM.",
    ),
    Prop(
        "dispid",
        "int",
        ("DispVM",),
        settable=False,
        write_once=True,
        doc="Internal, persistent identifier of particular DispVM.",
    ),
    Prop(
        "auto_cleanup", "bool", ("DispVM",), default=lambda vm: False, doc="Automatically remove this VM upon shutdown."
    ),
]

GLOBAL_PROPERTIES = [
    Prop(
        "clockvm",
        "vm",
        (),
        allow_none=True,
        default=lambda app: None,
        doc="Which VM to use as NTP proxy for updating AdminVM.",
    ),
    Prop("check_updates_vm", "bool", (), default=lambda app: True, doc="Check for updates inside qubes."),
    Prop(
        "default_audiovm",
        "vm",
        (),
        allow_none=True,
        default=lambda app: app.domain("dom0"),
        doc="Default AudioVM for VMs.",
    ),
    Prop(
        "default_dispvm",
        "vm",
        (),
        allow_none=True,
        default=lambda app: None,
        doc="Default DispVM base for service calls.",
    ),
    Prop(
        "default_guivm", "vm", (), allow_none=True, default=lambda app: app.domain("dom0"), doc="Default GuiVM for VMs."
    ),
    Prop("default_kernel", "str", (), doc="Which kernel to use when not overriden in VM."),
    Prop("default_netvm", "vm", (), allow_none=True, default=lambda app: None, doc="Default NetVM for AppVMs."),
    Prop("default_pool", "str", (), default=lambda app: "varlibqubes", doc="Default storage pool."),
    Prop(
        "default_pool_kernel",
        "str",
        (),
        default=lambda app: "linux-kernel",
        doc="Default storage pool for kernel volumes.",
    ),
    Prop(
        "default_pool_private",
        "str",
        (),
        default=lambda app: app.get_global("default_pool"),
        doc="Default storage pool for private volumes.",
    ),
    Prop(
        "default_pool_root",
        "str",
        (),
        default=lambda app: app.get_global("default_pool"),
        doc="Default storage pool for root volumes.",
    ),
    Prop(
        "default_pool_volatile",
        "str",
        (),
        default=lambda app: app.get_global("default_pool"),
        doc="Default storage pool for volatile volumes.",
    ),
    Prop(
        "default_qrexec_timeout",
        "int",
        (),
        default=lambda app: 60,
        doc="Default time in seconds after which qrexec connection attempt is deemed failed.",
    ),
    Prop(
        "default_shutdown_timeout",
        "int",
        (),
        default=lambda app: 60,
        doc="Default time in seconds for VM shutdown to complete.",
    ),
    Prop("default_template", "vm", (), vmclass=("TemplateVM",), doc="Default template for new AppVMs."),
    Prop(
        "management_dispvm",
        "vm",
        (),
        allow_none=True,
        default=lambda app: None,
        doc="Default DVM template for Disposable VM for managing other VMs.",
    ),
    Prop(
        "stats_interval",
        "int",
        (),
        default=lambda app: 3,
        doc="Interval in seconds for VM stats reporting (memory, CPU usage).",
    ),
    Prop(
        "updatevm",
        "vm",
        (),
        allow_none=True,
        default=lambda app: None,
        doc="Which VM to use as yum proxy for updating AdminVM and TemplateVMs.",
    ),
]
GLOBAL_BY_NAME = {prop.name: prop for prop in GLOBAL_PROPERTIES}


def properties_of(klass):
    """Return {name: Prop} for a qube class."""
    return {prop.name: prop for prop in PROPERTIES if klass in prop.classes}


# Validation helpers, following qubes/vm/__init__.py validate_name and
# qubes/__init__.py property.sanitize / property.bool.

NAME_PATTERN = re.compile(r"\A[a-zA-Z][a-zA-Z0-9_-]*\Z")
TAG_CHARACTERS = set(string.ascii_letters + string.digits + "-_")


def validate_name(name):
    if len(name) > 31:
        raise QubesValueError("VM name must be shorter than 32 characters")
    if not NAME_PATTERN.match(name):
        raise QubesValueError("VM name contains illegal characters")
    if name == "Domain-0":
        raise QubesValueError("VM name cannot be 'Domain-0'")
    if name in ("none", "default"):
        raise QubesValueError("VM name cannot be 'none' nor 'default'")
    if name.endswith("-dm"):
        raise QubesValueError("VM name cannot end with -dm")


def validate_tag(tag):
    if not tag or not set(tag) <= TAG_CHARACTERS:
        raise QubesValueError(f"disallowed characters in tag {tag!r}")


def parse_bool(text):
    lowered = text.lower()
    if lowered in ("0", "no", "false", "off"):
        return False
    if lowered in ("1", "yes", "true", "on"):
        return True
    raise QubesValueError(f"Invalid literal for boolean property: {text!r}")


def parse_scalar(prop, text, holder):
    """Convert the text a client sends into the property's type (sanitize + type)."""
    if not all(char in string.printable for char in text):
        raise QubesValueError("Invalid characters in property value")
    if prop.kind == "bool":
        return parse_bool(text)
    if prop.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise QubesValueError("Failed to parse property value as int") from None
    if prop.kind == "ipv4":
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise QubesValueError("Failed to parse property value as IPv4Address") from None
    if prop.kind == "ipv6":
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise QubesValueError("Failed to parse property value as IPv6Address") from None
    if prop.kind == "label":
        if text not in LABELS:
            raise LabelNotFoundError(text)
        return text
    if prop.name == "mac":
        value = text.lower()
        if not re.match(r"\A([0-9a-f][0-9a-f]:){5}[0-9a-f][0-9a-f]\Z", value):
            raise PropertyValueError(holder, prop.name, text, "Invalid MAC address value")
        return value
    if prop.name == "virt_mode" and text.lower() not in ("hvm", "pv", "pvh"):
        raise PropertyValueError(holder, prop.name, text)
    return text.lower() if prop.name == "virt_mode" else text


def _check_positive(prop, value, holder):
    if prop.name in ("memory", "vcpus", "qrexec_timeout", "shutdown_timeout", "stubdom_mem") and value <= 0:
        raise PropertyValueError(holder, prop.name, value, "Value must be positive")
    if prop.name == "maxmem" and value < 0:
        raise PropertyValueError(holder, prop.name, value, "Value must be non-negative")


# Model


class Features:
    """A qube's features: string values, as qubesd stores them."""

    def __init__(self, vm):
        self.vm = vm
        self.data = vm.data.setdefault("features", {})

    def __contains__(self, key):
        return key in self.data

    def __getitem__(self, key):
        try:
            return self.data[key]
        except KeyError:
            raise FeatureNotFoundError(self.vm.name, key) from None

    def get(self, key, default=None):
        return self.data.get(key, default)

    def keys(self):
        return sorted(self.data)

    def items(self):
        return [(key, self.data[key]) for key in sorted(self.data)]

    def set(self, key, value):
        """Store *value* as qubesd does: True -> '1', False -> '', else str()."""
        if isinstance(value, bool):
            value = "1" if value else ""
        value = str(value)
        if not all(ord(char) < 128 for char in value):
            raise QubesValueError("Non-ASCII characters in feature value")
        validate_feature(key, value)
        self.data[key] = value

    def delete(self, key):
        if key not in self.data:
            raise FeatureNotFoundError(self.vm.name, key)
        del self.data[key]


def validate_feature(key, value):
    """Apply the feature-pre-set checks of qubes/ext/services.py and net.py."""
    if key.startswith("service."):
        service = key[len("service.") :]
        if not service:
            raise QubesValueError("Service name cannot be empty")
        if "/" in service:
            raise QubesValueError("Service name cannot contain a slash")
        if service in (".", ".."):
            raise QubesValueError('Service name cannot be "." or ".."')
        if len(service) > 48:
            raise QubesValueError("Service name must not exceed 48 bytes")
    if key in ("net.fake-ip", "net.fake-gateway"):
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise QubesValueError(f"Invalid {key} value: {value!r}") from None


class Domain:
    """View of one qube in the store, with Qubes' property semantics."""

    def __init__(self, app, name):
        self.app = app
        self.name = name
        self.data = app.data["qubes"][name]

    def __repr__(self):
        return f"<Domain {self.name}>"

    def __str__(self):
        return self.name

    def __eq__(self, other):
        return isinstance(other, Domain) and other.name == self.name

    def __hash__(self):
        return hash(self.name)

    @property
    def klass(self):
        return self.data["class"]

    @property
    def props(self):
        return self.data.setdefault("props", {})

    @property
    def features(self):
        return Features(self)

    @property
    def tags(self):
        return self.data.setdefault("tags", [])

    @property
    def lab(self):
        """Lab-only attributes (image, layers), never shown by dom0 tools."""
        return self.data.setdefault("lab", {})

    def property_defs(self):
        return properties_of(self.klass)

    def property_list(self):
        return sorted(self.property_defs())

    def prop_def(self, name):
        try:
            return self.property_defs()[name]
        except KeyError:
            raise NoSuchPropertyError(self.name, name) from None

    def get(self, name):
        """Return the typed value of a property (raises PropertyUnsetError)."""
        prop = self.prop_def(name)
        if name in self.props:
            return self._decode(prop, self.props[name])
        if prop.default is None:
            raise PropertyUnsetError(self.name, name)
        return prop.default(self)

    def is_default(self, name):
        self.prop_def(name)
        return name not in self.props

    def _decode(self, prop, raw):
        if raw is None:
            return None
        if prop.kind == "vm":
            return self.app.domain(raw)
        if prop.kind == "label":
            return Label(raw)
        return raw

    def template_or_none(self):
        if "template" not in self.property_defs():
            return None
        try:
            return self.get("template")
        except AttributeError:
            return None

    def set(self, name, text):
        """Set a property from its client text form; return (old, new) raw values."""
        prop = self.prop_def(name)
        if not prop.settable:
            raise PropertyValueError(self.name, name, text, f"property {name!r} on {self.klass} instance cannot be set")
        if prop.kind == "vm":
            value = self.app.resolve_vm_value(self, prop, text)
        else:
            value = parse_scalar(prop, text, self.name)
            if prop.kind == "int":
                _check_positive(prop, value, self.name)
        self._check_setter(prop, value)
        old = self.props.get(name, "<default>")
        self.props[name] = value
        return old, value

    def reset(self, name):
        prop = self.prop_def(name)
        if not prop.settable:
            raise PropertyValueError(self.name, name, None, f"property {name!r} on {self.klass} instance cannot be set")
        if name == "netvm":
            default = prop.default(self)
            self._check_setter(prop, default.name if default else None)
        if name == "provides_network":
            self._check_setter(prop, False)
        self.props.pop(name, None)

    def _check_setter(self, prop, value):
        """Apply the setters of qubes/vm/mix/net.py and the template rules."""
        if prop.name == "netvm" and value is not None:
            netvm = self.app.domain(value)
            if not netvm.get("provides_network"):
                raise QubesValueError(f"The {value} qube does not provide network")
            if netvm == self or self in netvm.netvm_chain():
                raise QubesValueError("Loops in network are unsupported")
        if prop.name == "provides_network" and not value:
            if self.app.connected_vms(self):
                raise QubesValueError("The qube is still used by other qubes, change theirs 'netvm' first")
        if prop.name == "template":
            if self.app.power_state(self.name) != "Halted":
                raise VMNotHaltedError(self.name, "Cannot change template while qube is running")
            template = self.app.domain(value)
            if self.klass == "DispVM" and not template.get("template_for_dispvms"):
                raise PropertyValueError(
                    self.name, "template", value, "template for DispVM must have template_for_dispvms=True"
                )

    def netvm_chain(self):
        """Return the qubes upstream of this one (its netvm, that netvm's netvm...)."""
        chain = []
        current = self.get("netvm") if "netvm" in self.property_defs() else None
        while current is not None and current not in chain:
            chain.append(current)
            current = current.get("netvm")
        return chain

    def is_networked(self):
        if self.get("provides_network"):
            return True
        return self.get("netvm") is not None

    def ip_for_client(self, client):
        """Address this netvm gives *client* (get_ip_for_vm in net.py)."""
        if client.klass == "DispVM":
            return vmid_to_ipv4("10.138", client.get("dispid"))
        return vmid_to_ipv4("10.137", client.get("qid"))

    def ip6_for_client(self, client):
        if client.klass == "DispVM":
            text = f"{IPV6_PREFIX}::a8a:{client.get('dispid'):x}"
        else:
            text = f"{IPV6_PREFIX}::a89:{client.get('qid'):x}"
        return str(ipaddress.IPv6Address(text))

    def check_with_template(self, feature, default):
        current = self
        while current is not None:
            if feature in current.features:
                return current.features[feature]
            current = current.template_or_none()
        return default

    def check_with_netvm(self, feature, default):
        current = self
        seen = set()
        while current is not None and current.name not in seen:
            seen.add(current.name)
            if feature in current.features:
                return current.features[feature]
            if "netvm" not in current.property_defs():
                break
            current = current.get("netvm")
        return default


def vmid_to_ipv4(prefix, vmid):
    """Address for a qid or dispid, as vmid_to_ipv4 in qubes/vm/mix/net.py."""
    if vmid < 255:
        return str(ipaddress.IPv4Address(f"{prefix}.{(vmid >> 8) & 0xFF}.{vmid & 0xFF}"))
    vmid -= 1
    return str(ipaddress.IPv4Address(f"{prefix}.{vmid // 254}.{(vmid % 254) + 1}"))


class Qubes:
    """The whole store: qubes, global properties (qubes-prefs) and runtime state."""

    def __init__(self, data):
        self.data = data
        data.setdefault("qubes", {})
        data.setdefault("global", {})
        data.setdefault("runtime", {})
        data.setdefault("lab", {})

    @classmethod
    def empty(cls):
        app = cls({"version": STORE_VERSION})
        app.data["qubes"]["dom0"] = {
            "class": ADMIN_CLASS,
            "props": {"name": "dom0", "qid": 0, "uuid": "00000000-0000-0000-0000-000000000000", "label": "black"},
            "features": {},
            "tags": [],
            "lab": {},
        }
        return app

    # Domains

    def names(self):
        return sorted(self.data["qubes"])

    def domains(self):
        return [Domain(self, name) for name in self.names()]

    def domain(self, name):
        if name not in self.data["qubes"]:
            raise NoSuchDomainError(name)
        return Domain(self, name)

    def __contains__(self, name):
        return name in self.data["qubes"]

    def connected_vms(self, netvm):
        result = []
        for vm in self.domains():
            if "netvm" in vm.property_defs() and vm.get("netvm") == netvm:
                result.append(vm)
        return result

    def based_on(self, template):
        return [vm for vm in self.domains() if "template" in vm.property_defs() and vm.template_or_none() == template]

    def new_qid(self):
        used = {vm.get("qid") for vm in self.domains()}
        for qid in range(1, MAX_QID):
            if qid not in used:
                return qid
        raise QubesError("Cannot find unused qid!")

    def new_dispid(self):
        used = {vm.props.get("dispid") for vm in self.domains()}
        generator = random.SystemRandom()
        for _ in range(int(MAX_DISPID**0.5)):
            dispid = generator.randrange(MAX_DISPID)
            if dispid and dispid not in used:
                return dispid
        raise QubesError("Cannot find unused dispid!")

    def add_vm(self, klass, name, label, template=None):
        """Create a qube as admin.vm.Create does; return the Domain."""
        if klass not in VM_CLASSES:
            raise QubesValueError(f"no such domain class: {klass!r}")
        validate_name(name)
        if name in self:
            raise QubesValueError(f"VM {name} already exists")
        if label not in LABELS:
            raise LabelNotFoundError(label)
        if template is not None and klass == "TemplateVM":
            raise QubesValueError(f"{klass} cannot be based on template")
        if template is not None and template not in self:
            raise NoSuchDomainError(template)
        if klass in TEMPLATE_BASED and template is None:
            if klass == "DispVM":
                template = self.get_global("default_dispvm")
                template = template.name if template is not None else None
            else:
                default = self.get_global_or_none("default_template")
                template = default.name if default is not None else None
            if template is None:
                raise QubesError(f"{klass} needs a template and no default is set")
        props = {"name": name, "qid": self.new_qid(), "uuid": str(uuid.uuid4()), "label": label}
        self.data["qubes"][name] = {"class": klass, "props": props, "features": {}, "tags": [], "lab": {}}
        vm = Domain(self, name)
        try:
            if template is not None:
                template_vm = self.domain(template)
                wanted = properties_of(klass)["template"].vmclass
                if template_vm.klass not in wanted:
                    raise PropertyValueError(
                        name,
                        "template",
                        template,
                        f"wrong VM class: domains[{template!r}] is of type {template_vm.klass} and not {wanted[0]}",
                    )
                if klass == "DispVM" and not template_vm.get("template_for_dispvms"):
                    raise QubesValueError(
                        f"template for DispVM ({template}) needs to be an AppVM with template_for_dispvms=True"
                    )
                props["template"] = template
            if klass == "DispVM":
                props["dispid"] = self.new_dispid()
                # DispVM.__init__ in qubes/vm/dispvm.py clones the firewall of its
                # disposable template.
                firewall.copy_rules(self.domain(template), vm)
        except QubesError:
            del self.data["qubes"][name]
            raise
        vm.tags.extend(["audiovm-dom0", "created-by-dom0", "guivm-dom0"])
        return vm

    def remove_vm(self, name):
        """Remove a halted qube that nothing references (admin.vm.Remove)."""
        vm = self.domain(name)
        if name == "dom0":
            raise VMInUseError("'dom0' cannot be removed")
        if self.power_state(name) != "Halted":
            raise VMNotHaltedError(name)
        if vm.get("installed_by_rpm"):
            raise VMInUseError("VM installed by package manager: " + name)
        if self.dependencies(vm):
            raise VMInUseError(f"Domain is in use: {name!r};see 'journalctl -u qubesd -e' in dom0 for details")
        del self.data["qubes"][name]
        self.data["runtime"].pop(name, None)

    def dependencies(self, vm):
        """Return (holder or None, property) pairs whose value is *vm*."""
        result = []
        for other in self.domains():
            if other == vm:
                continue
            for prop in other.property_defs().values():
                if prop.kind != "vm":
                    continue
                with contextlib.suppress(AttributeError):
                    if other.get(prop.name) == vm:
                        result.append((other, prop.name))
        for prop in GLOBAL_PROPERTIES:
            if prop.kind == "vm" and self.get_global_or_none(prop.name) == vm:
                result.append((None, prop.name))
        return result

    def resolve_vm_value(self, holder, prop, text):
        """Validate a VMProperty value given as text; return the name or None."""
        holder_name = holder.name if isinstance(holder, Domain) else "dom0"
        if text == "":
            if prop.allow_none:
                return None
            raise PropertyValueError(holder_name, prop.name, text)
        validate_name(text)
        if text not in self:
            raise PropertyValueError(holder_name, prop.name, text, f"Can't set {prop.name} to non-existing qube {text}")
        vm = self.domain(text)
        if prop.vmclass and vm.klass not in prop.vmclass:
            raise PropertyValueError(
                holder_name,
                prop.name,
                text,
                f"wrong VM class: domains[{text!r}] is of type {vm.klass} and not {prop.vmclass[0]}",
            )
        return text

    # Global properties (qubes-prefs)

    def global_prop(self, name):
        try:
            return GLOBAL_BY_NAME[name]
        except KeyError:
            raise NoSuchPropertyError("dom0", name) from None

    def get_global(self, name):
        prop = self.global_prop(name)
        stored = self.data["global"]
        if name in stored:
            raw = stored[name]
            if raw is None:
                return None
            return self.domain(raw) if prop.kind == "vm" else raw
        if prop.default is None:
            raise PropertyUnsetError("dom0", name)
        return prop.default(self)

    def get_global_or_none(self, name):
        try:
            return self.get_global(name)
        except PropertyUnsetError:
            return None

    def global_is_default(self, name):
        self.global_prop(name)
        return name not in self.data["global"]

    def set_global(self, name, text):
        prop = self.global_prop(name)
        if prop.kind == "vm":
            value = self.resolve_vm_value(self, prop, text)
        else:
            value = parse_scalar(prop, text, "dom0")
        self.data["global"][name] = value
        return value

    def reset_global(self, name):
        self.global_prop(name)
        self.data["global"].pop(name, None)

    # Runtime state, written by the lab runtime

    def runtime(self, name):
        return self.data["runtime"].get(name)

    def power_state(self, name):
        runtime = self.runtime(name)
        if not runtime:
            return "Halted"
        return runtime.get("state", "Halted")

    def is_running(self, name):
        return self.power_state(name) == "Running"


class Store:
    """store.json with an exclusive lock around every read-modify-write."""

    def __init__(self, layout):
        self.layout = layout

    @contextlib.contextmanager
    def _locked(self, mode):
        self.layout.store_lock.touch(exist_ok=True)
        with open(self.layout.store_lock, "r+", encoding="utf-8") as lock:
            fcntl.flock(lock, mode)
            yield

    def _load(self):
        with open(self.layout.store, encoding="utf-8") as store:
            data = json.load(store)
        if data.get("version") != STORE_VERSION:
            raise QubesError(
                f"{self.layout.store} has store version {data.get('version')!r},"
                f" expected {STORE_VERSION}: start a new lab run"
            )
        return Qubes(data)

    def _save(self, app):
        temporary = self.layout.store.with_suffix(f".tmp{os.getpid()}")
        with open(temporary, "w", encoding="utf-8") as store:
            json.dump(app.data, store, indent=1, sort_keys=True)
            store.write("\n")
        os.replace(temporary, self.layout.store)

    def read(self):
        """Return a snapshot of the store (changes to it are not saved)."""
        with self._locked(fcntl.LOCK_SH):
            return self._load()

    @contextlib.contextmanager
    def transaction(self):
        """Yield the store for changes; save it when the block ends without error."""
        with self._locked(fcntl.LOCK_EX):
            app = self._load()
            yield app
            self._save(app)

    def create(self, app):
        with self._locked(fcntl.LOCK_EX):
            self._save(app)
