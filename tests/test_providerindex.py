"""The cached universe's Provides index: buckets decoded only when a name in them is looked up."""

from __future__ import annotations

import marshal

import pytest

from reprobuild.errors import RepositoryError
from reprobuild.providerindex import BUCKETS, ProvidersIndex, bucket_of

PROVIDERS = {f"librust-crate{i}+feature-dev": (f"librust-crate{i}-dev",) for i in range(3000)} | {
    "mail-transport-agent": ("exim4-daemon-light", "postfix"), "awk": ("gawk", "mawk"), "c-compiler": ("gcc",)}


def test_round_trip_answers_as_the_dict() -> None:
    index = ProvidersIndex(ProvidersIndex.of(PROVIDERS).buckets())
    assert index.get("awk") == ("gawk", "mawk") and index["c-compiler"] == ("gcc",)
    assert index.get("libc6") == () and index.get("libc6", ("x",)) == ("x",) and "libc6" not in index
    with pytest.raises(KeyError):
        index["libc6"]
    assert "mail-transport-agent" in index and 42 not in index
    assert dict(index) == PROVIDERS and len(index) == len(PROVIDERS) and list(index) == sorted(PROVIDERS)
    assert index.get("awk") == ("gawk", "mawk")  # after every bucket is decoded, the same answers
    assert ProvidersIndex.of({}).get("awk") == () and len(ProvidersIndex.of({})) == 0


def test_only_the_buckets_of_looked_up_names_are_decoded() -> None:
    index = ProvidersIndex(ProvidersIndex.of(PROVIDERS).buckets())
    for name in ("awk", "libc6", "awk", "c-compiler"):
        index.get(name)
    assert {i for i in range(BUCKETS) if index._decoded[i]} == {bucket_of(n) for n in ("awk", "libc6", "c-compiler")}


def test_a_damaged_bucket_is_a_clear_error_when_needed() -> None:
    buckets = list(ProvidersIndex.of(PROVIDERS).buckets())
    damaged = bucket_of("awk")
    elsewhere = next(f"n{i}" for i in range(BUCKETS * 4) if bucket_of(f"n{i}") != damaged)  # in another bucket
    assert bucket_of("c-compiler") != damaged
    for bad in (b"\xff not marshal", marshal.dumps({"awk": "gawk"}), marshal.dumps({elsewhere: ("x",)}),
                marshal.dumps(["awk"]), marshal.dumps({"awk": ()})):  # fmt: skip
        buckets[damaged] = bad
        index = ProvidersIndex(tuple(buckets))
        assert index.get("c-compiler") == ("gcc",)  # the other buckets still answer
        with pytest.raises(RepositoryError, match=f"damaged \\(bucket {damaged}\\)"):
            index.get("awk")
    for wrong in ((), tuple(buckets[:-1]), tuple(buckets[:-1]) + ("text",)):
        with pytest.raises(ValueError):
            ProvidersIndex(wrong)  # type: ignore[arg-type]
