import ipaddress as ip
import json

import pytest

from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.errors import MapError, RewriteError


def A(s):
    return ip.ip_address(s)


def bound(specs, locals_=(), resolve=None, env=None):
    return AddressMap.from_args(specs, env=env).bind([A(x) for x in locals_], resolve)


def new(bmap, addr):
    hit = bmap.lookup(A(addr))
    return None if hit is None else str(hit[0])


def test_single_and_prefix_rules():
    m = bound(["10.0.1.5=10.9.0.7", "10.1.0.0/16=10.2.0.0/16", "fd00::/64=fd09::/64"])
    assert new(m, "10.0.1.5") == "10.9.0.7"
    assert new(m, "10.0.1.6") is None
    assert new(m, "10.1.3.4") == "10.2.3.4"
    assert new(m, "fd00::1:2") == "fd09::1:2"


def test_prefix_to_single_address():
    m = bound(["10.1.0.0/16=10.9.0.7"])
    assert new(m, "10.1.200.1") == "10.9.0.7"


def test_ipv4_rules_map_ipv4_mapped_and_keep_it_mapped():
    m = bound(["10.0.1.5=10.9.0.7"])
    assert new(m, "::ffff:10.0.1.5") == "::ffff:a09:7"
    assert A("::ffff:a09:7").ipv4_mapped == A("10.9.0.7")


def test_special_addresses_untouched_unless_named():
    m = bound(["0.0.0.0/0=10.9.0.7", "::/0=fd09::1"])
    for a in ("127.0.0.1", "0.0.0.0", "169.254.1.1", "::1", "::", "fe80::1", "::ffff:127.0.0.1"):
        assert new(m, a) is None, a
    assert new(m, "192.168.1.1") == "10.9.0.7"
    named = bound(["127.0.0.1=10.9.0.7", "fe80::/64=fd09::/64"])
    assert new(named, "127.0.0.1") == "10.9.0.7"
    assert new(named, "fe80::5") == "fd09::5"


def test_local_shorthand_moves_image_local_addresses_per_family():
    m = bound(["local=10.9.0.7"], locals_=["10.0.1.5", "10.0.2.5", "127.0.0.1", "fd00::5"])
    assert new(m, "10.0.1.5") == "10.9.0.7"
    assert new(m, "10.0.2.5") == "10.9.0.7"
    assert new(m, "127.0.0.1") is None
    assert new(m, "fd00::5") is None  # other family
    assert new(m, "8.8.8.8") is None  # not local: a peer outside


def test_explicit_rule_wins_over_local():
    m = bound(["local=10.9.0.7", "10.0.2.5=10.9.0.8"], locals_=["10.0.1.5", "10.0.2.5"])
    assert new(m, "10.0.2.5") == "10.9.0.8"
    assert new(m, "10.0.1.5") == "10.9.0.7"


def test_env_form_of_sample_plugin():
    m = bound([], locals_=["10.0.1.5"], env={"INETSK_LOCAL_IPV4": "10.9.0.7"})
    assert new(m, "10.0.1.5") == "10.9.0.7"
    assert new(m, "::ffff:10.0.1.5") == "::ffff:a09:7"
    # an explicit local rule wins over the environment
    m = bound(["local4=10.9.0.8"], locals_=["10.0.1.5"], env={"INETSK_LOCAL_IPV4": "10.9.0.7"})
    assert new(m, "10.0.1.5") == "10.9.0.8"


def test_auto_resolves_lazily_and_once():
    calls = []

    def resolve(v):
        calls.append(v)
        return A("10.9.0.7") if v == 4 else None

    m = bound(["local=auto"], locals_=["10.0.1.5", "fd00::5"], resolve=resolve)
    assert calls == []
    assert new(m, "10.0.1.5") == "10.9.0.7"
    assert new(m, "10.0.1.5") == "10.9.0.7"
    assert calls == [4]
    with pytest.raises(RewriteError, match="no IPv6 address"):
        m.lookup(A("fd00::5"))


def test_auto_families():
    assert AddressMap.from_args(["local=auto"]).auto_families() == {4, 6}
    assert AddressMap.from_args(["fd00::1=auto", "10.0.0.1=10.0.0.2"]).auto_families() == {6}


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("10.0.0.1", "OLD=NEW"),
        ("10.0.0.1=", "empty side"),
        ("banana=10.0.0.1", "not an IPv4 or IPv6 address"),
        ("10.0.0.0/24=10.1.0.0/16", "prefix lengths differ"),
        ("10.0.0.1=fd00::1", "maps IPv4 to IPv6"),
        ("10.0.0.5/24=10.1.0.0/24", "not a valid prefix"),
        ("local4=fd00::1", "needs an IPv4 address"),
        ("local=10.0.0.0/24", "not a prefix"),
    ],
)
def test_bad_rules(spec, fragment):
    with pytest.raises(MapError) as ei:
        AddressMap.from_args([spec])
    assert fragment in str(ei.value)
    assert f"--map {spec}" in str(ei.value)


def test_overlapping_rules_rejected():
    with pytest.raises(MapError, match="overlaps --map 10.0.0.0/8=11.0.0.0/8"):
        AddressMap.from_args(["10.0.0.0/8=11.0.0.0/8", "10.1.1.1=12.0.0.1"])
    with pytest.raises(MapError, match="second local rule"):
        AddressMap.from_args(["local=10.0.0.1", "local4=10.0.0.2"])


def test_map_files(tmp_path):
    t = tmp_path / "m.toml"
    t.write_text('rules = ["10.0.0.1=10.9.0.1"]\n[map]\n"fd00::1" = "fd09::1"\nlocal4 = "auto"\n')
    j = tmp_path / "m.json"
    j.write_text(json.dumps({"map": {"10.0.0.2": "10.9.0.2"}}))
    amap = AddressMap.from_args([], [str(t), str(j)])
    m = amap.bind([], lambda v: A("10.7.7.7"))
    assert new(m, "10.0.0.1") == "10.9.0.1"
    assert new(m, "10.0.0.2") == "10.9.0.2"
    assert new(m, "fd00::1") == "fd09::1"
    assert amap.auto_families() == {4}


@pytest.mark.parametrize(
    "name, text, fragment",
    [
        ("bad.toml", "rules = [", "invalid TOML"),
        ("bad.json", "{", "invalid JSON"),
        ("keys.toml", "maps = {}", "unknown key(s) maps"),
        ("rule.toml", 'rules = ["10.0.0.1=x"]', "rules[0]"),
        ("type.json", '{"map": {"10.0.0.1": 5}}', "must be a string"),
    ],
)
def test_bad_map_files_name_the_file(tmp_path, name, text, fragment):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(MapError) as ei:
        AddressMap.from_args([], [str(f)])
    assert str(f) in str(ei.value)
    assert fragment in str(ei.value)


def test_missing_map_file(tmp_path):
    with pytest.raises(MapError, match="cannot read map file"):
        AddressMap.from_args([], [str(tmp_path / "nope.toml")])
