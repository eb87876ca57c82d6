"""Tests of the lab images, the apt mirror, the updates proxy and the lab agent.

Tests marked ``lab`` need root. They build the images and the mirror once (cached in
/var/cache/sysdns-lab, see tests/lab/images.py). Agent scripts run in throwaway network
namespaces, chrooted into a private overlay of an image, and whole images boot with
systemd-nspawn. Every namespace, mount and container is removed when a test ends,
also when it fails.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.lab import images, updates_proxy

AGENT = Path(images.__file__).resolve().parent / "agent"
QUBESDB_CMD = AGENT / "qubes-core-agent/usr/bin/qubesdb-cmd"
RUN_AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not RUN_AS_ROOT, reason="needs root (namespaces, chroot, systemd-nspawn)")

TEST_CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBszCCAVmgAwIBAgIUDHfLKQ1ZxTVk0hb1lWQlPbTNXjgwCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAwwMc3lzZG5zIGxhYiBDQTAeFw0yNTAxMDEwMDAwMDBaFw0zNTAx
MDEwMDAwMDBaMBcxFTATBgNVBAMMDHN5c2RucyBsYWIgQ0EwWTATBgcqhkjOPQIB
-----END CERTIFICATE-----
"""


# --------------------------------------------------------------------------------------
# Helpers


def run(argv: list[str], check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{shlex.join(argv)} exited with {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def write_qubesdb(directory: Path, entries: dict[str, str]) -> None:
    """Write QubesDB entries as the lab's file tree (key "/a/b" -> file "a/b")."""
    for key, value in entries.items():
        path = directory / key.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)


@contextlib.contextmanager
def netns(tag: str) -> Iterator[str]:
    """Create a network namespace with lo up; delete it (and its links) afterwards."""
    name = f"sdimg-{uuid.uuid4().hex[:6]}-{tag}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        run(["ip", "netns", "delete", name], check=False)


class ImageChroot:
    """An image root seen through a private overlay, entered with chroot in a netns.

    Each ``sh`` call mounts the overlay (upper layer kept in a temporary folder), /proc,
    /sys and the QubesDB tree in a new mount namespace that dies with the command, so
    files persist between calls but no mount outlives one.
    """

    def __init__(self, image: Path, namespace: str, scratch: Path):
        self.image = image
        self.namespace = namespace
        self.upper = scratch / "upper"
        self.work = scratch / "work"
        self.merged = scratch / "merged"
        self.qubesdb = scratch / "qubesdb"
        self.rw = scratch / "rw"
        for folder in (self.upper, self.work, self.merged, self.qubesdb, self.rw):
            folder.mkdir(parents=True)

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        merged = str(self.merged)
        mounts = "\n".join(
            [
                "set -e",
                f"mount -t overlay overlay -o lowerdir={self.image},upperdir={self.upper},workdir={self.work} {merged}",
                f"mount -t proc proc {merged}/proc",
                f"mount -t sysfs sysfs {merged}/sys",
                f"mkdir -p {merged}/tmp/qubesdb",
                f"mount --bind {self.qubesdb} {merged}/tmp/qubesdb",
                f"mount --bind {self.rw} {merged}/rw",
                "exec chroot "
                + shlex.join(
                    [
                        merged,
                        "/usr/bin/env",
                        "-i",
                        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                        "QUBESDB_DIR=/tmp/qubesdb",
                        "LC_ALL=C",
                        "/bin/bash",
                        "-c",
                        script,
                    ]
                ),
            ]
        )
        return run(
            [
                "ip",
                "netns",
                "exec",
                self.namespace,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "/bin/sh",
                "-c",
                mounts,
            ],
            check=check,
            timeout=timeout,
        )

    def read(self, path: str) -> str:
        return (self.upper / path.lstrip("/")).read_text()


class BootedQube:
    """An image booted with systemd-nspawn in its own netns, as the lab runtime does."""

    def __init__(self, image: Path, namespace: str, scratch: Path, qubesdb: dict[str, str]):
        self.namespace = namespace
        self.qubesdb = scratch / "qubesdb"
        self.rw = scratch / "rw"
        self.console = scratch / "console.log"
        # An existing rw folder is kept: booting the same scratch folder again is the
        # next boot of the same qube.
        self.qubesdb.mkdir(exist_ok=True)
        self.rw.mkdir(exist_ok=True)
        write_qubesdb(self.qubesdb, qubesdb)
        argv = [
            "systemd-nspawn",
            "-D",
            str(image),
            "--volatile=overlay",
            "--register=no",
            "--keep-unit",
            f"--machine={namespace}",
            f"--network-namespace-path=/run/netns/{namespace}",
            "--console=read-only",
            "--resolv-conf=off",
            "--timezone=off",
            "--link-journal=no",
            "--capability=CAP_NET_ADMIN",
            "-b",
            f"--bind-ro={self.qubesdb}:/etc/qubes-lab/qubesdb",
            f"--bind={self.rw}:/rw",
        ]
        with open(self.console, "wb") as console:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"},
                start_new_session=True,
            )
        self.init_pid = self._wait_for_init()

    def _wait_for_init(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"systemd-nspawn exited with {self.process.returncode}:\n{self.console.read_text()}"
                )
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
            time.sleep(0.05)
        raise AssertionError(f"no systemd inside the container after {timeout} s:\n{self.console.read_text()}")

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return run(["nsenter", "-t", str(self.init_pid), "-a", "/bin/bash", "-c", script], check=check, timeout=timeout)

    def wait_until_running(self, timeout: float = 120) -> str:
        """Wait for the boot to finish; return systemd's state ("running", "degraded"...)."""
        deadline = time.monotonic() + timeout
        while True:
            # Until PID 1 has created its private socket, systemctl cannot connect.
            result = self.sh(f"timeout {timeout} systemctl is-system-running --wait", check=False, timeout=timeout + 10)
            if "Failed to connect" not in result.stderr:
                return result.stdout.strip()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"systemd in the container accepted no connection within {timeout} s: {result.stderr.strip()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@contextlib.contextmanager
def booted(image: Path, tag: str, tmp_path: Path, qubesdb: dict[str, str]) -> Iterator[BootedQube]:
    with netns(tag) as namespace:
        scratch = tmp_path / tag
        scratch.mkdir(exist_ok=True)
        qube = BootedQube(image, namespace, scratch, qubesdb)
        try:
            yield qube
        finally:
            qube.stop()


