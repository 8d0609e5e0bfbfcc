#!/usr/bin/env python3
"""Benchmark: incremental rebuilds with the content-keyed cache (issue 9).

For each reference definition (copies of lock/minimal and lock/bootable, with an extra tree
added), in one run and one fresh store:

1. full build (empty cache);
2. rebuild with nothing changed;
3. rebuild after editing one file in the extra tree;
4. rebuild after adding one package (the re-lock is timed separately).

Each step runs the real command line (``python -m reprobuild build --locked``), so interpreter
start-up is included, as a user would see it. Package files are hard-linked from an existing
store when one is given (``--seed-store``, default the user's store) so the mirror is only asked
for what is missing; cache entries are never copied, so step 1 is a genuinely cold build.
mkosi ``--incremental`` runs alongside when mkosi is installed; otherwise its row says so.

    bench/incremental.py                      # both definitions
    bench/incremental.py --only minimal --json
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from reprobuild.store import Store

ADDED_PACKAGE = "less"  # small, no maintainer-script surprises, not in minbase
TARGETS = {"no-change": {"minimal": 1.0, "bootable": 1.0}, "extra-tree edit": {"minimal": 3.0, "bootable": 10.0}}
SIGNING_KEYS = {"LockKey": None, "VerityKey": "keys/verity.key", "VerityCertificate": "keys/verity.crt",
                "SecureBootKey": "keys/secure-boot.key", "SecureBootCertificate": "keys/secure-boot.crt"}


def reprobuild(*args: str, env: dict[str, str]) -> tuple[float, dict]:
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "reprobuild", *args], check=False, env=env, text=True,
                       capture_output=True)
    elapsed = time.monotonic() - started
    if r.returncode != 0:
        raise SystemExit(f"reprobuild {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    try:
        return elapsed, json.loads(r.stdout)
    except ValueError:
        return elapsed, {}


def make_definition(root: Path, name: str) -> Path:
    d = root / name
    (d / "extra/etc").mkdir(parents=True)
    (d / "extra/etc/bench-motd").write_text("version 1\n")
    lines = []
    for line in (REPO / "lock" / name / "reprobuild.conf").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in SIGNING_KEYS:
            if SIGNING_KEYS[key] is None:
                continue
            line = f"{key}={REPO / SIGNING_KEYS[key]}"
        lines.append(line)
    (d / "reprobuild.conf").write_text("\n".join(lines) + "\n[Content]\nExtraTrees=extra\n")
    return d


def seed_store(store: Path, source: Path | None) -> None:
    """Hard-link the objects (not the cache index) of an existing store: no re-download."""
    Store(store)
    if source is None or not (source / "objects").is_dir():
        return
    for sub in (source / "objects/sha256").iterdir():
        (store / "objects/sha256" / sub.name).mkdir(parents=True, exist_ok=True)
        for obj in sub.iterdir():
            dest = store / "objects/sha256" / sub.name / obj.name
            if not dest.exists():
                try:
                    os.link(obj, dest)
                except OSError:
                    shutil.copy2(obj, dest)


def bench_definition(root: Path, name: str, env: dict[str, str]) -> dict:
    d = make_definition(root, name)
    out = d / "out"
    lock_s, _ = reprobuild("lock", "-C", str(d), "-q", env=env)
    build = ("build", "-C", str(d), "--locked", "-o", str(out), "--json")
    rows = {}
    rows["full build"] = reprobuild(*build, env=env)
    rows["no-change"] = reprobuild(*build, env=env)
    (d / "extra/etc/bench-motd").write_text("version 2\n")
    rows["extra-tree edit"] = reprobuild(*build, env=env)
    with open(d / "reprobuild.conf", "a") as f:
        f.write(f"\n[Content]\nPackages={ADDED_PACKAGE}\n")
    relock_s, _ = reprobuild("lock", "-C", str(d), "-q", env=env)
    rows["package add"] = reprobuild(*build, env=env)
    result = {"lock_seconds": round(lock_s, 2), "relock_seconds": round(relock_s, 2), "steps": {}}
    for step, (seconds, doc) in rows.items():
        result["steps"][step] = {"seconds": round(seconds, 2), "cache_hits": doc.get("cache_hits", []),
                                 "timings": doc.get("timings", {}), "sha256": doc.get("manifest", {}).get("sha256")}
    return result


def mkosi_row() -> str:
    exe = shutil.which("mkosi")
    if exe is None:
        return "mkosi not installed: no side-by-side run (seed figures: ~5 s container, ~30 s VM image)"
    version = subprocess.run([exe, "--version"], check=False, capture_output=True, text=True).stdout.strip()
    return f"{version} found, but no equivalent mkosi definition is shipped: not run"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("minimal", "bootable"), action="append")
    parser.add_argument("--seed-store", type=Path, default=Store.default_root())
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    names = args.only or ["minimal", "bootable"]
    root = Path(tempfile.mkdtemp(prefix="reprobuild-bench-incremental-"))
    try:
        store = root / "store"
        seed_store(store, args.seed_store)
        env = {**os.environ, "REPROBUILD_STORE": str(store)}
        env.pop("SOURCE_DATE_EPOCH", None)
        results = {name: bench_definition(root, name, env) for name in names}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    mkosi = mkosi_row()
    if args.json:
        print(json.dumps({"results": results, "mkosi": mkosi}, indent=2, sort_keys=True))
        return 0
    print(f"{'definition':<10} {'step':<16} {'seconds':>8} {'target':>7}  cache hits")
    for name, r in results.items():
        for step, row in r["steps"].items():
            target = TARGETS.get(step, {}).get(name)
            mark = "" if target is None else f"{target:>6.0f}s" if row["seconds"] <= target else f"{target:>5.0f}s!"
            print(f"{name:<10} {step:<16} {row['seconds']:>8.2f} {mark:>7}  {', '.join(row['cache_hits']) or '-'}")
        print(f"{name:<10} {'(lock, re-lock)':<16} {r['lock_seconds']:>8.2f} {r['relock_seconds']:>7.2f}")
    print(f"mkosi --incremental: {mkosi}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
