"""Emulated dom0 qubesctl: salt-call --local against the lab run.

Follows qubesctl of QubesOS/qubes-mgmt-salt v4.2.3. Without --targets/--all
(and the template/app selectors) it configures dom0 only, by running
`qubesctl --dom0-only COMMAND`, which is `salt-call --local COMMAND`. When that
fails it prints "DOM0 configuration failed, not continuing" and exits 1,
otherwise 0. --show-output only affects qubes reached through management
disposables, which the lab does not reproduce. Before the command, the lab runs
`saltutil.sync_all` so the formula's _modules and _states are loaded, as
installing a formula package in dom0 does.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from .layout import REPO_DIR, RunLayout

# The project's virtual environment, made by `make deps`, holds the Salt that the
# lab's dom0 runs.
DEFAULT_SALT_CALL = REPO_DIR / ".venv" / "bin" / "salt-call"
SALT_CALL_ENV = "SYSDNS_LAB_SALT_CALL"


def find_salt_call():
    configured = os.environ.get(SALT_CALL_ENV)
    if configured:
        return configured
    if DEFAULT_SALT_CALL.exists():
        return str(DEFAULT_SALT_CALL)
    found = shutil.which("salt-call")
    if found:
        return found
    raise FileNotFoundError(
        f"salt-call not found: set {SALT_CALL_ENV}, or run `make deps` to create {DEFAULT_SALT_CALL}"
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="qubesctl")
    parser.add_argument("--show-output", action="store_true", help="Show output of management commands")
    parser.add_argument(
        "--force-color", action="store_true", help="Force color output, allow control characters from VM, UNSAFE"
    )
    parser.add_argument("--skip-dom0", action="store_true", help="Skip dom0 configuration (VM creation etc)")
    parser.add_argument(
        "--max-concurrency", type=int, default=4, help="Maximum number of VMs configured simultaneously"
    )
    parser.add_argument("--skip-top-check", action="store_true")
    parser.add_argument("--sync-extmods", action="store_true")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--targets", help="Comma separated list of VMs to target")
    group.add_argument("--all", action="store_true", help="Target all non-disposable VMs")
    parser.add_argument("--templates", action="store_true")
    parser.add_argument("--standalones", action="store_true")
    parser.add_argument("--app", action="store_true")
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="Salt command to execute (for example: state.highstate)"
    )
    return parser.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        layout = RunLayout.from_environment()
    except LookupError as error:
        print(f"qubesctl: error: {error}", file=sys.stderr)
        return 1
    started = time.time()
    code = 1
    try:
        code = run(layout, parse_args(argv))
    except SystemExit as exit_request:
        code = exit_request.code if isinstance(exit_request.code, int) else 2
    finally:
        entry = {
            "time": round(started, 6),
            "argv": ["qubesctl"] + argv,
            "exit_code": code,
            "duration": round(time.time() - started, 6),
            "pid": os.getpid(),
        }
        with open(layout.calls_log, "a", encoding="utf-8") as calls:
            calls.write(json.dumps(entry) + "\n")
    return code


def run(layout, args):
    if args.targets or args.all or args.templates or args.standalones or args.app:
        print(
            "qubesctl: error: configuring qubes through management disposables "
            "(--targets, --all, --templates, --standalones, --app) is not reproduced "
            "in the lab; the formula runs in dom0 only",
            file=sys.stderr,
        )
        return 1
    if args.skip_dom0:
        return 0
    if not args.command:
        print("qubesctl: error: a salt command is required (for example state.sls NAME)", file=sys.stderr)
        return 2
    salt_call = find_salt_call()
    base = [salt_call, "--local", "-c", str(layout.salt_dir)]
    env = layout.environment()
    sync = subprocess.run(
        base + ["--out=quiet", "saltutil.sync_all"], env=env, capture_output=True, text=True, check=False
    )
    if sync.returncode != 0:
        sys.stderr.write(sync.stdout + sync.stderr)
        print("DOM0 configuration failed, not continuing", file=sys.stderr)
        return 1
    command = list(args.command)
    if args.force_color:
        command.insert(0, "--force-color")
    result = subprocess.run(base + command, env=env, check=False)
    if result.returncode != 0:
        print("DOM0 configuration failed, not continuing", file=sys.stderr)
        return 1
    return 0
