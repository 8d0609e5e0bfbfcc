"""Progress reporting for long stages (fetch, unpack, image writing), kept out of the library.

Library functions accept an optional :class:`Progress` and call it; they never print. The CLI
picks an implementation with :func:`make_progress`: a rich bar (bytes, rate, count) on a
terminal, one plain line per finished item otherwise, nothing with ``--quiet``.

Every implementation is safe to call from several threads at once.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable
from typing import Protocol, TextIO, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    """What a stage reports. Calls come in the order start, (advance | item_done | note)*, finish."""

    def start(self, description: str, total_items: int, total_bytes: int) -> None:
        """A stage begins: it will handle ``total_items`` items worth ``total_bytes`` bytes."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more bytes were transferred (negative: bytes of a failed attempt taken back)."""

    def item_done(self, name: str, status: str, nbytes: int = 0) -> None:
        """An item finished; ``status`` is a short word such as fetched, present or failed."""

    def note(self, text: str) -> None:
        """A message worth showing now (a retry, a fallback to another URL)."""

    def finish(self) -> None:
        """The stage is over (also called after a failure)."""


class NullProgress:
    """Reports nothing (``--quiet``, and library calls without a reporter)."""

    def start(self, description: str, total_items: int, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def item_done(self, name: str, status: str, nbytes: int = 0) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def finish(self) -> None:
        pass


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``format_bytes(1536) == '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def set_counts(sets: Iterable[tuple[str, int]]) -> str:
    """Package counts per set, the one wording every message uses: ``image 79, tools 72``.

    Sets share packages, so their sum counts some twice: messages give the sets, never a total."""
    return ", ".join(f"{name} {count}" for name, count in sets)


class PlainProgress:
    """One line per finished item and a summary line; for logs and pipes (no terminal codes)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._description = ""
        self._total_items = 0
        self._done = 0
        self._bytes = 0
        self._t0 = 0.0

    def start(self, description: str, total_items: int, total_bytes: int) -> None:
        with self._lock:
            self._description, self._total_items, self._done, self._bytes = description, total_items, 0, 0
            self._t0 = time.monotonic()
            self._write(f"{description}: {total_items} item(s), {format_bytes(total_bytes)}")

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._bytes += nbytes

    def item_done(self, name: str, status: str, nbytes: int = 0) -> None:
        with self._lock:
            self._done += 1
            size = f" ({format_bytes(nbytes)})" if nbytes else ""
            self._write(f"[{self._done}/{self._total_items}] {status} {name}{size}")

    def note(self, text: str) -> None:
        with self._lock:
            self._write(text)

    def finish(self) -> None:
        with self._lock:
            secs = max(time.monotonic() - self._t0, 1e-9)
            self._write(f"{self._description}: {self._done}/{self._total_items} done, "
                        f"{format_bytes(self._bytes)} in {secs:.1f} s ({format_bytes(self._bytes / secs)}/s)")

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()


class RichProgress:
    """A live rich bar: description, bar, bytes done/total, rate, items done/total, ETA."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console  # lazy: rich costs ~50 ms to import
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichBar

        self._bar = RichBar(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TextColumn("{task.fields[done]}/{task.fields[items]}"),
            TimeRemainingColumn(), console=Console(file=stream), transient=False,
        )
        self._task: int | None = None
        self._lock = threading.Lock()
        self._done = 0

    def start(self, description: str, total_items: int, total_bytes: int) -> None:
        with self._lock:
            self._done = 0
            self._bar.start()
            self._task = self._bar.add_task(description, total=total_bytes, done=0, items=total_items)

    def advance(self, nbytes: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, nbytes)  # rich locks internally

    def item_done(self, name: str, status: str, nbytes: int = 0) -> None:
        with self._lock:
            self._done += 1
            if self._task is not None:
                self._bar.update(self._task, done=self._done)
            if status not in ("fetched", "present"):
                self._bar.console.print(f"{status} {name}")

    def note(self, text: str) -> None:
        self._bar.console.print(text)

    def finish(self) -> None:
        with self._lock:
            self._bar.stop()
            self._task = None


def make_progress(quiet: bool, stream: TextIO | None = None) -> Progress:
    """The reporter for a CLI command: nothing if quiet, rich on a terminal, plain lines otherwise.

    ``stream`` defaults to stderr, so stdout stays clean for ``--json`` output."""
    if quiet:
        return NullProgress()
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return RichProgress(stream)
    return PlainProgress(stream)
