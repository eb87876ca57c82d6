"""The lab as a whole: default estate, `up`, `down`, and helpers for tests.

`Lab.up()` builds a run under /run/sysdns-lab/<prefix>: the store with the
default Qubes 4.2 estate, the emulated dom0 tools in bin/, a salt-call
configuration, the uplink namespace with its resolvers, and boots the qubes a
fresh Qubes 4.2 install runs. `Lab.down()` removes every namespace, mount,
container and process of the run, also after a failed or interrupted `up`.
"""

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import layout as layout_module
from . import procs
from .layout import RunLayout
from .observer import Observer
from .runtime import Runtime, mounted_paths, netns_exists, run, unmount
from .store import Qubes, Store
from .uplink import Uplink, load_stamps

log = logging.getLogger(__name__)

DOM0_TOOLS = (
    "qvm-ls",
    "qvm-prefs",
    "qvm-features",
    "qvm-service",
    "qvm-tags",
    "qvm-create",
    "qvm-clone",
    "qvm-remove",
    "qvm-start",
    "qvm-shutdown",
    "qvm-kill",
    "qvm-check",
    "qvm-run",
    "qvm-firewall",
    "qubes-prefs",
    "qubesctl",
)

DEFAULT_RUNNING = ("sys-net", "sys-firewall", "personal", "work", "pro", "untrusted", "sys-whonix", "anon-whonix")


def _template_features(distribution, version):
    # Features a template reports through qubes.PostInstall (qubes-core-agent-linux
    # qubes-rpc/post-install.d) and qvm-template records at install.
    return {
        "os": "Linux",
        "os-distribution": distribution,
        "os-version": version,
        "qrexec": "1",
        "vmexec": "1",
        "gui": "1",
    }


# (template, lab image, features, tags), following the templates Qubes 4.2 ships
# and the Whonix template states of qubes-mgmt-salt-dom0-virtual-machines v4.2.20
# (qvm/template-whonix-gateway.sls, template-whonix-workstation.sls). The Whonix
# stand-ins are copies of debian-12-xfce carrying the Whonix features and tag.
TEMPLATES = [
    ("debian-12-xfce", "debian-12-xfce", _template_features("debian", "12"), []),
    ("debian-12-hard-min", "debian-12-hard-min", _template_features("debian", "12"), []),
    ("debian-13-minimal", "debian-13-minimal", _template_features("debian", "13"), []),
    (
        "whonix-gateway-17",
        "debian-12-xfce",
        dict(_template_features("whonix", "17"), **{"whonix-gw": "1"}),
        ["whonix-updatevm"],
    ),
    (
        "whonix-workstation-17",
        "debian-12-xfce",
        dict(_template_features("whonix", "17"), **{"whonix-ws": "1"}),
        ["whonix-updatevm"],
    ),
]


