"""Every error the library raises on purpose.

Library code raises these; only ``reprobuild.cli`` turns them into a one-line message and an
exit code. Each class carries its exit code as a class variable, click-style.
"""

from __future__ import annotations

import errno
import os
from typing import ClassVar

# Errors that mean "this file system is full" (for the user, or for everyone).
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class ReprobuildError(Exception):
    """Base class: a failure a user can understand and act on."""

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def format_message(self) -> str:
        if self.hint:
            return f"{self.message}\nhint: {self.hint}"
        return self.message


class UsageError(ReprobuildError):
    """Bad arguments or options on the command line."""

    exit_code = 2


class ConfigError(ReprobuildError):
    """The image definition is invalid; the message names file and line."""

    exit_code = 2


class RepositoryError(ReprobuildError):
    """Repository metadata could not be fetched, is unsigned, badly signed, expired or corrupt."""


class ResolutionFailed(ReprobuildError):
    """The requested package set cannot be satisfied; the message explains the conflict chain."""

    exit_code = 3


class LockError(ReprobuildError):
    """A lockfile is malformed, out of date, or its signature does not verify."""


class LockOutOfDate(LockError):
    """The lock no longer matches its image definition: a configuration error (exit code 2),
    fixed by running ``reprobuild lock``."""

    exit_code = 2


class StoreError(ReprobuildError):
    """The content-addressed store is missing objects or holds corrupt ones."""


class FetchError(ReprobuildError):
    """An object could not be downloaded and verified from any of its URLs."""


class BuildError(ReprobuildError):
    """Building the root tree or the image failed."""


class FormatError(ReprobuildError):
    """A binary format (GPT, verity, PE, cpio, .deb, file system) is malformed or hostile."""


class ToolMissing(ReprobuildError):
    """An external program the operation needs is not installed."""

    def __init__(self, tool: str, package: str | None = None, purpose: str = "") -> None:
        what = f"'{tool}' is needed{(' ' + purpose) if purpose else ''} but is not installed"
        hint = f"apt-get install {package}" if package else None
        super().__init__(what, hint)
        self.tool = tool
        self.package = package


class VerificationFailed(ReprobuildError):
    """A verification (signature, hash, rebuild) did not pass."""


def mount_point(path: str | os.PathLike[str]) -> str:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    current = os.path.abspath(os.fspath(path))
    while not os.path.lexists(current) and current != os.path.dirname(current):
        current = os.path.dirname(current)
    try:
        device = os.stat(current).st_dev
        while current != os.path.dirname(current):
            parent = os.path.dirname(current)
            if os.stat(parent).st_dev != device:
                break
            current = parent
    except OSError:
        pass
    return current


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: what failed, both paths of a link or rename, and for a full disk
    the file system (its mount point) that is full."""
    text = e.strerror or str(e) or type(e).__name__
    paths = [os.fsdecode(p) for p in (e.filename, e.filename2) if p is not None]
    if paths:
        text += ": " + " -> ".join(paths)
    if e.errno in DISK_FULL and paths:
        # For a rename or link both paths are on one file system; for a copy the second is written.
        text += f" (the file system at {mount_point(paths[-1])} is full)"
    return text.replace("\n", " ")


def disk_full_note(error: BaseException) -> str | None:
    """For an error caused (directly or down its chain) by a full disk: which file system is
    full, as a note for the one-line message; None if the chain has no such OSError with a path,
    or the message already says it."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:
            path = cause.filename2 if cause.filename2 is not None else cause.filename
            if path is None:
                return None
            note = f"the file system at {mount_point(os.fsdecode(path))} is full"
            return None if note in str(error) else note
        cause = cause.__cause__ or cause.__context__
    return None