@contextlib.contextmanager
def running_proxy(namespace: str, mirror: Path, log_path: Path) -> Iterator[subprocess.Popen]:
    """Start updates_proxy.py on 127.0.0.1:8082 inside ``namespace``; stop it afterwards."""
    process = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            namespace,
            "python3",
            updates_proxy.__file__,
            "--mirror",
            str(mirror),
            "--listen",
            "127.0.0.1:8082",
            "--log",
            str(log_path),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while run(["ip", "netns", "exec", namespace, "ss", "-Htln", "sport = :8082"], check=False).stdout.strip() == "":
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"updates proxy did not start: {process.stderr.read().decode()}")
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def qubesdb_cmd(qubesdb: Path, *argv: str, name: str = "qubesdb-read") -> subprocess.CompletedProcess:
    """Run the agent's qubesdb-cmd from the source tree through a link named ``name``.

    The tool picks its command from the name it was called by, as the real one does.
    """
    link = qubesdb.parent / "bin" / name
    link.parent.mkdir(exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(QUBESDB_CMD)
    return run([str(link), *argv], check=False, env={**os.environ, "QUBESDB_DIR": str(qubesdb)})


CLIENT_QUBESDB = {
    "/name": "client",
    "/qubes-vm-type": "AppVM",
    "/qubes-vm-persistence": "rw-only",
    "/qubes-mac": "00:16:3e:5e:6c:00",
    "/qubes-ip": "10.137.0.7",
    "/qubes-netmask": "255.255.255.255",
    "/qubes-gateway": "10.137.0.5",
    "/qubes-primary-dns": "10.139.1.1",
    "/qubes-secondary-dns": "10.139.1.2",
}

NETVM_QUBESDB = {
    "/name": "net",
    "/qubes-vm-type": "NetVM",
    "/qubes-vm-persistence": "rw-only",
    "/qubes-netvm-network": "10.137.0.5",
    "/qubes-netvm-gateway": "10.137.0.5",
    "/qubes-netvm-netmask": "255.255.255.255",
    "/qubes-netvm-primary-dns": "10.139.1.1",
    "/qubes-netvm-secondary-dns": "10.139.1.2",
    "/connected-ips": "10.137.0.7",
    "/connected-ips6": "",
    "/qubes-firewall/10.137.0.7/policy": "drop",
    "/qubes-firewall/10.137.0.7/0000": "action=accept",
}


@pytest.fixture(scope="session")
def lab_images() -> dict[str, Path]:
    if not RUN_AS_ROOT:
        pytest.skip("building the lab images needs root")
    return images.ensure_images()


@pytest.fixture(scope="session")
def lab_mirror(lab_images: dict[str, Path]) -> Path:
    return images.ensure_mirror()


@pytest.fixture
def xfce_chroot(lab_images: dict[str, Path], tmp_path: Path) -> Iterator[ImageChroot]:
    with netns("chroot") as namespace:
        yield ImageChroot(lab_images["debian-12-xfce"], namespace, tmp_path)


# --------------------------------------------------------------------------------------
# Build inputs, packages and helpers that need no images


def test_build_key_tracks_agent_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent_copy = tmp_path / "agent"
    shutil.copytree(AGENT, agent_copy, symlinks=True)
    monkeypatch.setattr(images, "AGENT_DIR", agent_copy)
    original = images.build_key()

    assert images.build_key() == original
    script = agent_copy / "qubes-core-agent-networking/usr/lib/qubes/qubes-setup-dnat-to-ns"
    script.write_text(script.read_text() + "\n# changed\n")
    changed_content = images.build_key()
    assert changed_content != original
    script.chmod(0o644)
    assert images.build_key() != changed_content


def test_parse_simulated_installs_files_suites() -> None:
    output = "\n".join(
        [
            "NOTE: This is only a simulation!",
            "Inst netbase (6.4 Debian:12.12/oldstable [all])",
            "Inst libc6 [2.36-9] (2.36-9+deb12u4 Debian:12.12/oldstable [amd64])",
            "Inst dnscrypt-proxy (2.1.8+ds1-1+b4 Debian:13.2/stable [amd64])",
            "Inst tzdata (2025b-0+deb12u1 Debian:12.12/oldstable, Debian:13.2/stable [all])",
            "Inst qubes-core-agent-networking (4.2.47+lab1 localhost [all])",
            "Conf netbase (6.4 Debian:12.12/oldstable [all])",
        ]
    )
    packages = images._parse_simulated_installs(output, "bookworm")

    assert [(p.name, p.version, p.suite) for p in packages] == [
        ("netbase", "6.4", "bookworm"),
        ("libc6", "2.36-9+deb12u4", "bookworm"),
        ("dnscrypt-proxy", "2.1.8+ds1-1+b4", "trixie"),
        ("tzdata", "2025b-0+deb12u1", "bookworm"),
        ("qubes-core-agent-networking", "4.2.47+lab1", "bookworm"),
    ]


def test_parse_simulated_installs_rejects_unknown_origin() -> None:
    with pytest.raises(images.BuildError, match="which suite"):
        images._parse_simulated_installs("Inst foo (1.0 Ubuntu:24.04/noble [amd64])", "bookworm")


def test_agent_packages_build(tmp_path: Path) -> None:
    debs = images.build_agent_packages(tmp_path)

    assert set(debs) == set(images.AGENT_PACKAGES)
    core_fields = run(["dpkg-deb", "-f", str(debs["qubes-core-agent"]), "Package", "Version", "Architecture"]).stdout
    assert "Package: qubes-core-agent\n" in core_fields
    assert "Architecture: all" in core_fields
    networking_depends = run(["dpkg-deb", "-f", str(debs["qubes-core-agent-networking"]), "Depends"]).stdout
    assert "nftables" in networking_depends
    assert "qubes-core-agent (=" in networking_depends

    listing = run(["dpkg-deb", "-c", str(debs["qubes-core-agent"])]).stdout
    assert "./usr/bin/qubesdb-read -> qubesdb-cmd" in listing
    assert "-rwxr-xr-x root/root" in next(
        line for line in listing.splitlines() if line.endswith("/usr/lib/qubes-lab/event")
    )
    networking_listing = run(["dpkg-deb", "-c", str(debs["qubes-core-agent-networking"])]).stdout
    for path in (
        "/usr/lib/qubes/qubes-setup-dnat-to-ns",
        "/usr/lib/qubes/setup-ip",
        "/usr/lib/qubes-lab/vif-route-qubes",
        "/usr/lib/qubes-lab/qubes-firewall",
        "/usr/lib/systemd/system/qubes-iptables.service",
        "/etc/qubes/qubes-ipv4.nft",
    ):
        assert "." + path in networking_listing, path


def test_agent_packages_are_reproducible(tmp_path: Path) -> None:
    first = images.build_agent_packages(tmp_path / "first")
    second = images.build_agent_packages(tmp_path / "second")

    for name in images.AGENT_PACKAGES:
        assert first[name].read_bytes() == second[name].read_bytes(), name


def test_install_lab_ca_writes_all_places(tmp_path: Path) -> None:
    (tmp_path / "etc/ssl/certs").mkdir(parents=True)
    (tmp_path / "etc/ssl/certs/ca-certificates.crt").write_text("EXISTING\n")

    images.install_lab_ca(tmp_path, TEST_CA_PEM)

    assert (tmp_path / "usr/local/share/ca-certificates/lab-ca.crt").read_text() == TEST_CA_PEM
    assert (tmp_path / "usr/share/ca-certificates/sysdns-lab/lab-ca.crt").read_text() == TEST_CA_PEM
    assert (tmp_path / "etc/ca-certificates.conf").read_text() == "sysdns-lab/lab-ca.crt\n"
    assert (tmp_path / "etc/ssl/certs/ca-certificates.crt").read_text() == "EXISTING\n" + TEST_CA_PEM


def test_install_lab_ca_twice_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    images.install_lab_ca(tmp_path, TEST_CA_PEM)
    bundle = (tmp_path / "etc/ssl/certs/ca-certificates.crt").read_text()

    images.install_lab_ca(tmp_path, "\n" + TEST_CA_PEM + "\n")

    assert (tmp_path / "etc/ssl/certs/ca-certificates.crt").read_text() == bundle
    assert (tmp_path / "etc/ca-certificates.conf").read_text().count("sysdns-lab/lab-ca.crt") == 1


@pytest.mark.parametrize("bad", ["", "not a certificate", TEST_CA_PEM + TEST_CA_PEM])
def test_install_lab_ca_rejects_non_pem(tmp_path: Path, bad: str) -> None:
    (tmp_path / "etc").mkdir()
    with pytest.raises(ValueError, match="exactly one PEM certificate"):
        images.install_lab_ca(tmp_path, bad)


def test_install_lab_ca_refuses_symlink_out_of_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "etc/ssl").mkdir(parents=True)
    outside.mkdir()
    (root / "etc/ssl/certs").symlink_to(outside)

    with pytest.raises(ValueError, match="symlink"):
        images.install_lab_ca(root, TEST_CA_PEM)
    assert list(outside.iterdir()) == []


