"""Build and cache the offline lab's Debian root filesystems and its local apt mirror.

The lab boots qubes as systemd-nspawn containers from root filesystems built here:

``debian-12-xfce``
    bookworm minbase, the lab's qubes-core-agent and qubes-core-agent-networking, and
    nftables (the template of sys-net, sys-firewall and client qubes);
``debian-12-hard-min``
    bookworm minbase and the lab's qubes-core-agent only, without nftables;
``debian-13-minimal``
    trixie minbase and the lab's qubes-core-agent only.

Every image has the user ``user`` (uid 1000), apt pointed at the updates proxy on
127.0.0.1:8082, a one-line sources.list for its suite and the lab archive key
trusted. /etc/machine-id is empty, so systemd gives each boot its own ID, and
/etc/resolv.conf is empty too.

The mirror serves, for bookworm and trixie, what ``apt-get install dnscrypt-proxy
nftables ca-certificates qubes-core-agent-networking`` needs in those images:
dnscrypt-proxy exists only in trixie, and a bookworm template takes it from there
through an apt pin. Its InRelease files are signed with a lab key made once.

Everything is built below a cache folder (default /var/cache/sysdns-lab), in a
folder named by a hash of the build inputs: this file and the agent sources under
agent/. A build is renamed into place only when complete, so an interrupted build
leaves nothing half-built behind. The debootstrap runs are cached separately, keyed by their
own arguments. Building needs root, debootstrap, apt-utils, dpkg-dev, gnupg and access
to http://deb.debian.org/debian.

Command line (from the repository root)::

    python3 -m tests.lab.images build [--cache DIR] [--force]
    python3 -m tests.lab.images info [--cache DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("/var/cache/sysdns-lab")
DEBIAN_URL = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
ARCH = "amd64"
# netbase provides /etc/protocols, without which nft cannot parse the protocol names
# (such as ipv6-icmp) in Qubes' own qubes-ipv6.nft; Qubes' minimal templates have it.
DEBOOTSTRAP_INCLUDE = ("systemd", "systemd-sysv", "dbus", "iproute2", "netbase")

# Debian release numbers as they appear in apt's "Inst" lines ("Debian:12.12/...").
SUITE_RELEASES = {"bookworm": "12", "trixie": "13"}
IMAGE_SUITES = {
    "debian-12-xfce": "bookworm",
    "debian-12-hard-min": "bookworm",
    "debian-13-minimal": "trixie",
}
MIRROR_PACKAGES = ("dnscrypt-proxy", "nftables", "ca-certificates", "qubes-core-agent-networking")
XFCE_PACKAGES = ("nftables", "qubes-core-agent-networking")
# Packages a bookworm template takes from trixie through an apt pin, because
# bookworm, bookworm-updates, -security and -backports do not have them.
BOOKWORM_FROM_TRIXIE = ("dnscrypt-proxy",)

AGENT_DIR = Path(__file__).resolve().parent / "agent"
AGENT_PACKAGES = ("qubes-core-agent", "qubes-core-agent-networking")
UPDATES_PROXY_URL = "http://127.0.0.1:8082/"
LAB_USER = "user"
LAB_UID = 1000
ARCHIVE_KEY_UID = "sysdns lab archive (offline test key only) <lab-archive@localhost>"
ARCHIVE_KEY_FILE = "sysdns-lab-archive.gpg"
LAB_CA_NAME = "lab-ca.crt"
# Fixed timestamp for the lab .deb files, so that the same sources give the same bytes.
SOURCE_DATE_EPOCH = "1700000000"


# Log file of the build in progress; _run appends every command and its output to it.
_build_log: Path | None = None
_build_log_lock = threading.Lock()


class BuildError(RuntimeError):
    """A step of the image or mirror build failed; the message names the step."""


@dataclass(frozen=True)
class ResolvedPackage:
    """One package apt would install: name, version and the suite it comes from."""

    name: str
    version: str
    suite: str


# --------------------------------------------------------------------------------------
# Public API


def ensure_images(cache: Path | str = DEFAULT_CACHE) -> dict[str, Path]:
    """Build the lab images unless the cache already contains them for the current inputs.

    Returns the root folder of each image by name. The images are the read-only lower
    layers of the lab's qubes: never change them in place.
    """
    build = ensure_build(Path(cache))
    return {name: build / "images" / name for name in IMAGE_SUITES}


def ensure_mirror(cache: Path | str = DEFAULT_CACHE) -> Path:
    """Build the lab apt mirror (with the images it is computed from) when missing.

    Returns the folder that contains ``debian/dists`` and ``debian/pool``, which is the
    --mirror argument of updates_proxy.py.
    """
    return ensure_build(Path(cache)) / "mirror"


def install_lab_ca(root: Path | str, ca_pem: str) -> None:
    """Trust the lab CA certificate ``ca_pem`` (one PEM certificate) inside ``root``.

    Writes /usr/local/share/ca-certificates/lab-ca.crt and appends the certificate to
    /etc/ssl/certs/ca-certificates.crt, the bundle Go's crypto/x509 reads on Debian.
    Because a running qube mounts /rw/usrlocal over /usr/local, the certificate also
    goes to /usr/share/ca-certificates/sysdns-lab/ with a line in
    /etc/ca-certificates.conf, so that an update-ca-certificates run inside the qube
    (for example when apt installs ca-certificates) keeps it in the bundle.
    Raises ValueError for anything but one PEM certificate; calling it again with the
    same certificate changes nothing.
    """
    root = Path(root)
    pem = ca_pem.strip().replace("\r\n", "\n") + "\n"
    if not re.fullmatch(r"-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=\n]+-----END CERTIFICATE-----\n", pem):
        raise ValueError(
            "install_lab_ca: ca_pem must contain exactly one PEM certificate "
            "('-----BEGIN CERTIFICATE-----' ... '-----END CERTIFICATE-----'), got "
            f"{ca_pem[:60]!r}"
        )
    if not (root / "etc").is_dir():
        raise ValueError(f"install_lab_ca: {root} is not a root filesystem (no etc/ folder)")

    _write_in_root(root, "usr/local/share/ca-certificates/" + LAB_CA_NAME, pem)
    _write_in_root(root, "usr/share/ca-certificates/sysdns-lab/" + LAB_CA_NAME, pem)

    conf = _path_in_root(root, "etc/ca-certificates.conf")
    conf_lines = conf.read_text().splitlines() if conf.exists() else []
    if "sysdns-lab/" + LAB_CA_NAME not in conf_lines:
        conf_lines.append("sysdns-lab/" + LAB_CA_NAME)
        _write_in_root(root, "etc/ca-certificates.conf", "\n".join(conf_lines) + "\n")

    bundle = _path_in_root(root, "etc/ssl/certs/ca-certificates.crt")
    bundle_text = bundle.read_text() if bundle.exists() else ""
    if pem not in bundle_text:
        if bundle_text and not bundle_text.endswith("\n"):
            bundle_text += "\n"
        _write_in_root(root, "etc/ssl/certs/ca-certificates.crt", bundle_text + pem)


def build_key() -> str:
    """Return the cache key: a hash of this file and of every file under agent/."""
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    for path in sorted(AGENT_DIR.rglob("*")):
        relative = path.relative_to(AGENT_DIR).as_posix()
        if path.is_symlink():
            digest.update(f"link {relative} {os.readlink(path)}\n".encode())
        elif path.is_file():
            executable = bool(path.stat().st_mode & 0o111)
            digest.update(f"file {relative} {executable}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_agent_packages(out_dir: Path) -> dict[str, Path]:
    """Build the lab's agent .deb files from agent/ into ``out_dir``; return them by name.

    Files are staged with normalized modes (0755 for folders and executables, 0644
    otherwise), so the packages do not depend on the checkout's umask.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    packages: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="sysdns-agent-") as staging_dir:
        for name in AGENT_PACKAGES:
            source = AGENT_DIR / name
            staging = Path(staging_dir) / name
            _stage_tree(source, staging)
            control = _read_control(source / "DEBIAN" / "control")
            if control.get("Package") != name:
                raise BuildError(f"{source}/DEBIAN/control names package {control.get('Package')!r}, expected {name!r}")
            deb = out_dir / f"{name}_{control['Version']}_{control['Architecture']}.deb"
            _run(
                ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(staging), str(deb)],
                env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH},
                step=f"build the {name} package",
            )
            packages[name] = deb
    return packages


