"""
Run the main job of qubes-sysdns-formula in the offline lab, as a user would in dom0:
review (state.show_sls), build (state.sls qubes.network.sys-dns) and prove
(state.sls qubes.tests.sys-dns) while an independent observer on sys-net's side of
sys-dns's link counts the port-53 packets that leave sys-dns. Exit 0 only when every
step succeeded and that count is 0.

Usage (as root, after `make images`): python -m tests.demo
"""

import sys
import time

from tests.integration.formula_lab import lab_pillar
from tests.lab.lab import Lab, check_host


def step(title):
    print("\n==> " + title, flush=True)


def run_qubesctl(lab, *args):
    print("$ sudo qubesctl " + " ".join(args), flush=True)
    started = time.monotonic()
    result = lab.qubesctl(*args)
    print(result.stdout, end="")
    if result.stderr.strip():
        print(result.stderr, end="", file=sys.stderr)
    print("(exit code {}, {:.1f} s)".format(result.returncode, time.monotonic() - started), flush=True)
    return result.returncode


def main():
    check_host()
    step("Bringing the lab up: dom0 tools, templates, sys-net, sys-firewall, clients, uplink resolvers")
    lab = Lab.up()
    try:
        print("lab run: {}".format(lab.run_dir))
        lab.write_pillar("sysdns", lab_pillar(lab))

        step("Review: state.show_sls renders the build without touching any qube")
        before = len(lab.calls())
        if run_qubesctl(lab, "state.show_sls", "qubes.network.sys-dns") != 0:
            return 1
        touched = [call["argv"] for call in lab.calls(before) if call["argv"][0] != "qubesctl"]
        print("dom0 tool calls during the review: {}".format(len(touched)))
        if touched:
            return 1

        step("Build: state.sls qubes.network.sys-dns")
        if run_qubesctl(lab, "--show-output", "state.sls", "qubes.network.sys-dns") != 0:
            return 1

        step("Prove: state.sls qubes.tests.sys-dns, observed from sys-net's side of sys-dns's link")
        with lab.observe("sys-dns") as observer:
            tests_exit = run_qubesctl(lab, "--show-output", "state.sls", "qubes.tests.sys-dns")
            observation = observer.stop()

        step("Summary")
        chain = {name: lab.qvm("qvm-prefs", name, "netvm").stdout.strip() for name in ("sys-firewall", "sys-dns")}
        print("sys-firewall netvm: {}".format(chain["sys-firewall"]))
        print("sys-dns netvm:      {}".format(chain["sys-dns"]))
        print("tests SLS:          {}".format("passed" if tests_exit == 0 else "FAILED"))
        print(
            "observer:           {} port-53 packets left sys-dns ({} packets captured on {}/{})".format(
                len(observation.dns_queries), observation.captured, observation.namespace, observation.interface
            )
        )
        for packet in observation.dns_queries[:10]:
            print("  " + packet.describe())
        if tests_exit != 0 or observation.dns_queries:
            return 1
        return 0
    finally:
        step("Tearing the lab down")
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