def build_estate(disposable_firewall=False):
    """Return the store of a default Qubes 4.2 install as the lab reproduces it.

    Properties follow qubes-mgmt-salt-dom0-virtual-machines v4.2.20 (qvm/sys-net.sls,
    sys-firewall.sls, default-dispvm.sls, personal.sls, work.sls, untrusted.sls,
    sys-whonix.sls, anon-whonix.sls). `pro` is a user qube like `work`.
    """
    app = Qubes.empty()
    for name, image, features, tags in TEMPLATES:
        vm = app.add_vm("TemplateVM", name, "black")
        vm.lab["image"] = image
        vm.lab["layers"] = []
        for key, value in features.items():
            vm.features.set(key, value)
        vm.tags.extend(tags)
    app.set_global("default_template", "debian-12-xfce")
    app.set_global("default_kernel", "6.6.63-1.qubes.fc37")

    sys_net = app.add_vm("AppVM", "sys-net", "red", "debian-12-xfce")
    for prop, value in (
        ("netvm", ""),
        ("virt_mode", "hvm"),
        ("autostart", "True"),
        ("provides_network", "True"),
        ("memory", "300"),
        ("maxmem", "0"),
    ):
        sys_net.set(prop, value)
    sys_net.features.set("service.clocksync", "1")
    sys_net.features.set("service.minimal-netvm", "1")
    sys_net.features.set("servicevm", "1")

    default_dvm = app.add_vm("AppVM", "default-dvm", "red", "debian-12-xfce")
    default_dvm.set("template_for_dispvms", "True")
    default_dvm.features.set("appmenus-dispvm", "1")
    app.set_global("default_dispvm", "default-dvm")

    if disposable_firewall:
        sys_firewall = app.add_vm("DispVM", "sys-firewall", "green", "default-dvm")
    else:
        sys_firewall = app.add_vm("AppVM", "sys-firewall", "green", "debian-12-xfce")
    for prop, value in (("netvm", "sys-net"), ("autostart", "True"), ("provides_network", "True"), ("memory", "500")):
        sys_firewall.set(prop, value)
    sys_firewall.features.set("servicevm", "1")
    app.set_global("default_netvm", "sys-firewall")
    app.set_global("updatevm", "sys-firewall")
    app.set_global("clockvm", "sys-net")

    for name, label in (("personal", "yellow"), ("work", "blue"), ("pro", "purple"), ("untrusted", "red")):
        app.add_vm("AppVM", name, label, "debian-12-xfce")

    sys_whonix = app.add_vm("AppVM", "sys-whonix", "black", "whonix-gateway-17")
    for prop, value in (
        ("netvm", "sys-firewall"),
        ("provides_network", "True"),
        ("autostart", "True"),
        ("memory", "500"),
    ):
        sys_whonix.set(prop, value)
    sys_whonix.features.set("servicevm", "1")
    anon = app.add_vm("AppVM", "anon-whonix", "red", "whonix-workstation-17")
    anon.set("netvm", "sys-whonix")
    anon.tags.append("anon-vm")

    app.data["lab"]["uplink_qube"] = "sys-net"
    return app


def check_host():
    """Raise RuntimeError naming what is missing to run the lab on this host."""
    if os.geteuid() != 0:
        raise RuntimeError(
            "the Qubes lab needs root (network namespaces, mounts, systemd-nspawn): run the tests as root"
        )
    missing = [
        tool
        for tool in ("systemd-nspawn", "ip", "nsenter", "tcpdump", "unbound", "dnsdist", "openssl", "dig", "mount")
        if shutil.which(tool) is None
    ]
    if missing:
        raise RuntimeError(
            f"the Qubes lab needs {', '.join(missing)}: install systemd-container, "
            "iproute2, util-linux, tcpdump, unbound, dnsdist, openssl and dnsutils"
        )


# systemd in every container holds inotify instances (about eight each, counted on a
# booted lab qube), and all containers run as root, so they share root's limit:
# Debian 12's default of 128 lets only about 16 qubes boot, and the next ones fail
# with "Failed to allocate manager object: Too many open files". Two labs up at once
# (the session lab plus a fresh one) need more.
INOTIFY_INSTANCES_SYSCTL = Path("/proc/sys/fs/inotify/max_user_instances")
INOTIFY_INSTANCES_MIN = 4096


def raise_inotify_limit():
    """Raise the host's inotify instance limit to INOTIFY_INSTANCES_MIN if it is lower."""
    current = int(INOTIFY_INSTANCES_SYSCTL.read_text())
    if current < INOTIFY_INSTANCES_MIN:
        INOTIFY_INSTANCES_SYSCTL.write_text(f"{INOTIFY_INSTANCES_MIN}\n")
        log.info(
            "raised fs.inotify.max_user_instances from %d to %d for the lab's containers",
            current,
            INOTIFY_INSTANCES_MIN,
        )


