"""Qube lifecycle: network namespaces, overlay roots, veth links, nspawn boots.

Each running qube is a systemd-nspawn container in network namespace
"<prefix>-<qube>". A monitor process (`python3 -m tests.lab.runtime monitor RUN
QUBE`) boots it and reports readiness to the starter through a pipe. It then
waits for the container to end and cleans up, whatever ended it (qvm-shutdown,
qvm-kill, `poweroff` inside, a crash), as qubesd does on domain-shutdown.

Volume semantics follow the Qubes 4.2 storage model (qubes/vm/appvm.py,
templatevm.py and dispvm.py in QubesOS/qubes-core-admin v4.2.39):

- TemplateVM and StandaloneVM root: its own changes persist, and they become
  visible to the qubes based on it when it shuts down (root volume save_on_stop).
  The lab stores each run's overlay upper as a committed layer at shutdown.
- AppVM root: a fresh overlay over its template's committed layers at every
  start (snap_on_start); /rw (private volume) persists.
- DispVM: fresh root over its disposable template's template, and /rw a fresh
  copy of the disposable template's /rw at every start.
"""

import argparse
import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import layout as layout_module
from . import procs, qubesdb
from .store import LabLimitError, QubesError, Store, VMError, VMNotStartedError

log = logging.getLogger(__name__)

AGENT_EVENT = "/usr/lib/qubes-lab/event"
QUBESDB_MOUNT = "/etc/qubes-lab/qubesdb"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BACKEND_MAC = "fe:ff:ff:ff:ff:ff"
UPDATES_PROXY_ADDRESS = "127.0.0.1:8082"

# The uplink link of the qube that owns the "physical" network card (sys-net):
# its side of a veth pair to the uplink namespace, configured by the runtime the
# way NetworkManager would configure a wired link with static addresses.
UPLINK_QUBE_ADDRESS = "192.0.2.10/24"
UPLINK_QUBE_ADDRESS6 = "2001:db8::10/64"
UPLINK_GATEWAY = "192.0.2.1"
UPLINK_GATEWAY6 = "2001:db8::1"
UPLINK_BRIDGE = "br0"
UPLINK_RESOLV_CONF = "nameserver 192.0.2.1\nnameserver 2001:db8::1\n"

# overlayfs takes one page of mount options. Relative layer paths of about 40
# bytes leave room for this many layers, far more than a lab run creates.
MAX_TEMPLATE_LAYERS = 60
OVERLAY_OPTIONS = "index=off,metacopy=off,redirect_dir=off"


class CommandError(RuntimeError):
    """A host command of the runtime failed; the message contains its stderr."""


