"""Fixtures of the sysdns_config unit tests."""

import pytest

from tests.unit.config.helpers import require_dnscrypt_proxy, require_root_tool


@pytest.fixture(name="dnscrypt_proxy")
def fixture_dnscrypt_proxy():
    return require_dnscrypt_proxy()


@pytest.fixture(name="root_netns_tools")
def fixture_root_netns_tools():
    for tool in ("ip", "nft"):
        require_root_tool(tool)
