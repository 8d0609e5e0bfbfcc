#!/usr/bin/env python3
"""Benchmark: ``reprobuild build -f tar`` of the minbase definition vs. ``mmdebstrap --variant=minbase``.

``--set server``: the same for issue 20's server set, minbase + ``postgresql nginx
openssh-server python3`` (SERVER below; the set of the issue's own table), with the suites a lock
reads (trixie, -updates, -security) given to mmdebstrap too, so that both install the same versions.
Its definition removes PostgreSQL's default cluster (``RemoveFiles=``: ``initdb`` writes a random
system identifier), so that the cold and warm tars can be compared; both tools still run ``initdb``.

One run, same machine, same mirror (the host's apt sources; no host name is written here):

  1. reprobuild, cold: an empty store, so every .deb is fetched (``build --locked -f tar``);
  2. mmdebstrap --variant=minbase --format=tar, as shipped: it fetches indices and .debs itself;
  3. reprobuild, warm: the store from run 1 (the lock already pins every package, so no index is read);
  4. mmdebstrap with its .debs cached by the sync-in/sync-out hooks of its manual (skipped by --quick).

Each run is a child process: wall time from a monotonic clock, peak memory from wait4's ru_maxrss
(the largest resident set among the child and the descendants it waited for, as ``/usr/bin/time -v``
reports), its CPU seconds (user + system of the child and those descendants, wait4's rusage),
output size of the tar, and the package count read from the tar's dpkg status.

The CPU seconds bound what a run could take on this machine: work of C CPU-seconds on N cores
takes at least C / N seconds, however well it is spread. The verdict states that floor for the
warm run beside the wall time its target allows.
The lock step (``reprobuild lock``, indices + resolution) is not timed here: see ``## lock``.

    python bench/build.py [--set server] [--runs N] [--quick] [--write-docs] [--keep DIR]

``--runs N``: runs 2 and 3 N times each, one after the other in turn (mmdebstrap, reprobuild,
mmdebstrap, …), so that a slow minute of a shared machine or mirror hits both. Their rows give the
median run (by wall time) and list every run's time; the verdict's ratio is of the two medians,
with the range of the N pairwise ratios beside it.

Targets (issue 4): cold no slower than mmdebstrap; warm at least 2× faster than mmdebstrap.
Issue 20: warm minbase ≥ 2.8× mmdebstrap; warm server set ≥ 2.5× mmdebstrap.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stagebench import (
    DOCS,
    Measured,
    check,
    check_source_unchanged,
    facts_line,
    machine_facts,
    make_definition,
    measure,
    mib,
    pretty,
    reprobuild,
    secs,
    source_digest,
    stage_note,
    table,
    tar_packages,
    update_docs_section,
    wait_for_quiet,
)
from reprobuild.fileio import sha256_file

# Issue 20's server set: the packages its table names ("minbase + postgresql nginx openssh-server
# python3"). bench/scaling.py's larger server set (≈285 packages) is a different, scaling question.
SERVER = ("postgresql", "nginx", "openssh-server", "python3")
SERVER_CONF = ("\n[Content]\nPackages=" + " ".join(SERVER) + "\n"
               "RemoveFiles=/var/lib/postgresql/*/main /etc/postgresql/*/main\n")
SECTIONS = {"minbase": "build", "server": "build, issue 20's server set"}
TARGETS = {"minbase": 2.8, "server": 2.5}  # issue 20: warm --no-cache vs mmdebstrap as shipped


def run_reprobuild(directory: Path, store: Path, out: Path, *extra: str) -> tuple[Measured, dict]:
    m = check(measure(reprobuild("build", "-C", str(directory), "--locked", "-f", "tar", "-o", str(out),
                                 "--store", str(store), "--json", *extra), stdout_only=True), "reprobuild build")
    return m, json.loads(m.output)


def has_no_cache_flag() -> bool:
    """Does this checkout's ``build`` have --no-cache (the stage cache)?"""
    return "--no-cache" in measure(reprobuild("build", "--help")).output


