#!/usr/bin/env python3
"""Benchmark ``reprobuild diff`` against diffoscope on two DDIs: identical, and differing in a few files.

Usage: bench/diff.py [--size-mib N] [--fs erofs|squashfs] [--from-ddi IMAGE] [--repeat N] [--no-diffoscope]
                     [--timeout S] [--keep DIR]

Builds the DDIs with `reprobuild.image.ddi.build_ddi` (root + verity + signature, plus an ESP for
the fixture tree) from the fixture tree of tests/test_diff_support.py plus N MiB of incompressible
files, or — with ``--from-ddi IMAGE`` — from the root tree of a DDI that ``reprobuild build``
made (e.g. ``lock/minimal``'s minbase image; the tree is taken out with ``fsck.erofs --extract``
before timing). The root is erofs as the build makes it (``--fs squashfs``: the old fixture,
gzip-compressed; ``--fs ext4``: as the build makes it). The
changed pair differs in ``etc/hostname`` (fixture), or in ``etc/hostname``, ``etc/issue`` and
one file's mode (``--from-ddi``). Each tool runs as a child process; wall time comes from a
monotonic clock and peak memory from GNU time's ``%M`` (Debian package ``time``). "found" means
the expected exit status; "located" means the output names ``etc/hostname``; "path" says how
reprobuild compared the root (its output names the verity tree path). Python byte code is compiled first (as an installed package has it). Prints a
Markdown table for docs/benchmarks.md.
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
    """(seconds, peak RSS in KiB, exit status or None on timeout, output).

    Peak RSS comes from GNU time (``%M``), which forks the tool from its own small process: a
    child forked from this benchmark (which has built the images) would report this process's
    memory as its own peak.
    """
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as rss:
        start = time.monotonic()
        p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", rss.name, *argv], stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            code = p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            return time.monotonic() - start, 0, None, ""
        elapsed = time.monotonic() - start
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
        lines = [ln for ln in rss.read().splitlines() if ln.strip().isdigit()]
        return elapsed, int(lines[-1]) if lines else 0, code, text


def changed_tree(tree: Path, out: Path) -> Path:
    """A copy of ``tree`` with etc/hostname and etc/issue rewritten and one file's mode changed."""
    subprocess.run(["cp", "-a", str(tree), str(out)], check=True)
    (out / "etc/hostname").write_text("changed-by-bench\n")
    issue = out / "etc/issue"
    issue.write_bytes((issue.read_bytes() if issue.exists() else b"") + b"changed by bench/diff.py\n")
    for rel in ("usr/bin/true", "usr/bin/false", "usr/bin/env"):
        p = out / rel
        if p.is_file() and not p.is_symlink():
            p.chmod(0o700)
            break
    return out


def extract_root(image: Path, out: Path) -> Path:
    from reprobuild.image.gpt import read_gpt_path

    disk = read_gpt_path(image)
    root = next(p for p in disk.partitions if p.name.startswith("root-") and not p.name.endswith(("-verity", "-sig")))
    part = out.parent / "root.img"
    with open(image, "rb") as src, open(part, "wb") as dst:
        src.seek(root.offset(disk.sector_size))
        dst.write(src.read(root.size(disk.sector_size)))
    subprocess.run(["fsck.erofs", f"--extract={out}", str(part)], check=True, capture_output=True)
    part.unlink()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--size-mib", type=int, default=256, help="incompressible data added to the fixture tree")
    ap.add_argument("--fs", choices=("erofs", "squashfs", "ext4"), default="erofs", help="root file system of the DDIs")
    ap.add_argument("--from-ddi", type=Path, default=None, help="take the root tree out of this DDI (erofs root)")
    ap.add_argument("--no-diffoscope", action="store_true", help="time reprobuild only (e.g. for a size sweep)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--repeat", type=int, default=5, help="runs of reprobuild diff per pair (the median is shown)")
    ap.add_argument("--keep", type=Path, default=None, help="build the images here and keep them")
    args = ap.parse_args()
    diffoscope = None if args.no_diffoscope else shutil.which("diffoscope")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-diff-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "reprobuild")], check=True, env=env,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        keys = make_keys(work)
        t = time.monotonic()
        if args.from_ddi:
            tree = extract_root(args.from_ddi, work / "tree")
            other = changed_tree(tree, work / "tree-changed")
            a = make_ddi(work, "a", keys=keys, fs=args.fs, tree=tree, esp=False)
            a2 = make_ddi(work, "a2", keys=keys, fs=args.fs, tree=tree, esp=False)
            b = make_ddi(work, "b", keys=keys, fs=args.fs, tree=other, esp=False)
            what = f"the root tree of {args.from_ddi.name}"
        else:
            extra = args.size_mib << 20
            a = make_ddi(work, "a", keys=keys, extra_bytes=extra, fs=args.fs)
            a2 = make_ddi(work, "a2", keys=keys, extra_bytes=extra, fs=args.fs)
            b = make_ddi(work, "b", frozenset({"content"}), keys=keys, extra_bytes=extra, fs=args.fs)
            what = f"the fixture tree + {args.size_mib} MiB"
        print(f"built 3 DDIs of {a.stat().st_size >> 20} MiB in {time.monotonic() - t:.1f} s", file=sys.stderr)
        rows = []
        changed = "one file differs" if not args.from_ddi else "three files differ"
        for label, x, y in (("identical", a, a2), (changed, a, b)):
            tools = [("reprobuild diff", [sys.executable, "-m", "reprobuild", "diff", "--no-color", str(x), str(y)])]
            if diffoscope:
                tools.append(("diffoscope", [diffoscope, "--no-progress", "--text", "-", str(x), str(y)]))
            for name, argv in tools:
                # reprobuild: the median of --repeat runs (its time is mostly interpreter start-up,
                # which the machine's load skews); diffoscope: one run.
                samples = [run(argv, args.timeout) for _ in range(args.repeat if name == "reprobuild diff" else 1)]
                samples.sort(key=lambda r: r[0])
                secs, rss, code, out = samples[len(samples) // 2]
                want = 0 if label == "identical" else 1
                found = "timeout" if code is None else ("yes" if code == want else f"no (exit {code})")
                located = "—" if label == "identical" else ("yes" if "etc/hostname" in out else "no")
                path = "—"
                if name == "reprobuild diff":
                    path = "verity trees" if ("dm-verity hash trees" in out or label == "identical") else \
                        "read in place" if "read in place" in out else "extraction"
                    if label == "identical" and args.fs != "erofs":
                        path = "bytes"
                rows.append((label, name, f"{secs:.2f}", f"{rss / 1024:.0f}", found, located, path))
                print(f"{label:18} {name:16} {secs:8.2f} s {rss / 1024:8.0f} MiB  {found}  {located}  {path}",
                      file=sys.stderr)  # fmt: skip
        start = [run([sys.executable, "-m", "reprobuild", "--version"], 60)[0] for _ in range(args.repeat)]
        load = os.getloadavg()[0]
        print(f"\nTwo DDIs of {a.stat().st_size >> 20} MiB ({args.fs} root + verity + signature) from {what}; "
              f"{os.cpu_count()} CPUs, load {load:.1f}; `reprobuild --version` alone (interpreter and CLI start-up): "
              f"{sorted(start)[len(start) // 2]:.2f} s (median of {args.repeat}).\n")  # fmt: skip
        print("| pair | tool | wall time (s) | peak RSS (MiB) | correct verdict | names the file | root compared by |")
        print("|---|---|---:|---:|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        if not diffoscope and not args.no_diffoscope:
            print("\ndiffoscope is not installed (apt-get install diffoscope-minimal): only reprobuild was timed.")
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
