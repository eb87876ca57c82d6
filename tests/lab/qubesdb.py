"""QubesDB entries of a qube, written as a file tree the lab agent reads.

The entries follow QubesOS/qubes-core-admin v4.2.39: QubesVM.create_qdb_entries
in qubes/vm/qubesvm.py, DispVM.create_qdb_entries in qubes/vm/dispvm.py, the
netvm entries of qubes/vm/mix/net.py and the domain-qdb-create handlers of
qubes/ext/services.py, qubes/ext/r3compatibility.py and qubes/ext/vm_config.py.
Key "/qubes-ip" is file "qubes-ip"; key "/qubes-service/foo" is file
"qubes-service/foo".
"""

import base64
import os
from pathlib import Path

from . import firewall
from .store import format_value

# r3compatibility.py maps these features to legacy service names.
LEGACY_SERVICES = {
    "service.ntpd": "ntpd",
    "check-updates": "qubes-update-check",
    "dvm": "qubes-dvm",
}


def _text(value):
    text = format_value(value)
    return "" if text is None else text


def qube_entries(app, vm):
    """Return {key: value} of the QubesDB of *vm* as qubesd writes it at start."""
    entries = {}
    updateable = vm.get("updateable")
    entries["/name"] = vm.name
    entries["/type"] = vm.klass
    entries["/default-user"] = vm.get("default_user")
    entries["/qubes-vm-updateable"] = str(updateable)
    entries["/qubes-vm-persistence"] = "full" if updateable else "rw-only"
    if vm.klass == "DispVM":
        entries["/qubes-vm-persistence"] = "none"
    entries["/qubes-debug-mode"] = str(int(vm.get("debug")))
    template = vm.template_or_none()
    entries["/qubes-base-template"] = template.name if template is not None else ""
    entries["/qubes-random-seed"] = base64.b64encode(os.urandom(64)).decode("ascii")

    if vm.get("provides_network"):
        entries["/qubes-netvm-network"] = _text(vm.get("gateway"))
        entries["/qubes-netvm-gateway"] = _text(vm.get("gateway"))
        if vm.get("gateway6"):
            entries["/qubes-netvm-gateway6"] = _text(vm.get("gateway6"))
        entries["/qubes-netvm-netmask"] = _text(vm.get("netmask"))
        for position, address in zip(("primary", "secondary"), vm.get("dns")):
            entries[f"/qubes-netvm-{position}-dns"] = address

    if vm.get("netvm") is not None:
        entries["/qubes-mac"] = vm.get("mac")
        entries["/qubes-ip"] = _text(vm.get("visible_ip"))
        entries["/qubes-netmask"] = _text(vm.get("visible_netmask"))
        entries["/qubes-gateway"] = _text(vm.get("visible_gateway"))
        for position, address in zip(("primary", "secondary"), vm.get("dns")):
            entries[f"/qubes-{position}-dns"] = address
        if vm.get("visible_ip6"):
            entries["/qubes-ip6"] = _text(vm.get("visible_ip6"))
        if vm.get("visible_gateway6"):
            entries["/qubes-gateway6"] = _text(vm.get("visible_gateway6"))

    entries["/qubes-timezone"] = "UTC"
    entries["/qubes-block-devices"] = ""
    entries["/qubes-usb-devices"] = ""
    entries["/keyboard-layout"] = vm.get("keyboard_layout")

    entries.update(service_entries(vm))
    entries["/qubes-vm-type"] = legacy_vm_type(vm)
    entries["/qubes-iptables-error"] = ""
    for feature, value in vm.features.items():
        if feature.startswith("vm-config."):
            entries["/vm-config/" + feature[len("vm-config.") :]] = value

    if vm.get("provides_network"):
        entries.update(netvm_entries(app, vm))
    return entries


def service_entries(vm):
    """Return the /qubes-service/ entries (services.py and r3compatibility.py)."""
    entries = {}
    for feature, value in vm.features.items():
        if feature.startswith("service."):
            service = feature[len("service.") :]
            if service and len(service) <= 48:
                # qubesd writes str(int(bool(value))): any non-empty value,
                # including '0', enables the service.
                entries["/qubes-service/" + service] = str(int(bool(value)))
        legacy = LEGACY_SERVICES.get(feature)
        if legacy is not None:
            entries["/qubes-service/" + legacy] = str(int(bool(value)))
    if "updates-proxy-setup" in vm.features:
        entries["/qubes-service/yum-proxy-setup"] = str(int(bool(vm.features["updates-proxy-setup"])))
    entries["/qubes-service/meminfo-writer"] = "1" if vm.get("maxmem") > 0 else "0"
    return entries


def legacy_vm_type(vm):
    if vm.klass == "TemplateVM":
        return "TemplateVM"
    if vm.get("provides_network"):
        return "ProxyVM" if vm.get("netvm") is not None else "NetVM"
    return "AppVM"


def netvm_entries(app, netvm):
    """Return /connected-ips and /mapped-ip/ entries of a network-providing qube."""
    entries = {}
    clients = app.connected_vms(netvm)
    entries["/connected-ips"] = " ".join(
        _text(client.get("visible_ip")) for client in clients if client.get("visible_ip")
    )
    entries["/connected-ips6"] = " ".join(
        _text(client.get("visible_ip6")) for client in clients if client.get("visible_ip6")
    )
    for client in clients:
        if app.power_state(client.name) == "Halted":
            continue
        base = f"/mapped-ip/{_text(client.get('ip'))}"
        if client.get("visible_ip"):
            entries[base + "/visible-ip"] = _text(client.get("visible_ip"))
        if client.get("visible_gateway"):
            entries[base + "/visible-gateway"] = _text(client.get("visible_gateway"))
        # NetVMMixin.reload_firewall_for_vm in qubes/vm/mix/net.py: the client's
        # qvm-firewall rules under each of its addresses, one family each. The empty
        # key /qubes-firewall/<address> that Qubes writes last, to wake the watch of
        # qubes-firewall, is left out: a key of the lab's file tree cannot also be a
        # folder, and dom0 sends the agent the event firewall-changed instead.
        rules = firewall.stored_rules(client)
        for family, address in ((4, client.get("ip")), (6, client.get("ip6"))):
            if not address:
                continue
            for key, value in firewall.qdb_entries(rules, family).items():
                entries[f"/qubes-firewall/{address}/{key}"] = value
    return entries


def key_path(directory, key):
    if not key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"invalid QubesDB key {key!r}")
    return Path(directory) / key.lstrip("/")


def write_tree(directory, entries):
    """Make *directory* hold exactly *entries*; each file is replaced atomically.

    The directory itself is kept, because a running container has it bind-mounted.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wanted = {key_path(directory, key): value for key, value in entries.items()}
    for path, value in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        data = value.encode("utf-8")
        try:
            if path.read_bytes() == data:
                continue
        except (FileNotFoundError, IsADirectoryError):
            pass
        temporary = path.parent / f".{path.name}.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, path)
    for path in sorted(directory.rglob("*"), key=lambda item: len(item.parts), reverse=True):
        if path.is_file() and path not in wanted:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def read_tree(directory):
    """Return {key: value} of a QubesDB file tree (for tests and `status`)."""
    directory = Path(directory)
    result = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            result["/" + str(path.relative_to(directory))] = path.read_text("utf-8")
    return result
