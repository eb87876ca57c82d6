"""Control the offline Qubes lab: python3 -m tests.lab up|status|shell|down."""

import argparse
import json
import os
import sys

from .lab import (
    DEFAULT_RUNNING,
    Lab,
    cleanup_prefix,
    configure_logging,
    install_signal_handlers,
    list_runs,
)


def command_up(args):
    install_signal_handlers()
    lab = Lab.up(
        prefix=args.prefix,
        disposable_firewall=args.disposable_firewall,
        running=() if args.no_start else DEFAULT_RUNNING,
    )
    timings = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in lab.timings.items())
    print(f"lab {lab.prefix} is up ({timings})")
    print(f"run dir: {lab.run_dir}")
    print(f"dom0 tools: export QUBES_LAB_RUN={lab.run_dir} PATH={lab.bin_dir}:$PATH")
    return 0


def command_status(args):
    if args.prefix is None and not list_runs():
        print("no lab run under /run/sysdns-lab")
        return 0
    lab = Lab.attach(args.prefix)
    status = lab.status()
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    print(f"lab {status['prefix']}: {status['run_dir']}")
    width = max(len(name) for name in status["qubes"])
    for name, qube in sorted(status["qubes"].items()):
        print(
            f"  {name:{width}s}  {qube['class']:12s} {qube['state']:9s} "
            f"netvm={qube['netvm'] or '-':14s} ip={qube['ip'] or '-'}"
        )
    return 0


def command_shell(args):
    lab = Lab.attach(args.prefix)
    app = lab.store()
    argv = lab.runtime.container_argv(lab.runtime.init_pid(app, args.qube), ["/bin/bash", "-l"], user=args.user)
    os.execvp(argv[0], argv)
    return 1


def command_down(args):
    prefixes = list_runs() if args.all else [args.prefix or _single_run()]
    for prefix in prefixes:
        lab = Lab.attach(prefix) if prefix in list_runs() else None
        if lab is not None:
            lab.down()
            print(f"lab {prefix} is down ({lab.timings['down']:.1f} s)")
        else:
            cleanup_prefix(prefix)
            print(f"leftovers of lab {prefix} removed")
    return 0


def _single_run():
    runs = list_runs()
    if len(runs) != 1:
        raise SystemExit(
            "pass --prefix: " + ("no lab run found" if not runs else f"several lab runs exist: {', '.join(runs)}")
        )
    return runs[0]


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.lab", description="offline Qubes lab of qubes-sysdns-formula"
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create a lab run and boot the default qubes")
    up.add_argument("--prefix", help="run prefix (default: a random 'sl' + 4 hex digits)")
    up.add_argument(
        "--disposable-firewall", action="store_true", help="make sys-firewall a named disposable of default-dvm"
    )
    up.add_argument("--no-start", action="store_true", help="create the estate, boot nothing")
    status = sub.add_parser("status", help="show the qubes of a run")
    status.add_argument("--prefix")
    status.add_argument("--json", action="store_true")
    shell = sub.add_parser("shell", help="open a shell in a running qube")
    shell.add_argument("qube")
    shell.add_argument("--prefix")
    shell.add_argument("--user", default="root")
    down = sub.add_parser("down", help="remove a run and all its leftovers")
    group = down.add_mutually_exclusive_group()
    group.add_argument("--prefix")
    group.add_argument("--all", action="store_true", help="remove every lab run")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    commands = {"up": command_up, "status": command_status, "shell": command_shell, "down": command_down}
    try:
        return commands[args.command](args)
    except (LookupError, RuntimeError, ValueError) as error:
        print(f"python3 -m tests.lab {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the lab run was torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
