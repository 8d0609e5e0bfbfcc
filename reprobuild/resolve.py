"""Choose the exact set of binary packages for an image, with Debian semantics, using resolvelib.

Roles, as in pip's resolver (``pip/_internal/resolution/resolvelib/``: provider, requirements, candidates):

* ``Universe`` holds every Debian rule: which versions exist (all suites merged, highest version is
  apt's candidate), Provides (also versioned), Multi-Arch qualifiers, apt's order for alternatives
  and providers, and the translation of a relationship field into requirements.
* Identifiers are typed: ``PackageKey(name)`` is the slot of one real package (there is one
  architecture: native, with ``Architecture: all`` counted as native); ``AlternativesKey`` is one
  ``a | b`` group, or a dependency on a virtual name, shared by every package that writes it.
* Requirements and candidates are small classes, each with ``is_satisfied_by`` or
  ``format_for_error``. Conflicts and Breaks are requirements too: every real package slot has an
  ``AbsentCandidate`` ("not installed") that satisfies them, and that positive requirements exclude.
* ``DebProvider`` only answers resolvelib's five questions by asking the universe.
* ``explain_conflict`` turns resolvelib's ``ResolutionImpossible`` into one ``ResolutionFailed``.
* ``check_consistency`` re-checks the final set independently of the resolver (a safety net in the
  spirit of resolvelib's ``InconsistentCandidate``).

Reproducibility: every choice is ordered by data only (versions, apt's provider order, names),
never by hash or input order, so the same universe and request always give the same set.
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import difflib
import itertools
import marshal
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, Final, NamedTuple

import resolvelib
from resolvelib.resolvers import ResolutionImpossible, ResolutionTooDeep

from reprobuild.debian.control import Relation, parse_provides, parse_relations
from reprobuild.debian.package import BinaryPackage
from reprobuild.debian.stanzaindex import StanzaHead, decode_stanza, scan_stanzas
from reprobuild.debian.version import check_relation, version_key
from reprobuild.errors import FormatError, RepositoryError, ResolutionFailed
from reprobuild.providerindex import ProvidersIndex

__all__ = [
    "BASE_SETS",
    "UNIVERSE_FORMAT",
    "AbsentCandidate",
    "AlternativesKey",
    "AlternativesRequirement",
    "ChoiceCandidate",
    "ConflictRequirement",
    "DebProvider",
    "InconsistentResolution",
    "IndexText",
    "PackageKey",
    "PinnedRequirement",
    "ProgressReporter",
    "RepoCandidate",
    "Resolution",
    "ResolveRequest",
    "ResolvedPackage",
    "SkipCandidate",
    "Universe",
    "VersionedRequirement",
    "check_consistency",
    "explain_conflict",
    "resolve",
]  # fmt: skip

BASE_SETS: Final = ("essential", "minbase", "none")
MAX_ROUNDS: Final = 50_000
# apt's Priority order for choosing among providers (higher priority first); "extra" is obsolete.
_PRIORITY_RANK: Final = {"required": 0, "important": 1, "standard": 2, "optional": 3, "extra": 4}


class InconsistentResolution(ResolutionFailed):
    """The resolver returned a set that breaks a Depends or Conflicts rule: a bug, not user error."""


# --------------------------------------------------------------------------- identifiers


class PackageKey(NamedTuple):
    """The slot of one real package name (native architecture or ``all``).

    A named tuple rather than a dataclass: resolvelib hashes and compares identifiers some 100 000
    times per lock (its per-round dict lookups), and a tuple does both in C, where a dataclass
    calls its generated Python ``__hash__`` and ``__eq__``."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class AlternativesKey:
    """One OR group (or a lone virtual name), identified by its canonical text.

    ``weak`` marks a Recommends group, which may be left unsatisfied.
    """

    text: str
    group: tuple[Relation, ...] = field(compare=False)
    weak: bool = False

    @classmethod
    def of(cls, group: tuple[Relation, ...], weak: bool = False) -> AlternativesKey:
        return cls(" | ".join(str(relation) for relation in group), group, weak)

    def __str__(self) -> str:
        return self.text


Identifier = PackageKey | AlternativesKey


# --------------------------------------------------------------------------- candidates


class RepoCandidate:
    """One version of a real package from the index. One object per (name, version) per universe,
    so identity comparison is exact and cheap."""

    __slots__ = ("key", "package", "provides")

    def __init__(self, package: BinaryPackage) -> None:
        self.package = package
        self.key = PackageKey(package.name)
        self.provides: tuple[Relation, ...] = parse_provides(package.provides) if package.provides else ()

    def satisfies(self, relation: Relation) -> bool:
        """Whether this version satisfies ``relation`` directly or through Provides (Policy §7.5:
        an unversioned Provides satisfies only unversioned relations)."""
        package = self.package
        if relation.arch is not None and not _arch_allows(package, relation.arch):
            return False
        if package.name == relation.name:
            return relation.op is None or check_relation(package.version, relation.op, relation.version)
        for provided in self.provides:
            if provided.name == relation.name and (
                relation.op is None
                or (
                    provided.version is not None
                    and check_relation(provided.version, relation.op, relation.version)
                )
            ):
                return True
        return False

    def format_for_error(self) -> str:
        return f"{self.package.name} {self.package.version}"

    def __repr__(self) -> str:
        return f"RepoCandidate({self.package.name} {self.package.version})"


@dataclass(frozen=True, slots=True)
class AbsentCandidate:
    """ "This package is not installed": the only way to satisfy nothing but Conflicts/Breaks."""

    key: PackageKey

    def format_for_error(self) -> str:
        return f"{self.key.name} not installed"


@dataclass(frozen=True, slots=True)
class ChoiceCandidate:
    """Satisfy an OR group (or virtual name) with ``package_name`` through ``relation``."""

    key: AlternativesKey
    relation: Relation
    package_name: str

    def format_for_error(self) -> str:
        how = "" if self.relation.name == self.package_name else f" (providing {self.relation})"
        return f"{self.package_name}{how} for '{self.key.text}'"


