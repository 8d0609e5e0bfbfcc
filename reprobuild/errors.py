"""Every error the library raises on purpose.

Library code raises these; only ``reprobuild.cli`` turns them into a one-line message and an
exit code. Each class carries its exit code as a class variable, click-style.
"""

from __future__ import annotations

from typing import ClassVar


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