def mmdebstrap_argv(suite: str, mirror: str, out: Path, cache: Path | None, include: tuple[str, ...] = (),
                    mirrors: tuple[str, ...] = ()) -> list[str]:
    """``mmdebstrap --variant=minbase --format=tar`` (``--include=`` the extra packages), from
    ``mirror``, or from ``mirrors`` (sources.list lines) when given; ``cache``: keep the .debs there."""
    argv = ["mmdebstrap", "--variant=minbase", "--format=tar", "--quiet"]
    if include:
        argv.append(f"--include={','.join(include)}")
    if cache is not None:
        # The manual's recipe ("cannot use a caching proxy"): keep /var/cache/apt/archives outside.
        argv += ["--skip=essential/unlink",
                 f"--setup-hook=mkdir -p {shlex.quote(str(cache))} \"$1\"/var/cache/apt/archives/",
                 f"--setup-hook=sync-in {shlex.quote(str(cache))} /var/cache/apt/archives/",
                 f"--customize-hook=sync-out /var/cache/apt/archives {shlex.quote(str(cache))}"]
    return [*argv, suite, str(out), *(mirrors or (mirror,))]


def median_index(seconds: list[float]) -> int:
    """Which of the runs took the median wall time (of an even number, the faster of the middle two)."""
    ordered = sorted(range(len(seconds)), key=seconds.__getitem__)
    return ordered[(len(ordered) - 1) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--set", choices=sorted(SECTIONS), default="minbase", dest="package_set",
                    help="minbase (lock/minimal) or issue 20's server set (default: minbase)")
    ap.add_argument("--quick", action="store_true", help="skip the cached-mmdebstrap run")
    ap.add_argument("--write-docs", action="store_true",
                    help="update '## build' (or, with --set server, '## build, issue 20's server set') "
                         "in docs/benchmarks.md")
    ap.add_argument("--keep", type=Path, help="work here and keep the outputs (default: a temporary directory)")
    ap.add_argument("--docs", type=Path, default=DOCS, help="the benchmarks document to update")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for the load average to drop")
    ap.add_argument("--runs", type=int, default=1, metavar="N",
                    help="run mmdebstrap as shipped and the warm build N times each, in turn; "
                         "their rows give the median (default: 1)")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    from reprobuild.debian.sources import host_mirror_for

    if not shutil.which("mmdebstrap"):
        print("mmdebstrap is needed (apt-get install mmdebstrap)", file=sys.stderr)
        return 2
    mirror = host_mirror_for("debian")
    server = args.package_set == "server"
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-build-"))
    work.mkdir(parents=True, exist_ok=True)
    replacements = {str(work): "$WORK", mirror: "MIRROR"}
    try:
        directory = make_definition(work / "defs", "minimal", work / "index-store",
                                    extra_conf=SERVER_CONF if server else "", name=args.package_set)
        suite = json.loads((directory / "reprobuild.lock").read_text())["release"]
        include = SERVER if server else ()
        mirrors: tuple[str, ...] = ()
        if server:  # the suites the lock read (docs/lockfile.md): the same versions on both sides
            security = host_mirror_for("debian-security")
            replacements[security] = "SECURITY-MIRROR"
            mirrors = (f"deb {mirror} {suite} main", f"deb {mirror} {suite}-updates main",
                       f"deb {security} {suite}-security main")

        def mmdebstrap(out: Path, cache: Path | None) -> list[str]:
            return mmdebstrap_argv(suite, mirror, out, cache, include, mirrors)

        if not args.no_wait:
            wait_for_quiet()
        facts = machine_facts()
        source = source_digest()
        store = work / "store"
        rows: list[list[str]] = []
        results: dict[str, float] = {}
        cpu: dict[str, float] = {}
        commands: list[str] = []

        def record(key: str, label: str, m: Measured, out: Path, note: str, runs: list[Measured] | None = None) -> None:
            """One row; with ``runs`` (m is their median) the note lists every run's wall time."""
            results[key], cpu[key] = m.seconds, m.cpu_seconds
            if runs and len(runs) > 1:
                note = f"median of {len(runs)}: " + ", ".join(f"{r.seconds:.1f}" for r in runs) + " s; " + note
            rows.append([label, secs(m.seconds), secs(m.cpu_seconds), f"{m.maxrss_kib / 1024:.0f}", mib(out.stat().st_size),
                         str(tar_packages(out) or "?"), note])
            commands.append(pretty(m.argv, replacements))
            print(f"{label}: {m.seconds:.1f} s", file=sys.stderr)

        # 1. reprobuild, cold store (nothing fetched, nothing cached): what a first build costs.
        m, j = run_reprobuild(directory, store, work / "out-cold")
        record("cold", "reprobuild, cold store", m, work / "out-cold/image.tar", stage_note(j))
        cold_sha = sha256_file(work / "out-cold/image.tar")
        # 2. mmdebstrap as shipped, and 3. reprobuild, warm store: every .deb present, the tree
        #    built again. With the stage cache that is --no-cache (otherwise the unchanged build
        #    would be a cache hit: row 3b). --runs N: N of each, in turn.
        cache = has_no_cache_flag()
        mm_runs: list[Measured] = []
        warm_runs: list[Measured] = []
        warm_json: list[dict] = []
        every_same = True
        for _ in range(args.runs):
            mm_runs.append(check(measure(mmdebstrap(work / "mmdebstrap.tar", None)), "mmdebstrap"))
            m, j = run_reprobuild(directory, store, work / "out-warm", *(["--no-cache"] if cache else []))
            warm_runs.append(m)
            warm_json.append(j)
            every_same = every_same and sha256_file(work / "out-warm/image.tar") == cold_sha
        record("mmdebstrap", "mmdebstrap --variant=minbase" + (" --include=(the set)" if server else ""),
               mm_runs[median_index([r.seconds for r in mm_runs])], work / "mmdebstrap.tar",
               "fetches indices + .debs every run", mm_runs)
        median = median_index([r.seconds for r in warm_runs])
        record("warm", "reprobuild, warm store" + (" --no-cache" if cache else ""), warm_runs[median],
               work / "out-warm/image.tar",
               stage_note(warm_json[median]) + f"; tar {'identical to' if every_same else 'DIFFERS from'} cold"
               + (" in every run" if args.runs > 1 else ""), warm_runs)
        if cache:
            m, j = run_reprobuild(directory, store, work / "out-hit")
            same = sha256_file(work / "out-hit/image.tar") == cold_sha
            record("hit", "reprobuild, warm store + stage cache", m, work / "out-hit/image.tar",
                   stage_note(j) + f"; tar {'identical to' if same else 'DIFFERS from'} cold")
        # 4. mmdebstrap with a .deb cache (primed by one uncounted run).
        if not args.quick:
            cache = work / "apt-cache"
            check(measure(mmdebstrap(work / "prime.tar", cache)), "mmdebstrap (priming)")
            (work / "prime.tar").unlink()
            mc = check(measure(mmdebstrap(work / "mmdebstrap-cached.tar", cache)), "mmdebstrap (cached)")
            record("mmdebstrap-cached", "mmdebstrap, .debs cached (sync-in/out)", mc,
                   work / "mmdebstrap-cached.tar", "still fetches indices")
            # The same with its tree in memory (mmdebstrap makes it in $TMPDIR), as reprobuild's
            # default workspace makes its private trees: what that choice alone is worth.
            ms = check(measure(mmdebstrap(work / "mmdebstrap-shm.tar", cache), env={**os.environ, "TMPDIR": "/dev/shm"}),
                       "mmdebstrap (cached, TMPDIR=/dev/shm)")
            record("mmdebstrap-shm", "mmdebstrap, .debs cached, TMPDIR=/dev/shm", ms,
                   work / "mmdebstrap-shm.tar", "its tree in memory, like reprobuild's workspace")

        headers = ["run", "wall s", "CPU s", "peak RSS MiB", "output MiB", "packages", "notes"]
        text = table(headers, rows)
        ratio_cold = results["mmdebstrap"] / results["cold"]
        ratio_warm = results["mmdebstrap"] / results["warm"]
        target = TARGETS[args.package_set]
        pair_ratios = [a.seconds / b.seconds for a, b in zip(mm_runs, warm_runs, strict=True)]
        warm_ratio = f"{ratio_warm:.2f}×" + (
            f" (medians of {args.runs}; run by run {min(pair_ratios):.2f}–{max(pair_ratios):.2f}×)" if args.runs > 1 else "")
        if server:  # issue 4's targets are minbase's
            verdict = (f"cold: {ratio_cold:.2f}× mmdebstrap's speed; warm: {warm_ratio} "
                       f"(issue 20's target ≥ {target}: {'met' if ratio_warm >= target else 'NOT met'})")
        else:
            verdict = (f"cold: {ratio_cold:.2f}× mmdebstrap's speed (issue 4's target ≥ 1: "
                       f"{'met' if ratio_cold >= 1 else 'NOT met'}); "
                       f"warm: {warm_ratio} (issue 4's target ≥ 2: {'met' if ratio_warm >= 2 else 'NOT met'}; "
                       f"issue 20's ≥ {target}: {'met' if ratio_warm >= target else 'NOT met'})")
        cores = len(os.sched_getaffinity(0))
        allowed = results["mmdebstrap"] / target
        verdict += (f"; the warm run used {cpu['warm']:.1f} CPU-seconds, at least {cpu['warm'] / cores:.1f} s "
                    f"of wall time on these {cores} cores, against the {allowed:.1f} s the target allows "
                    f"(mmdebstrap: {cpu['mmdebstrap']:.1f} CPU-seconds)")
        if "hit" in results:
            verdict += f"; unchanged rebuild from the stage cache: {results['mmdebstrap'] / results['hit']:.0f}×"
        if "mmdebstrap-cached" in results:
            verdict += f"; warm vs. cached mmdebstrap: {results['mmdebstrap-cached'] / results['warm']:.2f}×"
        if "mmdebstrap-shm" in results:
            verdict += (f"; warm vs. cached mmdebstrap with its tree in memory too: "
                        f"{results['mmdebstrap-shm'] / results['warm']:.2f}×")
        print(text)
        print(verdict)
        check_source_unchanged(source)
        if args.write_docs:
            what = ("`bench/build.py --set server`: issue 20's server set — the `lock/minimal` definition with "
                    f"`Packages={' '.join(SERVER)}` (the set of the issue's table) and `RemoveFiles=` for "
                    "PostgreSQL's default cluster (random: `initdb` still runs, its output is removed so that "
                    "the cold and warm tars can be compared) — as `-f tar`, side by side with "
                    f"`mmdebstrap --variant=minbase --include={','.join(SERVER)} --format=tar` from the same "
                    "mirror and suites (trixie, -updates, -security), in one run."
                    if server else
                    "`bench/build.py`: the `lock/minimal` definition (trixie minbase) as `-f tar`, side by side "
                    "with `mmdebstrap --variant=minbase --format=tar` from the same mirror (the host's apt "
                    "sources), in one run.")
            body = "\n".join([
                what,
                "Cold = empty store; warm = the store of the cold run with every .deb present and the tree built",
                "again (`--no-cache`, where the stage cache exists); \"stage cache\" = the same unchanged build",
                "served from the stage cache. Peak RSS is `wait4`'s `ru_maxrss` (the",
                "largest process of the run's tree, as `/usr/bin/time -v` reports it). `reprobuild lock` (indices",
                "and resolution) is not part of these times; mmdebstrap reads the indices in every run.",
                "reprobuild makes its private trees in memory (`/dev/shm`, docs/user-guide.md \"Where the trees",
                "are made\"); the last mmdebstrap row gives mmdebstrap the same (`TMPDIR=/dev/shm`).",
                "",
                facts_line(facts),
                "",
                text,
                "",
                f"**Targets (issues 4 and 20)** — {verdict}.",
                "",
                "Commands (paths are temporary; `MIRROR`" + (", `SECURITY-MIRROR`: the host's Debian mirrors):"
                                                            if server else " is the host's Debian mirror):"),
                "",
                "```sh",
                "python bench/build.py" + (" --set server" if server else "") + (" --quick" if args.quick else "")
                + (f" --runs {args.runs}" if args.runs > 1 else "") + " --write-docs",
                *commands,
                "```",
            ])
            section = SECTIONS[args.package_set]
            update_docs_section(section, body, args.docs)
            print(f"updated docs/benchmarks.md (## {section})", file=sys.stderr)
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