@dataclass(frozen=True, slots=True)
class SkipCandidate:
    """Leave a weak (Recommends) group unsatisfied, as apt does when it cannot be installed."""

    key: AlternativesKey

    def format_for_error(self) -> str:
        return f"skipping recommended '{self.key.text}'"


Candidate = RepoCandidate | AbsentCandidate | ChoiceCandidate | SkipCandidate


# --------------------------------------------------------------------------- requirements


@dataclass(frozen=True, slots=True)
class VersionedRequirement:
    """Real package ``key`` must be installed in a version satisfying ``relation`` (by name or by
    one of its Provides, when ``relation`` names a virtual package this package provides)."""

    key: PackageKey
    relation: Relation
    answers: dict = field(default_factory=dict, compare=False, repr=False)  # see _memoised
    positive = True
    verb = "depends on"

    def check(self, candidate: Candidate) -> bool:
        return isinstance(candidate, RepoCandidate) and candidate.satisfies(self.relation)

    def is_satisfied_by(self, candidate: Candidate) -> bool:
        return _memoised(self, candidate)

    def format_for_error(self) -> str:
        if self.relation.name == self.key.name:
            return str(self.relation)
        return f"{self.key.name} providing {self.relation}"


@dataclass(frozen=True, slots=True)
class PinnedRequirement:
    """Exactly ``version`` of ``key`` (a ``name=version`` in the user's Packages=)."""

    key: PackageKey
    version: str
    answers: dict = field(default_factory=dict, compare=False, repr=False)  # see _memoised
    positive = True
    verb = "requires"

    def check(self, candidate: Candidate) -> bool:
        return isinstance(candidate, RepoCandidate) and version_key(candidate.package.version) == version_key(
            self.version
        )

    def is_satisfied_by(self, candidate: Candidate) -> bool:
        return _memoised(self, candidate)

    def format_for_error(self) -> str:
        return f"{self.key.name} (= {self.version})"


@dataclass(frozen=True, slots=True)
class ConflictRequirement:
    """``key`` must be absent or in a version that does not match ``relation`` (Conflicts/Breaks,
    also when ``relation`` names a virtual package ``key`` provides)."""

    key: PackageKey
    relation: Relation
    kind: str  # "conflicts with" | "breaks"
    answers: dict = field(default_factory=dict, compare=False, repr=False)  # see _memoised
    positive = False

    @property
    def verb(self) -> str:
        return self.kind

    def check(self, candidate: Candidate) -> bool:
        return isinstance(candidate, AbsentCandidate) or (
            isinstance(candidate, RepoCandidate) and not candidate.satisfies(self.relation)
        )

    def is_satisfied_by(self, candidate: Candidate) -> bool:
        return _memoised(self, candidate)

    def format_for_error(self) -> str:
        if self.relation.name == self.key.name:
            return str(self.relation)
        return f"{self.relation} (provided by {self.key.name})"


@dataclass(frozen=True, slots=True)
class AlternativesRequirement:
    """One of the relations of an OR group (or a virtual name) must be satisfied."""

    key: AlternativesKey
    answers: dict = field(default_factory=dict, compare=False, repr=False)  # see _memoised
    positive = True

    @property
    def verb(self) -> str:
        return "recommends" if self.key.weak else "depends on"

    def check(self, candidate: Candidate) -> bool:
        if isinstance(candidate, SkipCandidate):
            return self.key.weak and candidate.key == self.key
        return isinstance(candidate, ChoiceCandidate) and candidate.key == self.key

    def is_satisfied_by(self, candidate: Candidate) -> bool:
        return _memoised(self, candidate)

    def format_for_error(self) -> str:
        return self.key.text


Requirement = VersionedRequirement | PinnedRequirement | ConflictRequirement | AlternativesRequirement


def _memoised(requirement: Requirement, candidate: Candidate) -> bool:
    """``requirement.check(candidate)``, remembered in ``requirement.answers``.

    resolvelib re-checks every pin against every requirement on it in every round (O(rounds ×
    requirements): libc6 alone collects hundreds), so each answer is computed once. Requirement
    objects are shared (cached per candidate by the universe), and candidates hash cheaply.
    """
    answer = requirement.answers.get(candidate)
    if answer is None:
        answer = requirement.answers[candidate] = requirement.check(candidate)
    return answer


def _arch_allows(package: BinaryPackage, qualifier: str) -> bool:
    """Multi-Arch qualifier check for a universe of one architecture (native + all).

    ``:any`` is satisfied only by ``Multi-Arch: allowed`` (or ``foreign``) packages; ``:native``
    and the native architecture's own name always are (everything here is native)."""
    if qualifier == "any":
        return package.multi_arch in ("allowed", "foreign")
    return qualifier == "native" or qualifier == package.architecture or package.architecture == "all"


# --------------------------------------------------------------------------- universe

# Bump when the universe's content rules (which records are kept, their order) or the cached
# layout change: cached universes of another format are then rebuilt from the indices.
UNIVERSE_FORMAT: Final = 3
_UNIVERSE_MAGIC: Final = "reprobuild-universe"
# A Provides field in its common form (names, optional :arch and "(= version)"): the provided
# names are then read with _PROVIDED_NAME; any other text goes through parse_provides.
_PROVIDES_COMMON: Final = re.compile(
    r"\s*[a-zA-Z0-9][a-zA-Z0-9+.\-]*(?::[a-zA-Z0-9\-]+)?\s*(?:\(\s*=\s*[0-9A-Za-z][^\s()]*\s*\)\s*)?"
    r"(?:,\s*[a-zA-Z0-9][a-zA-Z0-9+.\-]*(?::[a-zA-Z0-9\-]+)?\s*(?:\(\s*=\s*[0-9A-Za-z][^\s()]*\s*\)\s*)?)*,?\s*"
)
_PROVIDED_NAME: Final = re.compile(r"(?:^|,)\s*([a-zA-Z0-9][a-zA-Z0-9+.\-]*)")


