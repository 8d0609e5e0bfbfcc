#!/usr/bin/env python3
"""Benchmark: reprobuild's fetcher vs. ``apt-get download`` for one package list.

Both start empty (a fresh store; a fresh download directory) and fetch the same .debs from the
mirror of the host's apt sources (read at run time; no host name is written here):

    bench/fetch.py                         # the host's Priority: required packages
    bench/fetch.py --packages bash coreutils libc6
    bench/fetch.py --lock myimage/reprobuild.lock -C myimage
    bench/fetch.py --jobs 8 --rounds 3     # median of 3 alternating rounds

Prints a table (packages, bytes, seconds, MiB/s) and, with --json, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reprobuild.fetch import FetchItem, fetch_all, make_session
from reprobuild.progress import make_progress
from reprobuild.store import Store

# `apt-get download --print-uris` lines: 'URI' filename size SHA256:hex
_URI_LINE = re.compile(r"^'(?P<uri>[^']+)' (?P<file>\S+) (?P<size>\d+) SHA256:(?P<sha>[0-9a-f]{64})$")
APT_OPTS = ["-o", "APT::Sandbox::User=root", "-o", "Debug::NoLocking=1"]


@dataclass(frozen=True)
class Run:
    tool: str
    packages: int
    bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0


def required_packages() -> list[str]:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Priority}\n"],
                         capture_output=True, text=True, check=True).stdout
    return sorted({line.split()[0] for line in out.splitlines() if line.endswith(" required")})


def items_from_apt(specs: list[str]) -> list[FetchItem]:
    """What apt would download for ``specs`` (name or name=version): URL, size, sha256."""
    out = subprocess.run(["apt-get", *APT_OPTS, "download", "--print-uris", *specs],
                         capture_output=True, text=True, check=True).stdout
    items = []
    for line in out.splitlines():
        m = _URI_LINE.match(line.strip())
        if m:
            items.append(FetchItem(m["file"], m["sha"], int(m["size"]), (m["uri"],)))
    return items


def items_from_lock(lock_path: Path, directory: Path) -> tuple[list[FetchItem], list[str]]:
    from reprobuild.lock_urls import fetch_items

    from reprobuild.config import load_spec
    from reprobuild.lockfile import load_lock

    lock = load_lock(lock_path)
    items = list(fetch_items(lock, load_spec(directory)))
    specs = [f"{p.name}:{p.architecture}={p.version}" for p in lock.all_packages()]
    return items, specs


def bench_reprobuild(items: list[FetchItem], jobs: int, quiet: bool) -> Run:
    with tempfile.TemporaryDirectory(prefix="bench-store-") as d:
        store = Store(d)
        session = make_session(jobs)
        t0 = time.monotonic()
        report = fetch_all(store, items, jobs=jobs, session=session, progress=make_progress(quiet))
        secs = time.monotonic() - t0
        session.close()
        assert store.verify().ok
        return Run(f"reprobuild fetch -j{jobs}", len(report.fetched), report.bytes_downloaded, secs)


def bench_apt(specs: list[str]) -> Run:
    with tempfile.TemporaryDirectory(prefix="bench-apt-") as d:
        t0 = time.monotonic()
        subprocess.run(["apt-get", *APT_OPTS, "-q", "download", *specs], cwd=d, check=True,
                       stdout=subprocess.DEVNULL)
        secs = time.monotonic() - t0
        debs = list(Path(d).glob("*.deb"))
        return Run("apt-get download", len(debs), sum(p.stat().st_size for p in debs), secs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lock", type=Path, help="take the package list from this lock")
    ap.add_argument("-C", "--directory", type=Path, default=Path("."), help="image directory (with --lock)")
    ap.add_argument("--packages", nargs="+", help="package names (default: Priority: required)")
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds; the median is reported")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if shutil.which("apt-get") is None:
        print("apt-get is needed", file=sys.stderr)
        return 2
    if args.lock:
        items, specs = items_from_lock(args.lock, args.directory)
    else:
        specs = args.packages or required_packages()
        items = items_from_apt(specs)
    runs: dict[str, list[Run]] = {}
    for r in range(args.rounds):
        # Alternate who goes first, so a warming mirror cache favours neither.
        order = [bench_apt, bench_reprobuild] if r % 2 == 0 else [bench_reprobuild, bench_apt]
        for fn in order:
            run = bench_apt(specs) if fn is bench_apt else bench_reprobuild(items, args.jobs, args.quiet)
            runs.setdefault(run.tool, []).append(run)
    rows = []
    for tool, rs in runs.items():
        secs = statistics.median(x.seconds for x in rs)
        rows.append(Run(tool, rs[0].packages, rs[0].bytes, secs))
    if args.json:
        print(json.dumps([{"tool": r.tool, "packages": r.packages, "bytes": r.bytes, "seconds": round(r.seconds, 3),
                           "bytes_per_second": round(r.rate)} for r in rows], indent=2))
    else:
        print(f"{'tool':<24} {'packages':>8} {'MiB':>9} {'seconds':>8} {'MiB/s':>8}")
        for r in rows:
            print(f"{r.tool:<24} {r.packages:>8} {r.bytes / 2**20:>9.1f} {r.seconds:>8.2f} {r.rate / 2**20:>8.2f}")
        print(f"(median of {args.rounds} round(s); {len(items)} package(s) requested)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
