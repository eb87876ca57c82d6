"""Fixtures of the offline Qubes lab (tests/lab).

`lab` is one lab run for the whole session. `fresh_lab` is a factory for runs
that a test may damage, torn down when the test ends. Neither fixture skips: on
a host that cannot run the lab (not root, no systemd-nspawn...) they fail and
say why.
"""

import signal

import pytest

from tests.lab.lab import Lab, check_host


def _require_lab_host():
    try:
        check_host()
    except RuntimeError as error:
        pytest.fail(f"cannot build the Qubes lab: {error}", pytrace=False)


class _TeardownOnSigterm:
    """Turn SIGTERM into KeyboardInterrupt while labs exist, so their teardown runs."""

    def __init__(self):
        self.previous = None

    def __enter__(self):
        def interrupt(signum, _frame):
            raise KeyboardInterrupt(f"signal {signum}")

        self.previous = signal.signal(signal.SIGTERM, interrupt)
        return self

    def __exit__(self, *exc_info):
        signal.signal(signal.SIGTERM, self.previous)
        return False


@pytest.fixture(scope="session")
def lab():
    """A running lab (default estate, all default qubes booted) shared by the session.

    Tests that change it must restore what they changed.
    """
    _require_lab_host()
    with _TeardownOnSigterm():
        instance = Lab.up()
        try:
            yield instance
        finally:
            instance.down()


@pytest.fixture
def fresh_lab():
    """Factory: `fresh_lab(**Lab.up options)` returns a new lab run for this test only."""
    _require_lab_host()
    created = []

    def factory(**options):
        instance = Lab.up(**options)
        created.append(instance)
        return instance

    with _TeardownOnSigterm():
        try:
            yield factory
        finally:
            for instance in created:
                instance.down()
