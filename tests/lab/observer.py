"""Independent observer: capture a qube's uplink link from the netvm side.

tcpdump runs on the host inside the netvm's network namespace, on the vif that
carries the qube's traffic (or, for the qube with the uplink card, on the uplink
namespace's end of its link), so nothing inside the observed qubes can hide
from it. An observation that cannot be trusted raises ObservationError instead
of reporting zero packets: tcpdump must report captured == received with no
kernel drops, and two control packets sent through the link, one right after
the capture started and one right before it stopped, must both be in the file.
"""

import ipaddress
import itertools
import re
import signal
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import procs
from .runtime import run
from .store import Store, format_value

CONTROL_PORT = 9  # discard; the netvm's input chain rejects it, which is fine
LINKTYPE_ETHERNET = 1
STATISTICS = re.compile(
    r"(\d+) packets captured.*?(\d+) packets received by filter.*?(\d+) packets dropped by kernel", re.S
)


class ObservationError(AssertionError):
    """The capture cannot prove anything (tcpdump failed, dropped or missed controls)."""


@dataclass(frozen=True)
class Packet:
    """One captured IP packet with transport ports."""

    time: float
    family: int  # 4 or 6
    protocol: str  # "udp", "tcp" or "other"
    source: str
    destination: str
    source_port: int
    destination_port: int
    payload: bytes = b""
    icmp_type: int = -1
    icmp_code: int = -1

    @property
    def is_dns(self):
        return self.protocol in ("udp", "tcp") and 53 in (self.source_port, self.destination_port)

    @property
    def query_name(self):
        """Return the first question's name of a DNS message, or None."""
        data = self.payload
        if self.protocol == "tcp":
            data = data[2:]
        return parse_question_name(data)

    def describe(self):
        name = self.query_name if self.is_dns else None
        text = (
            f"IPv{self.family} {self.protocol} {self.source}:{self.source_port} -> "
            f"{self.destination}:{self.destination_port}"
        )
        return f"{text} ({name})" if name else text


@dataclass
class Observation:
    """The trusted result of one capture."""

    interface: str
    namespace: str
    packets: list = field(default_factory=list)
    captured: int = 0
    received: int = 0

    @property
    def dns_packets(self):
        return [packet for packet in self.packets if packet.is_dns]

    @property
    def dns_queries(self):
        """Port-53 packets sent towards port 53 (queries leaving through the link)."""
        return [packet for packet in self.dns_packets if packet.destination_port == 53]

    def destinations(self):
        return sorted({(packet.destination, packet.destination_port, packet.protocol) for packet in self.dns_queries})

    def icmp_errors(self, source=None):
        """ICMP destination-unreachable packets (type 3 / ICMPv6 type 1), optionally from *source*."""
        return [
            packet
            for packet in self.packets
            if (packet.protocol, packet.icmp_type) in (("icmp", 3), ("icmp6", 1))
            and (source is None or packet.source == source)
        ]

    def to_port(self, port, protocol=None):
        return [
            packet
            for packet in self.packets
            if packet.destination_port == port and (protocol is None or packet.protocol == protocol)
        ]

    def summary(self):
        lines = [
            f"{self.captured} packets on {self.namespace}/{self.interface}, {len(self.dns_queries)} port-53 queries"
        ]
        lines += ["  " + packet.describe() for packet in self.dns_packets[:20]]
        return "\n".join(lines)


_counter = itertools.count(1)