def run(argv, check=True, timeout=60, **kwargs):
    """Run a host command, capturing output; raise CommandError on failure."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    result = subprocess.run(argv, timeout=timeout, check=False, text=True, **kwargs)
    if check and result.returncode != 0:
        raise CommandError(
            f"{' '.join(map(str, argv))} failed with exit code {result.returncode}: {(result.stderr or '').strip()}"
        )
    return result


def netns_exists(name):
    return Path("/run/netns", name).exists()


def mounted_paths():
    """Return the mount points of this mount namespace (from /proc/self/mountinfo)."""
    paths = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            field = line.split()[4]
            paths.append(field.encode("utf-8").decode("unicode_escape"))
    return paths


def unmount(path):
    """Unmount *path* if mounted; fall back to a lazy unmount when busy."""
    path = str(path)
    if path not in mounted_paths():
        return
    result = run(["umount", path], check=False)
    if result.returncode != 0:
        log.warning("umount %s failed (%s), detaching lazily", path, result.stderr.strip())
        run(["umount", "-l", path])


class Runtime:
    """Lifecycle operations on the qubes of one lab run."""

    def __init__(self, layout, abort=None):
        self.layout = layout
        self.store = Store(layout)
        self.registry = procs.ProcessRegistry(layout.pids)
        # Set by Lab.down: no new monitor may start once the teardown began.
        self.abort = abort

    # Paths

    def qube_dir(self, name):
        return self.layout.qube_dir(name)

    def rw_dir(self, name):
        return self.qube_dir(name) / "rw"

    def root_dir(self, name):
        return self.qube_dir(name) / "root"

    def qubesdb_dir(self, name):
        return self.qube_dir(name) / "qubesdb"

    def console_log(self, name):
        return self.layout.logs_dir / f"{name}.console"

    def monitor_log(self, name):
        return self.layout.logs_dir / f"{name}.monitor"

    # Commands inside containers

    def init_pid(self, app, name):
        runtime = app.runtime(name) or {}
        init = runtime.get("init")
        if not init:
            raise VMNotStartedError(name)
        record = procs.ProcessRecord(**init)
        if not procs.is_alive(record):
            raise VMNotStartedError(name)
        return record.pid

    def container_argv(self, init_pid, argv, user="root", home=None, extra_env=None):
        """Return an argv that runs *argv* inside the container as *user*."""
        if home is None:
            home = "/root" if user == "root" else f"/home/{user}"
        env = [
            f"PATH={CONTAINER_PATH}",
            "LANG=C.UTF-8",
            f"HOME={home}",
            f"USER={user}",
            f"LOGNAME={user}",
            "SHELL=/bin/bash",
        ]
        env.extend(f"{key}={value}" for key, value in (extra_env or {}).items())
        prefix = ["nsenter", "-t", str(init_pid), "-a", "--", "/usr/bin/env", "-i", *env]
        if user != "root":
            prefix += ["/usr/sbin/runuser", "-u", user, "--"]
        return prefix + list(argv)

    def exec_in(self, app, name, argv, user="root", input=None, timeout=120, check=False):
        """Run *argv* in a running qube; return CompletedProcess (text mode)."""
        full = self.container_argv(self.init_pid(app, name), argv, user=user)
        result = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise CommandError(
                f"{' '.join(argv)} in {name} failed with exit code {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def agent_event(self, app, name, *args):
        """Call the lab agent's event handler inside *name*; raise on failure."""
        result = self.exec_in(app, name, [AGENT_EVENT, *args], timeout=60)
        if result.returncode != 0:
            raise VMError(
                f"{AGENT_EVENT} {' '.join(args)} failed in {name} with exit code"
                f" {result.returncode}: {result.stderr.strip()}"
            )
        log.info("event %s in %s", " ".join(args), name)

    # Reconciliation

    def runtime_alive(self, entry):
        """Return True if the monitor or the starter of a runtime entry still runs."""
        for role in ("monitor", "starter"):
            if entry.get(role) and procs.is_alive(procs.ProcessRecord(**entry[role])):
                return True
        return False

    def stale_qubes(self, app):
        return [name for name, entry in app.data["runtime"].items() if not self.runtime_alive(entry)]

    def reconcile(self):
        """Clean up qubes whose monitor and starter both ended without cleaning."""
        with self.store.transaction() as app:
            stale = self.stale_qubes(app)
        for name in stale:
            log.warning("qube %s has no live monitor: cleaning up its leftovers", name)
            self.cleanup(name)

    # Start

    def start(self, name, timeout=None):
        """Start *name* (and its netvm first) and wait until it runs.

        Raises QubesError subclasses with qubesd's messages.
        """
        self.reconcile()
        app = self.store.read()
        if app.power_state(name) == "Halting":
            self.wait_state(name, ("Halted",), app.domain(name).get("shutdown_timeout") + 30)
        with self.store.transaction() as app:
            vm = app.domain(name)
            state = app.power_state(name)
            if vm.klass == "AdminVM":
                raise VMError("dom0 cannot be started")
            if state == "Running":
                raise VMError(f"domain {name} is already running")
            self._check_startable(app, vm)
            if state == "Halted":
                starter = procs.record_for(os.getpid(), "starter", name)
                app.data["runtime"][name] = {"state": "Transient", "starter": starter.to_json()}
                owner = True
            else:
                owner = False
            netvm = vm.get("netvm") if "netvm" in vm.property_defs() else None
            wait_limit = timeout or vm.get("qrexec_timeout") + 30
        if not owner:
            self.wait_state(name, ("Running",), wait_limit)
            return
        try:
            if netvm is not None:
                self.ensure_running(netvm.name)
            self._spawn_monitor(name, wait_limit)
        except BaseException:
            with self.store.transaction() as app:
                entry = app.runtime(name)
                if entry and "monitor" not in entry:
                    app.data["runtime"].pop(name, None)
            raise

    def ensure_running(self, name):
        """Start *name* unless it runs; wait for a start already in progress."""
        app = self.store.read()
        state = app.power_state(name)
        if state == "Running":
            return
        if state == "Transient":
            self.wait_state(name, ("Running",), app.domain(name).get("qrexec_timeout") + 30)
            return
        try:
            self.start(name)
        except VMError as error:
            if "already running" not in str(error):
                raise

    def wait_state(self, name, states, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            app = self.store.read()
            state = app.power_state(name)
            if state in states:
                return state
            if state == "Halted" and "Halted" not in states:
                error = app.data["lab"].get("last_error", {}).get(name)
                raise VMError(f"qube {name} failed to start: {error or 'see its monitor log'}")
            time.sleep(0.1)
        raise VMError(f"timed out after {timeout} s waiting for {name} to be {'/'.join(states)}")

    def _check_startable(self, app, vm):
        if vm.klass in ("TemplateVM", "StandaloneVM"):
            if not vm.lab.get("image"):
                raise LabLimitError(
                    f"{vm.name} has no root filesystem in the lab: only templates"
                    " created by the lab estate or cloned from them can start"
                )
        elif vm.klass == "AppVM":
            template = vm.template_or_none()
            if template is None or not template.lab.get("image"):
                raise LabLimitError(f"{vm.name} has no template with a root filesystem")
        elif vm.klass == "DispVM":
            template = vm.get("template")
            if not template.get("template_for_dispvms"):
                raise QubesError(f"template for DispVM ({template.name}) needs to have template_for_dispvms=True")
            self._check_startable(app, template)
        netvm = vm.get("netvm") if "netvm" in vm.property_defs() else None
        if vm.klass == "TemplateVM" and netvm is not None:
            raise LabLimitError(
                f"{vm.name}: a template with a netvm is not reproduced; templates"
                " reach the mirror through the updates proxy only"
            )

    def _spawn_monitor(self, name, timeout):
        if self.abort is not None and self.abort.is_set():
            raise VMError(f"not starting {name}: the lab run is being torn down")
        self.layout.logs_dir.mkdir(parents=True, exist_ok=True)
        read_end, write_end = os.pipe()
        argv = [sys.executable, "-m", "tests.lab.runtime", "monitor", str(self.layout.run_dir), name, str(write_end)]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(layout_module.REPO_DIR)
        with open(self.monitor_log(name), "ab") as monitor_log:
            process, record = self.registry.spawn(
                argv,
                "monitor",
                name,
                stdout=monitor_log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_end,),
                env=env,
                cwd=str(layout_module.REPO_DIR),
            )
        os.close(write_end)
        with self.store.transaction() as app:
            app.data["runtime"][name]["monitor"] = record.to_json()
        message = self._read_ready(read_end, process, timeout)
        if message != "ok":
            raise VMError(f"qube {name} failed to start: {message}")

    @staticmethod
    def _read_ready(read_end, process, timeout):
        """Return the monitor's one-line report ("ok" or an error message)."""
        deadline = time.monotonic() + timeout
        data = b""
        try:
            while b"\n" not in data:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return f"no readiness report within {timeout} s"
                readable, _, _ = select.select([read_end], [], [], min(remaining, 1.0))
                if not readable:
                    continue
                chunk = os.read(read_end, 4096)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(read_end)
        text = data.decode("utf-8", "replace").strip()
        return text or f"monitor ended (exit code {process.poll()}) without a report"

    # Boot (runs in the monitor process)

    def boot(self, name):
        """Prepare and boot *name*; return the nspawn Popen. Runs in the monitor."""
        app = self.store.read()
        vm = app.domain(name)
        qube_dir = self.qube_dir(name)
        qube_dir.mkdir(parents=True, exist_ok=True)

        self.prepare_root(app, vm)
        self.prepare_rw(app, vm)
        namespace = self.layout.netns(name)
        self.create_netns(namespace)
        with self.store.transaction() as app:
            entry = app.data["runtime"][name]
            entry["netns"] = namespace
            entry["mounts"] = [str(self.root_dir(name))]
            entry["xid"] = app.data["lab"].get("next_xid", 1)
            app.data["lab"]["next_xid"] = entry["xid"] + 1
            vm = app.domain(name)
            qubesdb.write_tree(self.qubesdb_dir(name), qubesdb.qube_entries(app, vm))

        if app.data["lab"].get("uplink_qube") == name:
            self.attach_uplink(name)
        netvm = vm.get("netvm") if "netvm" in vm.property_defs() else None
        if netvm is not None:
            with self.store.transaction() as app:
                self.attach_link(app, app.domain(name), app.domain(netvm.name))
        if vm.klass == "TemplateVM":
            self.start_updates_proxy(name, namespace)

        process = self.launch_container(name, namespace)
        init = self.wait_init(process, name)
        with self.store.transaction() as app:
            app.data["runtime"][name]["init"] = init.to_json()
        self.wait_booted(name, init.pid, process, vm.get("qrexec_timeout"))

        if vm.get("provides_network"):
            self.reattach_clients(name)
        with self.store.transaction() as app:
            entry = app.data["runtime"][name]
            entry["state"] = "Running"
            entry["start_time"] = f"{time.time():.6f}"
            app.data["lab"].setdefault("last_error", {}).pop(name, None)
        return process

    def prepare_root(self, app, vm):
        name = vm.name
        root = self.root_dir(name)
        upper = self.qube_dir(name) / "upper"
        work = self.qube_dir(name) / "work"
        unmount(root)
        for path in (upper, work):
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        root.mkdir(exist_ok=True)
        lowers = self.lower_layers(app, vm)
        self.mount_overlay(lowers, upper, work, root)

    def lower_layers(self, app, vm):
        """Return the overlay lower layers of *vm*, relative to the run dir, top first."""
        if vm.klass in ("TemplateVM", "StandaloneVM"):
            source = vm
        elif vm.klass == "AppVM":
            source = vm.get("template")
        else:
            source = vm.get("template").get("template")
        layers = [f"qubes/{source.name}/layers/{layer}" for layer in reversed(source.lab.get("layers", []))]
        if len(layers) > MAX_TEMPLATE_LAYERS:
            raise LabLimitError(
                f"{source.name} has {len(layers)} committed root layers, more than the"
                f" lab's overlay limit of {MAX_TEMPLATE_LAYERS}: start a new lab run"
            )
        image = source.lab["image"]
        return layers + [f"images/{image}"]

    def mount_overlay(self, lowers, upper, work, target):
        options = (
            f"lowerdir={':'.join(lowers)},"
            f"upperdir={os.path.relpath(upper, self.layout.run_dir)},"
            f"workdir={os.path.relpath(work, self.layout.run_dir)},{OVERLAY_OPTIONS}"
        )
        run(["mount", "-t", "overlay", "overlay", "-o", options, str(target)], cwd=str(self.layout.run_dir))

    def prepare_rw(self, app, vm):
        rw = self.rw_dir(vm.name)
        if vm.klass == "DispVM":
            # NOTE: Qubes snapshots the disposable template's private volume as
            # committed at its last shutdown; the lab copies its current /rw.
            if rw.exists():
                shutil.rmtree(rw)
            source = self.rw_dir(vm.get("template").name)
            if source.exists():
                run(["cp", "-a", "--", str(source), str(rw)])
            else:
                rw.mkdir(parents=True)
        rw.mkdir(parents=True, exist_ok=True)

    def create_netns(self, namespace):
        if netns_exists(namespace):
            run(["ip", "netns", "delete", namespace])
        run(["ip", "netns", "add", namespace])
        run(["ip", "-n", namespace, "link", "set", "lo", "up"])

    def launch_container(self, name, namespace):
        console = open(self.console_log(name), "ab")
        argv = [
            "systemd-nspawn",
            "-D",
            str(self.root_dir(name)),
            "--register=no",
            "--keep-unit",
            f"--machine={namespace}",
            f"--hostname={name}",
            f"--network-namespace-path=/run/netns/{namespace}",
            "--console=read-only",
            "--resolv-conf=off",
            "--timezone=off",
            "--link-journal=no",
            "--capability=CAP_NET_ADMIN",
            f"--bind={self.rw_dir(name)}:/rw",
            f"--bind-ro={self.qubesdb_dir(name)}:{QUBESDB_MOUNT}",
            "-b",
        ]
        env = dict(os.environ)
        env["SYSTEMD_NSPAWN_API_VFS_WRITABLE"] = "network"
        process, record = self.registry.spawn(argv, "nspawn", name, stdout=console, stderr=subprocess.STDOUT, env=env)
        console.close()
        with self.store.transaction() as app:
            app.data["runtime"][name]["nspawn"] = record.to_json()
        return process

    def wait_init(self, process, name, timeout=20.0):
        """Return the record of the container's init (PID 1 inside), a child of nspawn."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise VMError(
                    f"systemd-nspawn exited with code {process.returncode}"
                    " before the container started" + self._console_tail(name)
                )
            for child in self._children(process.pid):
                if self._is_namespace_init(child):
                    return self.registry.record(child, "init", name)
            time.sleep(0.02)
        raise VMError(f"container init did not appear within {timeout} s")

    def _console_tail(self, name, lines=8):
        """Return the last lines of a qube's console log, to explain a failed boot."""
        try:
            text = self.console_log(name).read_text(errors="replace")
        except OSError:
            return ""
        tail = text.strip().splitlines()[-lines:]
        return ("; console: " + " | ".join(tail)) if tail else ""

    @staticmethod
    def _children(pid):
        children = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                children += [int(item) for item in (task / "children").read_text().split()]
        return children

    @staticmethod
    def _is_namespace_init(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("NSpid:"):
                    return line.split()[-1] == "1" and len(line.split()) > 2
        return False

    def wait_booted(self, name, init_pid, process, timeout):
        """Wait until systemd in the container reports running or degraded."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise VMError(f"container exited with code {process.returncode} during boot" + self._console_tail(name))
            remaining = max(1.0, deadline - time.monotonic())
            argv = self.container_argv(init_pid, ["systemctl", "is-system-running", "--wait"])
            try:
                result = subprocess.run(argv, capture_output=True, text=True, timeout=remaining, check=False)
                state = result.stdout.strip() or result.stderr.strip()
            except subprocess.TimeoutExpired:
                state = "starting (timed out)"
                break
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = subprocess.run(
                        self.container_argv(
                            init_pid, ["systemctl", "--failed", "--no-legend", "--plain", "--no-pager"]
                        ),
                        capture_output=True,
                        text=True,
                        check=False,
                    ).stdout
                    log.warning("%s booted degraded; failed units:\n%s", name, failed)
                return state
            time.sleep(0.1)
        raise VMError(f"{name} did not finish booting within {timeout} s (state: {state})")

    # Network links

    def vif_name(self, client):
        return f"vif{client.get('qid')}.0"

    def attach_link(self, app, client, netvm):
        """Create the client's eth0 and the netvm's vif, then run vif-online in netvm.

        Must be called inside a store transaction (*app*); the netvm must run or be
        finishing its boot (reattach_clients runs before it is marked Running).
        """
        if app.power_state(netvm.name) not in ("Running", "Transient"):
            raise VMNotStartedError(netvm.name, f"Cannot dynamically attach to stopped qube {netvm.name}")
        client_ns = self.layout.netns(client.name)
        netvm_ns = self.layout.netns(netvm.name)
        vif = self.vif_name(client)
        run(["ip", "link", "add", "eth0", "netns", client_ns, "type", "veth", "peer", "name", vif, "netns", netvm_ns])
        run(["ip", "-n", client_ns, "link", "set", "eth0", "address", client.get("mac")])
        run(["ip", "-n", netvm_ns, "link", "set", vif, "address", BACKEND_MAC])
        run(["ip", "-n", netvm_ns, "link", "set", vif, "up"])
        app.data["runtime"][client.name]["link"] = {"netvm": netvm.name, "vif": vif}
        qubesdb.write_tree(self.qubesdb_dir(netvm.name), qubesdb.qube_entries(app, netvm))
        args = ["vif-online", vif, str(client.get("ip"))]
        if client.get("ip6"):
            args.append(str(client.get("ip6")))
        self.agent_event(app, netvm.name, *args)
        # vif-route-qubes (qubes-core-agent-linux v4.2.47) adds permanent neighbour
        # entries with the client MAC it reads from xenstore. In the lab only the
        # runtime has that MAC, so it adds them after the agent's event.
        for address in (client.get("ip"), client.get("ip6")):
            if address:
                run(
                    [
                        "ip",
                        "-n",
                        netvm_ns,
                        "neigh",
                        "replace",
                        str(address),
                        "dev",
                        vif,
                        "lladdr",
                        client.get("mac"),
                        "nud",
                        "permanent",
                    ]
                )

    def detach_link(self, app, client):
        """Run vif-offline in the netvm and delete the client's veth pair."""
        entry = app.runtime(client.name) or {}
        link = entry.get("link")
        if not link:
            return
        netvm_name = link["netvm"]
        if app.is_running(netvm_name):
            args = ["vif-offline", link["vif"], str(client.get("ip"))]
            if client.get("ip6"):
                args.append(str(client.get("ip6")))
            try:
                self.agent_event(app, netvm_name, *args)
            except (QubesError, CommandError) as error:
                log.warning("vif-offline for %s failed: %s", client.name, error)
        client_ns = self.layout.netns(client.name)
        if netns_exists(client_ns):
            run(["ip", "-n", client_ns, "link", "delete", "eth0"], check=False)
        entry["link"] = None

    def attach_uplink(self, name):
        """Connect the uplink qube's eth0 to the uplink namespace's bridge."""
        namespace = self.layout.netns(name)
        uplink = self.layout.uplink_netns
        if not netns_exists(uplink):
            raise VMError(f"uplink namespace {uplink} does not exist: the lab is not up")
        peer = "nic0"
        run(["ip", "link", "add", "eth0", "netns", namespace, "type", "veth", "peer", "name", peer, "netns", uplink])
        run(["ip", "-n", uplink, "link", "set", peer, "master", UPLINK_BRIDGE])
        run(["ip", "-n", uplink, "link", "set", peer, "up"])
        run(["ip", "-n", namespace, "link", "set", "eth0", "up"])
        run(["ip", "-n", namespace, "addr", "add", UPLINK_QUBE_ADDRESS, "dev", "eth0"])
        run(["ip", "-n", namespace, "-6", "addr", "add", UPLINK_QUBE_ADDRESS6, "dev", "eth0", "nodad"])
        run(["ip", "-n", namespace, "route", "add", "default", "via", UPLINK_GATEWAY])
        run(["ip", "-n", namespace, "-6", "route", "add", "default", "via", UPLINK_GATEWAY6])
        (self.root_dir(name) / "etc").mkdir(exist_ok=True)
        resolv = self.root_dir(name) / "etc" / "resolv.conf"
        if resolv.is_symlink():
            resolv.unlink()
        resolv.write_text(UPLINK_RESOLV_CONF, encoding="utf-8")

    def renew_uplink(self, name):
        """Rewrite resolv.conf in the uplink qube and signal an uplink change.

        This is what a DHCP renewal through NetworkManager does in sys-net: the
        Qubes hook then rewrites `ip qubes dnat-dns`.
        """
        app = self.store.read()
        init_pid = self.init_pid(app, name)
        argv = self.container_argv(init_pid, ["/bin/sh", "-c", "cat > /etc/resolv.conf"])
        subprocess.run(argv, input=UPLINK_RESOLV_CONF, text=True, check=True, capture_output=True)
        self.agent_event(app, name, "uplink-changed")

    def reattach_clients(self, netvm_name):
        """Attach running clients of a netvm that just started (domain-start in net.py)."""
        with self.store.transaction() as app:
            netvm = app.domain(netvm_name)
            clients = [
                client
                for client in app.connected_vms(netvm)
                if app.is_running(client.name) and not (app.runtime(client.name) or {}).get("link")
            ]
            for client in clients:
                self.attach_link(app, client, netvm)
        for client in clients:
            self.agent_event(self.store.read(), client.name, "uplink-changed")

    def change_netvm(self, app, vm, old_netvm, new_netvm):
        """Rewire a running qube after its netvm property changed (net.py handlers).

        Called inside the store transaction that changed the property.
        """
        if not app.is_running(vm.name):
            return
        if new_netvm is not None and not app.is_running(new_netvm.name):
            raise VMNotStartedError(new_netvm.name, f"Cannot dynamically attach to stopped qube {new_netvm.name}")
        entry = app.runtime(vm.name)
        if entry.get("link"):
            self.detach_link(app, vm)
        if old_netvm is not None and app.is_running(old_netvm.name):
            qubesdb.write_tree(self.qubesdb_dir(old_netvm.name), qubesdb.qube_entries(app, old_netvm))
        if new_netvm is None:
            return
        qubesdb.write_tree(self.qubesdb_dir(vm.name), qubesdb.qube_entries(app, vm))
        self.attach_link(app, vm, new_netvm)
        self.agent_event(app, vm.name, "uplink-changed")

    def refresh_qubesdb(self, app, vm):
        """Rewrite the QubesDB of a running qube (after a feature or property change)."""
        if app.power_state(vm.name) in ("Running", "Transient"):
            qubesdb.write_tree(self.qubesdb_dir(vm.name), qubesdb.qube_entries(app, vm))

    def start_updates_proxy(self, name, namespace):
        mirror = self.store.read().data["lab"].get("mirror")
        if not mirror:
            raise VMError("the lab run has no apt mirror recorded: start it with Lab.up")
        argv = [
            "ip",
            "netns",
            "exec",
            namespace,
            sys.executable,
            str(layout_module.LAB_DIR / "updates_proxy.py"),
            "--mirror",
            str(mirror),
            "--listen",
            UPDATES_PROXY_ADDRESS,
            "--log",
            str(self.layout.logs_dir / f"{name}.updates-proxy"),
        ]
        log_file = open(self.layout.logs_dir / f"{name}.updates-proxy.out", "ab")
        _, record = self.registry.spawn(argv, "updates-proxy", name, stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        with self.store.transaction() as app:
            app.data["runtime"][name]["proxy"] = record.to_json()
        self._wait_listening(namespace, UPDATES_PROXY_ADDRESS, record)

    @staticmethod
    def _wait_listening(namespace, address, record, timeout=10.0):
        port = address.rsplit(":", 1)[1]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = run(["ip", "netns", "exec", namespace, "ss", "-Hltn", f"sport = :{port}"], check=False)
            if result.stdout.strip():
                return
            if not procs.is_alive(record):
                raise VMError(f"updates proxy exited before listening on {address}")
            time.sleep(0.05)
        raise VMError(f"updates proxy did not listen on {address} within {timeout} s")

    # Shutdown

    def shutdown(self, name, force=False, wait=False, timeout=60.0):
        """Ask a qube to shut down (SIGTERM to nspawn); with *wait*, kill on timeout."""
        self.reconcile()
        with self.store.transaction() as app:
            vm = app.domain(name)
            state = app.power_state(name)
            if state == "Halted":
                raise VMNotStartedError(name)
            if vm.klass != "AdminVM" and vm.get("provides_network") and not force:
                running = [client.name for client in app.connected_vms(vm) if app.power_state(client.name) != "Halted"]
                if running:
                    raise VMError("There are other VMs connected to this VM: " + ", ".join(running))
            entry = app.runtime(name)
            if state == "Transient":
                raise VMError(f"domain {name} is starting; try again when it runs")
            entry["state"] = "Halting"
            nspawn = entry.get("nspawn")
        if nspawn:
            procs.send_signal(procs.ProcessRecord(**nspawn), signal.SIGTERM)
        if wait:
            try:
                self.wait_state(name, ("Halted",), timeout)
            except VMError:
                log.info("killing %s after %s s shutdown timeout", name, timeout)
                self.kill(name)

    def kill(self, name, timeout=30.0):
        """Kill the container (SIGKILL to its init ends the whole PID namespace)."""
        app = self.store.read()
        app.domain(name)
        entry = app.runtime(name)
        if not entry:
            raise VMNotStartedError(name)
        with self.store.transaction() as app:
            if app.runtime(name):
                app.data["runtime"][name]["state"] = "Halting"
        for role in ("init", "nspawn"):
            if entry.get(role):
                procs.send_signal(procs.ProcessRecord(**entry[role]), signal.SIGKILL)
        if not entry.get("nspawn") and not entry.get("monitor"):
            self.cleanup(name)
            return
        try:
            self.wait_state(name, ("Halted",), timeout)
        except VMError:
            self.reconcile()

    def cleanup(self, name):
        """Release everything of a qube that is no longer running.

        Safe to call more than once and on a partly started qube.
        """
        app = self.store.read()
        entry = app.runtime(name) or {}
        for role in ("proxy", "init", "nspawn"):
            if entry.get(role):
                procs.end_processes([procs.ProcessRecord(**entry[role])], timeout=3.0, first_signal=signal.SIGKILL)
        with self.store.transaction() as app:
            if name in app:
                vm = app.domain(name)
                self.detach_link(app, vm)
                if "provides_network" in vm.property_defs() and vm.get("provides_network"):
                    for client in app.connected_vms(vm):
                        client_entry = app.runtime(client.name)
                        if client_entry and client_entry.get("link"):
                            client_entry["link"] = None
                            # Removing the vif removes the client's eth0 on Qubes. The
                            # kernel would also drop it with the netvm's namespace, but
                            # late enough that the next start finds "eth0" in use.
                            client_ns = self.layout.netns(client.name)
                            if netns_exists(client_ns):
                                run(["ip", "-n", client_ns, "link", "delete", "eth0"], check=False)
        for mount in entry.get("mounts", []):
            unmount(mount)
        unmount(self.root_dir(name))
        namespace = entry.get("netns") or self.layout.netns(name)
        if netns_exists(namespace):
            run(["ip", "netns", "delete", namespace], check=False)
        with self.store.transaction() as app:
            if name in app:
                self.after_halt(app, app.domain(name))
            app.data["runtime"].pop(name, None)
        log.info("qube %s halted and cleaned up", name)

    def after_halt(self, app, vm):
        """Apply the volume semantics of a shutdown (commit, discard, auto_cleanup)."""
        qube_dir = self.qube_dir(vm.name)
        upper = qube_dir / "upper"
        if vm.klass in ("TemplateVM", "StandaloneVM") and upper.exists():
            if any(upper.iterdir()):
                layers = vm.lab.setdefault("layers", [])
                number = str(max((int(layer) for layer in layers), default=0) + 1)
                (qube_dir / "layers").mkdir(exist_ok=True)
                os.rename(upper, qube_dir / "layers" / number)
                layers.append(number)
                log.info("committed root layer %s of %s", number, vm.name)
        for path in (upper, qube_dir / "work"):
            if path.exists():
                shutil.rmtree(path)
        if vm.klass == "DispVM":
            if self.rw_dir(vm.name).exists():
                shutil.rmtree(self.rw_dir(vm.name))
            if vm.get("auto_cleanup"):
                app.data["runtime"].pop(vm.name, None)
                del app.data["qubes"][vm.name]
                shutil.rmtree(qube_dir, ignore_errors=True)


def monitor_main(run_dir, name, ready_fd):
    """Boot a qube, report readiness on *ready_fd*, then supervise until it ends."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s monitor[{name}] %(levelname)s %(message)s")
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    runtime = Runtime(layout_module.RunLayout(run_dir))
    ready = os.fdopen(ready_fd, "w")
    process = None

    def forward(signum, _frame):
        # `down` ends monitors with SIGTERM: shut the container down cleanly first.
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    try:
        process = runtime.boot(name)
    except BaseException as error:  # report every failure, then clean up
        log.exception("boot of %s failed", name)
        message = str(error) or type(error).__name__
        with contextlib.suppress(Exception):
            with runtime.store.transaction() as app:
                app.data["lab"].setdefault("last_error", {})[name] = message
        with contextlib.suppress(Exception):
            if process is None:
                entry = runtime.store.read().runtime(name) or {}
                if entry.get("nspawn"):
                    procs.end_processes([procs.ProcessRecord(**entry["nspawn"])], 5.0)
            runtime.cleanup(name)
        with contextlib.suppress(OSError):
            ready.write(message.replace("\n", " ") + "\n")
            ready.close()
        return 1
    with contextlib.suppress(OSError):
        ready.write("ok\n")
        ready.close()
    log.info("%s is running", name)
    while True:
        try:
            process.wait()
            break
        except InterruptedError:
            continue
    log.info("%s: container ended with code %s", name, process.returncode)
    runtime.cleanup(name)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="lab runtime internals")
    sub = parser.add_subparsers(dest="command", required=True)
    monitor = sub.add_parser("monitor", help="boot and supervise one qube")
    monitor.add_argument("run_dir")
    monitor.add_argument("qube")
    monitor.add_argument("ready_fd", type=int)
    args = parser.parse_args(argv)
    if args.command == "monitor":
        return monitor_main(args.run_dir, args.qube, args.ready_fd)
    return 2


if __name__ == "__main__":
    sys.exit(main())
