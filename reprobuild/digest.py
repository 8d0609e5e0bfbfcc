"""Canonical JSON and digests of JSON data: the one place that defines "the same inputs give the
same bytes" for cache keys, provenance payloads and configuration digests."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (not ASCII-escaped): equal data always gives equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_digest(value: Any, domain: bytes = b"") -> str:
    """Hex sha256 of ``domain`` (a separator naming what is hashed) + the canonical JSON of ``value``."""
    return hashlib.sha256(domain + canonical_json(value)).hexdigest()