class Observer:
    """Capture the link of *qube* to its netvm (context manager)."""

    def __init__(self, layout, qube, registry=None):
        self.layout = layout
        self.qube = qube
        self.registry = registry or procs.ProcessRegistry(layout.pids)
        self.namespace, self.interface, self.control = self._locate()
        self.directory = layout.run_dir / "observations"
        stem = f"{qube}-{int(time.time())}-{next(_counter)}"
        self.pcap = self.directory / f"{stem}.pcap"
        self.stderr_path = self.directory / f"{stem}.stderr"
        self.markers = []
        self.process = None
        self.record = None

    def _locate(self):
        """Return (namespace, interface, control) for the observed link."""
        app = Store(self.layout).read()
        vm = app.domain(self.qube)
        entry = app.runtime(self.qube) or {}
        if app.power_state(self.qube) != "Running":
            raise ObservationError(f"cannot observe {self.qube}: it is not running")
        if app.data["lab"].get("uplink_qube") == self.qube:
            from .runtime import UPLINK_GATEWAY

            return (self.layout.uplink_netns, "nic0", (self.layout.netns(self.qube), UPLINK_GATEWAY))
        link = entry.get("link")
        if not link:
            raise ObservationError(f"cannot observe {self.qube}: it has no network link")
        gateway = format_value(vm.get("visible_gateway"))
        return (self.layout.netns(link["netvm"]), link["vif"], (self.layout.netns(self.qube), gateway))

    def start(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            "ip",
            "netns",
            "exec",
            self.namespace,
            "tcpdump",
            "--immediate-mode",
            "-n",
            "-s",
            "0",
            "-U",
            "-i",
            self.interface,
            "-w",
            str(self.pcap),
        ]
        stderr = open(self.stderr_path, "wb")
        self.process, self.record = self.registry.spawn(
            argv, "tcpdump", self.qube, stdout=subprocess.DEVNULL, stderr=stderr
        )
        stderr.close()
        deadline = time.monotonic() + 10
        while "listening on" not in self._stderr():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._abort()
                raise ObservationError(
                    f"tcpdump on {self.namespace}/{self.interface} did not start: {self._stderr().strip()}"
                )
            time.sleep(0.02)
        self._send_control()
        self._wait_for_marker(self.markers[-1])
        return self

    def stop(self):
        """Stop the capture and return a trusted Observation (or raise)."""
        if self.process is None:
            raise ObservationError("observer was not started")
        try:
            self._send_control()
            self._wait_for_marker(self.markers[-1])
        finally:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._abort()
                raise ObservationError("tcpdump did not stop on SIGINT") from None
        stderr = self._stderr()
        match = STATISTICS.search(stderr)
        if self.process.returncode != 0 or match is None:
            raise ObservationError(f"tcpdump exited with code {self.process.returncode}: {stderr.strip()}")
        captured, received, dropped = (int(value) for value in match.groups())
        if captured != received or dropped:
            raise ObservationError(
                f"tcpdump captured {captured} of {received} packets ({dropped} dropped "
                "by the kernel): the observation is incomplete"
            )
        packets = read_pcap(self.pcap)
        payloads = [packet.payload for packet in packets]
        for marker in self.markers:
            if not any(marker in payload for payload in payloads):
                raise ObservationError(
                    f"control packet {marker.decode()} is missing from {self.pcap}: "
                    "the capture did not cover the whole observation"
                )
        observed = [packet for packet in packets if not any(marker in packet.payload for marker in self.markers)]
        return Observation(self.interface, self.namespace, observed, captured, received)

    def _send_control(self):
        marker = f"sysdns-lab-control-{uuid.uuid4().hex}".encode()
        self.markers.append(marker)
        namespace, destination = self.control
        family = "AF_INET6" if ":" in destination else "AF_INET"
        code = (
            f"import socket; s = socket.socket(socket.{family}, socket.SOCK_DGRAM); "
            f"s.sendto({marker!r}, ({destination!r}, {CONTROL_PORT}))"
        )
        result = run(["ip", "netns", "exec", namespace, "python3", "-c", code], check=False)
        if result.returncode != 0:
            raise ObservationError(
                f"cannot send the control packet from {namespace} to {destination}: {result.stderr.strip()}"
            )

    def _wait_for_marker(self, marker, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pcap.exists() and marker in self.pcap.read_bytes():
                return
            time.sleep(0.02)
        raise ObservationError(f"control packet {marker.decode()} did not reach the capture file within {timeout} s")

    def _stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _abort(self):
        if self.record is not None:
            procs.end_processes([self.record], timeout=2.0, first_signal=signal.SIGKILL)

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None and self.process is not None and self.process.poll() is None:
            self._abort()
        return False


def read_pcap(path):
    """Parse a classic pcap file of Ethernet frames into Packets (stdlib only)."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        raise ObservationError(f"{path} is not a pcap file ({len(data)} bytes)")
    magic = data[:4]
    formats = {
        b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
        b"\xa1\xb2\xc3\xd4": (">", 1e-6),
        b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
        b"\xa1\xb2\x3c\x4d": (">", 1e-9),
    }
    if magic not in formats:
        raise ObservationError(f"{path} has an unknown pcap magic {magic.hex()}")
    endian, fraction = formats[magic]
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    if linktype != LINKTYPE_ETHERNET:
        raise ObservationError(f"{path} has link type {linktype}, expected Ethernet")
    packets = []
    offset = 24
    while offset + 16 <= len(data):
        seconds, fractional, included, _ = struct.unpack(endian + "IIII", data[offset : offset + 16])
        frame = data[offset + 16 : offset + 16 + included]
        offset += 16 + included
        packet = parse_ethernet(frame, seconds + fractional * fraction)
        if packet is not None:
            packets.append(packet)
    return packets


def parse_ethernet(frame, timestamp):
    if len(frame) < 14:
        return None
    ethertype = struct.unpack("!H", frame[12:14])[0]
    payload = frame[14:]
    while ethertype == 0x8100 and len(payload) >= 4:
        ethertype = struct.unpack("!H", payload[2:4])[0]
        payload = payload[4:]
    if ethertype == 0x0800:
        return parse_ipv4(payload, timestamp)
    if ethertype == 0x86DD:
        return parse_ipv6(payload, timestamp)
    return None


def parse_ipv4(data, timestamp):
    if len(data) < 20:
        return None
    header_length = (data[0] & 0x0F) * 4
    protocol = data[9]
    source = ".".join(str(byte) for byte in data[12:16])
    destination = ".".join(str(byte) for byte in data[16:20])
    fragment_offset = struct.unpack("!H", data[6:8])[0] & 0x1FFF
    transport = data[header_length:] if fragment_offset == 0 else b""
    return parse_transport(4, protocol, source, destination, transport, timestamp)


def parse_ipv6(data, timestamp):
    if len(data) < 40:
        return None
    next_header = data[6]
    source = str(ipaddress.IPv6Address(data[8:24]))
    destination = str(ipaddress.IPv6Address(data[24:40]))
    payload = data[40:]
    # Walk hop-by-hop (0), routing (43), fragment (44) and destination (60) headers.
    while next_header in (0, 43, 44, 60) and len(payload) >= 8:
        if next_header == 44:
            if struct.unpack("!H", payload[2:4])[0] & 0xFFF8:
                return parse_transport(6, payload[0], source, destination, b"", timestamp)
            length = 8
        else:
            length = (payload[1] + 1) * 8
        next_header, payload = payload[0], payload[length:]
    return parse_transport(6, next_header, source, destination, payload, timestamp)


def parse_transport(family, protocol, source, destination, data, timestamp):
    if protocol == 17 and len(data) >= 8:
        source_port, destination_port = struct.unpack("!HH", data[:4])
        return Packet(timestamp, family, "udp", source, destination, source_port, destination_port, data[8:])
    if protocol == 6 and len(data) >= 20:
        source_port, destination_port = struct.unpack("!HH", data[:4])
        offset = (data[12] >> 4) * 4
        return Packet(timestamp, family, "tcp", source, destination, source_port, destination_port, data[offset:])
    if protocol in (1, 58) and len(data) >= 4:
        # The payload of an ICMP error is the start of the packet it refers to.
        return Packet(
            timestamp,
            family,
            "icmp" if protocol == 1 else "icmp6",
            source,
            destination,
            0,
            0,
            data[8:],
            icmp_type=data[0],
            icmp_code=data[1],
        )
    return Packet(timestamp, family, "other", source, destination, 0, 0, data)


def parse_question_name(message):
    """Return the QNAME of a DNS message's first question, or None if malformed."""
    if len(message) < 12 or struct.unpack("!H", message[4:6])[0] == 0:
        return None
    labels = []
    position = 12
    while position < len(message):
        length = message[position]
        if length == 0:
            return ".".join(labels) + "."
        if length & 0xC0 or position + 1 + length > len(message):
            return None
        labels.append(message[position + 1 : position + 1 + length].decode("ascii", "replace"))
        position += 1 + length
    return None