@dataclass(frozen=True)
class IndexText:
    """One Packages index as its (normalized, verified) text, for :meth:`Universe.from_indices`."""

    origin: str  # the suite/component its packages carry (BinaryPackage.origin)
    text: Any = field(repr=False)  # bytes, bytearray or a read-only mmap of the text
    what: str = "Packages"  # names the index in error messages
    binary_all: bool = False  # a binary-all index: its entries yield to the same origin's arch index
    heads: list[StanzaHead] | None = field(default=None, repr=False)  # scan_stanzas(text), if done already


@dataclass(frozen=True)
class StanzaTable:
    """Where each name's stanzas are in the index texts: ``names`` sorted, and for the name at
    position ``i`` the stanzas ``records[3*first[i] : 3*first[i+1]]`` as (index, start, end)
    triples, in index order. Flat arrays, so the cached form loads as a few memory copies."""

    names: list[str]
    first: array.array  # "q", len(names) + 1
    records: array.array  # "q", 3 per stanza

    @classmethod
    def of(cls, stanzas: list[tuple[str, int, int, int]]) -> StanzaTable:
        """From ``(name, index, start, end)`` rows, which it sorts (so each name's stanzas are
        in index order)."""
        stanzas.sort()
        names: list[str] = []
        first = array.array("q")
        records = array.array("q")
        for k, (name, number, start, end) in enumerate(stanzas):
            if not names or names[-1] != name:
                names.append(name)
                first.append(k)
            records.extend((number, start, end))
        first.append(len(stanzas))
        return cls(names, first, records)

    def count(self, i: int) -> int:
        """How many stanzas the name at position ``i`` has."""
        return self.first[i + 1] - self.first[i]

    def position(self, name: str) -> int:
        """The position of ``name`` in ``names``, or -1."""
        i = bisect.bisect_left(self.names, name)
        return i if i < len(self.names) and self.names[i] == name else -1

    def stanzas(self, i: int) -> array.array:
        return self.records[3 * self.first[i] : 3 * self.first[i + 1]]


class _IndexedVersions(Mapping[str, tuple[RepoCandidate, ...]]):
    """name → candidates (highest first), decoded from that name's stanzas in the index texts on
    first lookup and kept, so every lookup of a name returns the same candidate objects (identity
    matters: requirement memos and the dependency cache key on them). Only the native and
    ``all`` entries of the indices are in the table."""

    def __init__(self, indices: Sequence[IndexText], table: StanzaTable) -> None:
        self.indices = tuple(indices)
        self.table = table
        self._decoded: dict[str, tuple[RepoCandidate, ...]] = {}

    def __getitem__(self, name: str) -> tuple[RepoCandidate, ...]:
        found = self._decoded.get(name)
        if found is None:
            i = self.table.position(name)
            if i < 0:
                raise KeyError(name)
            flat = self.table.stanzas(i)
            records = []
            for k in range(0, len(flat), 3):
                index = self.indices[flat[k]]
                records.append((index.binary_all, decode_stanza(index.text, (flat[k + 1], flat[k + 2]),
                                                                index.origin, index.what)))  # fmt: skip
            if any(package.name != name for _, package in records):
                raise RepositoryError(f"the cached universe lists another package's stanzas for {name!r}",
                                      hint="the index cache (the store's indices/ directory) is damaged: remove it")
            found = self._decoded[name] = _ordered_versions(_without_binary_all_duplicates(records))
        return found

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        return name in self._decoded or (isinstance(name, str) and self.table.position(name) >= 0)

    def __iter__(self) -> Iterator[str]:
        return iter(self.table.names)

    def __len__(self) -> int:
        return len(self.table.names)


def _without_binary_all_duplicates(records: list[tuple[bool, BinaryPackage]]) -> list[BinaryPackage]:
    """Drop the binary-all entries the same origin's arch index lists too (same name, version and
    architecture), as apt reads the two indices of one suite."""
    if not any(binary_all for binary_all, _ in records):
        return [package for _, package in records]
    listed = {(p.origin, p.version, p.architecture) for binary_all, p in records if not binary_all}
    return [p for binary_all, p in records if not binary_all or (p.origin, p.version, p.architecture) not in listed]


def _ordered_versions(records: Sequence[BinaryPackage]) -> tuple[RepoCandidate, ...]:
    """One candidate per version, highest first. The same version from several records (suites)
    is one version, as in apt; which record is kept is decided by (origin, filename, sha256),
    never by input order."""
    if len(records) == 1:  # the common case: no version parsing needed
        return (RepoCandidate(records[0]),)
    versions: dict[tuple, BinaryPackage] = {}
    for package in sorted(records, key=lambda p: (p.origin, p.filename, p.sha256)):
        versions.setdefault(version_key(package.version), package)
    return tuple(RepoCandidate(versions[k]) for k in sorted(versions, reverse=True))


def _provided_names(provides: str) -> list[str]:
    if _PROVIDES_COMMON.fullmatch(provides):
        return _PROVIDED_NAME.findall(provides)
    return [relation.name for relation in parse_provides(provides)]