def ensure_build(cache: Path) -> Path:
    """Return the complete build folder for the current inputs, building it if needed."""
    key = build_key()
    builds = cache / "builds"
    final = builds / key
    if _build_complete(final):
        _point_cache_links(cache, final)
        if not (cache / "tools" / "dnscrypt-proxy").exists():
            _install_tools(cache, final)
        return final

    if os.geteuid() != 0:
        raise BuildError(
            f"the lab images for build key {key} are not in {cache}; building them needs root "
            "(run `sudo python3 -m tests.lab.images build` from the repository root)"
        )
    builds.mkdir(parents=True, exist_ok=True)
    with _cache_lock(cache):
        if not _build_complete(final):
            _remove_stale_temporaries(builds)
            _build(cache, key, final)
        _point_cache_links(cache, final)
        _install_tools(cache, final)
        _remove_old_builds(builds, keep=final)
    return final


def _install_tools(cache: Path, build: Path) -> None:
    """Copy the build's tools to cache/tools unless an identical copy is there."""
    for tool in (build / "tools").iterdir():
        target = cache / "tools" / tool.name
        if target.exists() and target.read_bytes() == tool.read_bytes():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, tool.read_bytes(), mode=0o755)


def build_info(cache: Path | str = DEFAULT_CACHE) -> dict:
    """Return the summary (build.json) of the current build, or {} when there is none."""
    info_path = Path(cache) / "builds" / build_key() / "build.json"
    if not info_path.exists():
        return {}
    return json.loads(info_path.read_text())


# --------------------------------------------------------------------------------------
# The build


