"""Debian version ordering, exactly as dpkg implements it (deb-version(7), docs/formats.md §10).

A version is ``[epoch:]upstream[-revision]``. Epochs compare as integers (default 0), then the
upstream part, then the revision (absent revision compares like ``""``, which equals ``"0"``).
Each part is compared by alternating a non-digit run and a digit run:

* non-digit runs compare character by character, where ``~`` sorts before everything (even the end
  of the run), letters sort before non-letters, and the rest is ASCII order;
* digit runs compare numerically (an empty run is 0).

Instead of re-implementing dpkg's ``verrevcmp`` loop for every comparison, each version is turned
once into a plain Python tuple whose natural ordering is dpkg's ordering (``version_key``). Keys
are cached, so sorting hundreds of thousands of versions costs one parse per distinct string.
"""

from __future__ import annotations

import functools
import re
from typing import Final

from reprobuild.errors import FormatError

__all__ = ["RELATION_OPERATORS", "VersionKey", "check_relation", "compare_versions", "version_key"]

VersionKey = tuple[int, tuple, tuple]

# Order of one character inside a non-digit run (dpkg lib/dpkg/version.c, order()):
# '~' = -1 sorts before the end of the run (0), letters sort by ASCII, everything else after all
# letters (ASCII + 256). Digits never occur inside a non-digit run.
_END: Final = 0


def _char_order(c: str) -> int:
    if c == "~":
        return -1
    if c.isascii() and c.isalpha():
        return ord(c)
    return ord(c) + 256


_ORDER: Final[dict[str, int]] = {chr(i): _char_order(chr(i)) for i in range(128)}
_RUNS: Final = re.compile(r"([^0-9]*)([0-9]*)")
# A non-digit run is encoded as its character orders followed by _END, so that a run that is a
# prefix of another compares as dpkg pads it: with 0 (end) against the other run's next character.
# The whole part ends with the bare _END_RUN marker, which compares against the other part's next
# non-digit run exactly like an empty run does ("1.0" < "1.0.1" but "1.0" > "1.0~rc1").
_END_RUN: Final = (_END,)


@functools.lru_cache(maxsize=4096)
def _run_key(letters: str) -> tuple[int, ...]:
    """Key of one non-digit run: character orders, then _END. Few distinct runs exist ("." "-"
    "+deb" "~rc" …), so they are cached."""
    return tuple([_ORDER.get(c) or _char_order(c) for c in letters] + [_END])


def _part_key(part: str) -> tuple:
    """Key of an upstream or revision string: (run, number, run, number, …, _END_RUN)."""
    key: list = []
    for letters, digits in _RUNS.findall(part):
        if letters or digits:  # findall also yields the empty match at the end of the string
            key.append(_run_key(letters))
            key.append(int(digits) if digits else 0)
    if not key:
        # "" compares like "0": one empty run and the number 0 (dpkg's loop never runs for "",
        # and "0" only contributes an equal pair).
        key = [_END_RUN, 0]
    key.append(_END_RUN)
    return tuple(key)


@functools.lru_cache(maxsize=1 << 18)
def version_key(version: str) -> VersionKey:
    """A tuple whose natural ordering is dpkg's version ordering. Cached; O(len(version)) once.

    Raises FormatError, as dpkg does, for an epoch that is not a non-negative integer or an empty
    upstream or revision part.
    Other oddities dpkg only warns about (upstream not starting with a digit) are accepted.
    """
    epoch_text, colon, rest = version.partition(":")
    if colon:
        if not epoch_text.isdigit():
            raise FormatError(f"invalid version {version!r}: epoch {epoch_text!r} is not a number")
        epoch = int(epoch_text)
    else:
        epoch, rest = 0, version
    upstream, hyphen, revision = rest.rpartition("-")
    if not hyphen:
        upstream, revision = rest, ""
    elif not revision:
        raise FormatError(f"invalid version {version!r}: empty revision after '-'")
    if not upstream:
        raise FormatError(f"invalid version {version!r}: empty upstream version")
    return (epoch, _part_key(upstream), _part_key(revision))


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as ``dpkg --compare-versions a lt/eq/gt b`` would answer."""
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


RELATION_OPERATORS: Final = frozenset({"<<", "<=", "=", ">=", ">>", "<", ">"})


def check_relation(version: str, op: str, target: str) -> bool:
    """Whether ``version op target`` holds (the test of a ``name (op target)`` relationship).

    ``<`` and ``>`` are the obsolete spellings of ``<=`` and ``>=`` (Policy §7.1), not strict.
    """
    ka, kb = version_key(version), version_key(target)
    if op == ">=" or op == ">":
        return ka >= kb
    if op == "<<":
        return ka < kb
    if op == "=":
        return ka == kb
    if op == "<=" or op == "<":
        return ka <= kb
    if op == ">>":
        return ka > kb
    raise ValueError(f"unknown relation operator {op!r}")