class Universe:
    """Every installable version for one architecture, with the Debian rules the provider needs.

    Versions of a name are kept highest first (apt's candidate with default pins is the first);
    all are kept because a versioned dependency may need an older one. The Provides index and
    parsed relationship fields are built lazily, once.
    """

    def __init__(self, versions: Mapping[str, tuple[RepoCandidate, ...]], architecture: str) -> None:
        self.architecture = architecture
        self._versions = versions
        self._dependency_cache: dict[tuple[int, bool], tuple[Requirement, ...]] = {}

    # --- from index texts, and the cached form

    @classmethod
    def from_indices(cls, indices: Sequence[IndexText], architecture: str) -> Universe:
        """The universe of the native and ``all`` entries of ``indices`` (in suite order), equal in
        every answer to :meth:`from_packages` of their parsed packages.

        Each text is scanned once (``stanzaindex.scan_stanzas``: bounds, names, Architecture,
        Essential, Priority, Provides), unless its ``heads`` are given; a stanza is decoded only
        when its name is looked up. The Essential/required names and the Provides index are
        computed here, decoding only the names they need. Cost: ~0.4 s for trixie (56 MB of text). Raises RepositoryError for a
        malformed index (a malformed stanza nobody looks up is never decoded).
        """
        stanzas: list[tuple[str, int, int, int]] = []
        provides: dict[str, str] = {}  # a Provides of each name that has one
        flagged: set[str] = set()  # names with an entry that is Essential or Priority: required
        for number, index in enumerate(indices):
            for head in index.heads if index.heads is not None else scan_stanzas(index.text, index.what):
                if head.architecture != architecture and head.architecture != "all":
                    continue
                stanzas.append((head.name, number, head.start, head.end))
                if head.provides:
                    provides[head.name] = head.provides
                if head.essential or head.required:
                    flagged.add(head.name)
        table = StanzaTable.of(stanzas)
        del stanzas
        versions = _IndexedVersions([dataclasses.replace(i, heads=None) for i in indices], table)
        providers: dict[str, set[str]] = {}
        for i, name in enumerate(table.names):
            if name not in provides:
                continue
            if table.count(i) == 1:  # one entry: its scanned Provides is the candidate's
                try:
                    provided = _provided_names(provides[name])
                except FormatError as e:
                    raise RepositoryError(f"{name}: {e.message}") from None
            else:  # several entries: only the versions kept count
                provided = [p.name for version in versions[name] for p in version.provides]
            for virtual in provided:
                providers.setdefault(virtual, set()).add(name)
        universe = cls(versions, architecture)
        universe.__dict__.update(
            _providers={virtual: tuple(sorted(names)) if len(names) > 1 else tuple(names)
                        for virtual, names in providers.items()},
            essential_names=tuple(n for n in versions if n in flagged and versions[n][0].package.essential),
            required_names=tuple(n for n in versions if n in flagged and versions[n][0].package.priority == "required"),
        )  # fmt: skip
        return universe

    def to_bytes(self) -> bytes:
        """The table of a universe made by :meth:`from_indices`, for :meth:`from_bytes`: the
        stanza offsets of every name, the Provides index and the Essential/required names — not
        the index texts, which the caller keeps (and must hand back unchanged)."""
        if not isinstance(self._versions, _IndexedVersions):
            raise TypeError("only a universe made from index texts has a cached form")
        indices = [(i.origin, i.what, i.binary_all, len(i.text)) for i in self._versions.indices]
        table = self._versions.table
        return marshal.dumps((
            _UNIVERSE_MAGIC, UNIVERSE_FORMAT, self.architecture, indices, table.names, table.first.tobytes(),
            table.records.tobytes(), self._provider_index().buckets(), self.essential_names, self.required_names,
        ))  # fmt: skip

    def _provider_index(self) -> ProvidersIndex:
        providers = self._providers
        return providers if isinstance(providers, ProvidersIndex) else ProvidersIndex.of(providers)

    @classmethod
    def from_bytes(cls, data: bytes, texts: Sequence[Any]) -> Universe:
        """The universe :meth:`to_bytes` wrote, over the same index ``texts`` (in order): equal to
        the original in every answer. Cost: one marshal load (~6 ms for trixie: the Provides index
        stays in buckets decoded on lookup, `reprobuild.providerindex`); each name's
        stanzas are decoded on first lookup. Raises ValueError for anything else (another format
        version, damaged data, texts of other lengths)."""
        try:
            magic, version, architecture, indices, names, first, records, providers, essential, required = (
                marshal.loads(data)
            )
        except (EOFError, ValueError, TypeError) as e:
            raise ValueError(f"not a cached universe: {e}") from None
        shape = (type(architecture), type(indices), type(names), type(first), type(records), type(providers))
        if (magic, version, shape) != (_UNIVERSE_MAGIC, UNIVERSE_FORMAT, (str, list, list, bytes, bytes, tuple)):
            raise ValueError("cached universe of another format, or malformed")
        provider_index = ProvidersIndex(providers)  # ValueError when it is not BUCKETS buckets
        table = StanzaTable(names, array.array("q"), array.array("q"))
        try:
            table.first.frombytes(first)
            table.records.frombytes(records)
        except ValueError as e:
            raise ValueError(f"cached universe: damaged table: {e}") from None
        if len(table.first) != len(names) + 1 or len(table.records) != 3 * table.first[-1]:
            raise ValueError("cached universe: damaged table")
        if len(indices) != len(texts) or any(len(t) != i[3] for t, i in zip(texts, indices, strict=False)):
            raise ValueError("cached universe of other index texts")
        index_texts = [IndexText(origin, text, what, binary_all)
                       for (origin, what, binary_all, _), text in zip(indices, texts, strict=True)]  # fmt: skip
        universe = cls(_IndexedVersions(index_texts, table), architecture)
        # Seed the cached properties with the precomputed values (they are derived data only).
        universe.__dict__.update(
            _providers=provider_index, essential_names=tuple(essential), required_names=tuple(required)
        )
        return universe

    @classmethod
    def from_packages(cls, packages: Iterable[BinaryPackage], architecture: str) -> Universe:
        """Keep native and ``all`` packages; merge suites. Cost: O(n log n) for n packages.

        The same (name, version) from several origins is one version (as in apt); which record is
        kept is decided by (origin, filename, sha256), never by input order.
        """
        by_name: dict[str, list[BinaryPackage]] = {}
        for package in packages:
            if package.architecture == architecture or package.architecture == "all":
                by_name.setdefault(package.name, []).append(package)
        return cls({name: _ordered_versions(by_name[name]) for name in sorted(by_name)}, architecture)

    # --- lookups

    def __len__(self) -> int:
        """The number of real package names."""
        return len(self._versions)

    def versions(self, name: str) -> tuple[RepoCandidate, ...]:
        """All versions of a real package, highest first (empty if none)."""
        return self._versions.get(name, ())

    def candidate(self, name: str) -> RepoCandidate | None:
        """apt's candidate: the highest version (default pins)."""
        versions = self._versions.get(name)
        return versions[0] if versions else None

    @cached_property
    def _providers(self) -> Mapping[str, tuple[str, ...]]:
        """virtual name → names of real packages with some version providing it. Built once."""
        index: dict[str, set[str]] = {}
        for name, versions in self._versions.items():
            for version in versions:
                for provided in version.provides:
                    index.setdefault(provided.name, set()).add(name)
        return {virtual: tuple(sorted(names)) for virtual, names in index.items()}

    def providers(self, name: str) -> tuple[str, ...]:
        return self._providers.get(name, ())

    def exists(self, name: str) -> bool:
        return name in self._versions or name in self._providers

    def suggest(self, name: str) -> list[str]:
        """Close real or virtual names, for "did you mean". O(number of names); error path only."""
        names = list(self._versions) + [n for n in self._providers if n not in self._versions]
        return difflib.get_close_matches(name, names, n=3, cutoff=0.75)

    @cached_property
    def essential_names(self) -> tuple[str, ...]:
        """Names whose candidate is ``Essential: yes``, sorted."""
        return tuple(n for n, v in self._versions.items() if v[0].package.essential)

    @cached_property
    def required_names(self) -> tuple[str, ...]:
        """Names whose candidate has ``Priority: required``, sorted."""
        return tuple(n for n, v in self._versions.items() if v[0].package.priority == "required")

    # --- Debian semantics

    def satisfiers(self, relation: Relation) -> list[str]:
        """Names of real packages with some version satisfying ``relation``, in apt's order: the
        real package first, then providers by CompareProviders (Essential, native arch — always
        true here —, higher Priority), ties by name (apt would use cache order)."""
        found: list[str] = []
        if any(v.satisfies(relation) for v in self.versions(relation.name)):
            found.append(relation.name)
        providers = [
            name
            for name in self.providers(relation.name)
            if name != relation.name and any(v.satisfies(relation) for v in self.versions(name))
        ]
        providers.sort(key=self._provider_order)
        return found + providers

    def _provider_order(self, name: str) -> tuple[bool, int, str]:
        best = self.versions(name)[0].package
        return (not best.essential, _PRIORITY_RANK.get(best.priority, 5), name)

    def requirement_for(self, group: tuple[Relation, ...], weak: bool = False) -> Requirement:
        """The requirement one Depends/Recommends group becomes: a plain requirement on the named
        package when it is a single relation on a name nobody provides, else an OR group."""
        if len(group) == 1 and not weak and not self.providers(group[0].name):
            return VersionedRequirement(PackageKey(group[0].name), group[0])
        return AlternativesRequirement(AlternativesKey.of(group, weak))

    def relations(self, candidate: RepoCandidate, field_name: str) -> tuple[tuple[Relation, ...], ...]:
        return parse_relations(getattr(candidate.package, field_name))

    def dependencies(self, candidate: RepoCandidate, recommends: bool) -> tuple[Requirement, ...]:
        """Pre-Depends, Depends, (Recommends,) Conflicts and Breaks as requirements. Cached.

        Conflicts/Breaks become one requirement per real package that could match (by name or
        through Provides); a relation no version in the universe matches is dropped, and a package
        never conflicts with itself (Policy §7.4: Provides + Conflicts of the same name)."""
        cache_key = (id(candidate), recommends)
        cached = self._dependency_cache.get(cache_key)
        if cached is not None:
            return cached
        requirements: dict[Requirement, None] = {}
        for field_name in ("pre_depends", "depends"):
            for group in self.relations(candidate, field_name):
                requirements[self.requirement_for(group)] = None
        if recommends:
            for group in self.relations(candidate, "recommends"):
                requirements[self.requirement_for(group, weak=True)] = None
        for field_name, verb in (("conflicts", "conflicts with"), ("breaks", "breaks")):
            for group in self.relations(candidate, field_name):
                for relation in group:
                    for target in self._conflict_targets(relation):
                        if target != candidate.package.name:
                            requirements[ConflictRequirement(PackageKey(target), relation, verb)] = None
        result = tuple(requirements)
        self._dependency_cache[cache_key] = result
        return result

    def _conflict_targets(self, relation: Relation) -> list[str]:
        names = ([relation.name] if relation.name in self._versions else []) + list(
            self.providers(relation.name)
        )
        return [n for n in names if any(v.satisfies(relation) for v in self.versions(n))]

    def choices(
        self, key: AlternativesKey, preferred: Iterable[str]
    ) -> list[ChoiceCandidate | SkipCandidate]:
        """Every way to satisfy an OR group, in apt's order (pkgDepCache::MarkInstall): packages
        already wanted (``preferred``) first, then alternatives in written order, each with its
        satisfiers in provider order; a weak group ends with "skip"."""
        ordered: list[ChoiceCandidate | SkipCandidate] = []
        seen: set[tuple[Relation, str]] = set()
        for relation in key.group:
            for name in self.satisfiers(relation):
                if (relation, name) not in seen:
                    seen.add((relation, name))
                    ordered.append(ChoiceCandidate(key, relation, name))
        wanted = set(preferred)
        ordered.sort(key=lambda choice: choice.package_name not in wanted)  # stable
        if key.weak:
            ordered.append(SkipCandidate(key))
        return ordered


