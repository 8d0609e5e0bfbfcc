"""Read the host's apt sources: which mirror serves Debian (and Debian security) here.

A lock names its sources (``debian``, ``debian-security``) but, unless the image definition
says ``Mirror=``, not their URLs: the URL is taken from the host's apt configuration at fetch
time. This module is that look-up, and nothing more.

Formats read (sources.list(5)):

* deb822 ``/etc/apt/sources.list.d/*.sources``: stanzas of ``Types``, ``URIs``, ``Suites``,
  ``Components``, ``Signed-By``, ``Enabled`` …; ``#`` lines are comments.
* one-line ``/etc/apt/sources.list`` and ``sources.list.d/*.list``:
  ``deb [opt=value …] URI suite [component …]``.

Files with other names (``*.disabled``, ``*.save``, …) are ignored, as apt ignores them; so are
stanzas with ``Enabled: no``, ``cdrom:`` and other non-http(s)/file URIs (``mirror+…``, ``tor+…``:
we cannot fetch them the way apt does). Cost: reads a handful of small files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from reprobuild.errors import RepositoryError

Archive = Literal["debian", "debian-security"]

# Schemes we can fetch ourselves; everything else is skipped as apt's own transports would be needed.
_FETCHABLE_SCHEMES = ("http", "https", "file")

# Debian suite names (codenames and aliases) so a mirror whose URL path does not end in /debian can
# still be recognised by what it serves. Suffixes such as -updates/-backports are stripped first.
_DEBIAN_SUITES = frozenset(
    {
        "oldoldstable", "oldstable", "stable", "testing", "unstable", "experimental", "sid",
        "stretch", "buster", "bullseye", "bookworm", "trixie", "forky", "duke",
        "rc-buggy",
    }
)  # fmt: skip

# The archive root: ".../debian" or ".../debian-security", optionally a snapshot timestamp after it.
_ARCHIVE_PATH = re.compile(r"/(?P<archive>debian|debian-security)(?:/\d{8}T\d{6}Z)?/?$")


@dataclass(frozen=True, slots=True)
class AptSource:
    """One enabled source entry (one deb822 stanza or one one-line entry)."""

    types: tuple[str, ...]  # "deb", "deb-src"
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: tuple[Path, ...] = ()  # keyring paths; an inline armored key is not kept here
    origin: str = ""  # file (and line) the entry came from, for error messages


def read_apt_sources(root: Path = Path("/")) -> list[AptSource]:
    """All enabled, fetchable apt source entries under ``root``/etc/apt, in apt's file order.

    apt reads ``sources.list`` first, then ``sources.list.d`` in lexical order; we keep that order
    so "the first matching entry" means what it means to apt.
    """
    etc = root / "etc" / "apt"
    sources: list[AptSource] = []
    main_list = etc / "sources.list"
    if main_list.is_file():
        sources.extend(parse_one_line(_read(main_list), origin=str(main_list)))
    parts = etc / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if not path.is_file():
                continue
            if path.suffix == ".list":
                sources.extend(parse_one_line(_read(path), origin=str(path)))
            elif path.suffix == ".sources":
                sources.extend(parse_deb822(_read(path), origin=str(path)))
    return [s for s in (_only_fetchable(s) for s in sources) if s is not None]


def host_mirror_for(archive: Archive, root: Path = Path("/")) -> str:
    """The base URL (no trailing slash) of the host's mirror for ``archive``.

    Matching, best first: a ``deb`` entry whose URL path ends in ``/debian`` (``/debian-security``),
    then one whose suites are Debian suites (for security: suites ending in ``-security``).
    Raises RepositoryError naming the files read when nothing matches.
    """
    if archive not in ("debian", "debian-security"):
        raise ValueError(f"unknown archive {archive!r}")
    sources = [s for s in read_apt_sources(root) if "deb" in s.types]
    for source in sources:
        for uri in source.uris:
            m = _ARCHIVE_PATH.search(urlsplit(uri).path)
            if m and m.group("archive") == archive:
                return uri.rstrip("/")
    for source in sources:
        if any(_suite_belongs_to(suite, archive) for suite in source.suites):
            # The URL path is not conclusive; do not guess a security mirror for a plain Debian one.
            for uri in source.uris:
                m = _ARCHIVE_PATH.search(urlsplit(uri).path)
                if m is None or m.group("archive") == archive:
                    return uri.rstrip("/")
    where = ", ".join(sorted({s.origin.rsplit(":", 1)[0] for s in sources})) or "no enabled sources"
    raise RepositoryError(
        f"no apt source on this host serves the {archive!r} archive (read: {where})",
        hint=f"add a deb822 stanza for {archive} under {root / 'etc/apt/sources.list.d'}, "
        "or set Mirror= in the image definition",
    )


def _suite_belongs_to(suite: str, archive: Archive) -> bool:
    if archive == "debian-security":
        return suite.endswith(("-security", "/updates"))
    if suite.endswith("-security"):
        return False
    base = suite.split("-", 1)[0]
    return base in _DEBIAN_SUITES


# --------------------------------------------------------------------------------------- parsers


def parse_deb822(text: str, origin: str = "") -> list[AptSource]:
    """Parse a ``.sources`` file (pure). Disabled stanzas (``Enabled: no``) are dropped."""
    result: list[AptSource] = []
    for lineno, fields in _deb822_stanzas(text):
        if fields.get("enabled", "yes").strip().lower() == "no":
            continue
        signed_by = fields.get("signed-by", "")
        # Signed-By is either a list of keyring paths or an inline armored key block (multi-line).
        keyrings = () if "\n" in signed_by.strip() else tuple(Path(p) for p in signed_by.split())
        result.append(
            AptSource(
                types=tuple(fields.get("types", "").split()),
                uris=tuple(fields.get("uris", "").split()),
                suites=tuple(fields.get("suites", "").split()),
                components=tuple(fields.get("components", "").split()),
                signed_by=keyrings,
                origin=f"{origin}:{lineno}",
            )
        )
    return result


def _deb822_stanzas(text: str) -> Iterable[tuple[int, dict[str, str]]]:
    """Yield (first line number, lower-cased field → value) per stanza; comments skipped."""
    fields: dict[str, str] = {}
    start = 0
    last: str | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield start, fields
            fields, last = {}, None
            continue
        if line[0] in " \t":
            if last is not None:
                fields[last] += "\n" + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            continue  # apt would reject the file; we ignore the line rather than guess
        if not fields:
            start = lineno
        last = name.strip().lower()
        fields[last] = value.strip()
    if fields:
        yield start, fields


def parse_one_line(text: str, origin: str = "") -> list[AptSource]:
    """Parse one-line-style entries (pure): ``deb [opts] URI suite [components…]``."""
    result: list[AptSource] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        if kind not in ("deb", "deb-src"):
            continue
        rest = rest.strip()
        options: dict[str, str] = {}
        if rest.startswith("["):
            close = rest.find("]")
            if close < 0:
                continue
            for opt in rest[1:close].split():
                key, _, value = opt.partition("=")
                options[key.lower()] = value
            rest = rest[close + 1 :].strip()
        words = rest.split()
        if len(words) < 2:
            continue
        if options.get("enabled", "yes").lower() == "no":
            continue
        result.append(
            AptSource(
                types=(kind,),
                uris=(words[0],),
                suites=(words[1],),
                components=tuple(words[2:]),
                signed_by=tuple(Path(p) for p in options.get("signed-by", "").split(",") if p),
                origin=f"{origin}:{lineno}",
            )
        )
    return result


def _only_fetchable(source: AptSource) -> AptSource | None:
    uris = tuple(u for u in source.uris if urlsplit(u).scheme in _FETCHABLE_SCHEMES)
    if not uris:
        return None
    return AptSource(source.types, uris, source.suites, source.components, source.signed_by, source.origin)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RepositoryError(f"cannot read apt sources file {path}: {e}") from e
