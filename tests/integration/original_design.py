"""
Reproduce in a lab the estate that the original hand-written sys-dns design leaves,
step by step, through the lab's dom0 tools, so that the formula's takeover of such a
sys-dns can be tested.

The original design is a Salt state file that, from dom0:

1. creates sys-dns unless it exists, as an AppVM of the plain template
   ``debian-12-hard-min`` with the label blue;
2. sets its netvm to sys-net, ``provides_network`` and ``autostart``;
3. runs apt-get in the running AppVM, so the packages land in its root volume, which
   Qubes resets from the template at every start: they are gone after a reboot;
4. writes /etc/dnscrypt-proxy/dnscrypt-proxy.toml (listening on 127.0.0.1:53),
   /etc/dnscrypt-proxy/forwarding-rules.txt (comments only) and /etc/resolv.conf
   (``nameserver 127.0.0.1``), all in that root volume as well;
5. writes /rw/config/nft-dnscrypt.sh, which DNATs UDP and TCP port 53 to 127.0.0.1 in
   ``ip qubes dnat-dns`` when that chain exists, else in ``ip qubes prerouting``,
   else in a nat chain ``prerouting`` of its own table ``ip dnscrypt`` (priority
   dstnat + 5);
6. writes dnscrypt-nft.service into /etc/systemd/system of the root volume, a oneshot
   that runs that script, and enables and starts it;
7. enables and starts dnscrypt-proxy;
8. sets the netvm of sys-firewall to sys-dns.

Where the lab departs from it, and why:

- On Debian 12 the original's apt-get fails, because bookworm has no dnscrypt-proxy,
  and every later step then fails its requisite. The lab reproduces the estate of a
  user who got past that step by taking dnscrypt-proxy from trixie.
- debian-12-hard-min lacks qubes-core-agent-networking, without which Qubes cannot
  attach sys-firewall to sys-dns. That user installed it the way the original
  installs everything, into the AppVM root, and started its units; so Qubes' chain
  ``ip qubes dnat-dns`` exists and receives the original's DNAT rules.
- The lab mirror has no tcpdump (the original installs it for its own test only), and
  iproute2 is in every lab image.
- An AppVM of the lab reaches no mirror, so an updates proxy is started in sys-dns's
  network namespace for the install, as the lab does for its templates.
- dnscrypt-proxy is enabled by its package but never started: a policy-rc.d and a
  runtime mask keep it stopped, because Debian's configuration and the original's
  both download resolver lists from outside addresses, which the lab must never aim
  at (the original's configuration fails to bind 127.0.0.1:53 as ``_dnscrypt-proxy``
  anyway). The source URL in the written TOML is a lab name for the same reason.
"""

QUBE = "sys-dns"
TEMPLATE = "debian-12-hard-min"

SCRIPT_PATH = "/rw/config/nft-dnscrypt.sh"
UNIT_PATH = "/etc/systemd/system/dnscrypt-nft.service"
TOML_PATH = "/etc/dnscrypt-proxy/dnscrypt-proxy.toml"
FORWARDING_PATH = "/etc/dnscrypt-proxy/forwarding-rules.txt"

# The install step as the original runs it in the AppVM, with dnscrypt-proxy taken
# from trixie through an apt source and pin in the root volume that vanish with it.
INSTALL_COMMAND = r"""
set -e
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
systemctl mask --runtime dnscrypt-proxy.service dnscrypt-proxy.socket
echo 'deb http://deb.debian.org/debian trixie main' > /etc/apt/sources.list.d/original-trixie.list
printf 'Package: *\nPin: release n=trixie\nPin-Priority: -10\n\nPackage: dnscrypt-proxy\nPin: release n=trixie\nPin-Priority: 500\n' \
    > /etc/apt/preferences.d/original-dnscrypt-proxy
export DEBIAN_FRONTEND=noninteractive
apt-get -q update
apt-get -y -q --no-install-recommends install nftables dnscrypt-proxy
"""

# The networking agent, installed and started in the AppVM root like the rest.
NETWORKING_COMMAND = r"""
set -e
export DEBIAN_FRONTEND=noninteractive
apt-get -y -q --no-install-recommends install qubes-core-agent-networking
systemctl start qubes-iptables.service qubes-antispoof.service qubes-network-uplink.service \
    qubes-network.service qubes-firewall.service
"""

