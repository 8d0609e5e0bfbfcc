"""What a store object is, in words, for ``store gc --dry-run`` (and anyone listing objects).

Two sources, both read-only: the build cache's index (``<store>/cache/<stage>/<key>.json`` names
the object a stage produced and its metadata, see :mod:`reprobuild.cache`), and the object's own
first bytes (a .deb's control data; otherwise the magic numbers of the formats the build writes:
GPT "EFI PART" at byte 512, erofs 0xE0F5E1E2 at byte 1024, ustar at byte 257, cpio "070701",
zstd, xz). Cost: one small read per object, plus reading the cache index once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from reprobuild.cache import INDEX_DIR
from reprobuild.errors import ReprobuildError
from reprobuild.manifest import OUTPUT_FILES
from reprobuild.progress import format_bytes
from reprobuild.store import Store

_STAGE_WORDS = {"install": "installed packages tree", "tree": "configured root tree", "tools": "tools tree",
                "initrd": "initrd", "esp": "ESP with the UKI"}  # fmt: skip
# Output stages → the output format whose file their object is.
_OUTPUT_STAGES = {"ddi": "disk", "tar": "tar", "cpio": "cpio", "oci": "oci"}
# Index directories that hold no stage entries.
_NOT_STAGES = ("outputs", "explain")


def sniff(path: Path) -> str:
    """What the bytes at ``path`` are, from their first bytes (a .deb: its package)."""
    from reprobuild.debian.deb import read_control

    try:
        with open(path, "rb") as f:
            head = f.read(1100)
        size = path.stat().st_size
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if head.startswith(b"!<arch>\n"):
        try:
            c = read_control(path)
        except (ReprobuildError, OSError, ValueError):
            return f"an ar archive, not a readable .deb ({format_bytes(size)})"
        return f"package {c.package} {c.version} {c.architecture}"
    kinds = [(head[512:520] == b"EFI PART", "disk image (GPT)"),
             (head[1024:1028] == bytes.fromhex("e2e1f5e0"), "erofs file system"),
             (head[257:262] == b"ustar", "tar archive"),
             (head.startswith(b"070701"), "cpio archive"),
             (head.startswith(b"\x28\xb5\x2f\xfd"), "zstd data"),
             (head.startswith(b"\xfd7zXZ\x00"), "xz data"),
             (head.startswith(b"Package: "), "Packages index")]  # fmt: skip
    what = next((name for hit, name in kinds if hit), "data")
    return f"{what}, {format_bytes(size)}"


def _describe_entry(store: Store, stage: str, meta: dict[str, Any]) -> str:
    if stage == "unpacked":
        deb = meta.get("deb")
        of = sniff(store.path(deb)) if isinstance(deb, str) and store.has(deb) else "a .deb no longer in the store"
        return f"unpacked payload of {of} (build cache)"
    if stage == "fs":
        kind = meta.get("fs", {}).get("type", "root") if isinstance(meta.get("fs"), dict) else "root"
        return f"{kind} file system (build cache)"
    if stage in _OUTPUT_STAGES:
        manifest = meta  # the output stage's metadata: what the manifest records of the disk
        name = OUTPUT_FILES[_OUTPUT_STAGES[stage]]
        facts = [str(manifest[k]) for k in ("architecture",) if manifest.get(k)]
        if manifest.get("root_hash"):
            facts.append(f"root hash {str(manifest['root_hash'])[:12]}…")
        if isinstance(manifest.get("size"), int):
            facts.append(format_bytes(manifest["size"]))
        of = f" of {manifest['definition']}" if isinstance(manifest.get("definition"), str) else ""
        return f"{name}{of} (build output{': ' + ', '.join(facts) if facts else ''})"
    return f"{_STAGE_WORDS.get(stage, stage)} (build cache)"


def describe_objects(store: Store, shas: Iterable[str]) -> dict[str, str]:
    """sha256 → what that object is, for each of ``shas``."""
    wanted = set(shas)
    out: dict[str, str] = {}
    index = store.root / INDEX_DIR
    stages = sorted(d.name for d in index.iterdir() if d.is_dir() and d.name not in _NOT_STAGES) \
        if index.is_dir() else []
    for stage in stages:
        for entry in sorted((index / stage).glob("*.json")):
            try:
                doc = json.loads(entry.read_text())
            except (OSError, ValueError):
                continue
            obj = doc.get("object") if isinstance(doc, dict) else None
            if obj in wanted and obj not in out:
                out[obj] = _describe_entry(store, stage, doc.get("meta") or {})
    for sha in sorted(wanted - out.keys()):
        out[sha] = sniff(store.path(sha))
    return out
