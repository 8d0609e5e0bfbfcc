"""deb822 stanza parsing and relationship fields."""

from __future__ import annotations

import pytest

from reprobuild.debian.control import Relation, iter_stanzas, parse_provides, parse_relations
from reprobuild.errors import FormatError

PACKAGES = """\
Package: dash
Version: 0.5.12-2
Architecture: amd64
Pre-Depends: libc6 (>= 2.34)
Description: POSIX-compliant shell
 The Debian Almquist Shell (dash) is a POSIX-compliant shell derived
 from ash.
 .
 Since it executes scripts faster than bash, it is the default.

Package: libc6
Version: 2.36-9+deb12u4
Architecture: amd64
Multi-Arch: same
"""


def test_two_stanzas_with_continuation() -> None:
    first, second = list(iter_stanzas(PACKAGES))
    assert first["Package"] == "dash"
    assert first["Pre-Depends"] == "libc6 (>= 2.34)"
    assert first["Description"] == (
        "POSIX-compliant shell\n The Debian Almquist Shell (dash) is a POSIX-compliant shell derived\n"
        " from ash.\n .\n Since it executes scripts faster than bash, it is the default."
    )
    assert second == {
        "Package": "libc6",
        "Version": "2.36-9+deb12u4",
        "Architecture": "amd64",
        "Multi-Arch": "same",
    }


def test_crlf_and_extra_blank_lines_and_whitespace_only_separators() -> None:
    text = "\r\n\r\nA: 1\r\nB:  2 \r\n  cont\r\n\r\n\r\n \t\r\nA: 3\r\n\r\n"
    assert list(iter_stanzas(text)) == [{"A": "1", "B": "2 \n  cont"}, {"A": "3"}]


def test_trailing_whitespace_stripped_and_empty_value() -> None:
    assert list(iter_stanzas("A: x  \nB:\nC: y\t\n")) == [{"A": "x", "B": "", "C": "y"}]


def test_comments_are_skipped() -> None:
    assert list(iter_stanzas("# head\nA: 1\n# mid\nB: 2\n")) == [{"A": "1", "B": "2"}]


def test_empty_document() -> None:
    assert list(iter_stanzas("")) == []
    assert list(iter_stanzas("\n\n\n")) == []


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("A: 1\nthis is not a field\n", 2),
        ("A: 1\n\nB: 2\nC 3\n", 4),
        (" leading continuation\nA: 1\n", 1),
        ("A: 1\nA: 2\n", 2),
        ("A: 1\n\nB: 2\n\nB: 3\n-x: 4\n", 6),
    ],
    ids=["no-colon", "second-stanza", "continuation-first", "duplicate-field", "dash-name"],
)
def test_garbage_raises_with_line_number(text: str, line: int) -> None:
    with pytest.raises(FormatError, match=f"line {line}:"):
        list(iter_stanzas(text))


def test_relations_and_alternatives() -> None:
    field = "libc6 (>= 2.34), debconf (>= 0.5) | debconf-2.0, perl:any, python3:native (<< 3.12)"
    assert parse_relations(field) == (
        (Relation("libc6", None, ">=", "2.34"),),
        (Relation("debconf", None, ">=", "0.5"), Relation("debconf-2.0")),
        (Relation("perl", "any"),),
        (Relation("python3", "native", "<<", "3.12"),),
    )


def test_relation_spacing_restrictions_and_obsolete_operators() -> None:
    field = "foo(<2.0) [amd64 arm64] <!nocheck> <stage1>,bar (>1:1.0)  ,\n baz [!i386],"
    assert parse_relations(field) == (
        (Relation("foo", None, "<=", "2.0"),),
        (Relation("bar", None, ">=", "1:1.0"),),
        (Relation("baz"),),
    )


def test_relation_str_round_trip() -> None:
    field = "a (>= 1) | b:any, c (= 1:2-3)"
    text = ", ".join(" | ".join(str(r) for r in group) for group in parse_relations(field))
    assert text == field
    assert parse_relations(text) == parse_relations(field)


@pytest.mark.parametrize("bad", ["foo (>= )", "foo (~= 1)", "(>= 1)", "foo bar", "foo | | bar", "-foo"])
def test_bad_relations(bad: str) -> None:
    with pytest.raises(FormatError):
        parse_relations(bad)


def test_provides() -> None:
    assert parse_provides("awk, libfoo-abi-2 (= 2.1), mail-transport-agent") == (
        Relation("awk"),
        Relation("libfoo-abi-2", None, "=", "2.1"),
        Relation("mail-transport-agent"),
    )
    with pytest.raises(FormatError):
        parse_provides("a (>= 1)")
    with pytest.raises(FormatError):
        parse_provides("a | b")


def test_host_packages_file_parses(tmp_path: object) -> None:
    """Every stanza of a real Packages file (when the host has one) parses, with its relations."""
    import glob
    import subprocess

    lists = sorted(glob.glob("/var/lib/apt/lists/*_Packages*"))
    if not lists:
        pytest.skip("the host has no apt lists (optional cross-check)")
    text = subprocess.run(
        ["/usr/lib/apt/apt-helper", "cat-file", lists[0]], capture_output=True, text=True, check=True
    ).stdout
    count = 0
    for stanza in iter_stanzas(text):
        count += 1
        assert "Package" in stanza and "Version" in stanza
        for field in ("Depends", "Pre-Depends", "Recommends", "Conflicts", "Breaks"):
            parse_relations(stanza.get(field, ""))
        parse_provides(stanza.get("Provides", ""))
    assert count == text.count("\nPackage: ") + text.startswith("Package: ")
