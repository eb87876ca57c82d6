"""pillar.example documents exactly the keys the validator accepts, and validates."""

import pathlib

import yaml

from tests.unit.config.helpers import config

EXAMPLE = pathlib.Path(__file__).resolve().parents[3] / "pillar.example"
# Lists that are empty by default and hold example entries in pillar.example.
EXAMPLE_LISTS = {
    ("dnscrypt", "relays"),
    ("dnscrypt", "forwarding_rules"),
    ("dnscrypt", "cloaking_rules"),
    ("dnscrypt", "blocked_names"),
    ("dnscrypt", "allowed_names"),
    ("dnscrypt", "anonymized_routes"),
    ("dnscrypt", "sources"),
}


def _key_paths(value, prefix=()):
    paths = set()
    if isinstance(value, dict):
        for key, item in value.items():
            paths.add(prefix + (key,))
            paths |= _key_paths(item, prefix + (key,))
    elif isinstance(value, list):
        for item in value:
            paths |= _key_paths(item, prefix + ("*",))
    return paths


def _example():
    return yaml.safe_load(EXAMPLE.read_text())["sysdns"]


def test_example_has_every_key():
    documented = {":".join(path) for path in _key_paths(_example())}

    assert documented == set(config.pillar_keys())


def test_example_validates():
    cfg = config.validate(_example())

    assert cfg["dnscrypt"]["forwarding_rules"][0]["zone"] == "corp.example"


def test_example_values_are_defaults():
    example = config.validate(_example())
    defaults = config.validate({})

    for section in ("template", "qube", "rewire", "tests"):
        assert example[section] == defaults[section], section
    for key, value in defaults["dnscrypt"].items():
        if ("dnscrypt", key) not in EXAMPLE_LISTS:
            assert example["dnscrypt"][key] == value, key


def _indent(line):
    return len(line) - len(line.lstrip(" "))


def test_example_keys_commented():
    # A key needs a comment above it, either its own or one shared by the keys
    # right above it in the same block (no blank line or parent key between).
    lines = EXAMPLE.read_text().splitlines()
    uncommented = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped or stripped.startswith("- "):
            continue
        if stripped.split(":", 1)[0] in (
            "sysdns",
            "name",
            "stamp",
            "zone",
            "servers",
            "address",
            "server_name",
            "via",
            "urls",
        ):
            continue
        above = index - 1
        while above >= 0 and lines[above].strip() and not lines[above].strip().startswith("#"):
            if _indent(lines[above]) < _indent(line):
                break
            above -= 1
        if above < 0 or not lines[above].strip().startswith("#"):
            uncommented.append(f"{index + 1}: {stripped}")

    assert not uncommented, "\n".join(uncommented)
