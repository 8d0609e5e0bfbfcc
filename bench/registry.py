#!/usr/bin/env python3
"""Benchmark: lock/bootable's package objects through a local OCI registry, reprobuild vs skopeo.

Debian's docker-registry on 127.0.0.1 (plain HTTP, a fresh storage directory per round; the test
fixture in tests/registry_fixture.py starts it). Per round, with a monotonic clock:

  1. ``reprobuild store push`` of every object of lock/bootable's lock (4 uploads at a time);
  2. the same again (every blob present: HEAD requests only);
  3. reprobuild's fetch into an empty store with only ``oci://`` as the source (4 parallel jobs,
     each object's size and sha256 checked);
  4. ``skopeo copy docker://…:lock-… oci:DIR`` of the same artifact (the reference pull);
  5. ``skopeo copy oci:DIR docker://…/other:x`` (the reference push, into a new repository).

The objects come from the host's mirror the first time (``reprobuild fetch`` into a scratch
store; the user's default store is tried first as a file:// substituter).

    python bench/registry.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reprobuild.fetch import FetchItem, fetch_all
from reprobuild.lockfile import load_lock
from reprobuild.store import Store
from tests.registry_fixture import start_registry

DEFINITION = ROOT / "lock" / "bootable"


def timed(*argv: str) -> tuple[float, str]:
    env = {**os.environ, "DOCKER_CONFIG": "/nonexistent"}
    started = time.monotonic()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    if r.returncode:
        raise SystemExit(f"{' '.join(argv[:4])}… failed: {r.stderr[-2000:]}")
    return time.monotonic() - started, r.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    py = sys.executable
    lock_path = DEFINITION / "reprobuild.lock"
    lock = load_lock(lock_path)
    with tempfile.TemporaryDirectory(prefix="reprobuild-bench-registry-") as tmp:
        work = Path(tmp)
        store = work / "store"
        default = Store.default_root()
        subs = ["--substituter", f"file://{default}"] if default.is_dir() else []
        timed(py, "-m", "reprobuild", "fetch", "-C", str(DEFINITION), "--store", str(store), "-q", *subs)
        items = [FetchItem(name=p.name, sha256=p.sha256, size=p.size, urls=()) for p in lock.all_packages()]
        size = sum(i.size for i in items)
        rows = []
        for n in range(args.rounds):
            registry = start_registry(work / f"registry{n}", tls=False)
            try:
                repo = f"{registry.address}/bench/store"
                push = ("-m", "reprobuild", "store", "push", repo, "--lock", str(lock_path), "--store", str(store),
                        "--json")  # fmt: skip
                t_push, out = timed(py, *push)
                ref = json.loads(out)["reference"].split("@")[0]
                t_again, _ = timed(py, *push)
                started = time.monotonic()
                fetch_all(Store(work / f"pulled{n}"), items, [f"oci://{repo}"], jobs=4)
                t_fetch = time.monotonic() - started
                t_skopeo_pull, _ = timed("skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
                                         f"oci:{work / f'layout{n}'}:x")  # fmt: skip
                t_skopeo_push, _ = timed("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                                         f"oci:{work / f'layout{n}'}:x", f"docker://{registry.address}/bench/other:x")  # fmt: skip
                rows.append((t_push, t_again, t_fetch, t_skopeo_pull, t_skopeo_push))
            finally:
                registry.stop()
                shutil.rmtree(work / f"registry{n}", ignore_errors=True)
                shutil.rmtree(work / f"pulled{n}", ignore_errors=True)
                shutil.rmtree(work / f"layout{n}", ignore_errors=True)
    print(f"lock/bootable: {len(items)} objects, {size / 1e6:.1f} MB")
    print("| round | store push s | push again s | fetch from oci:// s | skopeo pull s | skopeo push s |")
    print("|---|---|---|---|---|---|")
    for n, row in enumerate(rows, 1):
        print(f"| {n} | " + " | ".join(f"{x:.2f}" for x in row) + " |")


if __name__ == "__main__":
    main()
