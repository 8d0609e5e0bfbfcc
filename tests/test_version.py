"""dpkg version ordering: golden cases, key properties, and a cross-check against dpkg itself.

tests/data/versions.txt holds ~3000 real version strings sampled deterministically from apt's
Packages lists; regenerate it with ``python tests/test_version.py --regenerate``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reprobuild.debian.version import check_relation, compare_versions, version_key
from reprobuild.errors import FormatError

VERSIONS_FILE = Path(__file__).parent / "data" / "versions.txt"
SAMPLE_SIZE = 3000

# (a, b, expected compare_versions(a, b)); every line was checked with dpkg --compare-versions.
GOLDEN = [
    ("1.0", "1.0", 0),
    ("1.0", "1.0-0", 0),  # absent revision == "0"
    ("0:1.0", "1.0", 0),
    ("1:0.1", "2.0", 1),  # epoch wins
    ("1.0", "1.0.1", -1),
    ("1.0", "1.0~rc1", 1),  # ~ sorts before the end of the string
    ("1.0~rc1", "1.0~rc1~", 1),
    ("1.0~~", "1.0~~a", -1),
    ("1.0~~a", "1.0~", -1),
    ("1.0a", "1.0+", -1),  # letters before non-letters
    ("1.0a", "1.0.", -1),
    ("1.0", "1.0a", -1),
    ("1.0+", "1.0", 1),
    ("2.30-1", "2.3-1", 1),  # numeric, not lexical
    ("1.002", "1.2", 0),  # leading zeros
    ("1a0", "1a", 0),  # trailing empty digit run is 0
    ("1.0-1", "1.0-1.1", -1),
    ("1.0-1~bpo12+1", "1.0-1", -1),
    ("1.0-1+deb12u1", "1.0-1", 1),
    ("2.36-9+deb12u4", "2.36-9+deb12u10", -1),
    ("1:2.38.1-5+deb12u3", "1:2.38.1-5+b1", 1),
    ("7.88.1-10+deb12u5", "7.88.1-10+deb12u12", -1),
    ("1.2-3-4", "1.2-3-5", -1),  # revision is after the last hyphen
    ("1.2-3-4", "1.2-3", 1),
    ("10:1", "9:99", 1),
    ("1.0~beta", "1.0~alpha", 1),
    ("1A", "1a", -1),
    ("1.0-a", "1.0-A", 1),
]


@pytest.mark.parametrize(("a", "b", "expected"), GOLDEN, ids=[f"{a} vs {b}" for a, b, _ in GOLDEN])
def test_golden(a: str, b: str, expected: int) -> None:
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


@pytest.mark.parametrize(
    ("version", "op", "target", "expected"),
    [
        ("1.0", "<<", "1.1", True),
        ("1.1", "<<", "1.1", False),
        ("1.1", "<=", "1.1", True),
        ("1.1", "=", "1.1-0", True),
        ("1.1", ">=", "1.1", True),
        ("1.1", ">>", "1.1", False),
        ("1.2", ">>", "1.1", True),
        ("1.1", "<", "1.1", True),  # obsolete '<' means '<='
        ("1.1", ">", "1.1", True),  # obsolete '>' means '>='
        ("1.0", ">", "1.1", False),
    ],
)
def test_check_relation(version: str, op: str, target: str, expected: bool) -> None:
    assert check_relation(version, op, target) is expected


def test_check_relation_rejects_unknown_operator() -> None:
    with pytest.raises(ValueError):
        check_relation("1", "!=", "2")


@pytest.mark.parametrize("bad", ["a:1.0", ":1.0", "1:", "-1", "1:-1", "1.0-"], ids=repr)
def test_invalid_versions(bad: str) -> None:
    with pytest.raises(FormatError):
        version_key(bad)


def test_sorting_with_key_matches_cmp() -> None:
    versions = _load_versions()[:400]
    by_key = sorted(versions, key=version_key)
    by_cmp = sorted(versions, key=functools.cmp_to_key(compare_versions))
    assert [version_key(v) for v in by_key] == [version_key(v) for v in by_cmp]


def _dpkg_order(c: str) -> int:
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    if c == "~":
        return -1
    return ord(c) + 256 if c else 0


def _verrevcmp(a: str, b: str) -> int:
    """A literal transcription of dpkg's verrevcmp() loop (lib/dpkg/version.c), as reference."""
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _dpkg_order(a[i]) if i < len(a) else 0
            bc = _dpkg_order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i, j = i + 1, j + 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i, j = i + 1, j + 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


