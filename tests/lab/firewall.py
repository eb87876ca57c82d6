"""Per-qube firewall rules (qvm-firewall) of the lab's dom0.

Two views of one rule, as in Qubes 4.2:

- ``Rule`` is the rule qubesd stores and validates (QubesOS/qubes-core-admin
  v4.2.39, qubes/firewall.py). Its ``api_rule`` is the line of
  admin.vm.firewall.Get and Set; its ``qdb_rule`` is the value dom0 writes to
  ``/qubes-firewall/<client address>/NNNN`` in the QubesDB of the client's netvm.
- ``client_rule`` and ``client_row`` are how qvm-firewall prints a rule
  (QubesOS/qubes-core-admin-client v4.2.18, qubesadmin/firewall.py).

The store keeps a qube's rules as ``api_rule`` lines under its ``firewall`` key. A
qube without that key has the default rule set ``action=accept``
(Firewall.load_defaults, used while the qube has no firewall.xml).
"""

import datetime
import ipaddress
import string

DEFAULT_RULES = ("action=accept",)

# Firewall.policy in qubes/firewall.py: the policy written to QubesDB is always drop.
POLICY = "drop"

HOSTNAME_CHARACTERS = frozenset(string.ascii_lowercase + string.digits + "-._")
COMMENT_CHARACTERS = frozenset(string.ascii_letters + string.digits + ":;,./-_[] ")

# Server-side element order: qubes.PropertyHolder.property_list sorts by
# (order, name), with action, comment and expire at order 0, dsthost, proto and
# specialtarget at 1, dstports and icmptype at 2. api_rule moves comment last;
# the QubesDB form leaves comment and expire out.
API_ORDER = ("action", "expire", "dsthost", "proto", "specialtarget", "dstports", "icmptype", "comment")
QDB_ORDER = ("action", "dsthost", "proto", "specialtarget", "dstports", "icmptype")
# qubesadmin.firewall.Rule.rule prints the elements in this order.
CLIENT_ORDER = ("action", "proto", "dsthost", "dstports", "icmptype", "specialtarget", "expire", "comment")


class RuleError(ValueError):
    """A rule qubesd or qubesadmin rejects; the message names the element."""


class DstHost:
    """A destination: IPv4 or IPv6 network (dst4, dst6) or a host name (dsthost).

    A bare address gets the full prefix length, as DstHost in qubes/firewall.py adds it.
    """

    def __init__(self, text):
        if text.count("/") > 1:
            raise RuleError(f"invalid destination {text!r}: more than one /")
        host, _, prefix = text.partition("/")
        if prefix and not prefix.isdigit():
            raise RuleError(f"invalid prefix length in {text!r}: expected a number after /")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if prefix:
                raise RuleError(f"invalid IP address {host!r} in {text!r}") from None
            if not text or not set(text) <= HOSTNAME_CHARACTERS:
                raise RuleError(f"Invalid hostname {text!r}: use lowercase letters, digits, -, . and _") from None
            self.type = "dsthost"
            self.prefixlen = 0
            self.value = text
            return
        self.type = "dst6" if address.version == 6 else "dst4"
        maximum = 128 if address.version == 6 else 32
        self.prefixlen = int(prefix) if prefix else maximum
        if self.prefixlen > maximum:
            raise RuleError(f"invalid prefix length in {text!r}: the maximum for IPv{address.version} is {maximum}")
        self.value = f"{host}/{self.prefixlen}"

    def __str__(self):
        return self.value


class DstPorts:
    """A port or port range, kept as ``first-last`` (the QubesDB form)."""

    def __init__(self, text):
        parts = text.split("-")
        if len(parts) > 2 or not all(part.isdigit() for part in parts):
            raise RuleError(f"invalid port or port range {text!r}: expected PORT or FIRST-LAST")
        first, last = int(parts[0]), int(parts[-1])
        if first > 65536 or last > 65536:
            raise RuleError(f"port out of range in {text!r}: the maximum is 65536")
        if first > last:
            raise RuleError(f"invalid port range {text!r}: the first port is above the last")
        self.range = (first, last)

    def __str__(self):
        return f"{self.range[0]}-{self.range[1]}"

    @property
    def pretty(self):
        first, last = self.range
        return str(first) if first == last else f"{first}-{last}"


