#!/usr/bin/env python3
"""Benchmark: rootless ``reprobuild build -f tar`` vs. ``mmdebstrap --mode=unshare --variant=minbase``.

Both run as the same ordinary user (created for the run, with a subordinate id range; both tools
build in a user namespace through newuidmap/newgidmap), same machine, same mirror (the host's apt
sources; no host name is written here), in one run:

  1. reprobuild, cold: the user's empty store, so every .deb is fetched (``build --locked -f tar``);
  2. mmdebstrap --mode=unshare --variant=minbase --format=tar, as shipped (fetches indices + .debs);
  3. reprobuild, warm store, ``--no-cache``: every .deb present, the tree built again;
  4. reprobuild, warm store with the stage cache: the same unchanged build served from the cache.

The definition is lock/minimal's (trixie minbase), locked by the user first (not timed). Wall time
from a monotonic clock, peak RSS from wait4 (as ``/usr/bin/time -v``). Needs root (to create the
user) and mmdebstrap.

    python bench/rootless.py [--write-docs] [--no-wait]

Target (issue 14): reprobuild with a warm store at least 2× faster than mmdebstrap.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stagebench import (
    DOCS,
    REPO,
    Measured,
    check,
    facts_line,
    machine_facts,
    measure,
    mib,
    pretty,
    secs,
    table,
    tar_packages,
    update_docs_section,
    wait_for_quiet,
)
from reprobuild.fileio import sha256_file
from tests.rootless_users import rootless_users

USER = "reprobuild-bench"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--write-docs", action="store_true", help="update '## rootless' in docs/benchmarks.md")
    ap.add_argument("--docs", type=Path, default=DOCS, help="the benchmarks document to update")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for the load average to drop")
    args = ap.parse_args()

    from reprobuild.debian.sources import host_mirror_for

    if os.geteuid() != 0:
        print("run as root: the benchmark creates its own ordinary user", file=sys.stderr)
        return 2
    if not shutil.which("mmdebstrap"):
        print("mmdebstrap is needed (apt-get install mmdebstrap)", file=sys.stderr)
        return 2
    mirror = host_mirror_for("debian")
    with rootless_users({USER: True}) as env:
        user = pwd.getpwnam(USER)
        home = Path(user.pw_dir)
        directory = home / "minimal"
        directory.mkdir()
        conf = [line for line in (REPO / "lock/minimal/reprobuild.conf").read_text().splitlines()
                if not line.startswith(("LockKey", "[Signing]"))]
        (directory / "reprobuild.conf").write_text("\n".join(conf) + "\n")
        for p in (directory, directory / "reprobuild.conf"):
            os.chown(p, user.pw_uid, user.pw_gid)
        check(measure(env.argv(USER, "lock", "-C", str(directory), "-q"), cwd=home), "reprobuild lock")
        suite = next(line.split("=", 1)[1].strip() for line in conf if line.startswith("Release="))
        if not args.no_wait:
            wait_for_quiet()
        facts = machine_facts()
        rows: list[list[str]] = []
        results: dict[str, float] = {}
        commands: list[str] = []

        def record(key: str, label: str, m: Measured, out: Path, note: str) -> None:
            results[key] = m.seconds
            rows.append([label, secs(m.seconds), f"{m.maxrss_kib / 1024:.0f}", mib(out.stat().st_size),
                         str(tar_packages(out) or "?"), note])
            commands.append(pretty(m.argv, {str(env.python): "python", str(home): "~", mirror: "MIRROR",
                                            " ".join(env.command(USER)): "runuser …"}))
            print(f"{label}: {m.seconds:.1f} s", file=sys.stderr)

        def build(name: str, *extra: str) -> tuple[Measured, Path]:
            out = home / name
            m = check(measure(env.argv(USER, "build", "-C", str(directory), "--locked", "-f", "tar", "-o",
                                       str(out), "-q", *extra), cwd=home), "reprobuild build")
            return m, out / "image.tar"

        m, cold = build("out-cold")
        record("cold", "reprobuild, cold store", m, cold, "fetches the .debs; the lock pins them (no index read)")
        mm = check(measure(env.command(USER, "mmdebstrap", "--mode=unshare", "--variant=minbase", "--format=tar",
                                       "--quiet", suite, str(home / "mmdebstrap.tar"), mirror), cwd=home),
                   "mmdebstrap")
        record("mmdebstrap", "mmdebstrap --mode=unshare --variant=minbase", mm, home / "mmdebstrap.tar",
               "fetches indices + .debs every run")
        # The same peer with its tree in memory too (mmdebstrap makes it in $TMPDIR): what the
        # workspace choice alone is worth, for an honest ratio.
        mm_ram = check(measure(env.command(USER, "mmdebstrap", "--mode=unshare", "--variant=minbase", "--format=tar",
                                           "--quiet", suite, str(home / "mmdebstrap-shm.tar"), mirror,
                                           env={"TMPDIR": "/dev/shm"}), cwd=home), "mmdebstrap (TMPDIR=/dev/shm)")
        record("mmdebstrap-shm", "mmdebstrap --mode=unshare --variant=minbase, TMPDIR=/dev/shm", mm_ram,
               home / "mmdebstrap-shm.tar", "its tree in memory, like reprobuild's default workspace")
        m, warm = build("out-warm", "--no-cache")
        same = "identical to" if sha256_file(warm) == sha256_file(cold) else "DIFFERS from"
        record("warm", "reprobuild, warm store --no-cache", m, warm, f"tree built again; tar {same} cold")
        m, hit = build("out-hit")
        same = "identical to" if sha256_file(hit) == sha256_file(cold) else "DIFFERS from"
        record("hit", "reprobuild, warm store + stage cache", m, hit, f"unchanged build; tar {same} cold")

        text = table(["run (as an ordinary user)", "wall s", "peak RSS MiB", "output MiB", "packages", "notes"], rows)
        ratio = results["mmdebstrap"] / results["warm"]
        verdict = (f"warm store --no-cache: {ratio:.2f}× mmdebstrap's speed (target ≥ 2: "
                   f"{'met' if ratio >= 2 else 'NOT met'}); cold: {results['mmdebstrap'] / results['cold']:.2f}×; "
                   f"unchanged rebuild from the stage cache: {results['mmdebstrap'] / results['hit']:.0f}×; "
                   f"warm vs. mmdebstrap with its tree in memory too: "
                   f"{results['mmdebstrap-shm'] / results['warm']:.2f}×")
        print(text)
        print(verdict)
        if args.write_docs:
            body = "\n".join([
                "`bench/rootless.py`: the `lock/minimal` definition (trixie minbase) as `-f tar`, built by an",
                "ordinary user (created for the run, with a subordinate id range) in reprobuild's rootless mode,",
                "side by side with `mmdebstrap --mode=unshare --variant=minbase --format=tar` as the same user, from",
                "the same mirror (the host's apt sources), in one run. Both build in a user namespace set up by",
                "newuidmap/newgidmap. Cold = the user's empty store; warm = every .deb in the store and the tree",
                "built again (`--no-cache`); stage cache = the same unchanged build served from the cache.",
                "Rootless builds copy cached trees instead of overlaying them (overlayfs in a user namespace",
                "cannot keep hard links), which the `--no-cache` row does not use anyway. reprobuild makes its",
                "private trees in memory (`/dev/shm`, docs/user-guide.md \"Where the trees are made\"); the",
                "second mmdebstrap row gives mmdebstrap the same (`TMPDIR=/dev/shm`).",
                "",
                facts_line(facts),
                "",
                text,
                "",
                f"**Target (issue 14)** — {verdict}.",
                "",
                "Commands (`runuser …` = `runuser -u USER -- env -i HOME=… PATH=… LC_ALL=C.UTF-8`; `MIRROR` is",
                "the host's Debian mirror):",
                "",
                "```sh",
                "python bench/rootless.py --write-docs",
                *commands,
                "```",
            ])
            update_docs_section("rootless", body, args.docs)
            print("updated docs/benchmarks.md (## rootless)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