@needs_root
def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_debootstrap(cache: Path, suite: str) -> Path:
        raise images.BuildError(f"debootstrap {suite} failed (simulated)")

    monkeypatch.setattr(images, "_ensure_base", fail_debootstrap)
    monkeypatch.setattr(images, "_update_host_lists", lambda apt_work, agent_repo: apt_work / "lists")
    cache = tmp_path / "cache"

    with pytest.raises(images.BuildError, match="simulated"):
        images.ensure_images(cache)

    assert [path.name for path in (cache / "builds").iterdir()] == ["failed-build.log"]
    assert "dpkg-deb" in (cache / "builds/failed-build.log").read_text()
    assert not (cache / "images").exists()
    assert not (cache / "mirror").exists()
    assert images.build_info(cache) == {}


# --------------------------------------------------------------------------------------
# qubesdb-read / qubesdb-multiread / qubesdb-list


@pytest.fixture
def qubesdb_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "qubesdb"
    write_qubesdb(
        tree,
        {
            "/qubes-ip": "10.137.0.7\n",
            "/qubes-vm-type": "AppVM",
            "/qubes-service/qubes-firewall": "1",
            "/qubes-service/cups": "0",
            "/qubes-firewall/10.137.0.7/policy": "drop",
            "/qubes-firewall/10.137.0.7/0000": "action=accept",
            "/odd": "tab\there\x01",
        },
    )
    return tree


def test_qubesdb_read_value_and_exit_codes(qubesdb_tree: Path) -> None:
    found = qubesdb_cmd(qubesdb_tree, "/qubes-ip")
    missing = qubesdb_cmd(qubesdb_tree, "/nope")
    mixed = qubesdb_cmd(qubesdb_tree, "-q", "/qubes-ip", "/nope")
    defaulted = qubesdb_cmd(qubesdb_tree, "--default=fallback", "/nope")

    assert (found.returncode, found.stdout) == (0, "10.137.0.7\n")
    assert (missing.returncode, missing.stdout) == (2, "")
    assert "Failed to read /nope" in missing.stderr
    assert (mixed.returncode, mixed.stdout, mixed.stderr) == (2, "10.137.0.7\n", "")
    assert (defaulted.returncode, defaulted.stdout) == (0, "fallback\n")


def test_qubesdb_read_escapes_unless_raw(qubesdb_tree: Path) -> None:
    assert qubesdb_cmd(qubesdb_tree, "-f", "/odd").stdout == "/odd = tab\\x09here\\x01\n"
    assert qubesdb_cmd(qubesdb_tree, "-r", "/odd").stdout == "tab\there\x01\n"


def test_qubesdb_read_rejects_relative_and_dotdot(qubesdb_tree: Path) -> None:
    assert qubesdb_cmd(qubesdb_tree, "qubes-ip").returncode == 1
    assert qubesdb_cmd(qubesdb_tree, "/qubes-service/../qubes-ip").returncode == 1


def test_qubesdb_missing_tree_fails(tmp_path: Path) -> None:
    result = qubesdb_cmd(tmp_path / "absent", "/qubes-ip")

    assert result.returncode == 1
    assert "Failed connect" in result.stderr


def test_qubesdb_multiread_and_list(qubesdb_tree: Path) -> None:
    services = qubesdb_cmd(qubesdb_tree, "/qubes-service/", name="qubesdb-multiread")
    rules = qubesdb_cmd(qubesdb_tree, "/qubes-firewall/", name="qubesdb-list")
    full = qubesdb_cmd(qubesdb_tree, "-f", "/qubes-fire", name="qubesdb-list")

    assert services.stdout == "cups = 0\nqubes-firewall = 1\n"
    assert rules.stdout == "10.137.0.7/0000\n10.137.0.7/policy\n"
    assert full.stdout == "/qubes-firewall/10.137.0.7/0000\n/qubes-firewall/10.137.0.7/policy\n"