# --------------------------------------------------------------------------- provider


class DebProvider(resolvelib.AbstractProvider):
    """Answers resolvelib's questions by asking the Universe; holds no Debian rules itself."""

    def __init__(self, universe: Universe, recommends: bool = False, pins: Mapping[str, str] | None = None):
        self.universe = universe
        self.recommends = recommends
        self.pins = dict(pins or {})

    def identify(self, requirement_or_candidate: Requirement | Candidate) -> Identifier:
        return requirement_or_candidate.key

    def get_preference(
        self,
        identifier: Identifier,
        resolutions: Mapping,
        candidates: Mapping,
        information: Mapping,
        backtrack_causes: Sequence,
    ) -> tuple[int, str]:
        """``(rank, name)``, lowest first: real packages someone needs (0), then OR groups (1), then
        weak Recommends groups (2), then packages only named by Conflicts/Breaks (3), which are
        pinned "absent" last. Deferring OR groups lets apt's "an alternative already wanted
        wins" rule see as many wanted packages as possible. The name makes the order total."""
        return self._preference(identifier, information)

    @staticmethod
    def _preference(identifier: Identifier, information: Mapping) -> tuple[int, str]:
        if isinstance(identifier, AlternativesKey):
            return (2 if identifier.weak else 1, identifier.text)
        positive = any(info.requirement.positive for info in information[identifier])
        return (0 if positive else 3, identifier.name)

    def narrow_requirement_selection(
        self,
        identifiers: Iterable[Identifier],
        resolutions: Mapping,
        candidates: Mapping,
        information: Mapping,
        backtrack_causes: Sequence,
    ) -> list[Identifier]:
        """``[min(identifiers, key=get_preference)]``, the very pick resolvelib would make, but
        without a ``get_preference`` call (and resolvelib's wrapper around it) per unpinned name
        per round, and a package's requirements are only scanned (for ``positive``) when its name
        could still beat the best pick so far. Keys are unique (rank separates the two identifier
        types), so the pick does not depend on the order. resolvelib ≥ 1.1 calls this in each round
        with more than one unpinned name, before ``get_preference``; 1.0 never does, and then
        ``get_preference`` makes the same pick."""
        best: Identifier | None = None
        best_key = (4, "")
        for identifier in identifiers:
            if best_key[0] == 0 and isinstance(identifier, PackageKey) and identifier.name >= best_key[1]:
                continue  # rank 0 or 3, either way not below (0, best name): its requirements are not scanned
            key = self._preference(identifier, information)
            if key < best_key:
                best, best_key = identifier, key
        assert best is not None, "resolvelib passes at least one identifier"
        return [best]

    def find_matches(
        self,
        identifier: Identifier,
        requirements: Mapping[Identifier, Iterator[Requirement]],
        incompatibilities: Mapping[Identifier, Iterator[Candidate]],
    ) -> list[Candidate]:
        """Candidates satisfying every requirement on ``identifier``, preferred first."""
        wanted = list(requirements[identifier])
        excluded = list(incompatibilities[identifier])
        found: list[Any]
        if isinstance(identifier, PackageKey):
            found = list(self.universe.versions(identifier.name))
            pinned = self.pins.get(identifier.name)
            if pinned is not None:  # lock --update: keep the locked version unless it cannot be
                found.sort(key=lambda c: version_key(c.package.version) != version_key(pinned))
            if not any(r.positive for r in wanted):
                found.insert(0, AbsentCandidate(identifier))
        else:
            found = self.universe.choices(identifier, self._already_wanted(identifier, requirements))
        return [c for c in found if c not in excluded and all(r.is_satisfied_by(c) for r in wanted)]

    def _already_wanted(self, key: AlternativesKey, requirements: Mapping) -> list[str]:
        """Names of the group's satisfiers that are pinned or already positively required."""
        names = [n for relation in key.group for n in self.universe.satisfiers(relation)]
        return [
            n
            for n in names
            if n in self.pins
            or (PackageKey(n) in requirements and any(r.positive for r in requirements[PackageKey(n)]))
        ]

    def is_satisfied_by(self, requirement: Requirement, candidate: Candidate) -> bool:
        # The hottest call of a resolution: _memoised inlined, one dict lookup in the common case.
        answer = requirement.answers.get(candidate)
        if answer is None:
            answer = requirement.answers[candidate] = requirement.check(candidate)
        return answer

    def get_dependencies(self, candidate: Candidate) -> Sequence[Requirement]:
        if isinstance(candidate, RepoCandidate):
            return self.universe.dependencies(candidate, self.recommends)
        if isinstance(candidate, ChoiceCandidate):
            return (VersionedRequirement(PackageKey(candidate.package_name), candidate.relation),)
        return ()


