"""The boot tests' way to boot: ``vm.run_until`` (or ``reprobuild vm --expect``), retried once
when the guest kernel crashed before userspace started.

Such a crash says nothing about the image under test: under TCG it is the emulator's race with
the kernel's early text patching (docs/running.md). The retry is never silent: it is reported as
a pytest warning (:class:`BootRetried`) naming the first crash, and it is named in the failure
message when the second boot fails too. Nothing else is retried: a crash after userspace started,
a timeout or a missing marker fails the test at once.
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pytest

from reprobuild.vm import FIRMWARE_GAVE_UP, GuestKernelCrashed, QemuConfig, run_until

T = TypeVar("T")

# `reprobuild vm`'s one-line error (vm.GuestKernelCrashed) when the crash came before init.
EARLY_CRASH_ERROR = re.compile(r"guest kernel (oops|panic) before userspace started \(")


class BootRetried(UserWarning):
    """A boot was retried once after a guest kernel crash before userspace."""


def retry_early_crash_once(boot: Callable[[], T], early_crash: Callable[[T], str | None]) -> tuple[T, str]:
    """``boot()``, and once more if ``early_crash(result)`` names a crash before userspace, with a
    :class:`BootRetried` warning. Returns (the last result, a note: "" or what was retried)."""
    result = boot()
    crash = early_crash(result)
    if crash is None:
        return result, ""
    note = f"boot retried once after a guest kernel crash before userspace: {crash}"
    warnings.warn(BootRetried(note), stacklevel=2)
    return boot(), note


@dataclass(frozen=True)
class Boot:
    found: bool
    console: bytes
    note: str  # "" or "boot retried once after …": put it into failure messages

    def tail(self, chars: int = 4000) -> str:
        return f"{self.note}\n{self.console[-chars:].decode(errors='replace')}".lstrip("\n")


def boot_until(config: QemuConfig, marker: bytes, timeout: float,
               stop_on: Sequence[bytes] = FIRMWARE_GAVE_UP) -> Boot:  # fmt: skip
    """``run_until(config, marker, timeout, stop_on)``, retried once after a guest kernel crash
    before userspace (the first attempt's console log is kept as ``SERIAL_LOG.first-attempt``).
    Any other guest kernel crash, or one on the retry, fails the test with its one-line error."""

    def boot() -> tuple[bool, bytes] | GuestKernelCrashed:
        try:
            return run_until(config, marker, timeout, stop_on)
        except GuestKernelCrashed as e:
            return e

    def early_crash(result: tuple[bool, bytes] | GuestKernelCrashed) -> str | None:
        if not isinstance(result, GuestKernelCrashed) or not result.crash.before_userspace:
            return None
        if config.serial_log is not None and config.serial_log.exists():
            shutil.copyfile(config.serial_log, f"{config.serial_log}.first-attempt")
        return str(result)

    result, note = retry_early_crash_once(boot, early_crash)
    if isinstance(result, GuestKernelCrashed):
        pytest.fail(Boot(False, result.console, f"{note}\n{result}".lstrip("\n")).tail())
    return Boot(*result, note)


def cli_early_crash(output: str) -> str | None:
    """The error line in ``reprobuild vm --expect``'s output when it ended on a guest kernel crash
    before userspace, else None."""
    return next((line.strip() for line in output.splitlines() if EARLY_CRASH_ERROR.search(line)), None)
