#!/usr/bin/env python3
"""Benchmark ``reprobuild diff`` against diffoscope on two DDIs: identical, and differing in one file.

Usage: bench/diff.py [--size-mib N] [--tree DIR] [--timeout S] [--keep DIR]

Builds the DDIs with `reprobuild.image.ddi.build_ddi` (ESP + squashfs root + verity + signature)
from the fixture tree of tests/test_diff_support.py plus N MiB of incompressible files, or from
``--tree DIR`` (e.g. an unpacked Debian root). The changed pair differs in ``etc/hostname`` only.
Each tool runs as a child process; wall time comes from a monotonic clock and peak memory from
``wait4``'s ru_maxrss (the child and the descendants it waited for). "found" means exit status 1;
"located" means the output names ``etc/hostname``. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_diff_support import make_ddi, make_keys


def run(argv: list[str], timeout: float) -> tuple[float, int, int | None, str]:
    """(seconds, peak RSS in KiB, exit status or None on timeout, output)."""
    with tempfile.TemporaryFile() as out:
        start = time.monotonic()
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.killpg(p.pid, 9)
                pid, status, usage = os.wait4(p.pid, 0)
                p.returncode = -9
                return time.monotonic() - start, usage.ru_maxrss, None, ""
            time.sleep(0.01)
        elapsed = time.monotonic() - start
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return elapsed, usage.ru_maxrss, p.returncode, out.read().decode("utf-8", "replace")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256, help="incompressible data added to the root tree")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--keep", type=Path, default=None, help="build the images here and keep them")
    args = ap.parse_args()
    diffoscope = shutil.which("diffoscope")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-diff-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        keys = make_keys(work)
        t = time.monotonic()
        a = make_ddi(work, "a", keys=keys, extra_bytes=args.size_mib << 20)
        a2 = make_ddi(work, "a2", keys=keys, extra_bytes=args.size_mib << 20)
        b = make_ddi(work, "b", frozenset({"content"}), keys=keys, extra_bytes=args.size_mib << 20)
        print(f"built 3 DDIs of {a.stat().st_size >> 20} MiB in {time.monotonic() - t:.1f} s", file=sys.stderr)
        rows = []
        for label, x, y in (("identical", a, a2), ("one file differs", a, b)):
            tools = [("reprobuild diff", [sys.executable, "-m", "reprobuild", "diff", "--no-color", str(x), str(y)])]
            if diffoscope:
                tools.append(("diffoscope", [diffoscope, "--no-progress", "--text", "-", str(x), str(y)]))
            for name, argv in tools:
                secs, rss, code, out = run(argv, args.timeout)
                want = 0 if label == "identical" else 1
                found = "timeout" if code is None else ("yes" if code == want else f"no (exit {code})")
                located = "—" if label == "identical" else ("yes" if "etc/hostname" in out else "no")
                rows.append((label, name, f"{secs:.2f}", f"{rss / 1024:.0f}", found, located))
                print(f"{label:18} {name:16} {secs:8.2f} s {rss / 1024:8.0f} MiB  {found}  {located}", file=sys.stderr)
        print(f"\nTwo DDIs of {a.stat().st_size >> 20} MiB (ESP + squashfs root + verity + signature); "
              f"{os.cpu_count()} CPUs.\n")  # fmt: skip
        print("| pair | tool | wall time (s) | peak RSS (MiB) | correct verdict | names the file |")
        print("|---|---|---:|---:|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        if not diffoscope:
            print("\ndiffoscope is not installed (apt-get install diffoscope-minimal): only reprobuild was timed.")
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