_PARTS = st.text(alphabet="0129ab~.+Z", min_size=1, max_size=8).filter(lambda t: t[0].isdigit())


@settings(max_examples=800, deadline=None)
@given(
    _PARTS,
    _PARTS,
    st.sampled_from(["", "-1", "-0", "-1~x", "-a"]),
    st.sampled_from(["", "-1", "-10", "-1+b1"]),
)
def test_key_agrees_with_literal_verrevcmp(a: str, b: str, rev_a: str, rev_b: str) -> None:
    """The tuple key reproduces dpkg's character loop on adversarial strings (~, runs, zeros)."""
    expected = _verrevcmp(a, b) or _verrevcmp(rev_a[1:], rev_b[1:])
    assert compare_versions(a + rev_a, b + rev_b) == (expected > 0) - (expected < 0)


def _load_versions() -> list[str]:
    return [line for line in VERSIONS_FILE.read_text().splitlines() if line]


def _dpkg_agrees(pairs: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The pairs where dpkg does not confirm our answer; one ``sh -c`` per batch of pairs.

    For each pair we ask dpkg the single question our answer implies (lt, eq or gt), so one dpkg
    process runs per pair; the shell prints the index of every pair dpkg disagrees with.
    """
    word = {-1: "lt", 0: "eq", 1: "gt"}
    wrong: list[tuple[str, str, int]] = []
    batch_size = 500
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        script = "\n".join(
            f"dpkg --compare-versions {shlex.quote(a)} {word[r]} {shlex.quote(b)} || echo {i}"
            for i, (a, b, r) in enumerate(batch)
        )
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
        wrong.extend(batch[int(i)] for i in out.split())
    return wrong


def test_against_dpkg_on_real_versions() -> None:
    """Sort ~3000 real versions with our key, then let dpkg confirm every adjacent pair plus
    1000 random pairs: a single wrong comparison anywhere in the order fails the test."""
    versions = _load_versions()
    assert len(versions) >= SAMPLE_SIZE * 0.9
    ordered = sorted(versions, key=version_key)
    pairs = [(a, b, compare_versions(a, b)) for a, b in itertools.pairwise(ordered)]
    assert all(r <= 0 for _, _, r in pairs)
    rng = random.Random(20240611)
    for _ in range(1000):
        a, b = rng.choice(versions), rng.choice(versions)
        pairs.append((a, b, compare_versions(a, b)))
    assert _dpkg_agrees(pairs) == []


def test_dpkg_cross_check_can_fail() -> None:
    """The cross-check itself must detect a wrong answer."""
    assert _dpkg_agrees([("1.0", "1.0~rc1", -1)]) == [("1.0", "1.0~rc1", -1)]


def _regenerate() -> None:
    """Sample SAMPLE_SIZE distinct versions from the host's apt lists, ordered by sha256 (so the
    sample does not depend on list order or on the day's mirror, only on the version strings)."""
    import glob
    import re

    found: set[str] = set()
    for path in sorted(glob.glob("/var/lib/apt/lists/*_Packages*")):
        text = subprocess.run(
            ["/usr/lib/apt/apt-helper", "cat-file", path], capture_output=True, text=True, check=True
        ).stdout
        found.update(m.group(1).strip() for m in re.finditer(r"^Version:(.*)$", text, re.MULTILINE))
    sample = sorted(found, key=lambda v: hashlib.sha256(v.encode()).digest())[:SAMPLE_SIZE]
    VERSIONS_FILE.parent.mkdir(exist_ok=True)
    VERSIONS_FILE.write_text("".join(v + "\n" for v in sorted(sample)))
    print(f"wrote {len(sample)} of {len(found)} versions to {VERSIONS_FILE}")


if __name__ == "__main__" and "--regenerate" in sys.argv:
    _regenerate()
