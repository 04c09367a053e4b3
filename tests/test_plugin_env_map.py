"""The plugin's map from CRIU's environment (a `criu restore` run by hand, docs/plugin.md row
1): a bad rule there is named as coming from $OVERLAYFS_INETSK_MAP, as a bad
$OVERLAYFS_INETSK_OPTIONS or $INETSK_LOCAL_IPV4 already was. Before, the message began
`--map 10.77.0.1=10.77.0.300: ...` (seen in criu's restore.log), naming an option nobody
gave."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlayfs_inetsk.errors import MapError
from overlayfs_inetsk.planner.sources import plugin_config


@pytest.mark.parametrize("value, says", [
    ("10.77.0.1=10.77.0.300", "10.77.0.1=10.77.0.300: new address '10.77.0.300' is not an "
                              "IPv4 or IPv6 address"),
    ("10.77.0.1=10.77.0.3, 10.77.0.1", "10.77.0.1: rule '10.77.0.1' must have the form OLD=NEW"),
])
def test_a_bad_rule_in_the_environment_is_named_as_coming_from_it(tmp_path: Path, value: str,
                                                                   says: str) -> None:
    env = {"OVERLAYFS_INETSK_MAP": value, "OVERLAYFS_INETSK_CONF_DIR": str(tmp_path / "no")}
    with pytest.raises(MapError) as e:
        plugin_config(str(tmp_path), env)
    assert str(e.value) == f"$OVERLAYFS_INETSK_MAP: {says}"


def test_a_bad_local_variable_keeps_its_own_name(tmp_path: Path) -> None:
    env = {"INETSK_LOCAL_IPV4": "banana", "OVERLAYFS_INETSK_CONF_DIR": str(tmp_path / "no")}
    with pytest.raises(MapError, match=r"^\$INETSK_LOCAL_IPV4: new address 'banana'"):
        plugin_config(str(tmp_path), env)
