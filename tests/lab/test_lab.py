"""Fidelity tests of the offline Qubes lab: it must behave as Qubes 4.2 does where
the formula depends on it. Each test names the Qubes source it reproduces.
"""

import signal
import subprocess
import sys
import time

import pytest

from tests.lab import procs, qubesdb
from tests.lab.lab import leftovers
from tests.lab.layout import REPO_DIR, RunLayout
from tests.lab.observer import ObservationError
from tests.lab.uplink import ANSWER_A, ANSWER_AAAA, LEAK_MARKER, PLAIN_ADDRESS

pytestmark = pytest.mark.lab


def qube_ip(lab, name):
    return str(lab.store().domain(name).get("ip"))


def test_plaintext_dns_leaks_before_formula(lab):
    """Without the formula, a client's lookup leaves sys-net as plaintext DNS.

    Reproduces QubesOS/qubes-core-agent-linux v4.2.47 network/qubes-setup-dnat-to-ns
    (10.139.1.x DNATed to the upstream resolvers in sys-firewall and sys-net) and
    QubesOS/qubes-core-admin v4.2.39 qubes/vm/mix/net.py (virtual DNS 10.139.1.1/2).
    """
    firewall_ip = qube_ip(lab, "sys-firewall")
    with lab.observe("sys-firewall") as firewall_link, lab.observe("sys-net") as uplink:
        result = lab.qvm("qvm-run", "-p", "personal", "getent hosts www.lab.test")
        marker = lab.dns_query("personal", "www.lab.test", "TXT")
    uplink_seen = uplink.stop()
    firewall_seen = firewall_link.stop()

    assert result.returncode == 0, result.stderr
    assert ANSWER_AAAA in result.stdout or ANSWER_A in result.stdout
    assert marker["answers"] == [LEAK_MARKER]
    assert (firewall_ip, "10.139.1.1") in {(packet.source, packet.destination) for packet in firewall_seen.dns_queries}
    assert (PLAIN_ADDRESS, 53, "udp") in uplink_seen.destinations()
    assert any(packet.query_name == "www.lab.test." for packet in uplink_seen.dns_queries)


@pytest.mark.parametrize("qube", ["sys-firewall", "sys-net"])
def test_dnat_dns_rule_lost_on_uplink_change(lab, qube):
    """A rule added to `ip qubes dnat-dns` is gone after the uplink changes.

    Reproduces qubes-core-agent-linux v4.2.47 network/qubes-setup-dnat-to-ns, which
    rebuilds the chain in one nft transaction, called from setup-ip (uplink change
    of a ProxyVM) and from network/qubes-nmhook (NetworkManager event in sys-net).
    """
    add = lab.exec(qube, "nft add rule ip qubes dnat-dns udp dport 53 counter comment lab-fidelity-marker")
    assert add.returncode == 0, add.stderr
    assert "lab-fidelity-marker" in lab.exec(qube, "nft list chain ip qubes dnat-dns").stdout

    if qube == "sys-net":
        lab.renew_uplink()
    else:
        lab.uplink_changed(qube)

    chain = lab.exec(qube, "nft list chain ip qubes dnat-dns")
    assert chain.returncode == 0, chain.stderr
    assert "lab-fidelity-marker" not in chain.stdout
    assert "dnat to" in chain.stdout


def test_downstream_dns_to_netvm_address_needs_custom_input(lab):
    """Port 53 to a netvm's own address is rejected until custom-input accepts it.

    Reproduces qubes-core-agent-linux v4.2.47 network/qubes-ipv4.nft: chain input
    jumps to custom-input, then rejects downstream (iifgroup 2) traffic with
    icmp host-prohibited.
    """
    firewall_ip = qube_ip(lab, "sys-firewall")
    responder = start_udp_responder(lab, "sys-firewall", firewall_ip)
    try:
        with lab.observe("personal") as link:
            rejected = lab.dns_query("personal", "www.lab.test", server=firewall_ip)
        seen = link.stop()
        assert rejected["status"] == "error", rejected
        assert any(packet.icmp_code == 10 for packet in seen.icmp_errors(firewall_ip))

        accept = lab.exec("sys-firewall", "nft add rule ip qubes custom-input udp dport 53 accept comment lab-fidelity")
        assert accept.returncode == 0, accept.stderr
        answered = lab.dns_query("personal", "www.lab.test", server=firewall_ip)
        assert answered["status"] == "answer", answered
        assert answered["answers"] == ["192.0.2.99"]
    finally:
        lab.exec("sys-firewall", "nft flush chain ip qubes custom-input")
        responder.terminate()
        responder.wait(timeout=5)


