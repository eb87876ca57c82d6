"""Paths of one lab run and of the cache shared between runs."""

import os
import re
from pathlib import Path

CACHE_DIR = Path("/var/cache/sysdns-lab")
RUN_ROOT = Path("/run/sysdns-lab")
REPO_DIR = Path(__file__).resolve().parents[2]
LAB_DIR = Path(__file__).resolve().parent
TOOLS_DIR = LAB_DIR / "bin"

# Environment variable that selects the run for the emulated dom0 tools.
RUN_ENV = "QUBES_LAB_RUN"

PREFIX_PATTERN = re.compile(r"\A[a-z][a-z0-9]{1,9}\Z")

# Linux limits network interface names to 15 bytes; namespace names have no such
# limit, but keeping "<prefix>-<qube>" readable in `ip netns list` is enough.
NETNS_NAME_MAX = 64


def validate_prefix(prefix):
    """Raise ValueError unless *prefix* is a valid run prefix."""
    if not PREFIX_PATTERN.match(prefix):
        raise ValueError(
            f"invalid lab prefix {prefix!r}: use 2-10 lowercase letters and digits,"
            " starting with a letter (for example 'sl1a2b')"
        )


class RunLayout:
    """Files and directories of one lab run under /run/sysdns-lab/<prefix>."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.prefix = self.run_dir.name

    @classmethod
    def from_prefix(cls, prefix):
        validate_prefix(prefix)
        return cls(RUN_ROOT / prefix)

    @classmethod
    def from_environment(cls):
        """Return the layout named by $QUBES_LAB_RUN, or raise LookupError."""
        value = os.environ.get(RUN_ENV)
        if not value:
            raise LookupError(
                f"{RUN_ENV} is not set: run the dom0 tools from a lab run's bin/"
                " directory (python3 -m tests.lab up prints it)"
            )
        layout = cls(value)
        if not layout.store.exists():
            raise LookupError(
                f"{RUN_ENV}={value} does not hold a lab run (no store.json): start one with python3 -m tests.lab up"
            )
        return layout

    @property
    def store(self):
        return self.run_dir / "store.json"

    @property
    def store_lock(self):
        return self.run_dir / "store.lock"

    @property
    def calls_log(self):
        return self.run_dir / "calls.log"

    @property
    def pids(self):
        return self.run_dir / "pids.jsonl"

    @property
    def bin_dir(self):
        return self.run_dir / "bin"

    @property
    def salt_dir(self):
        return self.run_dir / "salt"

    @property
    def pillar_dir(self):
        return self.salt_dir / "pillar"

    @property
    def uplink_dir(self):
        return self.run_dir / "uplink"

    @property
    def images_dir(self):
        """Symbolic links to the cached images, so overlay option strings stay short."""
        return self.run_dir / "images"

    @property
    def logs_dir(self):
        return self.run_dir / "logs"

    def qube_dir(self, name):
        return self.run_dir / "qubes" / name

    def netns(self, name):
        return f"{self.prefix}-{name}"[:NETNS_NAME_MAX]

    @property
    def uplink_netns(self):
        return f"{self.prefix}-uplink"

    def environment(self, base=None):
        """Return an environment in which the emulated dom0 tools find this run."""
        env = dict(os.environ if base is None else base)
        env[RUN_ENV] = str(self.run_dir)
        env["PATH"] = f"{self.bin_dir}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        return env
