"""systemd-style INI files: sections, ``Key=Value`` assignments, drop-ins and ``Include=``.

This module only reads text into an ordered list of assignments, each remembering the file and
line it came from; what the keys mean is ``reprobuild.config``'s job. Syntax follows
systemd.syntax(7): ``#`` and ``;`` start comment lines, a trailing backslash continues a line,
``[Section]`` headers, whitespace around ``=`` is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reprobuild.errors import ConfigError
from reprobuild.fileio import ReadRefused, read_bounded

MAX_INCLUDE_DEPTH = 8
MAX_FILE_BYTES = 1 << 20  # a configuration file, drop-in or Include= target: 1 MiB is plenty


@dataclass(frozen=True)
class Assignment:
    section: str
    key: str
    value: str
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse_ini_text(text: str, path: Path) -> list[Assignment]:
    """Parse one file's text into assignments (``Include=`` is returned like any other key)."""
    assignments: list[Assignment] = []
    section: str | None = None
    pending = ""
    pending_line = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            if not pending:
                pending_line = number
            pending += line[:-1] + " "
            continue
        if pending:
            line = pending + line
            number, pending = pending_line, ""
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise ConfigError(f"{path}:{number}: malformed section header {line!r}")
            section = line[1:-1].strip()
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{path}:{number}: expected Key=Value, got {line!r}")
        if section is None:
            raise ConfigError(f"{path}:{number}: assignment {key.strip()}= outside any [Section]")
        assignments.append(Assignment(section, key.strip(), value.strip(), path, number))
    if pending:
        raise ConfigError(f"{path}:{pending_line}: line continuation at end of file")
    return assignments


def read_ini(path: Path, _depth: int = 0, _seen: tuple[Path, ...] = ()) -> list[Assignment]:
    """Read a file, expanding ``Include=`` in place (paths relative to the including file)."""
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"{path}: Include= loop ({' -> '.join(str(p) for p in _seen + (resolved,))})")
    if _depth > MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{path}: Include= nested more than {MAX_INCLUDE_DEPTH} levels deep")
    try:
        text = read_bounded(path, MAX_FILE_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except ReadRefused as e:
        raise ConfigError(f"{path}: {e.reason}: not a configuration file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    result: list[Assignment] = []
    for assignment in parse_ini_text(text, path):
        if assignment.key == "Include":
            if not assignment.value:
                continue
            target = Path(assignment.value)
            if not target.is_absolute():
                target = path.parent / target
            if not target.exists():
                raise ConfigError(f"{assignment.where}: Include={assignment.value}: no such file")
            if not target.is_file():
                raise ConfigError(f"{assignment.where}: Include={assignment.value}: not a regular file")
            result.extend(read_ini(target, _depth + 1, _seen + (resolved,)))
        else:
            result.append(assignment)
    return result


def read_with_dropins(main: Path) -> list[Assignment]:
    """``main`` then ``<main>.d/*.conf`` in lexical order, as systemd reads drop-ins."""
    assignments = read_ini(main)
    dropin_dir = main.with_name(main.name + ".d")
    if dropin_dir.is_dir():
        for dropin in sorted(dropin_dir.glob("*.conf"), key=lambda p: p.name):
            assignments.extend(read_ini(dropin))
    return assignments