class ProgressReporter(resolvelib.BaseReporter):
    """Sends one line per pin and per backtrack to ``emit`` (for ``--verbose``)."""

    def __init__(self, emit: Any) -> None:
        self.emit = emit

    def pinning(self, candidate: Any) -> None:
        if isinstance(candidate, RepoCandidate):
            self.emit(f"selecting {candidate.format_for_error()}")

    def resolving_conflicts(self, causes: Any) -> None:
        self.emit("backtracking: " + "; ".join(_describe_cause(c.requirement, c.parent, {}) for c in causes))


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class ResolveRequest:
    packages: tuple[str, ...]  # Packages= entries: name, name=version or name:arch
    base_set: str = "minbase"  # essential | minbase | none
    recommends: bool = False
    pins: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # name -> version to keep


@dataclass(frozen=True)
class ResolvedPackage:
    package: BinaryPackage
    dependencies: tuple[str, ...]  # packages of the result chosen for its Depends/Pre-Depends, sorted
    pre_dependencies: tuple[str, ...]  # the subset chosen for Pre-Depends, sorted
    reason: str  # "requested" | "essential" | "priority required" | "dependency of X" | "recommended by X"


@dataclass(frozen=True)
class Resolution:
    packages: tuple[ResolvedPackage, ...]  # sorted by name

    def names(self) -> tuple[str, ...]:
        return tuple(p.package.name for p in self.packages)