def repository_file_roots():
    """Return the lab's default base file_roots: the formula's SLS tree, then the
    repository root with _modules and _states."""
    repo = layout_module.REPO_DIR
    return [str(repo / "qubes-sysdns-formula"), str(repo)]


def new_prefix():
    return "sl" + secrets.token_hex(2)


class Lab:
    """One lab run, addressed by its prefix."""

    def __init__(self, layout):
        self.layout = layout
        self._abort = threading.Event()
        self._threads = []
        self.runtime = Runtime(layout, abort=self._abort)
        self.registry = procs.ProcessRegistry(layout.pids)
        self.uplink = Uplink(layout, self.registry)
        self.timings = {}

    # Construction

    @classmethod
    def attach(cls, prefix=None):
        """Return the Lab of an existing run (the only one when *prefix* is None)."""
        if prefix is None:
            runs = list_runs()
            if len(runs) != 1:
                raise LookupError(
                    "no lab run found under /run/sysdns-lab"
                    if not runs
                    else f"several lab runs exist ({', '.join(runs)}): pass --prefix"
                )
            prefix = runs[0]
        layout = RunLayout.from_prefix(prefix)
        if not layout.store.exists():
            raise LookupError(f"no lab run with prefix {prefix!r} ({layout.run_dir})")
        return cls(layout)

    @classmethod
    def up(cls, prefix=None, disposable_firewall=False, running=DEFAULT_RUNNING, cache=layout_module.CACHE_DIR):
        """Create and start a lab run; on any failure tear it down and re-raise."""
        check_host()
        raise_inotify_limit()
        prefix = prefix or new_prefix()
        layout = RunLayout.from_prefix(prefix)
        if layout.run_dir.exists() or netns_exists(layout.uplink_netns):
            raise RuntimeError(
                f"lab prefix {prefix!r} is in use: run `python3 -m tests.lab down --prefix {prefix}` first"
            )
        lab = cls(layout)
        try:
            lab._build(disposable_firewall, running, Path(cache))
        except BaseException:
            log.exception("lab up failed, tearing down %s", prefix)
            try:
                lab.down()
            except Exception:  # keep the original error; report the teardown one
                log.exception("teardown of %s failed too: run `python3 -m tests.lab down --prefix %s`", prefix, prefix)
            raise
        return lab

    def _build(self, disposable_firewall, running, cache):
        from . import images

        started = time.monotonic()
        for directory in (
            self.layout.run_dir,
            self.layout.bin_dir,
            self.layout.logs_dir,
            self.layout.pillar_dir,
            self.layout.images_dir,
            self.layout.run_dir / "qubes",
        ):
            directory.mkdir(parents=True, exist_ok=True)
        image_paths = images.ensure_images(cache)
        mirror = images.ensure_mirror(cache)
        self.timings["images"] = time.monotonic() - started

        app = build_estate(disposable_firewall)
        app.data["lab"]["mirror"] = str(mirror)
        app.data["lab"]["images"] = {name: str(path) for name, path in image_paths.items()}
        for name, path in image_paths.items():
            (self.layout.images_dir / name).symlink_to(path)
        for vm in app.domains():
            if vm.klass != "AdminVM":
                self.runtime.rw_dir(vm.name).mkdir(parents=True, exist_ok=True)
        Store(self.layout).create(app)
        self.write_tools()
        self.write_salt_config()

        mark = time.monotonic()
        self.uplink.up()
        self.timings["uplink"] = time.monotonic() - mark

        mark = time.monotonic()
        self.provision_templates()
        self.timings["templates"] = time.monotonic() - mark

        mark = time.monotonic()
        self.start_all(running)
        self.timings["boot"] = time.monotonic() - mark
        self.timings["total"] = time.monotonic() - started

    def write_tools(self):
        """Write bin/ wrappers that bind the repository's dom0 tools to this run."""
        for tool in DOM0_TOOLS:
            wrapper = self.layout.bin_dir / tool
            wrapper.write_text(
                "#!/bin/sh\n"
                f'QUBES_LAB_RUN="${{QUBES_LAB_RUN:-{self.layout.run_dir}}}"\n'
                "export QUBES_LAB_RUN\n"
                f'exec {layout_module.TOOLS_DIR / tool} "$@"\n',
                encoding="utf-8",
            )
            wrapper.chmod(0o755)

    def write_salt_config(self):
        """Write the salt-call --local configuration qubesctl uses for this run."""
        salt = self.layout.salt_dir
        for name in ("cache", "pki", "sock", "extmods"):
            (salt / name).mkdir(parents=True, exist_ok=True)
        config = {
            "id": "dom0",
            "file_client": "local",
            "file_roots": {"base": repository_file_roots()},
            "pillar_roots": {"base": [str(self.layout.pillar_dir)]},
            "cachedir": str(salt / "cache"),
            "pki_dir": str(salt / "pki"),
            "sock_dir": str(salt / "sock"),
            "extension_modules": str(salt / "extmods"),
            "log_file": str(salt / "minion.log"),
            "log_level_logfile": "debug",
        }
        # JSON is valid YAML, and salt reads the minion file as YAML.
        (salt / "minion").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        self.write_pillar_top([])

    def use_file_roots(self, paths):
        """Set the base file_roots that qubesctl serves the formula from.

        The default is repository_file_roots(); a test of an installed tree passes its
        root and restores the default afterwards. Each qubesctl run starts with
        saltutil.sync_all, which replaces the cached _modules and _states with those of
        the new roots.
        """
        minion = self.layout.salt_dir / "minion"
        config = json.loads(minion.read_text(encoding="utf-8"))
        config["file_roots"] = {"base": [str(path) for path in paths]}
        minion.write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")

    def write_pillar_top(self, names):
        top = {"base": {"dom0": list(names)}} if names else {"base": {}}
        (self.layout.pillar_dir / "top.sls").write_text(json.dumps(top) + "\n")

    def write_pillar(self, name, data):
        """Write pillar file <name>.sls (a dict, or YAML text) and target it at dom0."""
        text = data if isinstance(data, str) else json.dumps(data, indent=1)
        (self.layout.pillar_dir / f"{name}.sls").write_text(text + "\n", encoding="utf-8")
        names = sorted(path.stem for path in self.layout.pillar_dir.glob("*.sls") if path.name != "top.sls")
        self.write_pillar_top(names)

    def provision_templates(self):
        """Give every template a first root layer that trusts the lab CA."""
        from . import images

        ca_pem = (self.layout.uplink_dir / "ca.pem").read_text()
        with Store(self.layout).transaction() as app:
            templates = [vm for vm in app.domains() if vm.klass == "TemplateVM"]
            for vm in templates:
                qube_dir = self.layout.qube_dir(vm.name)
                layer = qube_dir / "layers" / "0"
                work = qube_dir / "work"
                root = qube_dir / "root"
                for path in (layer, work, root):
                    path.mkdir(parents=True, exist_ok=True)
                self.runtime.mount_overlay([f"images/{vm.lab['image']}"], layer, work, root)
                try:
                    images.install_lab_ca(root, ca_pem)
                finally:
                    unmount(root)
                shutil.rmtree(work)
                vm.lab["layers"] = ["0"]

    def start_all(self, names):
        """Start qubes in parallel; each start brings its netvm up first."""
        errors = {}

        def start(name):
            try:
                if self._abort.is_set():
                    return
                self.runtime.ensure_running(name)
            except BaseException as error:  # collected and re-raised below
                errors[name] = error

        threads = [threading.Thread(target=start, args=(name,), name=f"start-{name}") for name in names]
        self._threads = threads
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            details = "; ".join(f"{name}: {error}" for name, error in errors.items())
            raise RuntimeError(f"lab qubes failed to start: {details}")

    # Teardown

    def down(self, timeout=10.0):
        """Remove every process, container, mount and namespace of this run."""
        started = time.monotonic()
        self._abort.set()
        cleanup_prefix(self.layout.prefix, timeout=timeout)
        # Start threads of an interrupted `up` end once their monitors are gone;
        # a second pass removes anything they created in the meantime.
        for thread in self._threads:
            thread.join(timeout=30)
        if self._threads:
            cleanup_prefix(self.layout.prefix, timeout=timeout)
        self.timings["down"] = time.monotonic() - started

    # Use from tests

    @property
    def prefix(self):
        return self.layout.prefix

    @property
    def run_dir(self):
        return self.layout.run_dir

    @property
    def bin_dir(self):
        return self.layout.bin_dir

    @property
    def env(self):
        """Environment with the emulated dom0 tools first on PATH."""
        return self.layout.environment()

    def store(self):
        """Return a read-only snapshot of the store (store.Qubes)."""
        return Store(self.layout).read()

    def netns(self, qube):
        return self.layout.netns(qube)

    @property
    def stamps(self):
        return load_stamps(self.layout)

    def qvm(self, tool, *args, input=None, timeout=300, check=False):
        """Run an emulated dom0 tool from bin/; return CompletedProcess (text)."""
        result = subprocess.run(
            [str(self.bin_dir / tool), *map(str, args)],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def qubesctl(self, *args, timeout=1800, check=False):
        return self.qvm("qubesctl", *args, timeout=timeout, check=check)

    def exec(self, qube, command, user="root", input=None, timeout=120, check=False):
        """Run a command in a running qube directly (not through qvm-run, not logged).

        *command* is an argv list, or a string run with /bin/sh -c.
        """
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        return self.runtime.exec_in(self.store(), qube, argv, user=user, input=input, timeout=timeout, check=check)

    def dns_query(self, qube, name, rtype="A", server="10.139.1.1", port=53, tcp=False, timeout=2.0):
        """Send one DNS query from *qube*'s network stack; return the result dict.

        The query runs as host Python inside the qube's network namespace (see
        dnsquery.py), so it passes the qube's own firewall and routes.
        """
        argv = [
            "ip",
            "netns",
            "exec",
            self.netns(qube),
            sys.executable,
            "-m",
            "tests.lab.dnsquery",
            "--server",
            server,
            "--port",
            str(port),
            "--type",
            rtype,
            "--timeout",
            str(timeout),
            name,
        ]
        if tcp:
            argv.insert(-1, "--tcp")
        env = dict(os.environ, PYTHONPATH=str(layout_module.REPO_DIR))
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout + 30, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"DNS query from {qube} failed to run: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def start(self, qube):
        self.runtime.start(qube)

    def shutdown(self, qube, wait=True, force=False, timeout=60):
        self.runtime.shutdown(qube, force=force, wait=wait, timeout=timeout)

    def observe(self, qube):
        """Return an Observer of *qube*'s link to its netvm (use as context manager)."""
        return Observer(self.layout, qube, self.registry)

    def renew_uplink(self, qube=None):
        """Emulate a DHCP renewal in the uplink qube (NetworkManager event)."""
        self.runtime.renew_uplink(qube or self.store().data["lab"]["uplink_qube"])

    def uplink_changed(self, qube):
        """Run the agent's uplink-changed event in *qube* (as after a netvm change)."""
        self.runtime.agent_event(self.store(), qube, "uplink-changed")

    def calls(self, since=0):
        """Return the calls.log entries from index *since* on."""
        try:
            lines = self.layout.calls_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines[since:] if line.strip()]

    def status(self):
        app = self.store()
        qubes = {}
        for vm in app.domains():
            if vm.klass == "AdminVM":
                continue
            entry = app.runtime(vm.name) or {}
            qubes[vm.name] = {
                "class": vm.klass,
                "state": app.power_state(vm.name),
                "netvm": getattr(vm.get("netvm"), "name", None),
                "ip": str(vm.get("visible_ip") or ""),
                "netns": entry.get("netns"),
                "link": entry.get("link"),
            }
        return {
            "prefix": self.prefix,
            "run_dir": str(self.run_dir),
            "bin_dir": str(self.bin_dir),
            "uplink_netns": self.layout.uplink_netns,
            "qubes": qubes,
        }

    def memory(self):
        """Return {process role or qube: PSS in KiB} of the lab's processes."""
        usage = {}
        pids = set()
        for namespace in lab_namespaces(self.prefix):
            result = run(["ip", "netns", "pids", namespace], check=False)
            pids.update((int(pid), namespace) for pid in result.stdout.split())
        for record in self.registry.alive():
            pids.add((record.pid, f"{self.prefix}-{record.qube or record.role}"))
        seen = set()
        for pid, group in sorted(pids):
            if pid in seen:
                continue
            seen.add(pid)
            pss = read_pss(pid)
            usage[group] = usage.get(group, 0) + pss
        return usage