TOML_TEXT = """\
server_names = ["cloudflare", "quad9-dnscrypt-ipv4"]
listen_addresses = ["127.0.0.1:53"]
max_clients = 250
require_dnssec = true
require_nolog = true
require_nofilter = true
[sources."public-resolvers"]
urls = ["https://resolvers.lab.test/public-resolvers.md"]
cache_file = "/var/cache/dnscrypt-proxy/public-resolvers.md"
refresh_delay = 72
prefix = ""
"""

FORWARDING_TEXT = """\
# Internal zones, each with the resolver that answers for it, e.g.:
# corp.example  192.0.2.53
"""

RESOLV_CONF_TEXT = "nameserver 127.0.0.1\noptions trust-ad\n"

# The DNAT script, in the lab's own words: the same choice of chain and the same rules.
NFT_SCRIPT_TEXT = """\
#!/bin/sh
# Send every DNS query arriving here to 127.0.0.1 port 53.
if nft list chain ip qubes dnat-dns >/dev/null 2>&1; then
    target="ip qubes dnat-dns"
elif nft list chain ip qubes prerouting >/dev/null 2>&1; then
    target="ip qubes prerouting"
else
    nft list table ip dnscrypt >/dev/null 2>&1 || nft add table ip dnscrypt
    nft list chain ip dnscrypt prerouting >/dev/null 2>&1 ||
        nft add chain ip dnscrypt prerouting '{ type nat hook prerouting priority dstnat + 5; }'
    target="ip dnscrypt prerouting"
fi
for protocol in udp tcp; do
    nft list chain $target | grep -q "$protocol dport 53 dnat to 127.0.0.1" ||
        nft add rule $target $protocol dport 53 dnat to 127.0.0.1
done
exit 0
"""

UNIT_TEXT = """\
[Unit]
Description=DNAT of DNS to 127.0.0.1 (original sys-dns design)
After=dnscrypt-proxy.service network-online.target
Wants=dnscrypt-proxy.service

[Service]
Type=oneshot
ExecStart=/rw/config/nft-dnscrypt.sh
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""


def _dom0(lab, tool, *args, input=None, timeout=300):
    result = lab.qvm(tool, *args, input=input, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            "original design: {} {} failed with exit code {}: {}".format(
                tool, " ".join(args), result.returncode, (result.stderr or result.stdout).strip()
            )
        )
    return result


def _in_qube(lab, command, input=None, timeout=300):
    """Run a shell command as root in sys-dns through qvm-run, as the original's qvm.run states do."""
    return _dom0(lab, "qvm-run", "--pass-io", "--user", "root", QUBE, command, input=input, timeout=timeout)


def _write(lab, path, text, mode):
    _in_qube(
        lab, 'mkdir -p "$(dirname {path})" && cat > {path} && chmod {mode} {path}'.format(path=path, mode=mode), text
    )


def install(lab, networking_agent=True):
    """
    Apply the original design to the lab's estate, step by step; leave sys-dns running.

    Without ``networking_agent`` sys-dns has no ``ip qubes`` tables, so the DNAT
    script creates its own table ``ip dnscrypt``, and sys-firewall stays on sys-net,
    because Qubes cannot attach it to a qube without the networking agent.
    """
    existing = lab.qvm("qvm-check", QUBE).returncode == 0
    if not existing:
        _dom0(lab, "qvm-create", "--class", "AppVM", "--template", TEMPLATE, "--label", "blue", QUBE)
    _dom0(lab, "qvm-prefs", QUBE, "netvm", "sys-net")
    _dom0(lab, "qvm-prefs", QUBE, "provides_network", "True")
    _dom0(lab, "qvm-prefs", QUBE, "autostart", "True")

    _dom0(lab, "qvm-start", "--skip-if-running", QUBE, timeout=600)
    if "proxy" not in (lab.store().runtime(QUBE) or {}):
        lab.runtime.start_updates_proxy(QUBE, lab.netns(QUBE))
    _in_qube(lab, INSTALL_COMMAND, timeout=900)
    if networking_agent:
        _in_qube(lab, NETWORKING_COMMAND, timeout=900)

    _write(lab, TOML_PATH, TOML_TEXT, "0644")
    _write(lab, FORWARDING_PATH, FORWARDING_TEXT, "0644")
    _write(lab, "/etc/resolv.conf", RESOLV_CONF_TEXT, "0644")
    _write(lab, SCRIPT_PATH, NFT_SCRIPT_TEXT, "0755")
    _write(lab, UNIT_PATH, UNIT_TEXT, "0644")
    _in_qube(lab, "systemctl daemon-reload && systemctl enable --now dnscrypt-nft.service")

    if networking_agent:
        _dom0(lab, "qvm-prefs", "sys-firewall", "netvm", QUBE)
