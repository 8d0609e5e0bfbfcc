#!/usr/bin/env python3
"""Benchmark: ``reprobuild release`` of ``lock/bootable`` — time, and the release's size against
the single ``image.raw`` (issue 16).

One run, same machine, same mirror (the host's apt sources; no host name is written here):

  1. ``lock/bootable`` with ``ImageId=``/``ImageVersion=`` and ``Bootloader=systemd-boot``, locked;
  2. ``reprobuild release`` into an empty store (fetch + build + split + SHA256SUMS), then again
     with the store warm and ``--no-cache`` (every stage built again): the two release
     directories must be byte-identical;
  3. the same with ``[Updates]`` (A/B slots of ``SlotSize=``): the image grows by the empty
     slots (holes: its allocated size barely moves), the release does not;
  4. ``release --compress gzip``, ``xz`` and ``zstd`` of the image of step 2 (served by the stage
     cache): the time is the compression's, one core each artifact.

    python bench/release.py [--write-docs] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stagebench import (
    check,
    facts_line,
    machine_facts,
    make_definition,
    measure,
    mib,
    reprobuild,
    secs,
    table,
    update_docs_section,
    wait_for_quiet,
)

CONF = "[Build]\nImageId=bench\nImageVersion=1\nBootloader=systemd-boot\n"
UPDATES = "[Updates]\nSource=https://updates.example.invalid/bench/\nSlotSize=1G\n"


def _release(directory: Path, store: Path, out: Path, no_cache: bool, *extra: str) -> tuple[float, dict]:
    argv = reprobuild("release", "-C", str(directory), "--store", str(store), "-o", str(out / "rel"),
                      "--build-output", str(out / "build"), "--json", *(["--no-cache"] if no_cache else []), *extra)
    m = check(measure(argv, stdout_only=True, timeout=1800), "reprobuild release")
    return m.seconds, json.loads(m.output)


def _sizes(out: Path) -> tuple[int, int, int]:
    """(release bytes, image.raw apparent bytes, image.raw allocated bytes)."""
    rel = sum(p.stat().st_size for p in (out / "rel").iterdir())
    st = (out / "build/image.raw").stat()
    return rel, st.st_size, st.st_blocks * 512


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--keep", type=Path)
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-release-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        wait_for_quiet()
        facts = machine_facts()
        rows = []
        plain = make_definition(work / "defs", "bootable", work / "index-store", extra_conf=CONF)
        t_cold, j = _release(plain, work / "store", work / "cold", no_cache=False)
        t_warm, _ = _release(plain, work / "store", work / "warm", no_cache=True)
        same = all((work / "cold/rel" / f).read_bytes() == (work / "warm/rel" / f).read_bytes()
                   for f in os.listdir(work / "cold/rel"))
        rel, apparent, allocated = _sizes(work / "cold")
        files = ", ".join(f"{a['source']} {mib(a['size'])}" for a in j["artifacts"])
        rows.append(["release, cold store", secs(t_cold), mib(rel), mib(apparent), mib(allocated), files])
        rows.append(["release, warm store --no-cache", secs(t_warm), mib(_sizes(work / "warm")[0]), "", "",
                     "identical to the cold release" if same else "DIFFERS from the cold release"])
        ab = make_definition(work / "defs-ab", "bootable", work / "index-store", extra_conf=CONF + UPDATES)
        t_ab, _ = _release(ab, work / "store", work / "ab", no_cache=False)
        rel, apparent, allocated = _sizes(work / "ab")
        rows.append(["release with [Updates] SlotSize=1G, warm store", secs(t_ab), mib(rel), mib(apparent),
                     mib(allocated), "A/B: three empty slots (holes)"])
        for compression in ("gzip", "xz", "zstd"):
            t_c, jc = _release(plain, work / "store", work / f"c-{compression}", False, "--compress", compression)
            size = sum(a["size"] for a in jc["artifacts"])
            root = next(a for a in jc["artifacts"] if a["source"] == "root")
            rows.append([f"release --compress {compression}, image cached", secs(t_c), mib(size), "", "",
                         f"root {mib(root['size'])} ({root['file'].rsplit('.', 1)[-1]})"])
        body = "\n".join([
            "`bench/release.py`: `reprobuild release` of `lock/bootable` with `ImageId=`, `ImageVersion=` and",
            "`Bootloader=systemd-boot`: build from the lock, split root, verity, verity signature and UKI,",
            "`SHA256SUMS` (no signing key: gpg's time is not the point). Release MiB is every file of the",
            "release directory; image.raw is the disk image the release was split from, apparent and",
            "allocated (holes are not allocated). The issue's seed compares mkosi's 1.2 GB image with",
            "bootc's 1.9 GB; neither was measured here.",
            "",
            facts_line(facts),
            "",
            table(["run", "wall s", "release MiB", "image.raw MiB", "allocated MiB", "notes"], rows),
            "",
            "```sh",
            "python bench/release.py --write-docs",
            ("python -m reprobuild release -C $WORK/defs/bootable --store $WORK/store -o $WORK/cold/rel "
             "--build-output $WORK/cold/build --json"),
            ("python -m reprobuild release -C $WORK/defs/bootable --store $WORK/store -o $WORK/warm/rel "
             "--build-output $WORK/warm/build --json --no-cache"),
            ("python -m reprobuild release -C $WORK/defs/bootable --store $WORK/store -o $WORK/c-gzip/rel "
             "--build-output $WORK/c-gzip/build --json --compress gzip  # and xz, zstd"),
            "```",
        ])
        print(body)
        if args.write_docs:
            update_docs_section("release", body)
        return 0 if same else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
