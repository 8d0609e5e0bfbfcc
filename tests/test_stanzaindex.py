"""The stanza scan of a Packages text: what it finds of each stanza is what a full parse gives,
and a stanza is decoded with all the checks of the full parser."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from reprobuild.debian.control import iter_stanzas
from reprobuild.debian.package import BinaryPackage
from reprobuild.debian.stanzaindex import (
    StanzaScanner,
    decode_stanza,
    normalize_text,
    scan_stanzas,
    trailing_space,
)
from reprobuild.errors import RepositoryError

DATA = Path(__file__).parent / "data"

# The deb822 corners iter_stanzas accepts: CRLF, blank-only lines and runs of empty lines between
# stanzas, comment lines, Package not first, continuation lines in a
# scanned field, tabs, trailing spaces, case in Essential/Priority values, no Architecture.
ODD = (
    "# a comment before everything\r\n"
    "Version: 2\r\nPackage: late-name\r\nArchitecture: amd64 \r\nProvides: a,\r\n b (= 1),\r\n\tc\r\n"
    "Filename: pool/l.deb\r\nSize: 3\r\n"
    " \t \r\n\r\n\r\n"
    "Package: ess\r\nVersion: 1\r\nEssential: YES\r\nPriority: Required\r\n# inside\r\nSize: 1\r\n"
    "\r\n"
    "Package: indep\r\nVersion: 1:0.1\r\nDescription: x\r\n .\r\n more\r\n"
    "\r\n"
    "Package: foreign\r\nVersion: 1\r\nArchitecture: arm64\r\n"
)


@pytest.mark.parametrize("text", [(DATA / "resolve_scenario.Packages").read_text(), ODD], ids=["scenario", "odd"])
def test_scan_finds_what_a_full_parse_finds(text: str) -> None:
    expected = [BinaryPackage.from_stanza(s, "o") for s in iter_stanzas(text)]
    normalized = normalize_text(text.encode())
    heads = scan_stanzas(normalized)
    assert [(h.name, h.architecture, h.essential, h.required, h.provides) for h in heads] == [
        (p.name, p.architecture, p.essential, p.priority == "required", p.provides) for p in expected
    ]
    assert [decode_stanza(normalized, h, "o") for h in heads] == expected
    assert [decode_stanza(normalized, (h.start, h.end), "o") for h in heads] == expected


def test_scan_and_decode_read_an_mmap(tmp_path: Path) -> None:
    """The cached texts are mmap'd: no bytes methods but find and slicing."""
    path = tmp_path / "text"
    path.write_bytes(b"Package: a\nVersion: 1\n\nPackage: b\nVersion: 2 \n")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as text:
        heads = scan_stanzas(text)
        assert [decode_stanza(text, h, "o").version for h in heads] == ["1", "2"]


@pytest.mark.parametrize(
    "text, message",
    [
        (b"Package: a\nVersion: 1\n\nVersion: 2\nSize: 1\n", "stanza without Package at byte 23"),
        (b"Package: a\nPackage: b\nVersion: 1\n", "field 'Package' repeated"),
        (b"Package: a\nArchitecture: amd64\nArchitecture: all\n", "field 'Architecture' repeated"),
        (b"Package: \xff\nVersion: 1\n", "not UTF-8"),
        (b"Package: a\nVersion: 1\n\n not a field\n", "stanza at byte 23: deb822: line 1: continuation"),
    ],
    ids=["no-package", "two-names", "two-architectures", "not-utf8", "stray-continuation"],
)
def test_scan_refuses_what_no_stanza_can_be(text: bytes, message: str) -> None:
    with pytest.raises(RepositoryError, match=message):
        scan_stanzas(text, "test index")


@pytest.mark.parametrize(
    "text, message",
    [
        (b"Package: a\nVersion: 1\nnot a field\n", "not a 'Field: value' line"),
        (b"Package: a\nSize: 1\n", "without Package/Version"),
        (b"Package: a\nVersion: 1\nSize: many\n", "bad stanza for 'a'"),
        (b"Package: a\nVersion: 1\nDepends: \xfe\n", "not UTF-8"),
    ],
    ids=["no-colon", "no-version", "bad-size", "not-utf8"],
)
def test_decoding_checks_the_whole_stanza(text: bytes, message: str) -> None:
    (head,) = scan_stanzas(text)  # the scan reads five fields only: the rest is checked here
    with pytest.raises(RepositoryError, match=message):
        decode_stanza(text, head, "o", "test index")


@pytest.mark.parametrize("text", [(DATA / "resolve_scenario.Packages").read_bytes(), ODD.encode()], ids=["scenario", "odd"])
def test_scan_in_steps_equals_one_scan(text: bytes) -> None:
    """The steps a download allows (each ending just after an empty line) give one scan's result."""
    text = normalize_text(text)
    whole = scan_stanzas(text)
    cuts = [i + 2 for i in range(len(text) - 1) if text[i : i + 2] == b"\n\n"]
    assert len(cuts) > 3
    for step in (1, 2, 3):
        scanner = StanzaScanner(trailing_space=trailing_space(text))  # the caller checks it in the end
        for end in cuts[::step]:
            scanner.scan(text, end)
        scanner.scan(text, len(text))
        assert scanner.finish(text) == whole


def _blank_at(where: str) -> bytes:
    """Four stanzas with values that end in a form feed (stripped only when some line of the
    text ends in a blank) and one line ending in a blank at ``where``."""
    stanzas = [f"Package: p{i}\x0c\nVersion: 1\nEssential: yes\x0c\nProvides: v{i}\x0c\nSize: 1\n" for i in range(4)]
    if where == "first":
        stanzas[0] = stanzas[0].replace("Size: 1\n", "Size: 1 \n")
    elif where == "third":
        stanzas[2] = stanzas[2].replace("Version: 1\n", "Version: 1\t\n")
    text = "\n".join(stanzas)
    if where == "last byte":
        text = text.rstrip("\n") + " "
    return text.encode()


@pytest.mark.parametrize("where", ["nowhere", "first", "third", "last byte"])
def test_scan_in_steps_finds_out_about_trailing_blanks(where: str) -> None:
    """With trailing_space=None the scanner finds a line ending in a blank wherever it is (and
    scans again what it had scanned): the steps give one scan's result, or — for a blank only as
    the text's last byte — say that they do not."""
    text = _blank_at(where)
    whole = scan_stanzas(text)
    assert all(h.essential for h in whole) == (where != "nowhere")  # "yes\f" is "yes" only when stripped
    cuts = [i + 2 for i in range(len(text) - 1) if text[i : i + 2] == b"\n\n"]
    for step in (1, 2):
        scanner = StanzaScanner(trailing_space=None)
        for end in cuts[::step]:
            scanner.scan(text, end)
        scanner.scan(text, len(text))
        assert scanner.complete(text) == (where != "last byte")
        if scanner.complete(text):
            assert scanner.finish(text) == whole
