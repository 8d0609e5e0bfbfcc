"""The Provides index of a universe (virtual name → the real packages providing it), kept in the
cached universe as hash buckets that are decoded only when a name in them is looked up.

trixie's index has ~66 000 virtual names (almost all ``librust-*+feature-dev``, each with one
provider); unmarshalling all of them was ~25 ms of a 30 ms universe load, while a resolution looks
up a few hundred names. Each name's bucket is ``zlib.crc32(name) % BUCKETS`` (stable across
processes, unlike ``hash``), and each bucket is one marshalled ``dict``. Lookups are remembered,
absent names too, so a name costs one bucket decode (a few µs) and one CRC once, then a dict hit.
"""

from __future__ import annotations

import marshal
import zlib
from collections.abc import Iterator, Mapping

from reprobuild.errors import RepositoryError

BUCKETS = 4096
_ABSENT: tuple[str, ...] = ()


def bucket_of(name: str) -> int:
    return zlib.crc32(name.encode("utf-8", "surrogateescape")) % BUCKETS


class ProvidersIndex(Mapping[str, tuple[str, ...]]):
    """A read-only ``{virtual name: provider names}`` over ``BUCKETS`` marshalled buckets."""

    def __init__(self, buckets: tuple[bytes, ...]) -> None:
        if len(buckets) != BUCKETS or not all(isinstance(b, bytes) for b in buckets):
            raise ValueError("a Provides index needs its buckets")
        self._buckets = buckets
        self._decoded = bytearray(BUCKETS)
        self._known: dict[str, tuple[str, ...]] = {}  # looked up or decoded; () for absent names

    @classmethod
    def of(cls, providers: Mapping[str, tuple[str, ...]]) -> ProvidersIndex:
        split: list[dict[str, tuple[str, ...]]] = [{} for _ in range(BUCKETS)]
        for name in sorted(providers):
            split[bucket_of(name)][name] = tuple(providers[name])
        return cls(tuple(marshal.dumps(b) if b else b"" for b in split))

    def buckets(self) -> tuple[bytes, ...]:
        """The stored form (for `ProvidersIndex(buckets)`)."""
        return self._buckets

    def _decode(self, index: int) -> None:
        """Merge bucket ``index`` into what is known. A damaged bucket (only a damaged cache file
        can hold one) raises RepositoryError when it is first needed, as a damaged stanza does."""
        data = self._buckets[index]
        if data:
            try:
                bucket = marshal.loads(data)
            except (EOFError, ValueError, TypeError):
                bucket = None
            if not isinstance(bucket, dict) or not all(
                isinstance(k, str) and bucket_of(k) == index and isinstance(v, tuple) and v
                and all(isinstance(n, str) for n in v) for k, v in bucket.items()
            ):  # fmt: skip
                raise RepositoryError(f"the cached universe's Provides index is damaged (bucket {index})",
                                      hint="remove the store's indices/derived/universe directory: it is rebuilt")  # fmt: skip
            self._known.update(bucket)
        self._decoded[index] = 1

    def get(self, name: str, default: tuple[str, ...] = _ABSENT) -> tuple[str, ...]:  # type: ignore[override]
        found = self._known.get(name)
        if found is None:
            index = bucket_of(name)
            if not self._decoded[index]:
                self._decode(index)
            found = self._known.setdefault(name, _ABSENT)
        return found or default

    def __getitem__(self, name: str) -> tuple[str, ...]:
        found = self.get(name)
        if not found:
            raise KeyError(name)
        return found

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.get(name))

    def _decode_all(self) -> None:
        for index in range(BUCKETS):
            if not self._decoded[index]:
                self._decode(index)

    def __iter__(self) -> Iterator[str]:
        """Every virtual name, sorted (decodes every bucket: for "did you mean" and tests)."""
        self._decode_all()
        return iter(sorted(name for name, found in self._known.items() if found))

    def __len__(self) -> int:
        self._decode_all()
        return sum(1 for found in self._known.values() if found)
