"""docs/pillar.md documents exactly the keys the validator accepts, with their defaults."""

import re

import yaml

from tests.unit.config.helpers import REPO, config

PILLAR_DOC = REPO / "docs" / "pillar.md"
# A table row whose first cell is a key path in backticks, such as
# | `dnscrypt:cache:size` | integer (entries) | `4096` | ...
_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|")
# A default cell that contains exactly one value in backticks.
_SINGLE_VALUE = re.compile(r"`([^`]*)`")


def _rows():
    """Return {key path: cells} for every key row of the reference tables."""
    rows = {}
    for line in PILLAR_DOC.read_text().splitlines():
        match = _ROW.match(line)
        if match:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[match.group(1)] = cells
    return rows


def _value_at(cfg, path):
    value = cfg
    for key in path.split(":"):
        value = value[key]
    return value


def test_doc_lists_no_unknown_key():
    unknown = sorted(set(_rows()) - set(config.pillar_keys()))

    assert unknown == [], f"documented in {PILLAR_DOC.name} but rejected by validate()"


def test_doc_lists_every_key():
    missing = sorted(set(config.pillar_keys()) - set(_rows()))

    assert missing == [], f"accepted by validate() but missing from {PILLAR_DOC.name}"


def test_doc_defaults_match_validator():
    defaults = config.validate({})
    checked = 0

    for path, cells in sorted(_rows().items()):
        if "*" in path:
            continue
        match = _SINGLE_VALUE.fullmatch(cells[2])
        if not match:
            continue
        documented = yaml.safe_load(match.group(1))
        assert documented == _value_at(defaults, path), path
        checked += 1

    # Most scalar keys write their default as one value: a broken parser would check none.
    assert checked >= 40