def _build(cache: Path, key: str, final: Path) -> None:
    global _build_log
    started = time.monotonic()
    work = final.parent / f".tmp-{key}-{os.getpid()}"
    work.mkdir()
    timings: dict[str, float] = {}
    _build_log = work / "build.log"
    try:
        log.info("building lab images and mirror %s in %s (log: %s)", key, work, _build_log)

        with _timed(timings, "agent packages and archive key"):
            agent_debs = build_agent_packages(work / "agent")
            archive_key = _ensure_archive_key(cache)

        with _timed(timings, "debootstrap and host apt update"):
            apt_work = work / "apt"
            agent_repo = _make_flat_repo(work / "agent-repo", list(agent_debs.values()))
            with ThreadPoolExecutor(max_workers=3) as pool:
                bases = {suite: pool.submit(_ensure_base, cache, suite) for suite in SUITE_RELEASES}
                lists_job = pool.submit(_update_host_lists, apt_work, agent_repo)
                base_roots = {suite: job.result() for suite, job in bases.items()}
                lists_dir = lists_job.result()

        images = work / "images"
        images.mkdir()
        with _timed(timings, "minimal images"):
            for name, suite in (("debian-12-hard-min", "bookworm"), ("debian-13-minimal", "trixie")):
                root = images / name
                _copy_tree(base_roots[suite], root)
                _configure_image(root, name, suite, archive_key.public)
                _install_packages(root, agent_repo, ["qubes-core-agent"], step=f"install the agent into {name}")

        mirror = work / "mirror"
        with _timed(timings, "mirror packages"):
            resolved = _resolve_mirror_packages(apt_work, lists_dir, agent_repo, images)
            _download_packages(apt_work, lists_dir, agent_repo, resolved, mirror / "debian" / "pool")
            _copy_agent_debs(agent_debs, mirror / "debian" / "pool" / "lab")

        with _timed(timings, "xfce image"):
            root = images / "debian-12-xfce"
            _copy_tree(images / "debian-12-hard-min", root)
            bookworm_repo = _make_flat_repo(
                work / "bookworm-repo",
                sorted((mirror / "debian" / "pool" / "bookworm").glob("*.deb"))
                + sorted((mirror / "debian" / "pool" / "lab").glob("*.deb")),
            )
            _install_packages(
                root,
                bookworm_repo,
                list(XFCE_PACKAGES),
                step="install nftables and the networking agent into debian-12-xfce",
            )

        with _timed(timings, "mirror indexes and signatures"):
            for suite in SUITE_RELEASES:
                _write_suite_indexes(mirror / "debian", suite, lists_dir, archive_key)
            _extract_dnscrypt_proxy(mirror / "debian" / "pool" / "trixie", work / "tools")

        for name in IMAGE_SUITES:
            _finalize_image(images / name)

        for scratch in ("apt", "agent-repo", "bookworm-repo"):
            shutil.rmtree(work / scratch, ignore_errors=True)
        info = {
            "key": key,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.monotonic() - started, 1),
            "timings": timings,
            "images": {name: _tree_size(images / name) for name in IMAGE_SUITES},
            "mirror_bytes": _tree_size(mirror),
            "mirror_packages": {
                suite: [f"{p.name}={p.version}" for p in packages] for suite, packages in resolved.items()
            },
            "archive_key": str(archive_key.public),
        }
        (work / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        _build_log = None
        os.rename(work, final)
        log.info("lab build %s finished in %.0f s", key, info["seconds"])
    except BaseException:
        failure_log = final.parent / "failed-build.log"
        if _build_log is not None and _build_log.exists():
            shutil.copyfile(_build_log, failure_log)
        log.error("lab build %s failed; removing %s (commands and output: %s)", key, work, failure_log)
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        _build_log = None


# --------------------------------------------------------------------------------------
# Debootstrap bases


def _ensure_base(cache: Path, suite: str) -> Path:
    """Return a cached debootstrap root for ``suite``, running debootstrap when missing."""
    arguments = ["--variant=minbase", f"--arch={ARCH}", "--include=" + ",".join(DEBOOTSTRAP_INCLUDE)]
    key = hashlib.sha256(json.dumps([suite, arguments, DEBIAN_URL]).encode()).hexdigest()[:12]
    bases = cache / "debootstrap"
    final = bases / f"{suite}-{key}"
    if (final / "etc" / "debian_version").exists():
        return final
    bases.mkdir(parents=True, exist_ok=True)
    for old in bases.glob(f"{suite}-*"):
        log.info("removing outdated debootstrap root %s", old)
        shutil.rmtree(old)
    for stale in bases.glob(f".tmp-{suite}-*"):
        shutil.rmtree(stale)

    work = bases / f".tmp-{suite}-{key}-{os.getpid()}"
    log.info("debootstrap %s into %s", suite, work)
    try:
        _run(
            ["debootstrap", *arguments, f"--keyring={DEBIAN_KEYRING}", suite, str(work), DEBIAN_URL],
            step=f"debootstrap {suite}",
            log_file=bases / f"debootstrap-{suite}.log",
        )
        _remove_apt_caches(work)
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


def _remove_apt_caches(root: Path) -> None:
    """Delete apt's package lists and downloaded .debs: the images never use them."""
    lists = root / "var/lib/apt/lists"
    for entry in lists.iterdir():
        if entry.name in ("lock", "partial"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for cached in (root / "var/cache/apt").glob("*.bin"):
        cached.unlink()
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


# --------------------------------------------------------------------------------------
# Image configuration


def _configure_image(root: Path, name: str, suite: str, archive_public_key: Path) -> None:
    """Apply the settings every lab image shares (see the module docstring)."""
    (root / "etc/apt/sources.list").write_text(f"deb {DEBIAN_URL} {suite} main\n")
    for extra in (root / "etc/apt/sources.list.d").glob("*"):
        extra.unlink()
    (root / "etc/apt/apt.conf.d/01qubes-proxy").write_text(f'Acquire::http::Proxy "{UPDATES_PROXY_URL}";\n')
    shutil.copyfile(archive_public_key, root / "etc/apt/trusted.gpg.d" / ARCHIVE_KEY_FILE)
    os.chmod(root / "etc/apt/trusted.gpg.d" / ARCHIVE_KEY_FILE, 0o644)

    # debootstrap copies the host's hostname, hosts and resolv.conf: none of them may
    # leak into a qube. qubes-early-vm-config sets the qube name at boot, and setup-ip
    # writes resolv.conf.
    (root / "etc/hostname").write_text(f"{name}\n")
    (root / "etc/hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    )
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.write_text("")

    # A policy-rc.d that forbids service starts while packages go in at build time;
    # _finalize_image removes it.
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# Lab image build: start no services.\nexit 101\n")
    policy.chmod(0o755)

    _chroot(
        root,
        ["useradd", "--create-home", "--uid", str(LAB_UID), "--user-group", "--shell", "/bin/bash", LAB_USER],
        step=f"create user {LAB_USER} in {name}",
    )
    # The Qubes 4.2 preset (vm-systemd/75-qubes-vm.preset) disables apt's timers.
    _chroot(
        root,
        ["systemctl", "disable", "apt-daily.timer", "apt-daily-upgrade.timer"],
        step=f"disable apt timers in {name}",
    )


def _finalize_image(root: Path) -> None:
    """Remove build-time leftovers and make the machine ID per boot."""
    (root / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
    _remove_apt_caches(root)
    # An empty machine-id (not "uninitialized", which means first boot) makes systemd
    # in the container use a transient ID, so qubes booted from one image differ.
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.is_symlink() or dbus_id.exists():
        dbus_id.unlink()
    dbus_id.parent.mkdir(parents=True, exist_ok=True)
    dbus_id.symlink_to("/etc/machine-id")


def _install_packages(root: Path, repo: Path, packages: list[str], step: str) -> None:
    """Install ``packages`` into ``root`` with its own apt, from the flat repo ``repo``.

    The repo is bind-mounted on /mnt in a private mount namespace, so nothing stays
    mounted after the call.
    """
    lists = "/tmp/lab-build-apt-lists"
    (root / lists.lstrip("/") / "partial").mkdir(parents=True, exist_ok=True)
    (root / "tmp/lab-build-sources.list").write_text("deb [trusted=yes] file:/mnt ./\n")
    apt_options = [
        "-o",
        "Dir::Etc::sourcelist=/tmp/lab-build-sources.list",
        "-o",
        "Dir::Etc::sourceparts=/nonexistent",
        "-o",
        f"Dir::State::Lists={lists}",
        "-o",
        "APT::Sandbox::User=root",
        "-o",
        "Acquire::Languages=none",
    ]
    script = " && ".join(
        [
            shlex.join(["apt-get", "-q", *apt_options, "update"]),
            shlex.join(["apt-get", "-q", "-y", *apt_options, "install", *packages]),
        ]
    )
    try:
        _chroot(root, ["/bin/sh", "-c", script], step=step, binds={repo: "/mnt"})
    finally:
        shutil.rmtree(root / lists.lstrip("/"), ignore_errors=True)
        (root / "tmp/lab-build-sources.list").unlink(missing_ok=True)


def _chroot(root: Path, argv: list[str], step: str, binds: dict[Path, str] | None = None) -> str:
    """Run ``argv`` chrooted into ``root`` in new mount and PID namespaces with /proc.

    Mounts (/proc and ``binds``) live only in the new mount namespace, so they vanish
    with the command, also when it fails or is killed.
    """
    mounts = [
        shlex.join(["mount", "--bind", str(source), str(root) + guest]) for source, guest in (binds or {}).items()
    ]
    command = shlex.join(
        [
            "chroot",
            str(root),
            "/usr/bin/env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "DEBIAN_FRONTEND=noninteractive",
            "LC_ALL=C",
            "HOME=/root",
            *argv,
        ]
    )
    script = " && ".join([*mounts, "exec " + command])
    return _run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            f"--mount-proc={root}/proc",
            "/bin/sh",
            "-c",
            script,
        ],
        step=step,
    )


# --------------------------------------------------------------------------------------
# Host-side apt: package lists, dependency resolution and downloads


def _apt_config(
    apt_work: Path, name: str, lists_dir: Path, sources: list[str], status: Path | None = None, preferences: str = ""
) -> Path:
    """Write an APT_CONFIG file that ignores the host's apt configuration entirely."""
    folder = apt_work / name
    (folder / "empty").mkdir(parents=True, exist_ok=True)
    (folder / "cache/archives/partial").mkdir(parents=True, exist_ok=True)
    (folder / "sources.list").write_text("".join(line + "\n" for line in sources))
    (folder / "preferences").write_text(preferences)
    if status is None:
        status = folder / "status"
        status.write_text("")
    settings = {
        "Dir::Etc::Parts": folder / "empty",
        "Dir::Etc::Main": "/dev/null",
        "Dir::Etc::sourcelist": folder / "sources.list",
        "Dir::Etc::sourceparts": folder / "empty",
        "Dir::Etc::preferences": folder / "preferences",
        "Dir::Etc::preferencesparts": folder / "empty",
        "Dir::State::Lists": lists_dir,
        "Dir::State::status": status,
        "Dir::State::extended_states": folder / "extended_states",
        "Dir::Cache": folder / "cache",
        "APT::Architecture": ARCH,
        "APT::Sandbox::User": "root",
        "APT::Get::List-Cleanup": "false",
        "Acquire::Languages": "none",
        "Debug::NoLocking": "true",
    }
    config = folder / "apt.conf"
    config.write_text(
        "".join(f'{key} "{value}";\n' for key, value in settings.items()) + f'APT::Architectures {{ "{ARCH}"; }};\n'
    )
    return config


def _debian_source(suite: str) -> str:
    return f"deb [arch={ARCH} signed-by={DEBIAN_KEYRING}] {DEBIAN_URL} {suite} main"


def _agent_source(agent_repo: Path) -> str:
    return f"deb [trusted=yes] file:{agent_repo} ./"


def _update_host_lists(apt_work: Path, agent_repo: Path) -> Path:
    """Download the bookworm and trixie package lists into a private lists folder."""
    lists_dir = apt_work / "lists"
    (lists_dir / "partial").mkdir(parents=True, exist_ok=True)
    sources = [_debian_source(suite) for suite in SUITE_RELEASES] + [_agent_source(agent_repo)]
    config = _apt_config(apt_work, "update", lists_dir, sources)
    _run(["apt-get", "-q", "update"], env=_apt_env(config), step="apt-get update for bookworm and trixie")
    return lists_dir


def _apt_env(config: Path) -> dict[str, str]:
    return {**os.environ, "APT_CONFIG": str(config), "LC_ALL": "C"}


def _resolve_mirror_packages(
    apt_work: Path, lists_dir: Path, agent_repo: Path, images: Path
) -> dict[str, list[ResolvedPackage]]:
    """Ask apt what installing MIRROR_PACKAGES needs in each minimal image.

    bookworm: sources bookworm and trixie, trixie pinned to priority 1 except the
    packages in BOOKWORM_FROM_TRIXIE (500), against the package status of
    debian-12-hard-min. trixie: source trixie against debian-13-minimal. Each package
    is filed under the suite its version comes from.
    """
    pins = "Package: *\nPin: release n=trixie\nPin-Priority: 1\n"
    for name in BOOKWORM_FROM_TRIXIE:
        pins += f"\nPackage: {name}\nPin: release n=trixie\nPin-Priority: 500\n"
    contexts = {
        "bookworm": _apt_config(
            apt_work,
            "resolve-bookworm",
            lists_dir,
            [_debian_source("bookworm"), _debian_source("trixie"), _agent_source(agent_repo)],
            status=images / "debian-12-hard-min/var/lib/dpkg/status",
            preferences=pins,
        ),
        "trixie": _apt_config(
            apt_work,
            "resolve-trixie",
            lists_dir,
            [_debian_source("trixie"), _agent_source(agent_repo)],
            status=images / "debian-13-minimal/var/lib/dpkg/status",
        ),
    }
    by_suite: dict[str, dict[str, ResolvedPackage]] = {suite: {} for suite in SUITE_RELEASES}
    for target, config in contexts.items():
        output = _run(
            ["apt-get", "-q", "-s", "install", *MIRROR_PACKAGES],
            env=_apt_env(config),
            step=f"resolve {', '.join(MIRROR_PACKAGES)} for {target}",
        )
        for package in _parse_simulated_installs(output, target):
            if package.name in AGENT_PACKAGES:
                continue
            by_suite[package.suite][f"{package.name}={package.version}"] = package
    for name in BOOKWORM_FROM_TRIXIE:
        if not any(package.name == name for package in by_suite["trixie"].values()):
            raise BuildError(f"apt did not resolve {name} from trixie; the mirror would lack it")
    return {suite: sorted(packages.values(), key=lambda p: p.name) for suite, packages in by_suite.items()}


_INST_LINE = re.compile(r"^Inst (\S+) (?:\[[^\]]*\] )?\((\S+) (.*) \[[^\]]+\]\)")


def _parse_simulated_installs(output: str, target: str) -> list[ResolvedPackage]:
    """Parse the "Inst" lines of ``apt-get -s install`` into packages with their suite."""
    releases = {number: suite for suite, number in SUITE_RELEASES.items()}
    packages = []
    for line in output.splitlines():
        if not line.startswith("Inst "):
            continue
        match = _INST_LINE.match(line)
        if not match:
            raise BuildError(f"cannot parse apt's simulated install line: {line!r}")
        name, version, origins = match.groups()
        if name in AGENT_PACKAGES:
            packages.append(ResolvedPackage(name, version, target))
            continue
        suites = {releases[n] for n in re.findall(r"Debian:(\d+)", origins) if n in releases}
        if target in suites:
            suite = target
        elif len(suites) == 1:
            suite = suites.pop()
        else:
            raise BuildError(f"cannot tell which suite {name} {version} comes from: {line!r}")
        packages.append(ResolvedPackage(name, version, suite))
    return packages


def _download_packages(
    apt_work: Path, lists_dir: Path, agent_repo: Path, resolved: dict[str, list[ResolvedPackage]], pool: Path
) -> None:
    """Download every resolved package with ``apt-get download`` into pool/<suite>/."""
    config = _apt_config(
        apt_work,
        "download",
        lists_dir,
        [_debian_source(suite) for suite in SUITE_RELEASES] + [_agent_source(agent_repo)],
    )
    for suite, packages in resolved.items():
        folder = pool / suite
        folder.mkdir(parents=True, exist_ok=True)
        if packages:
            _run(
                ["apt-get", "-q", "download", *[f"{p.name}={p.version}" for p in packages]],
                env=_apt_env(config),
                cwd=folder,
                step=f"download the {suite} packages of the mirror",
            )
        downloaded = {deb.name.split("_")[0] for deb in folder.glob("*.deb")}
        missing = sorted({p.name for p in packages} - downloaded)
        if missing:
            raise BuildError(f"apt-get download left out {', '.join(missing)} for {suite}")


def _copy_agent_debs(agent_debs: dict[str, Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for deb in agent_debs.values():
        shutil.copyfile(deb, folder / deb.name)


def _make_flat_repo(folder: Path, debs: list[Path]) -> Path:
    """Make a flat apt repository (Packages and Release in one folder) of ``debs``."""
    folder.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        target = folder / deb.name
        if target.exists():
            continue
        if deb.stat().st_dev == folder.stat().st_dev:
            os.link(deb, target)
        else:
            shutil.copyfile(deb, target)
    packages = _run(["apt-ftparchive", "packages", "."], cwd=folder, step=f"index {folder}")
    (folder / "Packages").write_text(packages)
    release = _run(["apt-ftparchive", "release", "."], cwd=folder, step=f"index {folder}")
    (folder / "Release").write_text(release)
    return folder


# --------------------------------------------------------------------------------------
# Mirror indexes and signing


@dataclass(frozen=True)
class ArchiveKey:
    """The lab archive signing key: armored secret key and binary public keyring."""

    secret: Path
    public: Path


def _ensure_archive_key(cache: Path) -> ArchiveKey:
    """Return the lab archive key, generating it once in a throwaway GNUPGHOME."""
    keys = cache / "keys"
    key = ArchiveKey(secret=keys / "archive-secret.asc", public=keys / ARCHIVE_KEY_FILE)
    if key.secret.exists() and key.public.exists():
        return key
    keys.mkdir(parents=True, exist_ok=True)
    os.chmod(keys, 0o700)
    with _gnupg_home() as home:
        gpg = ["gpg", "--batch", "--homedir", str(home), "--pinentry-mode", "loopback", "--passphrase", ""]
        _run(
            [*gpg, "--quick-generate-key", ARCHIVE_KEY_UID, "ed25519", "sign", "never"],
            step="generate the lab archive key",
        )
        secret = _run([*gpg, "--armor", "--export-secret-keys"], step="export the lab archive key", secret_output=True)
        public = _run_bytes([*gpg, "--export"], step="export the lab archive public key")
    _write_atomically(key.secret, secret.encode(), mode=0o600)
    _write_atomically(key.public, public, mode=0o644)
    return key


@contextlib.contextmanager
def _gnupg_home() -> Iterator[Path]:
    """Yield a temporary GNUPGHOME and stop the gpg-agent started for it afterwards."""
    with tempfile.TemporaryDirectory(prefix="sysdns-gnupg-") as home:
        os.chmod(home, 0o700)
        try:
            yield Path(home)
        finally:
            subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], check=False, capture_output=True)


def _write_suite_indexes(archive: Path, suite: str, lists_dir: Path, key: ArchiveKey) -> None:
    """Write Packages, Release, InRelease and Release.gpg of ``suite`` under ``archive``.

    Origin, Label, Suite, Version and Codename are copied from the Debian Release file
    that apt downloaded, so apt pins written for the real archive match the mirror.
    """
    index_dir = archive / "dists" / suite / "main" / f"binary-{ARCH}"
    index_dir.mkdir(parents=True, exist_ok=True)
    packages = ""
    for pool_dir in (archive / "pool" / suite, archive / "pool" / "lab"):
        packages += _run(
            ["apt-ftparchive", "packages", str(pool_dir.relative_to(archive))],
            cwd=archive,
            step=f"index the {suite} pool",
        )
    (index_dir / "Packages").write_text(packages)
    with gzip.open(index_dir / "Packages.gz", "wt", compresslevel=9) as stream:
        stream.write(packages)
    with lzma.open(index_dir / "Packages.xz", "wt") as stream:
        stream.write(packages)

    fields = _debian_release_fields(lists_dir, suite)
    options = []
    for field in ("Origin", "Label", "Suite", "Version", "Codename"):
        options += ["-o", f"APT::FTPArchive::Release::{field}={fields[field]}"]
    options += [
        "-o",
        f"APT::FTPArchive::Release::Architectures={ARCH}",
        "-o",
        "APT::FTPArchive::Release::Components=main",
        "-o",
        f"APT::FTPArchive::Release::Description=sysdns offline lab mirror of {suite} (subset)",
    ]
    release = _run(
        ["apt-ftparchive", *options, "release", f"dists/{suite}"], cwd=archive, step=f"write the {suite} Release file"
    )
    dist = archive / "dists" / suite
    (dist / "Release").write_text(release)

    with _gnupg_home() as home:
        gpg = ["gpg", "--batch", "--homedir", str(home), "--pinentry-mode", "loopback", "--passphrase", ""]
        _run([*gpg, "--import", str(key.secret)], step="import the lab archive key")
        _run(
            [
                *gpg,
                "--yes",
                "--digest-algo",
                "SHA512",
                "--clearsign",
                "-o",
                str(dist / "InRelease"),
                str(dist / "Release"),
            ],
            step=f"sign the {suite} InRelease file",
        )
        _run(
            [
                *gpg,
                "--yes",
                "--digest-algo",
                "SHA512",
                "--armor",
                "--detach-sign",
                "-o",
                str(dist / "Release.gpg"),
                str(dist / "Release"),
            ],
            step=f"sign the {suite} Release file",
        )


def _debian_release_fields(lists_dir: Path, suite: str) -> dict[str, str]:
    """Read the header fields of the real ``suite`` InRelease from apt's lists folder."""
    candidates = list(lists_dir.glob(f"*_dists_{suite}_InRelease"))
    if not candidates:
        raise BuildError(f"no InRelease file for {suite} in {lists_dir}: did apt-get update fail?")
    fields: dict[str, str] = {}
    for line in candidates[0].read_text(errors="replace").splitlines():
        match = re.match(r"^(Origin|Label|Suite|Version|Codename): (.+)$", line)
        if match:
            fields.setdefault(match.group(1), match.group(2).strip())
    missing = {"Origin", "Label", "Suite", "Version", "Codename"} - fields.keys()
    if missing:
        raise BuildError(f"{candidates[0]} is missing the fields {', '.join(sorted(missing))}")
    return fields


def _extract_dnscrypt_proxy(trixie_pool: Path, tools: Path) -> Path:
    """Unpack the dnscrypt-proxy binary from the trixie .deb into ``tools``."""
    debs = sorted(trixie_pool.glob("dnscrypt-proxy_*.deb"))
    if not debs:
        raise BuildError(f"no dnscrypt-proxy .deb in {trixie_pool}")
    tools.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sysdns-dnscrypt-") as unpacked:
        _run(["dpkg-deb", "-x", str(debs[-1]), unpacked], step="unpack dnscrypt-proxy")
        binary = tools / "dnscrypt-proxy"
        shutil.copyfile(Path(unpacked) / "usr/sbin/dnscrypt-proxy", binary)
        binary.chmod(0o755)
    return binary


# --------------------------------------------------------------------------------------
# Cache bookkeeping


def _build_complete(build: Path) -> bool:
    return (build / "build.json").exists()


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another lab build in %s to finish", cache)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _point_cache_links(cache: Path, build: Path) -> None:
    """Point cache/images and cache/mirror at ``build`` (each replaced atomically)."""
    for name in ("images", "mirror"):
        link = cache / name
        target = os.path.relpath(build / name, cache)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.exists() and not link.is_symlink():
            raise BuildError(f"{link} is a real folder; remove it so that it can become a link to {build / name}")
        temporary = cache / f".{name}.tmp-{os.getpid()}"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(target)
        os.replace(temporary, link)


def _remove_stale_temporaries(builds: Path) -> None:
    for stale in builds.glob(".tmp-*"):
        log.info("removing %s, left behind by an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _remove_old_builds(builds: Path, keep: Path) -> None:
    """Delete builds other than ``keep`` and the newest older one, unless still mounted.

    The newest older build stays because a lab run started before this build may
    have its images mounted as overlay lower layers. Such a mount may show only the
    path of the cache/images link, which does not name the build.
    """
    mounted = _mounted_paths_text()
    older = sorted(
        (build for build in builds.iterdir() if build.is_dir() and build != keep and not build.name.startswith(".")),
        key=lambda build: build.stat().st_mtime,
        reverse=True,
    )
    for old in older[1:]:
        if str(old) in mounted:
            log.warning("keeping old lab build %s: it is still mounted (a lab run uses it)", old)
            continue
        log.info("removing old lab build %s", old)
        shutil.rmtree(old, ignore_errors=True)


def _mounted_paths_text() -> str:
    """Concatenate the mount tables of all processes (every mount namespace)."""
    texts = []
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        with contextlib.suppress(OSError):
            texts.append(mountinfo.read_text())
    return "\n".join(texts)


# --------------------------------------------------------------------------------------
# Small helpers


def _run(
    argv: list[str],
    step: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    log_file: Path | None = None,
    secret_output: bool = False,
) -> str:
    """Run a command; return its stdout or raise BuildError naming ``step``.

    With ``secret_output`` the command's stdout stays out of the build log.
    """
    return _run_bytes(argv, step, env=env, cwd=cwd, log_file=log_file, secret_output=secret_output).decode(
        errors="replace"
    )


def _run_bytes(
    argv: list[str],
    step: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    log_file: Path | None = None,
    secret_output: bool = False,
) -> bytes:
    log.debug("running %s", shlex.join(argv))
    result = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True)
    if log_file is not None:
        log_file.write_bytes(result.stdout + result.stderr)
    build_log = _build_log
    if build_log is not None:
        with _build_log_lock, open(build_log, "ab") as stream:
            stream.write(f"$ {shlex.join(argv)}  (step: {step}, status {result.returncode})\n".encode())
            stream.write(_loggable_output(result.stdout, secret_output) + result.stderr)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace").strip().splitlines()
        tail = "\n".join(output[-25:])
        raise BuildError(f"failed to {step}: {shlex.join(argv)} exited with status {result.returncode}:\n{tail}")
    return result.stdout


def _loggable_output(stdout: bytes, secret: bool) -> bytes:
    """Return stdout for the build log; long, binary or secret output is summarized."""
    if secret:
        return f"({len(stdout)} bytes of secret output left out)\n".encode()
    if len(stdout) > 20000:
        return f"({len(stdout)} bytes of output left out)\n".encode()
    try:
        stdout.decode()
    except UnicodeDecodeError:
        return f"({len(stdout)} bytes of binary output left out)\n".encode()
    return stdout


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.monotonic()
    log.info("%s ...", name)
    yield
    timings[name] = round(time.monotonic() - started, 1)
    log.info("%s done in %.1f s", name, timings[name])


def _copy_tree(source: Path, target: Path) -> None:
    _run(["cp", "-a", "--reflink=auto", str(source), str(target)], step=f"copy {source} to {target}")


def _stage_tree(source: Path, target: Path) -> None:
    """Copy a package tree, giving folders and executables 0755 and other files 0644."""
    target.mkdir(mode=0o755)
    os.chmod(target, 0o755)
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_symlink():
            destination.symlink_to(os.readlink(path))
        elif path.is_dir():
            destination.mkdir()
            os.chmod(destination, 0o755)
        else:
            shutil.copyfile(path, destination)
            os.chmod(destination, 0o755 if path.stat().st_mode & 0o111 else 0o644)


def _read_control(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z-]+): (.*)$", line)
        if match:
            fields[match.group(1)] = match.group(2)
    return fields


def _tree_size(path: Path) -> int:
    """Return the disk usage of ``path`` in bytes (du, counting hard links once)."""
    output = _run(["du", "-sb", str(path)], step=f"measure {path}")
    return int(output.split()[0])


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_bytes(data)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def _path_in_root(root: Path, relative: str) -> Path:
    """Return root/relative after checking that no existing part of it is a symlink.

    A symlink inside a root filesystem points into the host when followed from
    outside, so writing through one could change the host's files.
    """
    path = root
    for part in Path(relative).parts:
        path = path / part
        if path.is_symlink():
            raise ValueError(f"{path} is a symlink; refusing to write through it from outside the root")
    return path


def _write_in_root(root: Path, relative: str, text: str) -> None:
    path = _path_in_root(root, relative)
    _path_in_root(root, str(Path(relative).parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, 0o644)


# --------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.lab.images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command run")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the images and the mirror unless cached; print a JSON summary")
    build.add_argument(
        "--force", action="store_true", help="rebuild even when the cache is current (debootstrap roots stay cached)"
    )
    commands.add_parser("info", help="print the JSON summary of the current build, or {} when there is none")
    arguments = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )

    if arguments.command == "info":
        print(json.dumps(build_info(arguments.cache), indent=2))
        return 0

    if arguments.force:
        stale = arguments.cache / "builds" / build_key()
        if stale.exists():
            with _cache_lock(arguments.cache):
                shutil.rmtree(stale)
    started = time.monotonic()
    try:
        images = ensure_images(arguments.cache)
        mirror = ensure_mirror(arguments.cache)
    except BuildError as error:
        log.error("%s", error)
        return 1
    summary = {
        "images": {name: str(path) for name, path in images.items()},
        "mirror": str(mirror),
        "seconds": round(time.monotonic() - started, 2),
        "build": build_info(arguments.cache),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
