"""The result of one named check, shared by ``verify`` and the checks it runs from other modules
(``provenance``), and the one-line summary of a list of them.

A check is *passed*, *failed* or *skipped*. A skipped check carries a short ``reason`` for the
summary line (``--no-rebuild``, ``--allow-unsigned uki``, ``the lock is unsigned``): a skip is
either a check that does not apply to the artifact or one the user turned off by name, never a
signature that is present but could not be checked (that is a failure).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The signatures ``verify --allow-unsigned KIND`` can waive (a module-level constant here, not in
# verify.py, so that the CLI names them without importing the whole verifier at start-up).
UNSIGNED_KINDS = ("lock", "verity", "uki", "provenance")


@dataclass(frozen=True)
class Check:
    """One named check. ``passed`` is True, False, or None when the check was skipped."""

    name: str
    passed: bool | None
    detail: str
    reason: str = ""  # skipped checks: why, in a few words, for the summary line

    @property
    def status(self) -> str:
        return {True: "passed", False: "failed", None: "skipped"}[self.passed]

    def as_json(self) -> dict[str, Any]:
        data = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.passed is None:
            data["reason"] = self.reason or "not applicable"
        return data


def passed(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def failed(name: str, detail: str) -> Check:
    return Check(name, False, detail)


def skipped(name: str, detail: str, reason: str = "not applicable") -> Check:
    return Check(name, None, detail, reason)


def all_passed(checks: Sequence[Check]) -> bool:
    """No check failed and at least one passed."""
    return any(c.passed for c in checks) and all(c.passed is not False for c in checks)


def summary_line(checks: Sequence[Check]) -> str:
    """What was checked and what was not, in one line:
    ``verified: 9 checks passed; not checked: rebuild (--no-rebuild)`` or
    ``NOT verified: 1 of 10 checks failed (uki-signature); 9 passed; not checked: …``."""
    ok = [c for c in checks if c.passed]
    bad = [c for c in checks if c.passed is False]
    skip = [c for c in checks if c.passed is None]
    if all_passed(checks):
        line = f"verified: {len(ok)} check{'s' if len(ok) != 1 else ''} passed"
    elif bad:
        line = (f"NOT verified: {len(bad)} of {len(ok) + len(bad)} checks failed "
                f"({', '.join(c.name for c in bad)}); {len(ok)} passed")  # fmt: skip
    else:
        line = "NOT verified: no check passed"
    if skip:
        line += "; not checked: " + ", ".join(f"{c.name} ({c.reason or 'not applicable'})" for c in skip)
    return line