def resolve(
    universe: Universe, request: ResolveRequest, reporter: resolvelib.BaseReporter | None = None
) -> Resolution:
    """Resolve ``request`` against ``universe``; raise ResolutionFailed with an explanation.

    Cost: one resolvelib run; about one round per package in the result plus one per OR group,
    plus backtracking on conflicts. The result is re-checked by ``check_consistency``.
    """
    roots = _root_requirements(universe, request)
    provider = DebProvider(universe, request.recommends, request.pins)
    resolver = resolvelib.Resolver(provider, reporter or resolvelib.BaseReporter())
    try:
        result = resolver.resolve([requirement for requirement, _ in roots], max_rounds=MAX_ROUNDS)
    except ResolutionImpossible as e:
        first_reasons: dict[Requirement, str] = {}
        for requirement, reason in roots:  # a package both requested and essential is "requested"
            first_reasons.setdefault(requirement, reason)
        raise explain_conflict(e, universe, first_reasons) from None
    except ResolutionTooDeep as e:
        raise ResolutionFailed(f"dependency resolution gave up after {e.round_count} rounds") from None
    resolution = _build_resolution(universe, provider, result.mapping, roots)
    check_consistency(universe, [p.package for p in resolution.packages])
    return resolution


def _root_requirements(universe: Universe, request: ResolveRequest) -> list[tuple[Requirement, str]]:
    """The user's packages, then the base set; each with the reason shown in the result."""
    if request.base_set not in BASE_SETS:
        raise ResolutionFailed(
            f"unknown base set {request.base_set!r} (choose one of {', '.join(BASE_SETS)})"
        )
    roots: list[tuple[Requirement, str]] = []
    for entry in request.packages:
        name, _, version = entry.partition("=")
        name, _, arch = name.strip().partition(":")
        version = version.strip()
        if arch and arch not in (universe.architecture, "all", "any", "native"):
            raise ResolutionFailed(
                f"{entry!r}: only the native architecture ({universe.architecture}) is supported"
            )
        if not universe.exists(name):
            close = universe.suggest(name)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ResolutionFailed(f"unknown package {name!r}: no suite provides it{hint}")
        providers = universe.providers(name)
        if not universe.versions(name) and len(providers) > 1:
            # As apt: a virtual package with several providers must be chosen by the user.
            raise ResolutionFailed(
                f"{name} is a virtual package provided by {', '.join(providers)}; "
                "name the one you want in Packages="
            )
        if version:
            if not any(
                version_key(c.package.version) == version_key(version) for c in universe.versions(name)
            ):
                raise ResolutionFailed(f"{name} has no version {version}; {_available(universe, name)}")
            roots.append((PinnedRequirement(PackageKey(name), version), "requested"))
        else:
            roots.append((universe.requirement_for((Relation(name),)), "requested"))
    if request.base_set in ("essential", "minbase"):
        roots += [
            (VersionedRequirement(PackageKey(n), Relation(n)), "essential") for n in universe.essential_names
        ]
    if request.base_set == "minbase":
        # debootstrap/mmdebstrap minbase: Essential + Priority: required + apt.
        required = set(universe.required_names) | ({"apt"} if universe.versions("apt") else set())
        roots += [
            (VersionedRequirement(PackageKey(n), Relation(n)), "priority required") for n in sorted(required)
        ]
    return roots


def _build_resolution(universe: Universe, provider: DebProvider, mapping: Mapping[Identifier, Candidate],
                      roots: list[tuple[Requirement, str]]) -> Resolution:  # fmt: skip
    """Turn resolvelib's mapping into sorted ResolvedPackages with chosen edges and reasons."""
    chosen: dict[str, RepoCandidate] = {
        c.package.name: c for c in mapping.values() if isinstance(c, RepoCandidate)
    }

    def target(requirement: Requirement) -> str | None:
        if isinstance(requirement, AlternativesRequirement):
            choice = mapping.get(requirement.key)
            return choice.package_name if isinstance(choice, ChoiceCandidate) else None
        return requirement.key.name if requirement.key.name in chosen else None

    edges: dict[str, tuple[list[str], list[str], list[str]]] = {}  # name -> (pre, depends, recommends)
    for name, candidate in chosen.items():
        pre = [target(universe.requirement_for(g)) for g in universe.relations(candidate, "pre_depends")]
        dep = [target(universe.requirement_for(g)) for g in universe.relations(candidate, "depends")]
        rec = []
        if provider.recommends:
            rec = [
                target(universe.requirement_for(g, weak=True))
                for g in universe.relations(candidate, "recommends")
            ]
        edges[name] = (
            sorted({n for n in pre if n}),
            sorted({n for n in dep if n}),
            sorted({n for n in rec if n}),
        )

    reasons: dict[str, str] = {}
    for requirement, reason in roots:  # roots are listed requested → essential → required
        name = target(requirement)
        if name is not None and name not in reasons:
            reasons[name] = reason
    frontier = sorted(reasons)
    while frontier:  # breadth first, so each reason names a shortest path; sorted for determinism
        following: list[str] = []
        for parent in frontier:
            pre, dep, rec = edges[parent]
            for name in sorted(set(pre) | set(dep)):
                if name not in reasons:
                    reasons[name] = f"dependency of {parent}"
                    following.append(name)
            for name in rec:
                if name not in reasons:
                    reasons[name] = f"recommended by {parent}"
                    following.append(name)
        frontier = sorted(following)
    return Resolution(
        tuple(
            ResolvedPackage(
                package=chosen[name].package,
                dependencies=tuple(sorted(set(edges[name][0]) | set(edges[name][1]))),
                pre_dependencies=tuple(edges[name][0]),
                reason=reasons.get(name, "dependency"),
            )
            for name in sorted(chosen)
        )
    )


