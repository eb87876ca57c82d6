"""Offline Qubes lab: emulated dom0 tools, qubes as systemd-nspawn containers in
network namespaces, an uplink with encrypted resolvers and a packet observer.

The modules that the emulated dom0 tools import (layout, procs, store, qubesdb,
runtime, dom0, qubesctl) use the standard library only, because they run under
whatever Python 3.11 the host has, outside the test virtualenv.
"""