class Rule:
    """One firewall rule with qubesd's validation (qubes/firewall.py, v4.2.39)."""

    def __init__(self, **elements):
        self.elements = {}
        for name in ("action", "proto", "dsthost", "specialtarget", "dstports", "icmptype", "expire", "comment"):
            value = elements.pop(name, None)
            if value is not None:
                self.elements[name] = self._parse(name, value)
        if elements:
            raise RuleError(f"unknown rule elements {sorted(elements)}")
        if "action" not in self.elements:
            raise RuleError("missing action=: every rule needs action=accept or action=drop")
        proto = self.elements.get("proto")
        # Rule.on_set_dstports and on_set_icmptype in qubes/firewall.py.
        if "dstports" in self.elements and proto not in ("tcp", "udp"):
            raise RuleError("dstports valid only for 'tcp' and 'udp' protocols")
        if "icmptype" in self.elements and proto != "icmp":
            raise RuleError("icmptype valid only for 'icmp' protocol")

    @staticmethod
    def _parse(name, value):
        value = str(value)
        if name == "action":
            return _choice(name, value, ("accept", "drop"))
        if name == "proto":
            return _choice(name, value, ("tcp", "udp", "icmp"))
        if name == "specialtarget":
            return _choice(name, value, ("dns",))
        if name == "dsthost":
            return DstHost(value)
        if name == "dstports":
            return DstPorts(value)
        if name == "icmptype":
            if not value.isdigit() or int(value) > 255:
                raise RuleError(f"invalid ICMP type {value!r}: expected a number from 0 to 255")
            return value
        if name == "expire":
            if not value.isdigit():
                raise RuleError(f"invalid expire {value!r}: expected seconds since 1970")
            return value
        if not set(value) <= COMMENT_CHARACTERS:
            raise RuleError(f"invalid comment {value!r}: use letters, digits, spaces and :;,./-_[]")
        return value

    @classmethod
    def from_api_string(cls, line):
        """Parse one admin.vm.firewall.Set line (Rule.from_api_string in qubes/firewall.py)."""
        options, _, comment = line.partition("comment=")
        elements = {}
        if comment:
            elements["comment"] = comment
        for option in options.strip().split(" "):
            key, separator, value = option.partition("=")
            if not separator:
                raise RuleError(f"invalid rule element {option!r}: expected NAME=VALUE")
            if key in ("dst4", "dst6", "dstname"):
                key = "dsthost"
            if key in elements:
                raise RuleError(f"rule element {key!r} given twice")
            if key not in API_ORDER:
                raise RuleError(f"unknown rule element {key!r}")
            elements[key] = value
        return cls(**elements)

    def get(self, name):
        return self.elements.get(name)

    @property
    def expired(self):
        expire = self.elements.get("expire")
        return expire is not None and datetime.datetime.fromtimestamp(int(expire)) < datetime.datetime.now()

    def _render(self, order):
        words = []
        for name in order:
            value = self.elements.get(name)
            if value is None:
                continue
            if name == "dsthost":
                words.append(f"{value.type}={value}")
            else:
                words.append(f"{name}={value}")
        return " ".join(words)

    @property
    def api_rule(self):
        return self._render(API_ORDER)

    @property
    def qdb_rule(self):
        return self._render(QDB_ORDER)


def _choice(name, value, allowed):
    if value not in allowed:
        raise RuleError(f"invalid {name} {value!r}: expected one of {', '.join(allowed)}")
    return value


def client_rule(rule):
    """Return the rule as ``qvm-firewall --raw`` prints it (qubesadmin Rule.rule).

    qubesadmin leaves out a network of prefix length 0 (0.0.0.0/0 or ::/0).
    """
    words = []
    for name in CLIENT_ORDER:
        value = rule.get(name)
        if value is None:
            continue
        if name == "dsthost":
            if value.prefixlen == 0 and value.type != "dsthost":
                continue
            words.append(f"{value.type}={value}")
        else:
            words.append(f"{name}={value}")
    return " ".join(words)


def client_row(rule):
    """Return the table cells of qvm-firewall's list, without the rule number."""
    cells = []
    for name in ("action", "dsthost", "proto", "dstports", "specialtarget", "icmptype", "expire", "comment"):
        value = rule.get(name)
        if value is None:
            cells.append("-")
        elif name == "dstports":
            cells.append(value.pretty)
        elif name == "expire":
            remaining = datetime.datetime.fromtimestamp(int(value)) - datetime.datetime.now()
            cells.append(f"{remaining.total_seconds():+.0f}s")
        else:
            cells.append(str(value))
    return cells


def stored_rules(vm):
    """Return the Rules of qube *vm*, expired ones included (Firewall.load)."""
    return [Rule.from_api_string(line) for line in vm.data.get("firewall", DEFAULT_RULES)]


def store_rules(vm, rules):
    """Replace the rules of *vm* in the store (Firewall.save drops expired rules).

    NOTE: Firewall.save also sets a timer that publishes the rules again when the
    next one expires. The lab has no such timer, so an expired rule stays active
    in the netvm until the qube's rules are next published.
    """
    vm.data["firewall"] = [rule.api_rule for rule in rules if not rule.expired]


def copy_rules(source, target):
    """Give *target* the rules of *source* (Firewall.clone)."""
    if "firewall" in source.data:
        target.data["firewall"] = list(source.data["firewall"])
    else:
        target.data.pop("firewall", None)


def qdb_entries(rules, family):
    """Return {key: value} under /qubes-firewall/<address>/ for one address family.

    Firewall.qdb_entries in qubes/firewall.py: "policy", then each rule numbered by
    its position (0000, 0001, ...), leaving out expired rules and rules for the other
    address family. Numbers keep counting over the rules left out, as there.
    """
    excluded = "dst4" if family == 6 else "dst6"
    entries = {"policy": POLICY}
    for number, rule in enumerate(rules):
        if rule.expired:
            continue
        dsthost = rule.get("dsthost")
        if dsthost is not None and dsthost.type == excluded:
            continue
        entries[f"{number:04}"] = rule.qdb_rule
    return entries