def read_pss(pid):
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def list_runs():
    if not layout_module.RUN_ROOT.exists():
        return []
    return sorted(path.name for path in layout_module.RUN_ROOT.iterdir() if (path / "store.json").exists())


def lab_namespaces(prefix):
    result = run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    return [name for name in names if name.startswith(prefix + "-")]


def cleanup_prefix(prefix, timeout=10.0):
    """Remove every leftover of the run *prefix*; works with or without its run dir.

    Order: processes the run recorded (pids.jsonl), then any process left in the
    run's network namespaces (the lab started them all), then mounts under the run
    dir, then the namespaces, then the run dir.
    """
    layout = RunLayout.from_prefix(prefix)
    registry = procs.ProcessRegistry(layout.pids)
    own = os.getpid()
    recorded = [record for record in registry.alive() if record.pid != own]
    # Containers first (SIGKILL to init ends the whole PID namespace), so the
    # monitors do not race the teardown with their own cleanup.
    first = [record for record in recorded if record.role in ("init", "monitor")]
    procs.end_processes(first, timeout=timeout, first_signal=signal.SIGKILL)
    rest = [record for record in recorded if procs.is_alive(record)]
    procs.end_processes(rest, timeout=timeout)

    for namespace in lab_namespaces(prefix):
        result = run(["ip", "netns", "pids", namespace], check=False)
        for pid in result.stdout.split():
            if int(pid) != own:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
        run(["ip", "netns", "pids", namespace], check=False).stdout.strip() for namespace in lab_namespaces(prefix)
    ):
        time.sleep(0.05)

    run_dir = str(layout.run_dir)
    for mount in sorted(
        (path for path in mounted_paths() if path == run_dir or path.startswith(run_dir + "/")), key=len, reverse=True
    ):
        unmount(mount)
    for namespace in lab_namespaces(prefix):
        run(["ip", "netns", "delete", namespace], check=False)
    remove_tree(layout.run_dir)


def remove_tree(path, timeout=5.0):
    """Remove *path*, retrying while a process that is ending still writes into it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def leftovers(prefix):
    """Return a description of anything of run *prefix* still present (for tests)."""
    layout = RunLayout.from_prefix(prefix)
    found = []
    namespaces = lab_namespaces(prefix)
    if namespaces:
        found.append(f"namespaces: {', '.join(namespaces)}")
    run_dir = str(layout.run_dir)
    mounts = [path for path in mounted_paths() if path == run_dir or path.startswith(run_dir + "/")]
    if mounts:
        found.append(f"mounts: {', '.join(mounts)}")
    if layout.run_dir.exists():
        found.append(f"run dir {layout.run_dir}")
    return found


def install_signal_handlers():
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt so `up` tears down on them."""

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)


def configure_logging(verbose=False):
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