def start_udp_responder(lab, qube, address):
    """Answer every UDP DNS query to address:53 in *qube*'s namespace with 192.0.2.99."""
    code = (
        "import socket,struct,sys\n"
        f"s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(({address!r},53))\n"
        "print('ready',flush=True)\n"
        "while True:\n"
        "  q,a=s.recvfrom(512)\n"
        "  r=q[:2]+b'\\x81\\x80'+q[4:6]+b'\\x00\\x01\\x00\\x00\\x00\\x00'+q[12:]\n"
        "  r+=b'\\xc0\\x0c\\x00\\x01\\x00\\x01\\x00\\x00\\x00\\x3c\\x00\\x04'+bytes([192,0,2,99])\n"
        "  s.sendto(r,a)\n"
    )
    process = subprocess.Popen(
        ["ip", "netns", "exec", lab.netns(qube), sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "ready"
    return process


def test_appvm_root_is_reset_and_rw_persists(lab):
    """An AppVM loses root changes at restart and keeps /rw.

    Reproduces QubesOS/qubes-core-admin v4.2.39 qubes/vm/appvm.py volume config:
    root snap_on_start (fresh snapshot of the template), private save_on_stop.
    """
    lab.exec("untrusted", "echo changed > /etc/lab-root-marker && echo kept > /rw/lab-rw-marker", check=True)
    assert lab.qvm("qvm-shutdown", "--wait", "untrusted").returncode == 0
    assert lab.qvm("qvm-start", "untrusted").returncode == 0

    assert lab.exec("untrusted", "cat /etc/lab-root-marker").returncode != 0
    assert lab.exec("untrusted", "cat /rw/lab-rw-marker").stdout.strip() == "kept"
    lab.exec("untrusted", "rm /rw/lab-rw-marker", check=True)


def test_dispvm_loses_root_and_rw(lab):
    """A named disposable keeps nothing between starts; /rw starts as its template's.

    Reproduces qubes-core-admin v4.2.39 qubes/vm/dispvm.py: root and private volumes
    snap_on_start from the disposable template, nothing saved on stop, and
    /qubes-vm-persistence "none" in QubesDB.
    """
    lab.qvm("qvm-start", "--skip-if-running", "default-dvm", check=True)
    lab.exec("default-dvm", "echo from-dvm > /rw/lab-dvm-marker", check=True)
    lab.qvm("qvm-shutdown", "--wait", "default-dvm", check=True)
    created = lab.qvm("qvm-create", "-C", "DispVM", "-t", "default-dvm", "-l", "red", "--prop", "netvm=", "lab-disp")
    assert created.returncode == 0, created.stderr
    try:
        lab.qvm("qvm-start", "lab-disp", check=True)
        assert lab.exec("lab-disp", "cat /rw/lab-dvm-marker").stdout.strip() == "from-dvm"
        persistence = lab.exec("lab-disp", "cat /etc/qubes-lab/qubesdb/qubes-vm-persistence")
        assert persistence.stdout.strip() == "none"
        lab.exec("lab-disp", "echo x > /rw/lab-own && echo y > /etc/lab-root", check=True)
        lab.qvm("qvm-shutdown", "--wait", "lab-disp", check=True)
        lab.qvm("qvm-start", "lab-disp", check=True)

        assert lab.exec("lab-disp", "test -e /rw/lab-own").returncode != 0
        assert lab.exec("lab-disp", "test -e /etc/lab-root").returncode != 0
        assert lab.exec("lab-disp", "cat /rw/lab-dvm-marker").stdout.strip() == "from-dvm"
    finally:
        lab.qvm("qvm-shutdown", "--wait", "lab-disp")
        lab.qvm("qvm-remove", "-f", "lab-disp")


def test_template_changes_reach_appvms_after_its_shutdown(lab):
    """Template root changes persist and reach AppVMs started after its shutdown.

    Reproduces qubes-core-admin v4.2.39 qubes/vm/templatevm.py (root save_on_stop)
    and qubes/vm/appvm.py (root snap_on_start from the template's saved volume).
    """
    created = lab.qvm("qvm-create", "-t", "debian-13-minimal", "-l", "gray", "--prop", "netvm=", "lab-t13")
    assert created.returncode == 0, created.stderr
    try:
        lab.qvm("qvm-start", "debian-13-minimal", "lab-t13", check=True)
        lab.exec("debian-13-minimal", "echo v1 > /etc/lab-template-marker", check=True)
        lab.qvm("qvm-shutdown", "--wait", "lab-t13", check=True)
        lab.qvm("qvm-start", "lab-t13", check=True)
        assert lab.exec("lab-t13", "cat /etc/lab-template-marker").returncode != 0

        lab.qvm("qvm-shutdown", "--wait", "debian-13-minimal", "lab-t13", check=True)
        lab.qvm("qvm-start", "lab-t13", check=True)
        assert lab.exec("lab-t13", "cat /etc/lab-template-marker").stdout.strip() == "v1"
    finally:
        lab.qvm("qvm-shutdown", "--wait", "lab-t13", "debian-13-minimal")
        lab.qvm("qvm-remove", "-f", "lab-t13")


def test_template_reaches_only_the_updates_proxy(lab):
    """A template has no network but apt works through the proxy on 127.0.0.1:8082.

    Reproduces qubes-core-admin v4.2.39 qubes/vm/templatevm.py (netvm default None)
    and the qubes.UpdatesProxy service that qubes-core-agent-linux v4.2.47
    network/update-proxy-configs points apt at.
    """
    lab.qvm("qvm-start", "debian-12-hard-min", check=True)
    try:
        update = lab.exec("debian-12-hard-min", "apt-get update", timeout=120)
        assert update.returncode == 0, update.stdout + update.stderr
        links = lab.exec("debian-12-hard-min", "ip -o link show").stdout
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
        assert lab.exec("debian-12-hard-min", "getent hosts deb.debian.org").returncode != 0
    finally:
        lab.qvm("qvm-shutdown", "--wait", "debian-12-hard-min", check=True)


QVM_CASES = [
    # (argv, exit code, exact stdout or None, stderr fragment or None)
    (["qvm-prefs", "sys-firewall", "netvm"], 0, "sys-net\n", None),
    (["qvm-prefs", "sys-net", "netvm"], 0, "", None),
    (["qvm-prefs", "sys-net", "provides_network"], 0, "True\n", None),
    (["qvm-prefs", "personal", "label"], 0, "yellow\n", None),
    (["qvm-prefs", "personal", "nosuch"], 2, "", "no such property: 'nosuch'"),
    (["qvm-prefs", "nosuch", "netvm"], 2, "", "no such domain: 'nosuch'"),
    (["qvm-prefs", "personal", "netvm", "nosuch"], 1, "", "Can't set netvm to non-existing qube nosuch"),
    (["qvm-prefs", "personal", "netvm", "work"], 1, "", "does not provide network"),
    (["qvm-features", "sys-net", "service.clocksync"], 0, "1\n", None),
    (["qvm-features", "personal", "nosuch"], 1, "", None),
    (["qvm-service", "sys-net", "clocksync"], 0, "on\n", None),
    (["qvm-tags", "anon-whonix", "list", "anon-vm"], 0, "anon-vm\n", None),
    (["qvm-tags", "anon-whonix", "list", "nosuch"], 1, "", None),
    (["qvm-check", "--running", "personal"], 0, "", "personal: running"),
    (["qvm-check", "--running", "personal", "debian-12-xfce"], 3, "", None),
    (["qvm-check", "nosuch"], 1, "", "nosuch: non-existent!"),
    (["qvm-start", "personal"], 1, "", "domain personal is already running"),
    (["qvm-start", "--skip-if-running", "personal"], 0, "", None),
    (["qvm-shutdown", "--wait", "--timeout", "5", "sys-firewall"], 1, "", "Failed to shut down: sys-firewall"),
    (["qvm-run", "-p", "personal", "exit 7"], 7, "", None),
    (["qvm-run", "-p", "--no-autostart", "default-dvm", "true"], 1, "", None),
    (["qvm-create", "x-lab"], 2, "", "--label option is mandatory"),
    (["qvm-remove", "-f", "sys-firewall"], 1, "", "Domain is not powered off"),
    (["qubes-prefs", "default_netvm"], 0, "sys-firewall\n", None),
    (["qubes-prefs", "nosuch"], 2, "", "no such property: 'nosuch'"),
]


@pytest.mark.parametrize("argv,code,stdout,stderr", QVM_CASES, ids=[" ".join(case[0]) for case in QVM_CASES])
def test_dom0_tool_output_and_exit_code(lab, argv, code, stdout, stderr):
    """qvm-* tools print and exit as the Qubes 4.2 tools do.

    Reproduces QubesOS/qubes-core-admin-client v4.2.18 qubesadmin/tools/qvm_prefs.py,
    qvm_features.py, qvm_service.py, qvm_tags.py, qvm_check.py, qvm_start.py,
    qvm_shutdown.py, qvm_run.py, qvm_create.py, qvm_remove.py and qubes_prefs.py.
    """
    result = lab.qvm(*argv)

    assert result.returncode == code, result.stderr
    if stdout is not None:
        assert result.stdout == stdout
    if stderr is not None:
        assert stderr in result.stderr


def test_qvm_ls_raw_data_fields(lab):
    """qvm-ls --raw-data prints '|'-separated rows, '-' for None, no header.

    Reproduces qubes-core-admin-client v4.2.18 qubesadmin/tools/qvm_ls.py (any
    property is a column; an unknown or hyphenated name shows '-').
    """
    result = lab.qvm(
        "qvm-ls",
        "--raw-data",
        "--fields",
        "name,class,state,template,netvm,provides_network,ip,visible_gateway,provides-network",
        "dom0",
        "sys-net",
        "personal",
    )
    rows = [line.split("|") for line in result.stdout.splitlines()]

    assert result.returncode == 0, result.stderr
    assert rows[0] == ["dom0", "AdminVM", "Running", "-", "-", "-", "-", "-", "-"]
    assert rows[1][:6] == ["personal", "AppVM", "Running", "debian-12-xfce", "sys-firewall", "False"]
    assert rows[1][7] == qube_ip(lab, "sys-firewall")
    assert rows[2][:6] == ["sys-net", "AppVM", "Running", "debian-12-xfce", "-", "True"]
    assert rows[2][8] == "-"


def test_service_feature_value_zero_enables_service(lab):
    """Feature service.X = '0' is written to QubesDB as enabled ('1').

    Reproduces qubes-core-admin v4.2.39 qubes/ext/services.py, which writes
    str(int(bool(value))) for every service feature, live for a running qube.
    """
    try:
        lab.qvm("qvm-features", "personal", "service.lab-zero", "0", check=True)
        lab.qvm("qvm-features", "personal", "service.lab-empty", "", check=True)
        entries = qubesdb.read_tree(lab.runtime.qubesdb_dir("personal"))

        assert entries["/qubes-service/lab-zero"] == "1"
        assert entries["/qubes-service/lab-empty"] == "0"
        assert lab.exec("personal", "cat /etc/qubes-lab/qubesdb/qubes-service/lab-zero").stdout.strip() == "1"
    finally:
        lab.qvm("qvm-features", "--unset", "personal", "service.lab-zero")
        lab.qvm("qvm-features", "--unset", "personal", "service.lab-empty")


def test_netvm_change_rewires_running_qube(lab):
    """Changing netvm of a running qube moves its link live and keeps DNS working.

    Reproduces qubes-core-admin v4.2.39 qubes/vm/mix/net.py. property-pre-set:netvm
    detaches from the old netvm, and property-set:netvm rewrites QubesDB and
    attaches to the new one. Attaching to a halted netvm is rejected.
    """
    net_ip = qube_ip(lab, "sys-net")
    vif = f"vif{lab.store().domain('work').get('qid')}.0"
    try:
        lab.qvm("qvm-prefs", "work", "netvm", "sys-net", check=True)
        route = lab.exec("work", "ip route show default").stdout
        sys_net_links = subprocess.run(
            ["ip", "-n", lab.netns("sys-net"), "-o", "link"], capture_output=True, text=True
        ).stdout
        firewall_links = subprocess.run(
            ["ip", "-n", lab.netns("sys-firewall"), "-o", "link"], capture_output=True, text=True
        ).stdout

        assert f"via {net_ip}" in route
        assert vif in sys_net_links
        assert vif not in firewall_links
        assert lab.dns_query("work", "www.lab.test")["answers"] == [ANSWER_A]

        lab.qvm(
            "qvm-create",
            "-l",
            "gray",
            "--prop",
            "provides_network=True",
            "--prop",
            "netvm=",
            "lab-halted-net",
            check=True,
        )
        refused = lab.qvm("qvm-prefs", "work", "netvm", "lab-halted-net")
        assert refused.returncode == 1
        assert "Cannot dynamically attach to stopped qube lab-halted-net" in refused.stderr
        assert f"via {net_ip}" in lab.exec("work", "ip route show default").stdout
    finally:
        lab.qvm("qvm-prefs", "--default", "work", "netvm", check=True)
        lab.qvm("qvm-remove", "-f", "lab-halted-net")
    assert f"via {qube_ip(lab, 'sys-firewall')}" in lab.exec("work", "ip route show default").stdout


def test_disposable_sys_firewall_keeps_dispid_address(fresh_lab):
    """A named disposable sys-firewall has a 10.138 address fixed by its dispid, and
    a restart re-attaches its running clients.

    Reproduces qubes-core-admin v4.2.39 qubes/vm/dispvm.py (dispid is write-once,
    set at creation), qubes/vm/mix/net.py get_ip_for_vm (10.138.x.y for a DispVM)
    and its domain-start handler, which attaches running clients of a netvm.
    """
    lab = fresh_lab(disposable_firewall=True, running=("personal",))
    address = qube_ip(lab, "sys-firewall")

    assert lab.store().domain("sys-firewall").klass == "DispVM"
    assert address.startswith("10.138.")
    assert lab.dns_query("personal", "www.lab.test")["answers"] == [ANSWER_A]

    lab.exec("sys-firewall", "touch /rw/lab-disposable-marker", check=True)
    lab.qvm("qvm-shutdown", "--force", "--wait", "sys-firewall", check=True)
    lab.qvm("qvm-start", "sys-firewall", check=True)

    assert qube_ip(lab, "sys-firewall") == address
    assert lab.exec("sys-firewall", "test -e /rw/lab-disposable-marker").returncode != 0
    assert lab.dns_query("personal", "www.lab.test")["answers"] == [ANSWER_A]


def test_observer_fails_instead_of_reporting_nothing(lab):
    """An observation whose capture died raises instead of reporting zero packets.

    Lab-internal: checks the observer itself, no Qubes behaviour.
    """
    observer = lab.observe("personal").start()
    procs.end_processes([observer.record], timeout=2, first_signal=signal.SIGKILL)

    with pytest.raises(ObservationError):
        observer.stop()


def lab_down(prefix):
    return subprocess.run(
        [sys.executable, "-m", "tests.lab", "down", "--prefix", prefix],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
    )


def interrupted_up(prefixes):
    """Start `up` and interrupt it during boot; return (prefix, exit code, output, records).

    An interrupt can land after the boot has finished, and `up` then exits 0 with a
    lab that is up: that run is brought down and the next prefix is tried.
    """
    for prefix in prefixes:
        command = [sys.executable, "-m", "tests.lab", "up", "--prefix", prefix]
        process = subprocess.Popen(command, cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        records = interrupt_during_boot(process, RunLayout.from_prefix(prefix))
        output = process.communicate(timeout=300)[0]
        if process.returncode != 0:
            return prefix, process.returncode, output, records
        down = lab_down(prefix)
        assert down.returncode == 0, down.stderr
    raise AssertionError(f"every interrupt landed after the boot had finished: {', '.join(prefixes)}")


def test_up_down_cycles_leave_nothing_behind():
    """Ten up/down cycles, one interrupted during boot, leave nothing behind.

    Lab-internal: no namespace, mount, recorded process or run directory may remain.
    """
    prefixes = [f"cy{index:02d}x" for index in range(10)]
    spare = ["cy04y", "cy04z"]
    try:
        for index, prefix in enumerate(prefixes):
            if index == 4:
                prefix, returncode, output, records = interrupted_up([prefix, *spare])
                assert returncode == 130, output
            else:
                command = [sys.executable, "-m", "tests.lab", "up", "--prefix", prefix]
                result = subprocess.run(command, cwd=REPO_DIR, capture_output=True, text=True, timeout=300)
                assert result.returncode == 0, result.stdout + result.stderr
                records = procs.ProcessRegistry(RunLayout.from_prefix(prefix).pids).records()
                down = lab_down(prefix)
                assert down.returncode == 0, down.stderr

            assert leftovers(prefix) == [], f"cycle {index}"
            assert [record for record in records if procs.is_alive(record)] == []
    finally:
        # A failed cycle must not leave its run behind for the next test session.
        for prefix in prefixes + spare:
            if RunLayout.from_prefix(prefix).run_dir.exists():
                lab_down(prefix)


def interrupt_during_boot(process, layout):
    """Send SIGINT once the first container runs; return every process recorded
    until the interrupted `up` removed its run directory."""
    records = {}
    deadline = time.monotonic() + 120
    interrupted = False
    while process.poll() is None and time.monotonic() < deadline:
        for record in procs.ProcessRegistry(layout.pids).records():
            records[record.pid, record.start_time] = record
        if not interrupted and any(record.role == "init" for record in records.values()):
            process.send_signal(signal.SIGINT)
            interrupted = True
        time.sleep(0.02)
    if not interrupted:
        process.kill()
        raise AssertionError("no container started within 120 s")
    return list(records.values())
