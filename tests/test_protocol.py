"""Names and layout: the one naming rule, exactly as docs/FACTORY-PROTOCOL.md states it."""

from __future__ import annotations

import pytest

from factory.protocol import PartName, base_of, check_base, parse_part, parse_sidecar


@pytest.mark.parametrize("name, expected", [
    ("foo.alloy.json", PartName("foo", 0)),
    ("foo.retry2.alloy.json", PartName("foo", 2)),
    ("qwen3.5-4b-code-forged.alloy.json", PartName("qwen3.5-4b-code-forged", 0)),
    ("qwen3.5-4b.retry11.alloy.json", PartName("qwen3.5-4b", 11)),
    ("foo.retry0.alloy.json", None),  # retry numbers start at 1
    ("foo.json", None),
    (".hidden.alloy.json", None),
    (".123.ab.tmp.foo.alloy.json", None),
    ("foo.alloy.json.partial", None),
])
def test_parse_part(name, expected):
    assert parse_part(name) == expected


@pytest.mark.parametrize("name, expected", [
    ("foo.error.json", ("foo", "error")),
    ("a.b.result.json", ("a.b", "result")),
    ("foo.x-dashboard.json", ("foo", "x-dashboard")),
    ("foo.alloy.json", None),
    ("foo.Error.json", None),
    ("foo", None),
])
def test_parse_sidecar(name, expected):
    assert parse_sidecar(name) == expected


def test_bundle_membership_is_unambiguous_with_dotted_bases():
    assert base_of("a.b.alloy.json") == "a.b"
    assert base_of("a.b.error.json") == "a.b"
    assert base_of("a.error.json") == "a"  # not part of "a.b"


def test_filenames_round_trip():
    for pn in (PartName("x"), PartName("x.y-z", 3)):
        assert parse_part(pn.filename) == pn
        assert parse_sidecar(pn.sidecar("ticket")) == (pn.base, "ticket")


@pytest.mark.parametrize("base, ok", [
    ("good-name_1.2", True), ("x.retry3", False), ("-dash", False), ("a b", False), ("a" * 201, False),
])
def test_check_base(base, ok):
    assert (check_base(base) is None) is ok