def check_consistency(universe: Universe, packages: Sequence[BinaryPackage]) -> None:
    """Raise InconsistentResolution unless every Pre-Depends/Depends group of every member is
    satisfied inside the set and no member Conflicts/Breaks another. O(total relations)."""
    members: dict[str, RepoCandidate] = {}
    for package in packages:
        found = [c for c in universe.versions(package.name) if c.package.version == package.version]
        if not found or package.name in members:
            raise InconsistentResolution(
                f"internal error: {package.name} {package.version} is not a unique member"
            )
        members[package.name] = found[0]
    by_provided: dict[str, list[RepoCandidate]] = {}
    for candidate in members.values():
        for name in [candidate.package.name] + [p.name for p in candidate.provides]:
            by_provided.setdefault(name, []).append(candidate)
    problems: list[str] = []
    for name in sorted(members):
        candidate = members[name]
        for field_name in ("pre_depends", "depends"):
            for group in universe.relations(candidate, field_name):
                if not any(m.satisfies(r) for r in group for m in by_provided.get(r.name, ())):
                    problems.append(
                        f"{candidate.format_for_error()} depends on {_group_text(group)}, not in the set"
                    )
        for field_name, verb in (("conflicts", "conflicts with"), ("breaks", "breaks")):
            for group in universe.relations(candidate, field_name):
                for relation in group:
                    for other in by_provided.get(relation.name, ()):
                        if (
                            other is not candidate
                            and other.package.name != name
                            and other.satisfies(relation)
                        ):
                            problems.append(
                                f"{candidate.format_for_error()} {verb} {other.format_for_error()}"
                            )
    if problems:
        raise InconsistentResolution(
            "internal error: the resolved set is inconsistent:\n  " + "\n  ".join(problems)
        )


# --------------------------------------------------------------------------- explanations


def explain_conflict(error: ResolutionImpossible, universe: Universe,
                     root_reasons: Mapping[Any, str] | None = None) -> ResolutionFailed:  # fmt: skip
    """One ResolutionFailed whose message holds the whole story: every requirement involved
    ("the user requested X", "X 1.2 depends on Y (>= 3)", "Z 2 conflicts with Y"), the versions
    that exist for each package named, and what could be changed."""
    reasons = dict(root_reasons or {})
    lines: list[str] = []
    targets: list[str] = []
    parents: list[str] = []
    for cause in error.causes:
        line = _describe_cause(cause.requirement, cause.parent, reasons)
        if line not in lines:
            lines.append(line)
        requirement = cause.requirement
        names = (
            [r.name for r in requirement.key.group]
            if isinstance(requirement, AlternativesRequirement)
            else [requirement.key.name]
        )
        targets += [n for n in names if n not in targets]
        if isinstance(cause.parent, RepoCandidate) and cause.parent.package.name not in parents:
            parents.append(cause.parent.package.name)
    chains = [
        f"{name} is wanted because: {chain}" for name in parents if (chain := _chain(universe, reasons, name))
    ]
    facts = [f"{name}: {_available(universe, name)}" for name in targets]
    message = (
        "cannot resolve the requested packages because these requirements conflict:\n  "
        + "\n  ".join(lines + chains)
        + "\nwhat the suites offer:\n  "
        + "\n  ".join(facts)
        + "\nTo fix this, you could: request another version or alternative in Packages=, remove one of the "
        "conflicting packages, or add a suite that has a suitable version."
    )
    return ResolutionFailed(message)


def _chain(universe: Universe, reasons: Mapping[Any, str], name: str) -> str:
    """A shortest dependency path from a root to ``name`` ("the user requested desktop → desktop
    depends on sound → …"), following every alternative and provider of the newest versions.
    Error path only: a breadth-first search over at most the whole universe."""
    roots: dict[str, str] = {}
    for requirement, reason in reasons.items():
        names = (
            [r.name for r in requirement.key.group]
            if isinstance(requirement, AlternativesRequirement)
            else [requirement.key.name]
        )
        for root in names:
            roots.setdefault(
                root, "the user requested" if reason == "requested" else f"the base set ({reason}) needs"
            )
    came_from: dict[str, str | None] = {root: None for root in roots}
    frontier = sorted(roots)
    while frontier and name not in came_from:
        following: list[str] = []
        for parent in frontier:
            candidate = universe.candidate(parent)
            if candidate is None:
                continue
            for field_name in ("pre_depends", "depends"):
                for group in universe.relations(candidate, field_name):
                    for relation in group:
                        for child in universe.satisfiers(relation):
                            if child not in came_from:
                                came_from[child] = parent
                                following.append(child)
        frontier = sorted(following)
    if name not in came_from:
        return ""
    path = [name]
    while (previous := came_from[path[-1]]) is not None:
        path.append(previous)
    path.reverse()
    return f"{roots[path[0]]} {path[0]}" + "".join(
        f" → {a} depends on {b}" for a, b in itertools.pairwise(path)
    )


def _describe_cause(requirement: Requirement, parent: Candidate | None, reasons: Mapping[Any, str]) -> str:
    wanted = requirement.format_for_error()
    if parent is None:
        reason = reasons.get(requirement, "requested")
        if reason == "requested":
            return f"the user requested {wanted}"
        return f"the base set needs {wanted} ({reason})"
    if isinstance(parent, ChoiceCandidate):
        return f"'{parent.key.text}' would be satisfied by {parent.package_name}, which needs {wanted}"
    return f"{parent.format_for_error()} {requirement.verb} {wanted}"


def _available(universe: Universe, name: str) -> str:
    versions = [c.package.version for c in universe.versions(name)]
    providers = [p for p in universe.providers(name) if p != name]
    parts = []
    if versions:
        parts.append("available versions " + ", ".join(versions))
    if providers:
        parts.append("provided by " + ", ".join(providers[:10]) + (" …" if len(providers) > 10 else ""))
    if not parts:
        close = universe.suggest(name)
        return "no such package in any suite" + (f" (did you mean {', '.join(close)}?)" if close else "")
    return "; ".join(parts)


def _group_text(group: tuple[Relation, ...]) -> str:
    return " | ".join(str(relation) for relation in group)
