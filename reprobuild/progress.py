"""Progress reporting for long stages (fetch, extraction, hashing, verification), kept out of the library.

Library functions never print. They report through one of two small interfaces:

* a message callback ``say(text: str)`` (lock, build, verify). A message that is an
  :class:`Update` (a ``str`` carrying stage, done, total and unit) is a progress update: a
  plain ``say`` prints it as the text it is, a reporter draws it as a bar instead;
* :class:`Progress` (``start``/``advance``/``item_done``/``note``/``finish``) for downloads.

A reporter (:func:`make_reporter`) implements both, plus the stage API a stage runner calls::

    reporter.stage_started("tree")                      # the name shown on the status line
    reporter.stage_progress(12, 59, "packages")         # done, total (None: unknown), unit
    reporter.stage_finished("59 packages installed")    # collapses to "tree: 59 packages installed (12.3s)"

On a terminal (:class:`RichProgress`): one live status line per running stage (spinner, name,
bar, counts or bytes and MiB/s, elapsed time), replaced by one summary line when the stage ends;
messages print above it. In a log (:class:`PlainProgress`: not a terminal, or ``CI=true``): a line
when a stage starts, at most one progress line every ``interval`` seconds, and the summary line:
a few lines per stage, never one per package. Sizes and rates are binary units (KiB, MiB/s)
everywhere. Every reporter is safe to call from several threads at once.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, Self, TextIO, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    """What a download stage reports. Calls come in the order start, (advance | item_done | note)*, finish."""

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


class Update(str):
    """A progress message: ``Update("extracting", 3, 59, "packages", "libc6")`` is the text
    ``extracting libc6 (3/59)`` for a plain ``say`` and a bar at 3/59 packages for a reporter.

    ``done == total`` with no ``item`` ends the stage (a reporter collapses it to a summary)."""

    stage: str
    done: int
    total: int | None
    unit: str
    item: str

    def __new__(cls, stage: str, done: int, total: int | None, unit: str = "", item: str = "",
                text: str | None = None) -> Self:  # fmt: skip
        if text is None:
            count = f"{done}/{total}" if total is not None else str(done)
            text = f"{stage} {item} ({count})" if item else f"{stage}: {count} {unit}".rstrip()
        self = super().__new__(cls, text)
        self.stage, self.done, self.total, self.unit, self.item = stage, done, total, unit, item
        return self

    @property
    def final(self) -> bool:
        return self.total is not None and self.done >= self.total and not self.item


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``format_bytes(1536) == '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate(nbytes: float, seconds: float) -> str:
    """``format_rate(3 << 20, 2.0) == '1.5 MiB/s'``: the one rate unit of bars and summaries."""
    return format_bytes(nbytes / max(seconds, 1e-9)) + "/s"


def set_counts(sets: Iterable[tuple[str, int]] | Mapping[str, int]) -> str:
    """Package counts per set, the one wording every message uses: ``image 79, tools 72``.

    Sets share packages, so their sum counts some twice: messages give the sets, never a total."""
    pairs = sets.items() if isinstance(sets, Mapping) else sets
    return ", ".join(f"{name} {count}" for name, count in pairs)


@dataclass
class Stage:
    """A running stage as the reporters track it."""

    name: str
    started: float
    done: int = 0
    total: int | None = None
    unit: str = ""
    item: str = ""
    nbytes: int = 0
    total_bytes: int = 0
    failed: int = 0

    def counts(self) -> str:
        """``23/59 packages`` (or ``23 packages`` with no total; empty before anything is counted)."""
        if self.total is None and not self.done:
            return ""
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        return f"{count} {self.unit}".rstrip()

    def status(self, now: float) -> str:
        """What the stage is at, in words: counts, bytes and rate when it moves bytes."""
        parts = [self.counts()] if self.counts() else []
        if self.total_bytes:
            parts.append(f"{format_bytes(self.nbytes)}/{format_bytes(self.total_bytes)}, "
                         f"{format_rate(self.nbytes, now - self.started)}")  # fmt: skip
        return ", ".join(parts)


class Reporter:
    """The stage logic shared by the renderers: stages by name, the stage API, ``say`` and the
    download :class:`Progress` methods. Renderers override the ``_show_*`` hooks (called with the
    lock held)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._stages: dict[str, Stage] = {}
        self._current: str | None = None  # the stage unnamed calls (stage_progress, advance) go to
        self._auto: set[str] = set()  # stages begun by an Update (not by stage_started/start)

    # -- the stage API ----------------------------------------------------------------------
    def stage_started(self, name: str, total: int | None = None, unit: str = "", total_bytes: int = 0) -> None:
        with self._lock:
            if name in self._stages:
                self._finish(name, "")
            stage = Stage(name, self._clock(), total=total, unit=unit, total_bytes=total_bytes)
            self._stages[name] = stage
            self._current = name
            self._show_start(stage)

    def stage_progress(self, done: int, total: int | None = None, unit: str = "", item: str = "",
                       name: str | None = None) -> None:  # fmt: skip
        with self._lock:
            key = name or self._current
            if key is None:
                return
            if key not in self._stages:
                self.stage_started(key, total, unit)
            stage = self._stages[key]
            stage.done, stage.item = done, item
            if total is not None:
                stage.total = total
            if unit:
                stage.unit = unit
            self._show_update(stage)

    def stage_finished(self, summary: str = "", name: str | None = None) -> None:
        with self._lock:
            key = name or self._current
            if key is not None and key in self._stages:
                self._finish(key, summary)

    def close(self) -> None:
        """End every running stage (a command's end; also after a failure)."""
        with self._lock:
            for name in list(self._stages):
                self._finish(name, "")

    # -- say --------------------------------------------------------------------------------
    def __call__(self, message: str) -> None:
        """``say``: an :class:`Update` moves its stage; any other text is shown as a line."""
        with self._lock:
            if isinstance(message, Update):
                for other in [n for n in self._auto if n != message.stage and n in self._stages]:
                    self._finish(other, "")  # a new stage's update ends the previous such stage
                self._auto.add(message.stage)
                self.stage_progress(message.done, message.total, message.unit, message.item, name=message.stage)
                self._current = message.stage
                if message.final:
                    self._finish(message.stage, "")
            else:
                self._show_message(str(message))

    # -- the download Progress protocol -----------------------------------------------------
    def start(self, description: str, total_items: int, total_bytes: int) -> None:
        self.stage_started(description, total_items, "packages", total_bytes)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            if self._current in self._stages:
                stage = self._stages[self._current]
                stage.nbytes += nbytes
                self._show_update(stage)

    def item_done(self, name: str, status: str, nbytes: int = 0) -> None:
        with self._lock:
            if self._current not in self._stages:
                return
            stage = self._stages[self._current]
            stage.done += 1
            stage.item = name
            if status not in ("fetched", "present"):
                stage.failed += 1
                self._show_message(f"{status} {name}")
            self._show_update(stage)

    def note(self, text: str) -> None:
        with self._lock:
            self._show_message(text)

    def finish(self) -> None:
        self.stage_finished()

    # -- internals --------------------------------------------------------------------------
    def _finish(self, name: str, summary: str) -> None:
        stage = self._stages.pop(name)
        self._auto.discard(name)
        if self._current == name:
            self._current = next(reversed(self._stages), None)
        elapsed = self._clock() - stage.started
        if not summary:
            summary = stage.counts() or "done"
            if stage.total_bytes or stage.nbytes:
                summary += f", {format_bytes(stage.nbytes)}, {format_rate(stage.nbytes, elapsed)}"
            if stage.failed:
                summary += f", {stage.failed} failed"
        self._show_finish(stage, f"{name}: {summary} ({elapsed:.1f}s)")

    def _show_start(self, stage: Stage) -> None:
        pass

    def _show_update(self, stage: Stage) -> None:
        pass

    def _show_finish(self, stage: Stage, line: str) -> None:
        pass

    def _show_message(self, text: str) -> None:
        pass


