"""The uplink namespace: real resolvers the lab's sys-net reaches.

unbound 1.17 serves plain DNS on 192.0.2.1:53, so a leaked query is visible and
marked. It also serves DNS over TLS on :853 and DNS over HTTPS on :4443, and is
the backend of dnsdist 1.7, which serves DNSCrypt on 192.0.2.2:443 and DoH on
192.0.2.3:443 (IPv6 twins 2001:db8::1, ::2, ::3). Every name under lab.test answers
A 192.0.2.80, AAAA 2001:db8::80 and a TXT record naming the endpoint that
answered; everything else is NXDOMAIN. The namespace has no route anywhere.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from . import procs, stamps
from .runtime import UPLINK_BRIDGE, netns_exists, run

log = logging.getLogger(__name__)

LAB_ZONE = "lab.test"
ANSWER_A = "192.0.2.80"
ANSWER_AAAA = "2001:db8::80"
PLAIN_ADDRESS = "192.0.2.1"
PLAIN_ADDRESS6 = "2001:db8::1"
DNSCRYPT_ADDRESS = "192.0.2.2"
DNSCRYPT_ADDRESS6 = "2001:db8::2"
DOH_ADDRESS = "192.0.2.3"
DOH_ADDRESS6 = "2001:db8::3"
DOH_HOSTNAME = "doh.lab.test"
DOH_PATH = "/dns-query"
UNBOUND_DOH_PORT = 4443
DOT_PORT = 853
DNSCRYPT_PROVIDER = "2.dnscrypt-cert.lab.test"
BACKEND = "127.0.0.1@5300"
# dnsdist queries unbound from a distinct loopback source per frontend, because
# unbound maps views to backend clients by source address: its implicit
# access-control for 127.0.0.0/8 overrides interface-view for them.
BACKEND_SOURCE_DNSCRYPT = "127.0.0.3"
BACKEND_SOURCE_DOH = "127.0.0.4"

# TXT values naming the endpoint that served the query, per unbound view.
MARKERS = {
    "plain": "uplink-plain",
    "dot": "uplink-dot",
    "doh-unbound": "uplink-doh-unbound",
    "dnscrypt": "uplink-dnscrypt",
    "doh": "uplink-doh",
}
LEAK_MARKER = MARKERS["plain"]

ADDRESSES = [f"{PLAIN_ADDRESS}/24", f"{DNSCRYPT_ADDRESS}/24", f"{DOH_ADDRESS}/24"]
ADDRESSES6 = [f"{PLAIN_ADDRESS6}/64", f"{DNSCRYPT_ADDRESS6}/64", f"{DOH_ADDRESS6}/64"]


class UplinkError(RuntimeError):
    pass


class Uplink:
    """Build, start and stop the uplink namespace of one lab run."""

    def __init__(self, layout, registry):
        self.layout = layout
        self.registry = registry
        self.directory = layout.uplink_dir
        self.namespace = layout.uplink_netns

    def path(self, name):
        return self.directory / name

    # Setup

    def up(self):
        """Create the namespace, credentials and configs, start the resolvers."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.create_namespace()
        self.create_certificates()
        self.create_dnscrypt_keys()
        self.write_unbound_config()
        self.write_dnsdist_config()
        self.start_resolvers()
        entries = self.write_stamps()
        self.wait_ready()
        return entries

    def create_namespace(self):
        if netns_exists(self.namespace):
            run(["ip", "netns", "delete", self.namespace])
        run(["ip", "netns", "add", self.namespace])
        commands = [
            ["link", "set", "lo", "up"],
            ["link", "add", UPLINK_BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0"],
            ["link", "set", UPLINK_BRIDGE, "up"],
        ]
        commands += [["addr", "add", address, "dev", UPLINK_BRIDGE] for address in ADDRESSES]
        commands += [["-6", "addr", "add", address, "dev", UPLINK_BRIDGE, "nodad"] for address in ADDRESSES6]
        for command in commands:
            run(["ip", "-n", self.namespace] + command)
        # The bridge has no carrier until sys-net's link joins it; the resolvers
        # must bind their addresses before that.
        for key in ("net.ipv4.ip_nonlocal_bind", "net.ipv6.ip_nonlocal_bind"):
            run(["ip", "netns", "exec", self.namespace, "sysctl", "-qw", f"{key}=1"])

    def create_certificates(self):
        """Create a lab CA and a server certificate for DoH and DoT."""
        ca_key, ca_pem = self.path("ca.key"), self.path("ca.pem")
        server_key, server_csr = self.path("server.key"), self.path("server.csr")
        server_pem, chain = self.path("server.pem"), self.path("server-chain.pem")
        extensions = self.path("server.ext")
        run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(ca_key),
                "-out",
                str(ca_pem),
                "-days",
                "30",
                "-subj",
                "/CN=sysdns lab CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]
        )
        run(
            [
                "openssl",
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(server_key),
                "-out",
                str(server_csr),
                "-subj",
                f"/CN={DOH_HOSTNAME}",
            ]
        )
        names = [f"DNS:{DOH_HOSTNAME}", "DNS:dot.lab.test", "DNS:resolver.lab.test"]
        names += [
            f"IP:{address}"
            for address in (
                PLAIN_ADDRESS,
                DNSCRYPT_ADDRESS,
                DOH_ADDRESS,
                PLAIN_ADDRESS6,
                DNSCRYPT_ADDRESS6,
                DOH_ADDRESS6,
            )
        ]
        extensions.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\n"
            f"subjectAltName={','.join(names)}\n",
            encoding="ascii",
        )
        run(
            [
                "openssl",
                "x509",
                "-req",
                "-in",
                str(server_csr),
                "-CA",
                str(ca_pem),
                "-CAkey",
                str(ca_key),
                "-CAcreateserial",
                "-out",
                str(server_pem),
                "-days",
                "30",
                "-extfile",
                str(extensions),
            ]
        )
        chain.write_text(server_pem.read_text() + ca_pem.read_text())

    def create_dnscrypt_keys(self):
        """Generate provider keys and a resolver certificate with dnsdist itself."""
        script = self.path("dnscrypt-keys.lua")
        public, private = self.path("provider.public"), self.path("provider.private")
        certificate, key = self.path("resolver.cert"), self.path("resolver.key")
        script.write_text(
            textwrap.dedent(f"""\
            generateDNSCryptProviderKeys("{public}", "{private}")
            generateDNSCryptCertificate("{private}", "{certificate}", "{key}",
                1, os.time() - 3600, os.time() + 30 * 86400)
            setSecurityPollSuffix("")
            """),
            encoding="ascii",
        )
        run(["dnsdist", "-C", str(script), "--check-config"])
        if len(public.read_bytes()) != 32:
            raise UplinkError(f"{public} does not hold a 32-byte DNSCrypt provider key")

    def serve_dnscrypt_certificate(self, valid_from, valid_until):
        """
        Serve, on the IPv4 DNSCrypt address, a certificate valid only from
        ``valid_from`` to ``valid_until`` (Unix times) in place of dnsdist's listener.

        A window away from the current time shows dnscrypt-proxy what a qube with a
        wrong clock sees; the host clock is shared by every container and must never be
        changed. dnsdist serves only certificates valid at its own clock, so
        tests/lab/certserver.py answers the certificate query, with a certificate that
        dnsdist signs here with the run's provider key. dnsdist keeps its DoH and IPv6
        DNSCrypt listeners. restore_dnscrypt() undoes it.
        """
        script = self.path("dnscrypt-skewed.lua")
        private = self.path("provider.private")
        certificate, key = self.path("skewed.cert"), self.path("skewed.key")
        script.write_text(
            textwrap.dedent(f"""\
            generateDNSCryptCertificate("{private}", "{certificate}", "{key}",
                2, {int(valid_from)}, {int(valid_until)})
            setSecurityPollSuffix("")
            """),
            encoding="ascii",
        )
        run(["dnsdist", "-C", str(script), "--check-config"])
        bind = f'addDNSCryptBind("{DNSCRYPT_ADDRESS}:443"'
        lines = self.path("dnsdist.conf").read_text().splitlines()
        self.path("dnsdist-certserver.conf").write_text(
            "".join(line + "\n" for line in lines if not line.startswith(bind)), encoding="ascii"
        )
        self._end("dnsdist")
        self._start_dnsdist("dnsdist-certserver.conf")
        self._start(
            "certserver",
            [
                sys.executable,
                "-m",
                "tests.lab.certserver",
                DNSCRYPT_ADDRESS,
                "443",
                DNSCRYPT_PROVIDER,
                str(certificate),
            ],
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
        )
        self._wait_listening([f"{DNSCRYPT_ADDRESS}:443"], udp=True)
        self._wait_listening([f"{DOH_ADDRESS}:443", f"[{DNSCRYPT_ADDRESS6}]:443"], udp=False)

    def restore_dnscrypt(self):
        """End the certificate server and give dnsdist its DNSCrypt listener back."""
        self._end("certserver")
        self._end("dnsdist")
        self._start_dnsdist("dnsdist.conf")
        self.wait_ready()

    def _end(self, role):
        records = [record for record in self.registry.records() if record.qube == "uplink" and record.role == role]
        procs.end_processes(records, timeout=5.0)

    def _start_dnsdist(self, config):
        self._start("dnsdist", ["dnsdist", "--supervised", "--disable-syslog", "-C", str(self.path(config))])

    def _wait_listening(self, addresses, udp, timeout=15.0):
        deadline = time.monotonic() + timeout
        flags = "-Hlun" if udp else "-Hltn"
        while time.monotonic() < deadline:
            result = run(["ip", "netns", "exec", self.namespace, "ss", flags], check=False)
            if all(address in result.stdout for address in addresses):
                return
            time.sleep(0.1)
        raise UplinkError(f"uplink listeners not ready within {timeout} s: {', '.join(addresses)}")

    def write_unbound_config(self):
        interfaces = [BACKEND]
        views = {}
        for address in (PLAIN_ADDRESS, PLAIN_ADDRESS6):
            interfaces += [f"{address}@53", f"{address}@{DOT_PORT}", f"{address}@{UNBOUND_DOH_PORT}"]
            views[f"{address}@53"] = "plain"
            views[f"{address}@{DOT_PORT}"] = "dot"
            views[f"{address}@{UNBOUND_DOH_PORT}"] = "doh-unbound"
        lines = [
            "server:",
            f'  directory: "{self.directory}"',
            '  username: ""',
            '  chroot: ""',
            "  use-syslog: no",
            f'  logfile: "{self.path("unbound.log")}"',
            f'  pidfile: "{self.path("unbound.pid")}"',
            "  verbosity: 1",
            "  log-queries: yes",
            "  log-replies: yes",
            "  do-ip4: yes",
            "  do-ip6: yes",
            "  do-udp: yes",
            "  do-tcp: yes",
            "  interface-automatic: no",
            "  ip-freebind: yes",
            '  module-config: "iterator"',
            f"  tls-port: {DOT_PORT}",
            f"  https-port: {UNBOUND_DOH_PORT}",
            f'  http-endpoint: "{DOH_PATH}"',
            f'  tls-service-key: "{self.path("server.key")}"',
            f'  tls-service-pem: "{self.path("server-chain.pem")}"',
            '  local-zone: "." static',
        ]
        lines += [f"  interface: {interface}" for interface in interfaces]
        # interface-action, not access-control: any access-control line would
        # override the interface-view lines (unbound.conf(5), interface-view).
        lines += [f"  interface-action: {interface} allow" for interface in interfaces]
        lines += [f"  interface-view: {interface} {view}" for interface, view in views.items()]
        lines += [
            f"  access-control-view: {BACKEND_SOURCE_DNSCRYPT}/32 dnscrypt",
            f"  access-control-view: {BACKEND_SOURCE_DOH}/32 doh",
        ]
        for view, marker in MARKERS.items():
            lines += [
                "view:",
                f'  name: "{view}"',
                '  local-zone: "." static',
                f'  local-zone: "{LAB_ZONE}." redirect',
                f'  local-data: "{LAB_ZONE}. 60 IN A {ANSWER_A}"',
                f'  local-data: "{LAB_ZONE}. 60 IN AAAA {ANSWER_AAAA}"',
                f"  local-data: '{LAB_ZONE}. 60 IN TXT \"{marker}\"'",
            ]
        self.path("unbound.conf").write_text("\n".join(lines) + "\n", encoding="ascii")
        run(["unbound-checkconf", str(self.path("unbound.conf"))])

    def write_dnsdist_config(self):
        certificate, key = self.path("resolver.cert"), self.path("resolver.key")
        chain, server_key = self.path("server-chain.pem"), self.path("server.key")
        text = textwrap.dedent(f"""\
            setSecurityPollSuffix("")
            setLocal("127.0.0.1:5353")
            setACL({{"0.0.0.0/0", "::/0"}})
            newServer({{address="{BACKEND.replace("@", ":")}", source="{BACKEND_SOURCE_DNSCRYPT}", pool="dnscrypt", checkName="{LAB_ZONE}.", checkInterval=30}})
            newServer({{address="{BACKEND.replace("@", ":")}", source="{BACKEND_SOURCE_DOH}", pool="doh", checkName="{LAB_ZONE}.", checkInterval=30}})
            addDNSCryptBind("{DNSCRYPT_ADDRESS}:443", "{DNSCRYPT_PROVIDER}", "{certificate}", "{key}")
            addDNSCryptBind("[{DNSCRYPT_ADDRESS6}]:443", "{DNSCRYPT_PROVIDER}", "{certificate}", "{key}")
            addDOHLocal("{DOH_ADDRESS}:443", "{chain}", "{server_key}", "{DOH_PATH}")
            addDOHLocal("[{DOH_ADDRESS6}]:443", "{chain}", "{server_key}", "{DOH_PATH}")
            doh_addresses = {{["{DOH_ADDRESS}"] = true, ["{DOH_ADDRESS6}"] = true}}
            addAction(LuaRule(function(dq) return doh_addresses[dq.localaddr:toString()] == true end), PoolAction("doh"))
            addAction(AllRule(), PoolAction("dnscrypt"))
            """)
        self.path("dnsdist.conf").write_text(text, encoding="ascii")
        run(["dnsdist", "-C", str(self.path("dnsdist.conf")), "--check-config"])

    def start_resolvers(self):
        for role, argv in (
            ("unbound", ["unbound", "-d", "-c", str(self.path("unbound.conf"))]),
            ("dnsdist", ["dnsdist", "--supervised", "--disable-syslog", "-C", str(self.path("dnsdist.conf"))]),
        ):
            self._start(role, argv)

    def _start(self, role, argv, **popen_kwargs):
        output = open(self.path(f"{role}.out"), "ab")
        self.registry.spawn(
            ["ip", "netns", "exec", self.namespace] + argv,
            role,
            "uplink",
            stdout=output,
            stderr=subprocess.STDOUT,
            **popen_kwargs,
        )
        output.close()

    def write_stamps(self):
        """Write uplink/stamps.json: {name, proto, stamp, address, port} per resolver."""
        public_key = self.path("provider.public").read_bytes()
        ca_der = subprocess.run(
            ["openssl", "x509", "-in", str(self.path("ca.pem")), "-outform", "DER"], capture_output=True, check=True
        ).stdout
        ca_hash = stamps.tbs_certificate_hash(ca_der)
        entries = []
        for suffix, address in (("", DNSCRYPT_ADDRESS), ("6", DNSCRYPT_ADDRESS6)):
            host = f"[{address}]" if ":" in address else address
            entries.append(
                {
                    "name": f"lab-dnscrypt{suffix}",
                    "proto": "dnscrypt",
                    "address": address,
                    "port": 443,
                    "stamp": stamps.dnscrypt_stamp(f"{host}:443", public_key, DNSCRYPT_PROVIDER),
                }
            )
        for suffix, address in (("", DOH_ADDRESS), ("6", DOH_ADDRESS6)):
            host = f"[{address}]" if ":" in address else address
            entries.append(
                {
                    "name": f"lab-doh{suffix}",
                    "proto": "doh",
                    "address": address,
                    "port": 443,
                    "stamp": stamps.doh_stamp(f"{host}:443", DOH_HOSTNAME, DOH_PATH, [ca_hash]),
                }
            )
        entries.append(
            {
                "name": "lab-doh-unbound",
                "proto": "doh",
                "address": PLAIN_ADDRESS,
                "port": UNBOUND_DOH_PORT,
                "stamp": stamps.doh_stamp(
                    f"{PLAIN_ADDRESS}:{UNBOUND_DOH_PORT}", f"{DOH_HOSTNAME}:{UNBOUND_DOH_PORT}", DOH_PATH, [ca_hash]
                ),
            }
        )
        entries.append(
            {
                "name": "lab-plain",
                "proto": "plain",
                "address": PLAIN_ADDRESS,
                "port": 53,
                "stamp": stamps.plain_stamp(PLAIN_ADDRESS),
            }
        )
        self.path("stamps.json").write_text(json.dumps(entries, indent=1) + "\n")
        return entries

    # Readiness and queries

    def wait_ready(self, timeout=15.0):
        """Wait until every resolver endpoint responds or listens."""
        deadline = time.monotonic() + timeout
        checks = {
            "plain": lambda: self.query(PLAIN_ADDRESS, "www.lab.test", "TXT") == [LEAK_MARKER],
            "plain6": lambda: self.query(PLAIN_ADDRESS6, "www.lab.test", "TXT") == [LEAK_MARKER],
            "listeners": self._listeners_ready,
        }
        pending = dict(checks)
        while pending and time.monotonic() < deadline:
            for name, check in list(pending.items()):
                try:
                    if check():
                        del pending[name]
                except OSError:
                    pass
            if pending:
                # The newest record of each role: serve_dnscrypt_certificate and
                # restore_dnscrypt leave the records of the processes they ended.
                newest = {
                    record.role: record
                    for record in self.registry.records()
                    if record.qube == "uplink" and record.role in ("unbound", "dnsdist")
                }
                for record in newest.values():
                    if not procs.is_alive(record):
                        raise UplinkError(
                            f"{record.role} in the uplink exited; see {self.directory}/"
                            f"{record.role}.out and unbound.log"
                        )
                time.sleep(0.1)
        if pending:
            raise UplinkError(f"uplink resolvers not ready within {timeout} s: {', '.join(sorted(pending))}")

    def _listeners_ready(self):
        result = run(["ip", "netns", "exec", self.namespace, "ss", "-Hltn"], check=False)
        wanted = [
            f"{DNSCRYPT_ADDRESS}:443",
            f"{DOH_ADDRESS}:443",
            f"{PLAIN_ADDRESS}:{DOT_PORT}",
            f"{PLAIN_ADDRESS}:{UNBOUND_DOH_PORT}",
            f"[{DOH_ADDRESS6}]:443",
            f"[{DNSCRYPT_ADDRESS6}]:443",
        ]
        return all(address in result.stdout for address in wanted)

    def query(self, server, name, rtype="A", timeout=1.0):
        """Send one UDP query from inside the uplink namespace; return answer strings."""
        argv = [
            "ip",
            "netns",
            "exec",
            self.namespace,
            "dig",
            f"@{server}",
            name,
            rtype,
            "+short",
            "+tries=1",
            f"+time={max(1, int(timeout))}",
        ]
        result = run(argv, check=False, timeout=timeout + 5)
        if result.returncode != 0:
            raise OSError(f"dig @{server} {name} {rtype} failed: {result.stdout.strip()}")
        return [line.strip().strip('"') for line in result.stdout.splitlines() if line.strip()]

    def queries_logged(self):
        """Return unbound's logged queries, oldest first."""
        log_file = self.path("unbound.log")
        if not log_file.exists():
            return []
        # With log-queries, unbound logs "info: CLIENT NAME. TYPE IN" per query.
        return [
            line
            for line in log_file.read_text(errors="replace").splitlines()
            if " info: " in line and line.rstrip().endswith(" IN")
        ]

    # Teardown

    def down(self):
        records = [record for record in self.registry.records() if record.qube == "uplink"]
        procs.end_processes(records, timeout=5.0)
        if netns_exists(self.namespace):
            run(["ip", "netns", "delete", self.namespace], check=False)


def load_stamps(layout):
    return json.loads(Path(layout.uplink_dir, "stamps.json").read_text())
