"""The machine, the load and the software versions a benchmark report names."""

import os
import platform
import re
import subprocess
import sys

from tests.lab import layout as layout_module


def _output(argv):
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({error})"
    return (result.stdout + result.stderr).strip()


def _first_match(pattern, text):
    match = re.search(pattern, text, re.M)
    if match:
        return match.group(1)
    if text:
        return text.splitlines()[0]
    return "unknown"


def machine():
    """Return CPU model, core count, memory, kernel and OS of the host."""
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="utf-8") as meminfo:
        memory_kib = int(meminfo.readline().split()[1])
    os_name = "unknown"
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release", encoding="utf-8") as release:
            os_name = _first_match(r'^PRETTY_NAME="?([^"\n]*)', release.read())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": os_name,
    }


def load():
    """Return the 1, 5 and 15 minute load averages and the number of lab runs on the host."""
    with open("/proc/loadavg", encoding="utf-8") as loadavg:
        averages = [float(value) for value in loadavg.read().split()[:3]]
    runs = 0
    if layout_module.RUN_ROOT.exists():
        runs = sum(1 for path in layout_module.RUN_ROOT.iterdir() if (path / "store.json").exists())
    return {"loadavg": averages, "lab_runs": runs}


def host_versions():
    """Return the versions of the host tools the benchmark drives."""
    salt_call = layout_module.REPO_DIR / ".venv" / "bin" / "salt-call"
    return {
        "python": sys.version.split()[0],
        "salt": _first_match(r"salt-call (\S+)", _output([str(salt_call), "--version"])),
        "dnsperf": _first_match(r"^Version (\S+)", _output(["dnsperf", "-h"])),
        "unbound": _first_match(r"^Version (\S+)", _output(["unbound", "-V"])),
        "dnsdist": _first_match(r"^dnsdist (\S+)", _output(["dnsdist", "--version"])),
    }


def lab_versions(lab):
    """Return the versions of dnscrypt-proxy and nftables inside the lab's sys-dns."""
    proxy = lab.exec("sys-dns", "dnscrypt-proxy -version").stdout.strip()
    nft = lab.exec("sys-dns", "nft --version").stdout.strip()
    return {
        "dnscrypt-proxy": proxy or "unknown",
        "nftables (sys-dns)": _first_match(r"nftables (v\S+)", nft),
    }