class NullProgress(Reporter):
    """Reports nothing (``--quiet``, and library calls without a reporter)."""


class PlainProgress(Reporter):
    """For logs and pipes (no terminal codes): a line when a stage starts, at most one progress
    line per ``interval`` seconds while it runs, and its summary line; messages as they come."""

    def __init__(self, stream: TextIO, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self._stream = stream
        self._interval = interval
        self._last: dict[str, float] = {}

    def _show_start(self, stage: Stage) -> None:
        self._last[stage.name] = stage.started
        what = f" {stage.total} {stage.unit}".rstrip() if stage.total is not None else ""
        size = f", {format_bytes(stage.total_bytes)}" if stage.total_bytes else ""
        self._write(f"{stage.name}:{what}{size} …" if what or size else f"{stage.name} …")

    def _show_update(self, stage: Stage) -> None:
        now = self._clock()
        if now - self._last.get(stage.name, stage.started) >= self._interval:
            self._last[stage.name] = now
            item = f": {stage.item}" if stage.item else ""
            self._write(f"{stage.name}: {stage.status(now)} ({now - stage.started:.0f}s){item}")

    def _show_finish(self, stage: Stage, line: str) -> None:
        self._last.pop(stage.name, None)
        self._write(line)

    def _show_message(self, text: str) -> None:
        self._write(text)

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()


class RichProgress(Reporter):
    """On a terminal: a live status line per running stage (spinner, name, bar, counts/bytes with
    MiB/s, elapsed), each replaced by its summary line when the stage ends."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        from rich.console import Console  # lazy: rich costs ~50 ms to import
        from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichBar

        self._console = Console(file=stream)
        self._bar = RichBar(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                            TextColumn("{task.fields[status]}", markup=False), TimeElapsedColumn(),
                            console=self._console, transient=True)  # fmt: skip
        self._tasks: dict[str, int] = {}
        self._live = False

    def _show_start(self, stage: Stage) -> None:
        if not self._live:
            self._bar.start()
            self._live = True
        total = stage.total_bytes or stage.total
        self._tasks[stage.name] = self._bar.add_task(stage.name, total=total, status=stage.status(stage.started))

    def _show_update(self, stage: Stage) -> None:
        task = self._tasks.get(stage.name)
        if task is None:
            return
        completed = stage.nbytes if stage.total_bytes else stage.done
        total = stage.total_bytes or stage.total
        label = f"{stage.name} {stage.item}" if stage.item and not stage.total_bytes else stage.name
        self._bar.update(task, completed=completed, total=total, description=label[:40],
                         status=stage.status(self._clock()))  # fmt: skip

    def _show_finish(self, stage: Stage, line: str) -> None:
        task = self._tasks.pop(stage.name, None)
        if task is not None:
            self._bar.remove_task(task)
        self._console.print(line, highlight=False, markup=False)
        if not self._tasks and self._live:
            self._bar.stop()
            self._live = False

    def _show_message(self, text: str) -> None:
        self._console.print(text, highlight=False, markup=False)


def is_log(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is not a terminal or ``CI=true`` (a log: no live display)."""
    env = os.environ if environ is None else environ
    isatty = getattr(stream, "isatty", None)
    return env.get("CI", "").lower() == "true" or not (isatty is not None and isatty())


def make_reporter(quiet: bool, stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> Reporter:
    """The reporter for a CLI command: nothing if quiet, live status lines on a terminal, a few
    plain lines per stage in a log (not a terminal, or ``CI=true``).

    ``stream`` defaults to stderr, so stdout stays clean for ``--json`` output."""
    if quiet:
        return NullProgress()
    stream = sys.stderr if stream is None else stream
    return PlainProgress(stream) if is_log(stream, environ) else RichProgress(stream)


def make_progress(quiet: bool, stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> Reporter:
    """The download reporter (the same object as :func:`make_reporter`'s)."""
    return make_reporter(quiet, stream, environ)
