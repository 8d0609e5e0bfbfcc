"""A Packages index as text plus a table of stanza offsets, decoded stanza by stanza (pure).

A lock resolves ~1-2k of the ~70k stanzas of trixie's main index. Parsing every stanza into a
``BinaryPackage`` costs seconds in Python, so the index is scanned once with C-level regex
searches for what must be known of *every* stanza before resolving — its bounds, ``Package``,
``Architecture``, ``Essential``, ``Priority`` and ``Provides`` — and a stanza is decoded in full
(``control.iter_stanzas`` + ``BinaryPackage.from_stanza``, with all their checks) only when its
package name is looked up. Field rules are those of deb822(5) as ``iter_stanzas`` applies them
(docs/formats.md §10): the values found here are the values a full parse gives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from reprobuild.debian.control import iter_stanzas
from reprobuild.debian.package import BinaryPackage
from reprobuild.errors import FormatError, RepositoryError

__all__ = ["StanzaHead", "StanzaScanner", "decode_stanza", "normalize_text", "scan_stanzas", "trailing_space"]

# As control.iter_stanzas: CRLF line ends, and lines of only blanks separate stanzas like empty ones.
_BLANK_WITH_SPACES: Final = re.compile(rb"^[ \t]+$", re.MULTILINE)
_HAS_BLANK_WITH_SPACES: Final = re.compile(rb"\n[ \t]+(?:\n|$)")
# One token of the scan, each starting at a line end (so the regex engine skips to the next
# "\n" in C): a stanza separator (an empty line follows), or one of the fields every stanza is
# summarised by, with its continuation lines (control._FIELD, for five names only). The text's
# first line has no "\n" before it: _FIRST reads it.
# Essential and Priority matter only as "yes" and "required" (any case): the lookaheads skip the
# other values (most stanzas say "Priority: optional") before any Python code sees them.
_NAMES: Final = (
    rb"(Package|Architecture|Provides|Essential(?=:[ \t]*[yY])|Priority(?=:[ \t]*[rR])):[ \t]*(.*(?:\n[ \t].*)*)"
)
_TOKEN: Final = re.compile(rb"\n(?:(?=\n)|" + _NAMES + rb")")
_FIRST: Final = re.compile(_NAMES)
# One str object for the common values (70k stanzas would each hold a copy).
_ARCHITECTURES: Final = {a.encode(): a for a in ("all", "amd64", "arm64", "armel", "armhf", "i386", "ppc64el",
                                                  "riscv64", "s390x", "mips64el", "loong64")}  # fmt: skip


@dataclass(slots=True)
class StanzaHead:
    """What a lock needs to know of a stanza without decoding it: its bounds in the text and the
    fields that decide which names exist, which are Essential/required, and who provides what.
    Values are as ``BinaryPackage.from_stanza`` reads them (architecture defaults to ``all``)."""

    name: str
    architecture: str
    essential: bool
    required: bool
    provides: str
    start: int
    end: int


def normalize_text(text: bytes) -> bytes:
    """The index text with CRLF line ends and blank-only lines made plain, as ``iter_stanzas``
    does before splitting (a no-op for Debian's indices): stanza bounds are then runs of ``\\n``."""
    if b"\r" in text:
        text = text.replace(b"\r\n", b"\n")
    if text[:1] in (b" ", b"\t") or _HAS_BLANK_WITH_SPACES.search(text):
        text = _BLANK_WITH_SPACES.sub(b"", text)
    return text


def scan_stanzas(text: bytes, what: str = "Packages") -> list[StanzaHead]:
    """Every stanza of a normalized index text, in order (pure; ~0.4 s for trixie's 56 MB).

    Raises RepositoryError for a stanza without ``Package`` (unless it holds only comments), a
    field given twice among the five scanned, or a scanned value that is not UTF-8. The other
    fields are checked when the stanza is decoded (:func:`decode_stanza`).
    """
    scanner = StanzaScanner(what, trailing_space(text))
    scanner.scan(text, len(text))
    return scanner.finish(text)


def trailing_space(text: bytes) -> bool:
    """Whether some line of ``text`` ends in a space or tab: then values lose trailing blanks,
    as in ``iter_stanzas`` (``text`` may be an mmap: no ``in`` or ``rstrip``)."""
    return text.find(b" \n") >= 0 or text.find(b"\t\n") >= 0 or _last_byte(text) in (b" ", b"\t")


class StanzaScanner:
    """:func:`scan_stanzas` in steps, over a text that grows (an index decompressed while it
    downloads): :meth:`scan` up to the end of an empty line, again as the text grows, then
    :meth:`finish`. The result is what one :func:`scan_stanzas` of the whole text gives, for
    the ``trailing_space`` of the whole text: given, or with ``trailing_space=None`` found out
    while scanning — each step looks for a line ending in a blank in the part it scans, and on
    the first one, scans what it had scanned again with values losing trailing blanks (trixie's
    main index has its first at 12 of 56 MB). Then only a text whose very end is a blank, which
    :attr:`complete` tells, must be scanned again by the caller."""

    def __init__(self, what: str = "Packages", trailing_space: bool | None = False) -> None:
        self.what = what
        self._detect = trailing_space is None  # find out while scanning
        self.trailing_space = bool(trailing_space)
        self.heads: list[StanzaHead] = []
        self._fields: dict[bytes, bytes] = {}
        self._start = 0  # of the current stanza
        self._pos = 0  # where the next scan starts: a "\n" (or 0)

    def complete(self, text: bytes) -> bool:
        """Whether the heads are those of :func:`scan_stanzas` of ``text`` (scanned to its end):
        always when ``trailing_space`` was given (the caller's to check), and when it was found
        out, unless only the text's last byte is a blank."""
        return not self._detect or self.trailing_space or _last_byte(text) not in (b" ", b"\t")

    def scan(self, text: bytes, end: int) -> None:
        """Scan ``text[:end]`` on from where the last scan stopped; ``end`` is ``len(text)`` or
        just after an empty line (``text[end-2:end] == b"\n\n"``)."""
        if self._detect and not self.trailing_space and (
            text.find(b" \n", self._pos, end) >= 0 or text.find(b"\t\n", self._pos, end) >= 0
        ):  # a step starts at a "\n": no " \n" spans two steps
            scanned = self._pos + 1 if self._pos else 0  # the end of the last step
            self.trailing_space = True
            self.heads, self._fields, self._start, self._pos = [], {}, 0, 0
            if scanned:
                self._scan(text, scanned)
        self._scan(text, end)

    def _scan(self, text: bytes, end: int) -> None:
        fields, start, what = self._fields, self._start, self.what
        if self._pos == 0:
            first = _FIRST.match(text, 0, end)
            if first is not None:
                fields[first.group(1)] = first.group(2)
        for match in _TOKEN.finditer(text, self._pos, end):
            name = match.group(1)
            if name is not None:
                if name in fields:
                    raise RepositoryError(f"{what}: field {name.decode()!r} repeated in the stanza at byte {start}")
                fields[name] = match.group(2)
                continue
            here = match.start()  # an empty line follows: the stanza ends here, the next one starts after it
            if fields:
                self.heads.append(_head(text, fields, start, here, self.trailing_space, what))
                fields = {}
            elif start < here:
                _check_no_stanza(text, start, here, what)
            start = here + 2
        # The next scan starts at the empty line's "\n", so a field on the next stanza's first
        # line is found as "\n<name>:" (no token can start there within text[:end]).
        self._fields, self._start, self._pos = fields, start, max(end - 1, self._pos)

    def finish(self, text: bytes) -> list[StanzaHead]:
        """The heads, once ``text`` is complete and scanned to its end."""
        if self._fields:
            self.heads.append(_head(text, self._fields, self._start, len(text), self.trailing_space, self.what))
        elif self._start < len(text):
            _check_no_stanza(text, self._start, len(text), self.what)
        self._fields = {}
        return self.heads


def _last_byte(text: bytes) -> bytes:
    """The last byte that is not a newline (``text`` may be an mmap: no rstrip)."""
    end = len(text)
    while end and text[end - 1] == 0x0A:
        end -= 1
    return text[end - 1 : end]


def _head(text: bytes, fields: dict[bytes, bytes], start: int, end: int, trailing_space: bool, what: str) -> StanzaHead:
    try:
        name = fields[b"Package"].decode("utf-8")
        raw_architecture = fields.get(b"Architecture", b"all")
        architecture = _ARCHITECTURES.get(raw_architecture) or raw_architecture.decode("utf-8")
        essential = fields.get(b"Essential")
        priority = fields.get(b"Priority")
        provides = fields.get(b"Provides", b"").decode("utf-8")
        essential = essential is not None and _value(essential, trailing_space).lower() == "yes"
        required = priority is not None and _value(priority, trailing_space).lower() == "required"
    except KeyError:
        raise RepositoryError(f"{what}: stanza without Package at byte {start}") from None
    except UnicodeDecodeError as e:
        raise RepositoryError(f"{what}: the stanza at byte {start} is not UTF-8: {e}") from None
    if trailing_space:
        name, architecture, provides = name.rstrip(), architecture.rstrip(), provides.rstrip()
    return StanzaHead(name, architecture, essential, required, provides, start, end)


def _value(raw: bytes, trailing_space: bool) -> str:
    value = raw.decode("utf-8")
    return value.rstrip() if trailing_space else value


def _check_no_stanza(text: bytes, start: int, end: int, what: str) -> None:
    """A span without any scanned field must hold no stanza at all (only comments)."""
    if _stanzas(text, start, end, what):
        raise RepositoryError(f"{what}: stanza without Package at byte {start}")


def _stanzas(text: bytes, start: int, end: int, what: str) -> list[dict[str, str]]:
    try:
        chunk = bytes(text[start:end]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RepositoryError(f"{what}: the stanza at byte {start} is not UTF-8: {e}") from None
    try:
        return list(iter_stanzas(chunk))
    except FormatError as e:
        raise RepositoryError(f"{what}: in the stanza at byte {start}: {e.message}") from None


def decode_stanza(text: bytes, head: StanzaHead | tuple[int, int], origin: str, what: str = "Packages") -> BinaryPackage:
    """The full ``BinaryPackage`` of the stanza at ``head`` (a StanzaHead or ``(start, end)``).

    Raises RepositoryError for a malformed stanza (the line it names counts from the stanza's
    first line), one without Package/Version, or bad numbers.
    """
    start, end = (head.start, head.end) if isinstance(head, StanzaHead) else head
    stanzas = _stanzas(text, start, end, what)
    if len(stanzas) != 1 or "Package" not in stanzas[0] or "Version" not in stanzas[0]:
        found = sorted(stanzas[0])[:5] if stanzas else []
        raise RepositoryError(f"{what}: stanza without Package/Version at byte {start}: {found}")
    stanza = stanzas[0]
    try:
        return BinaryPackage.from_stanza(stanza, origin)
    except (KeyError, ValueError) as e:
        raise RepositoryError(f"{what}: bad stanza for {stanza.get('Package')!r}: {e}") from e