def test_qubesdb_write_is_rejected(qubesdb_tree: Path) -> None:
    result = qubesdb_cmd(qubesdb_tree, "/x", "1", name="qubesdb-write")

    assert result.returncode == 1
    assert "read-only" in result.stderr


# --------------------------------------------------------------------------------------
# Updates proxy


@pytest.fixture
def proxy_server(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    mirror = tmp_path / "mirror"
    release = mirror / "debian/dists/bookworm/InRelease"
    release.parent.mkdir(parents=True)
    release.write_text("signed release\n")
    os.utime(release, (1_700_000_000, 1_700_000_000))
    (tmp_path / "secret").write_text("outside the mirror\n")
    log_path = tmp_path / "proxy.log"
    server = updates_proxy.MirrorProxyServer(("127.0.0.1", 0), mirror, log_path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], release, log_path
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def proxy_request(port: int, method: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, url, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_updates_proxy_serves_mirror_file(proxy_server: tuple[int, Path, Path]) -> None:
    port, release, _ = proxy_server

    status, body = proxy_request(port, "GET", "http://deb.debian.org/debian/dists/bookworm/InRelease")
    head_status, head_body = proxy_request(port, "HEAD", "http://deb.debian.org/debian/dists/bookworm/InRelease")

    assert (status, body) == (200, b"signed release\n")
    assert (head_status, head_body) == (200, b"")


def test_updates_proxy_if_modified_since(proxy_server: tuple[int, Path, Path]) -> None:
    port, _, _ = proxy_server
    url = "http://deb.debian.org/debian/dists/bookworm/InRelease"

    fresh = proxy_request(port, "GET", url, {"If-Modified-Since": email.utils.formatdate(1_700_000_000, usegmt=True)})
    stale = proxy_request(port, "GET", url, {"If-Modified-Since": email.utils.formatdate(1_600_000_000, usegmt=True)})

    assert fresh[0] == 304
    assert stale == (200, b"signed release\n")


@pytest.mark.parametrize(
    ("method", "url", "expected"),
    [
        ("GET", "http://security.debian.org/debian-security/dists/bookworm-security/InRelease", 403),
        ("GET", "http://deb.debian.org/other/dists/bookworm/InRelease", 403),
        ("GET", "https://deb.debian.org/debian/dists/bookworm/InRelease", 403),
        ("GET", "http://deb.debian.org:8080/debian/dists/bookworm/InRelease", 403),
        ("GET", "http://deb.debian.org/debian/../secret", 403),
        ("GET", "http://deb.debian.org/debian/%2e%2e/secret", 403),
        ("CONNECT", "deb.debian.org:443", 403),
        ("POST", "http://deb.debian.org/debian/dists/bookworm/InRelease", 403),
        ("GET", "http://deb.debian.org/debian/dists/bookworm/Release", 404),
        ("GET", "http://deb.debian.org/debian/dists/bookworm", 404),
    ],
)
def test_updates_proxy_refuses(proxy_server: tuple[int, Path, Path], method: str, url: str, expected: int) -> None:
    port, _, _ = proxy_server

    status, body = proxy_request(port, method, url)

    assert status == expected
    assert b"outside the mirror" not in body


def test_updates_proxy_logs_every_request(proxy_server: tuple[int, Path, Path]) -> None:
    port, _, log_path = proxy_server

    def wait_for_lines(count):
        # The proxy writes a log line right after each response, from the thread that
        # served it, so wait for one request's line before sending the next.
        deadline = time.monotonic() + 5
        while len(log_path.read_text().splitlines()) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    proxy_request(port, "GET", "http://deb.debian.org/debian/dists/bookworm/InRelease")
    wait_for_lines(1)
    proxy_request(port, "GET", "http://example.org/")
    wait_for_lines(2)
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(e["method"], e["url"], e["status"]) for e in entries] == [
        ("GET", "http://deb.debian.org/debian/dists/bookworm/InRelease", 200),
        ("GET", "http://example.org/", 403),
    ]
    assert entries[0]["bytes"] == len("signed release\n")


def test_updates_proxy_listen_argument() -> None:
    assert updates_proxy.parse_listen("127.0.0.1:8082") == ("127.0.0.1", 8082)
    assert updates_proxy.parse_listen("[::1]:8082") == ("::1", 8082)
    for bad in ("8082", "127.0.0.1:", "127.0.0.1:99999"):
        with pytest.raises(Exception, match="--listen"):
            updates_proxy.parse_listen(bad)


# --------------------------------------------------------------------------------------
# Agent network scripts, chrooted into debian-12-xfce in a throwaway netns


def start_netvm_tables(chroot: ImageChroot) -> None:
    """Run what boot runs before the network: qubes-sysinit, antispoof, base tables."""
    chroot.sh(
        "/usr/lib/qubes/init/qubes-sysinit.sh && nft -f /etc/qubes/qubes-antispoof.nft "
        "&& /usr/lib/qubes/init/qubes-iptables start"
    )


def dnat_rules(chroot: ImageChroot) -> list[str]:
    listing = chroot.sh("nft list chain ip qubes dnat-dns").stdout
    lines = [line.strip() for line in listing.splitlines()]
    return [line for line in lines if line and not line.startswith(("table ", "chain ", "type ", "}"))]


@pytest.mark.lab
@needs_root
def test_iptables_loads_base_tables(xfce_chroot: ImageChroot) -> None:
    write_qubesdb(xfce_chroot.qubesdb, NETVM_QUBESDB)

    start_netvm_tables(xfce_chroot)

    ipv4 = xfce_chroot.sh("nft list table ip qubes").stdout
    ipv6 = xfce_chroot.sh("nft list table ip6 qubes").stdout
    for chain in (
        "chain input",
        "chain forward",
        "chain postrouting",
        "chain custom-input",
        "chain custom-forward",
        "chain prerouting",
        "chain antispoof",
    ):
        assert chain in ipv4, chain
        assert chain in ipv6, chain
    assert "jump custom-input" in ipv4
    assert "iifgroup 2 counter packets 0 bytes 0 reject with icmp host-prohibited" in ipv4
    assert "type filter hook input priority filter; policy drop;" in ipv6


@pytest.mark.lab
@needs_root
def test_dnat_to_ns_maps_virtual_dns(xfce_chroot: ImageChroot) -> None:
    write_qubesdb(xfce_chroot.qubesdb, NETVM_QUBESDB)
    start_netvm_tables(xfce_chroot)
    xfce_chroot.sh("printf 'nameserver 192.0.2.1\\nnameserver 2001:db8::1\\n' > /etc/resolv.conf")

    first = xfce_chroot.sh("/usr/lib/qubes/qubes-setup-dnat-to-ns", check=False)
    again = xfce_chroot.sh("/usr/lib/qubes/qubes-setup-dnat-to-ns", check=False)

    assert first.returncode == 0, first.stderr
    assert again.returncode == 100
    assert dnat_rules(xfce_chroot) == [
        "ip daddr 10.139.1.1 udp dport 53 dnat to 192.0.2.1",
        "ip daddr 10.139.1.1 tcp dport 53 dnat to 192.0.2.1",
        "ip daddr 10.139.1.2 udp dport 53 dnat to 192.0.2.1",
        "ip daddr 10.139.1.2 tcp dport 53 dnat to 192.0.2.1",
    ]


@pytest.mark.lab
@needs_root
def test_dnat_to_ns_rewrite_drops_custom_rules(xfce_chroot: ImageChroot) -> None:
    write_qubesdb(xfce_chroot.qubesdb, NETVM_QUBESDB)
    start_netvm_tables(xfce_chroot)
    xfce_chroot.sh("printf 'nameserver 192.0.2.1\\n' > /etc/resolv.conf && /usr/lib/qubes/qubes-setup-dnat-to-ns")
    xfce_chroot.sh("nft insert rule ip qubes dnat-dns udp dport 53 counter redirect to :53")
    assert any("redirect" in line for line in dnat_rules(xfce_chroot))

    xfce_chroot.sh("printf 'nameserver 192.0.2.1\\nnameserver 192.0.2.2\\n' > /etc/resolv.conf")
    rewrite = xfce_chroot.sh("/usr/lib/qubes/qubes-setup-dnat-to-ns", check=False)

    assert rewrite.returncode == 0, rewrite.stderr
    rules = dnat_rules(xfce_chroot)
    assert not any("redirect" in line for line in rules)
    assert rules == [
        "ip daddr 10.139.1.1 udp dport 53 dnat to 192.0.2.1",
        "ip daddr 10.139.1.1 tcp dport 53 dnat to 192.0.2.1",
        "ip daddr 10.139.1.2 udp dport 53 dnat to 192.0.2.2",
        "ip daddr 10.139.1.2 tcp dport 53 dnat to 192.0.2.2",
    ]


@pytest.mark.lab
@needs_root
def test_dnat_to_ns_without_ipv4_resolver_drops(xfce_chroot: ImageChroot) -> None:
    write_qubesdb(xfce_chroot.qubesdb, {**NETVM_QUBESDB, "/qubes-netvm-secondary-dns": "not-an-address"})
    start_netvm_tables(xfce_chroot)
    xfce_chroot.sh("printf 'nameserver 2001:db8::1\\n' > /etc/resolv.conf && /usr/lib/qubes/qubes-setup-dnat-to-ns")

    assert dnat_rules(xfce_chroot) == [
        "ip daddr 10.139.1.1 udp dport 53 drop",
        "ip daddr 10.139.1.1 tcp dport 53 drop",
    ]


@pytest.mark.lab
@needs_root
def test_setup_ip_configures_uplink(xfce_chroot: ImageChroot) -> None:
    write_qubesdb(
        xfce_chroot.qubesdb,
        {**CLIENT_QUBESDB, "/qubes-ip6": "fd09:24ef:4179::a89:7", "/qubes-gateway6": "fd09:24ef:4179::a89:5"},
    )
    with netns("peer") as peer:
        run(
            [
                "ip",
                "-n",
                xfce_chroot.namespace,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                "vif7.0",
                "netns",
                peer,
            ]
        )
        xfce_chroot.sh("/usr/lib/qubes/init/qubes-sysinit.sh && /usr/lib/qubes/setup-ip add eth0")

        addresses = xfce_chroot.sh("ip -o addr show dev eth0").stdout
        link = xfce_chroot.sh("ip -d link show dev eth0").stdout
        neighbours = xfce_chroot.sh("ip neigh show dev eth0").stdout
        routes = xfce_chroot.sh("ip route show").stdout
        routes6 = xfce_chroot.sh("ip -6 route show default").stdout

    assert "inet 10.137.0.7/32" in addresses
    assert "inet6 fd09:24ef:4179::a89:7/128" in addresses
    assert "group 1" in link
    assert "10.137.0.5 lladdr fe:ff:ff:ff:ff:ff PERMANENT" in neighbours
    assert "default via 10.137.0.5 dev eth0 onlink" in routes
    assert "10.137.0.5 dev eth0 scope link" in routes
    assert "default via fd09:24ef:4179::a89:5 dev eth0" in routes6
    assert xfce_chroot.read("/etc/resolv.conf") == "nameserver 10.139.1.1\nnameserver 10.139.1.2\n"


@pytest.mark.lab
@needs_root
def test_setup_ip_respects_protected_resolv_conf(xfce_chroot: ImageChroot) -> None:
    write_qubesdb(xfce_chroot.qubesdb, CLIENT_QUBESDB)
    with netns("peer") as peer:
        run(
            [
                "ip",
                "-n",
                xfce_chroot.namespace,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                "vif7.0",
                "netns",
                peer,
            ]
        )
        xfce_chroot.sh(
            "mkdir -p /rw/config/protected-files.d && echo /etc/resolv.conf > /rw/config/protected-files.d/dns.conf"
            " && echo 'nameserver 127.0.0.1' > /etc/resolv.conf"
            " && /usr/lib/qubes/init/qubes-sysinit.sh && /usr/lib/qubes/setup-ip add eth0"
        )

    assert xfce_chroot.read("/etc/resolv.conf") == "nameserver 127.0.0.1\n"


@pytest.mark.lab
@needs_root
def test_setup_ip_in_proxyvm_runs_dnat_and_hook(xfce_chroot: ImageChroot) -> None:
    proxyvm = {
        **CLIENT_QUBESDB,
        **NETVM_QUBESDB,
        "/qubes-vm-type": "ProxyVM",
        "/qubes-ip": "10.137.0.6",
        "/qubes-netvm-network": "10.137.0.6",
        "/qubes-netvm-gateway": "10.137.0.6",
    }
    write_qubesdb(xfce_chroot.qubesdb, proxyvm)
    with netns("peer") as peer:
        run(
            [
                "ip",
                "-n",
                xfce_chroot.namespace,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                "vif6.0",
                "netns",
                peer,
            ]
        )
        start_netvm_tables(xfce_chroot)
        xfce_chroot.sh(
            "mkdir -p /rw/config"
            " && printf '#!/bin/sh\\necho changed >> /rw/ip-change.log\\n' > /rw/config/qubes-ip-change-hook"
            " && chmod +x /rw/config/qubes-ip-change-hook"
        )

        xfce_chroot.sh("/usr/lib/qubes-lab/event uplink-changed")
        rules = dnat_rules(xfce_chroot)

    # sys-firewall forwards the virtual DNS addresses to its own resolvers, which
    # are the same virtual addresses one hop up.
    assert rules == [
        "ip daddr 10.139.1.1 udp dport 53 dnat to 10.139.1.1",
        "ip daddr 10.139.1.1 tcp dport 53 dnat to 10.139.1.1",
        "ip daddr 10.139.1.2 udp dport 53 dnat to 10.139.1.2",
        "ip daddr 10.139.1.2 tcp dport 53 dnat to 10.139.1.2",
    ]
    assert xfce_chroot.read("/run/qubes/qubes-ns") == "NS1=10.139.1.1\nNS2=10.139.1.2\n"
    assert xfce_chroot.rw.joinpath("ip-change.log").read_text() == "changed\n"


@pytest.mark.lab
@needs_root
def test_vif_online_and_offline(xfce_chroot: ImageChroot) -> None:
    write_qubesdb(xfce_chroot.qubesdb, {**NETVM_QUBESDB, "/qubes-netvm-gateway6": "fd09:24ef:4179::a89:5"})
    with netns("client") as client:
        run(
            [
                "ip",
                "-n",
                xfce_chroot.namespace,
                "link",
                "add",
                "vif7.0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                client,
            ]
        )
        start_netvm_tables(xfce_chroot)
        xfce_chroot.sh(
            "mkdir -p /rw/config/network-hooks.d && printf '#!/bin/sh\\necho \"$@\" >> /rw/hook.log\\n'"
            " > /rw/config/network-hooks.d/10-record && chmod +x /rw/config/network-hooks.d/10-record"
        )

        online = xfce_chroot.sh(
            "/usr/lib/qubes-lab/event vif-online vif7.0 10.137.0.7 fd09:24ef:4179::a89:7", check=False
        )
        link = xfce_chroot.sh("ip -d link show dev vif7.0").stdout
        addresses = xfce_chroot.sh("ip -o addr show dev vif7.0").stdout
        routes = xfce_chroot.sh("ip route show dev vif7.0").stdout
        routes6 = xfce_chroot.sh("ip -6 route show dev vif7.0").stdout
        proxy_arp = xfce_chroot.sh("cat /proc/sys/net/ipv4/conf/vif7.0/proxy_arp").stdout.strip()
        allowed = xfce_chroot.sh("nft list set ip qubes allowed; nft list set ip6 qubes allowed").stdout

        offline = xfce_chroot.sh(
            "/usr/lib/qubes-lab/event vif-offline vif7.0 10.137.0.7 fd09:24ef:4179::a89:7", check=False
        )
        routes_after = xfce_chroot.sh("ip route show dev vif7.0").stdout
        allowed_after = xfce_chroot.sh("nft list set ip qubes allowed").stdout

    assert online.returncode == 0, online.stderr
    assert "link/ether fe:ff:ff:ff:ff:ff" in link
    assert "group 2" in link
    assert "inet 10.137.0.5/32" in addresses
    assert "inet6 fd09:24ef:4179::a89:5/128" in addresses
    assert "10.137.0.7 scope link metric 32745" in routes
    assert "fd09:24ef:4179::a89:7 metric 32745" in routes6
    assert proxy_arp == "1"
    assert '"vif7.0" . 10.137.0.7' in allowed
    assert '"vif7.0" . fd09:24ef:4179::a89:7' in allowed
    assert offline.returncode == 0, offline.stderr
    assert routes_after.strip() == ""
    assert "10.137.0.7" not in allowed_after
    assert xfce_chroot.rw.joinpath("hook.log").read_text().splitlines() == [
        "online vif7.0 vif 10.137.0.7",
        "online vif7.0 vif fd09:24ef:4179::a89:7",
        "offline vif7.0 vif 10.137.0.7",
        "offline vif7.0 vif fd09:24ef:4179::a89:7",
    ]


@pytest.mark.lab
@needs_root
def test_vif_online_rejects_bad_name(xfce_chroot: ImageChroot) -> None:
    write_qubesdb(xfce_chroot.qubesdb, NETVM_QUBESDB)

    result = xfce_chroot.sh("/usr/lib/qubes-lab/event vif-online eth9 10.137.0.7", check=False)

    assert result.returncode == 1
    assert "invalid interface name" in result.stderr


@pytest.mark.lab
@needs_root
def test_qubes_firewall_hooks_and_rules(xfce_chroot: ImageChroot) -> None:
    write_qubesdb(
        xfce_chroot.qubesdb,
        {
            **NETVM_QUBESDB,
            "/connected-ips": "10.137.0.7 10.137.0.8",
            "/qubes-firewall/10.137.0.7/0001": "action=accept proto=tcp dstports=443-443 dst4=192.0.2.0/24",
            "/qubes-firewall/10.137.0.8/policy": "accept",
            "/qubes-firewall/10.137.0.8/0000": "action=maybe",
        },
    )
    start_netvm_tables(xfce_chroot)
    xfce_chroot.sh(
        "mkdir -p /rw/config/qubes-firewall.d"
        " && printf '#!/bin/sh\\necho hook >> /rw/order.log\\n' > /rw/config/qubes-firewall.d/50-hook"
        " && printf '#!/bin/sh\\necho user-script >> /rw/order.log\\n' > /rw/config/qubes-firewall-user-script"
        " && chmod +x /rw/config/qubes-firewall.d/50-hook /rw/config/qubes-firewall-user-script"
    )

    start = xfce_chroot.sh("/usr/lib/qubes-lab/qubes-firewall start", check=False)
    table = xfce_chroot.sh("nft list table ip qubes-firewall").stdout
    bad_client = xfce_chroot.sh("nft list chain ip qubes-firewall qbs-10-137-0-8").stdout
    stop = xfce_chroot.sh("/usr/lib/qubes-lab/qubes-firewall stop", check=False)
    after_stop = xfce_chroot.sh("nft list tables").stdout

    assert start.returncode == 0, start.stderr
    assert xfce_chroot.rw.joinpath("order.log").read_text() == "hook\nuser-script\n"
    assert "type filter hook forward priority filter; policy drop;" in table
    assert "ip saddr 10.137.0.7 jump qbs-10-137-0-7" in table
    # nft prints "ip protocol tcp" folded into "tcp dport".
    assert "ip daddr 192.0.2.0/24 tcp dport 443 accept" in table
    assert 'iifname != "vif*" ip saddr { 10.137.0.7, 10.137.0.8 } drop' in table
    # An unparsable rule blocks the whole client, as Qubes does.
    assert "reject with icmp admin-prohibited" in bad_client
    assert "accept" not in bad_client
    assert "failed to parse rules for 10.137.0.8" in start.stderr
    assert stop.returncode == 0
    assert "qubes-firewall" not in after_stop


@pytest.mark.lab
@needs_root
def test_events_without_networking_agent(lab_images: dict[str, Path], tmp_path: Path) -> None:
    with netns("min") as namespace:
        chroot = ImageChroot(lab_images["debian-12-hard-min"], namespace, tmp_path)
        write_qubesdb(chroot.qubesdb, CLIENT_QUBESDB)

        uplink = chroot.sh("/usr/lib/qubes-lab/event uplink-changed", check=False)
        vif = chroot.sh("/usr/lib/qubes-lab/event vif-online vif7.0 10.137.0.7", check=False)
        nft = chroot.sh("command -v nft", check=False)

    assert uplink.returncode == 0
    assert "not installed" in uplink.stderr
    assert vif.returncode == 1
    assert nft.returncode != 0


# --------------------------------------------------------------------------------------
# Booting the images


EXPECTED_ACTIVE_UNITS = {
    "debian-12-xfce": [
        "qubes-sysinit",
        "qubes-early-vm-config",
        "qubes-mount-dirs",
        "qubes-misc-post",
        "qubes-antispoof",
        "qubes-iptables",
        "qubes-network-uplink",
        "qubes-network",
        "qubes-firewall",
    ],
    "debian-12-hard-min": ["qubes-sysinit", "qubes-early-vm-config", "qubes-mount-dirs", "qubes-misc-post"],
    "debian-13-minimal": ["qubes-sysinit", "qubes-early-vm-config", "qubes-mount-dirs", "qubes-misc-post"],
}


@pytest.mark.lab
@needs_root
@pytest.mark.parametrize("image_name", sorted(EXPECTED_ACTIVE_UNITS))
def test_image_boots_with_agent_units(lab_images: dict[str, Path], tmp_path: Path, image_name: str) -> None:
    qubesdb = {**NETVM_QUBESDB, "/name": "bootcheck", "/qubes-vm-type": "ProxyVM"}
    with booted(lab_images[image_name], "boot", tmp_path, qubesdb) as qube:
        state = qube.wait_until_running()
        failed = qube.sh("systemctl --failed --no-legend --plain").stdout
        active = qube.sh(
            "systemctl is-active " + " ".join(EXPECTED_ACTIVE_UNITS[image_name]), check=False
        ).stdout.split()
        services = qube.sh("ls /run/qubes-service").stdout.split()
        hostname = qube.sh("hostname").stdout.strip()
        machine_id = qube.sh("cat /etc/machine-id").stdout.strip()
        rc_local = (qube.rw / "config/rc.local").exists()
        tables = qube.sh("command -v nft >/dev/null && nft list tables || true").stdout

    assert state == "running", failed
    assert failed == ""
    assert active == ["active"] * len(EXPECTED_ACTIVE_UNITS[image_name])
    assert "qubes-network" in services
    assert "qubes-firewall" in services
    assert hostname == "bootcheck"
    assert len(machine_id) == 32
    assert rc_local
    if image_name == "debian-12-xfce":
        assert "table ip qubes\n" in tables
        assert "table ip qubes-firewall" in tables
    else:
        assert tables == ""


@pytest.mark.lab
@needs_root
def test_boot_configures_existing_eth0(lab_images: dict[str, Path], tmp_path: Path) -> None:
    """An eth0 present before boot is set up by qubes-network-uplink at boot."""
    with netns("peer") as peer, netns("client") as namespace:
        run(["ip", "-n", namespace, "link", "add", "eth0", "type", "veth", "peer", "name", "vif7.0", "netns", peer])
        scratch = tmp_path / "client"
        scratch.mkdir()
        qube = BootedQube(lab_images["debian-12-xfce"], namespace, scratch, CLIENT_QUBESDB)
        try:
            state = qube.wait_until_running()
            unit = qube.sh("systemctl is-active qubes-network-uplink@eth0.service", check=False).stdout.strip()
            addresses = qube.sh("ip -o -4 addr show dev eth0").stdout
            resolv = qube.sh("cat /etc/resolv.conf").stdout
        finally:
            qube.stop()

    assert state == "running"
    assert unit == "active"
    assert "inet 10.137.0.7/32" in addresses
    assert resolv == "nameserver 10.139.1.1\nnameserver 10.139.1.2\n"


@pytest.mark.lab
@needs_root
def test_appvm_boot_runs_rc_local_and_bind_dirs(lab_images: dict[str, Path], tmp_path: Path) -> None:
    qubesdb = {**CLIENT_QUBESDB, "/name": "persist"}
    with booted(lab_images["debian-12-hard-min"], "persist", tmp_path, qubesdb) as qube:
        assert qube.wait_until_running() == "running"
        rw = qube.rw
        # The first boot populated /rw/config; prepare the next boot as a user would.
        qube.sh(
            "mkdir -p /rw/config/qubes-bind-dirs.d /rw/config/rc.local.d"
            " && echo \"binds+=( '/etc/lab-bound' )\" > /rw/config/qubes-bind-dirs.d/50-lab.conf"
            " && printf '#!/bin/sh\\necho rc >> /rw/boot.log\\n' > /rw/config/rc.local.d/10-lab.rc"
            " && chmod +x /rw/config/rc.local.d/10-lab.rc"
            " && mkdir -p /rw/bind-dirs/etc/lab-bound && echo kept > /rw/bind-dirs/etc/lab-bound/file"
        )

    with booted(lab_images["debian-12-hard-min"], "persist", tmp_path, qubesdb) as qube:
        state = qube.wait_until_running()
        bound = qube.sh("cat /etc/lab-bound/file", check=False).stdout
        mount_target = qube.sh("findmnt -n -o TARGET /etc/lab-bound", check=False).stdout.strip()

    assert state == "running"
    assert (rw / "config/rc.local").exists()
    assert bound == "kept\n"
    assert mount_target == "/etc/lab-bound"
    assert (rw / "boot.log").read_text() == "rc\n"


@pytest.mark.lab
@needs_root
def test_booted_chain_forwards_dns_to_uplink(lab_images: dict[str, Path], tmp_path: Path) -> None:
    """A client's DNS to 10.139.1.1 goes through a netvm's dnat-dns to the uplink."""
    image = lab_images["debian-12-xfce"]
    with (
        netns("uplink") as uplink,
        booted(image, "net", tmp_path, NETVM_QUBESDB) as net,
        booted(image, "client", tmp_path, CLIENT_QUBESDB) as client,
    ):
        assert net.wait_until_running() == "running"
        assert client.wait_until_running() == "running"
        # Uplink side, as the lab runtime builds it: sys-net's eth0 and resolv.conf.
        run(["ip", "-n", net.namespace, "link", "add", "eth0", "type", "veth", "peer", "name", "nic0", "netns", uplink])
        run(["ip", "-n", uplink, "addr", "add", "192.0.2.1/24", "dev", "nic0"])
        run(["ip", "-n", uplink, "link", "set", "nic0", "up"])
        net.sh(
            "ip addr add 192.0.2.10/24 dev eth0 && ip link set eth0 up && ip route add default via 192.0.2.1"
            " && echo 'nameserver 192.0.2.1' > /etc/resolv.conf"
        )
        net.sh("/usr/lib/qubes-lab/event uplink-changed")
        responder = subprocess.Popen(
            ["ip", "netns", "exec", uplink, "python3", "-c", UDP_RESPONDER],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # Client link: eth0 in the client, vif7.0 in the netvm.
            run(
                [
                    "ip",
                    "-n",
                    client.namespace,
                    "link",
                    "add",
                    "eth0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "vif7.0",
                    "netns",
                    net.namespace,
                ]
            )
            net.sh("/usr/lib/qubes-lab/event vif-online vif7.0 10.137.0.7")
            client.sh("/usr/lib/qubes-lab/event uplink-changed")
            # bash's /dev/udp gives a connected UDP socket; dd reads the whole datagram
            # (bash's read would take one byte and drop the rest of it).
            reply = client.sh(
                "exec 3<>/dev/udp/10.139.1.1/53 && printf 'lab-query' >&3"
                " && timeout 5 dd bs=512 count=1 status=none <&3",
                check=False,
            )
            resolv = client.sh("cat /etc/resolv.conf").stdout
            uplink_unit = client.sh("systemctl is-active qubes-network-uplink@eth0.service", check=False).stdout.strip()
        finally:
            responder.terminate()
            responder_output, responder_errors = responder.communicate(timeout=10)

    assert uplink_unit == "active"
    assert resolv == "nameserver 10.139.1.1\nnameserver 10.139.1.2\n"
    assert reply.returncode == 0, f"{reply.stderr}\nresponder: {responder_output} {responder_errors}"
    # The uplink saw the query from sys-net's address (masquerade) on 192.0.2.1:53.
    assert reply.stdout.strip() == "answer-from-192.0.2.1:53-to-192.0.2.10"
    assert "lab-query" in responder_output


UDP_RESPONDER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("192.0.2.1", 53))
sock.settimeout(60)
data, peer = sock.recvfrom(512)
print(data.decode(), peer, flush=True)
sock.sendto(f"answer-from-192.0.2.1:53-to-{peer[0]}\\n".encode(), peer)
"""


# --------------------------------------------------------------------------------------
# The mirror: apt-get install through the updates proxy inside a booted template


@pytest.mark.lab
@needs_root
@pytest.mark.parametrize("image_name", ["debian-12-hard-min", "debian-13-minimal"])
def test_mirror_installs_packages_through_proxy(
    lab_images: dict[str, Path], lab_mirror: Path, tmp_path: Path, image_name: str
) -> None:
    qubesdb = {"/name": "template", "/qubes-vm-type": "TemplateVM", "/qubes-vm-persistence": "full"}
    proxy_log = tmp_path / "proxy.log"
    with (
        booted(lab_images[image_name], "tpl", tmp_path, qubesdb) as template,
        running_proxy(template.namespace, lab_mirror, proxy_log),
    ):
        assert template.wait_until_running() == "running"
        if image_name == "debian-12-hard-min":
            # What the formula does on bookworm: add trixie, pinned to dnscrypt-proxy.
            template.sh(
                "echo 'deb http://deb.debian.org/debian trixie main' > /etc/apt/sources.list.d/trixie.list"
                " && printf 'Package: *\\nPin: release n=trixie\\nPin-Priority: 1\\n\\n"
                "Package: dnscrypt-proxy\\nPin: release n=trixie\\nPin-Priority: 500\\n'"
                " > /etc/apt/preferences.d/dnscrypt-proxy"
            )
        install = template.sh(
            "export DEBIAN_FRONTEND=noninteractive && apt-get update"
            " && apt-get install -y " + " ".join(images.MIRROR_PACKAGES),
            check=False,
            timeout=300,
        )
        versions = template.sh("dpkg-query -W -f '${Package} ${Status}\\n' " + " ".join(images.MIRROR_PACKAGES)).stdout
        check = template.sh(
            "dnscrypt-proxy -version && nft --version && test -s /etc/ssl/certs/ca-certificates.crt", check=False
        )

    assert install.returncode == 0, install.stdout[-3000:] + install.stderr
    assert "W: " not in install.stderr, install.stderr
    for name in images.MIRROR_PACKAGES:
        assert f"{name} install ok installed" in versions, versions
    assert check.returncode == 0, check.stderr
    requests = [json.loads(line) for line in proxy_log.read_text().splitlines()]
    assert requests, "apt sent nothing through the updates proxy"
    assert all(r["url"].startswith("http://deb.debian.org/debian/") for r in requests)
    assert any(r["url"].endswith("/InRelease") and r["status"] == 200 for r in requests)
    assert any("/pool/" in r["url"] and r["status"] == 200 for r in requests)


@pytest.mark.lab
@needs_root
def test_mirror_signature_verifies_with_lab_key(lab_mirror: Path) -> None:
    key = images.DEFAULT_CACHE / "keys" / images.ARCHIVE_KEY_FILE
    for suite in images.SUITE_RELEASES:
        result = run(["gpgv", "--keyring", str(key), str(lab_mirror / f"debian/dists/{suite}/InRelease")], check=False)
        assert result.returncode == 0, result.stderr


@pytest.mark.lab
@needs_root
def test_ensure_images_cached_call_reuses_build(lab_images: dict[str, Path]) -> None:
    # The time this takes is a figure for docs/lab.md, not a test condition.
    again = images.ensure_images()

    assert again == lab_images
