#!/usr/bin/env python3
"""Benchmark: how reprobuild's steps grow with the package set, beside mmdebstrap (issue 20).

Three sets, Debian trixie amd64 from the mirror of the host's apt sources (read at run time; no
host name is written here), each a copy of ``lock/minimal``'s definition made at run time
(``[Content] Packages=`` added; no lock is committed):

* ``minbase`` — ``lock/minimal`` as it is (Essential + Priority: required + apt, ≈78 packages);
* ``server``  — minbase + a server's packages (SERVER below, ≈285 packages);
* ``desktop`` — minbase + the Cinnamon desktop task, Firefox and LibreOffice Writer without
  Recommends (DESKTOP below, ≈780 packages).

For each set, in one run, each step a child process (wall time from a monotonic clock, peak RSS
from wait4's ``ru_maxrss``, as in the other benchmarks):

  1. ``reprobuild lock`` with an empty store (indices downloaded, verified, scanned; resolution);
  2. ``reprobuild fetch`` into that store (every .deb of the lock downloaded and verified);
  3. ``reprobuild build --locked -f tar``, the first build (no stage cache yet: it fills it);
  4. the same with ``--no-cache`` (the tree built again from the warm store);
  5. the same again with the stage cache (an unchanged rebuild);
  6. ``mmdebstrap --variant=minbase --include=… --format=tar`` from the same suites (it fetches
     indices and .debs itself every run);
  7. mmdebstrap with its .debs cached by bench/build.py's sync-in/sync-out recipe (one uncounted
     priming run first; skipped by --quick);
  8. the host's mkosi (Debian 12 ships mkosi 14), ``Format=directory`` with the same packages
     (debootstrap + apt; it fetches every .deb; skipped by --quick or --no-mkosi, or when mkosi
     is not installed). mkosi's disk formats cannot run on this kind of host (no vfat: see
     bench/boot.py); a tree is what the other two make before packing it.

Installed size is the sum of Installed-Size over the tar's dpkg status. The three reprobuild
tars of a set must be identical (sha256); the table says so.

    python bench/scaling.py [--sets minbase server desktop] [--quick] [--write-docs] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stagebench import (
    DOCS,
    Measured,
    check,
    check_source_unchanged,
    facts_line,
    installed_packages,
    machine_facts,
    make_definition,
    measure,
    pretty,
    reprobuild,
    source_digest,
    stage_note,
    table,
    tar_dpkg_status,
    update_docs_section,
    wait_for_quiet,
)
from bench.boot import du, mkosi_config, reason
from bench.build import mmdebstrap_argv
from reprobuild.fileio import sha256_file

SERVER = ("postgresql", "nginx", "openssh-server", "python3-full", "git", "curl", "sudo", "rsync", "vim",
          "build-essential", "redis-server", "postfix", "php-fpm")
DESKTOP = ("task-cinnamon-desktop", "firefox-esr", "libreoffice-writer")
SETS: dict[str, tuple[str, ...]] = {"minbase": (), "server": SERVER, "desktop": DESKTOP}
# How to read a run: written under the tables by --write-docs (facts about the method and the
# sets, not about one run's numbers).
READING = """How to read it:

* mmdebstrap fetches its indices and .debs every run, and its own time swings 2-4× with the load
  and the mirror from run to run, so one run's ratios are indicative only; the build sections
  above time the same work interleaved.
* "first build" fills the stage cache: each payload is also written decompressed to the store
  (stage `unpacked`) and the tar is stored, on the store's disk; `--no-cache` writes neither.
* The server set's tars differ in PostgreSQL's default cluster, which postgresql-common's postinst
  makes with `initdb` (`global/pg_control`: a random system identifier and the creation time; see
  [reproducibility.md](reproducibility.md#normalisation-rules-reprobuildrootfsnormalizepy)). With
  `RemoveFiles=/var/lib/postgresql/*/main /etc/postgresql/*/main` two builds are identical (the
  section "where a server set's time goes").
* mkosi is Debian 12's mkosi 14 (`Format=directory`, the same `Packages=` plus apt): debootstrap's
  minbase and mkosi's own additions give it more packages; its tree size is `du` of its
  directory. It makes a tree only; its disk formats cannot run here (no vfat, see "boot").
* Time follows the number of files and maintainer scripts more than installed MB: the server set's
  postinsts include `initdb`, postfix's set-up and byte-compiling Python, run one at a time by
  dpkg; much of the desktop set's size is a few big files. Install layers: the Essential set in
  one `dpkg --install`, then a few dependency layers, so triggers run a fixed number of times,
  not once per package."""

TIMEOUT = 3600.0  # one step of the desktop set on a loaded 2-core machine stays well below this


@dataclass
class Step:
    label: str
    m: Measured
    note: str = ""


@dataclass
class SetResult:
    name: str
    packages: tuple[str, ...]
    load: str
    steps: dict[str, Step] = field(default_factory=dict)
    locked: dict[str, int] = field(default_factory=dict)  # set name -> packages in the lock
    fetched_bytes: int = 0
    tar_bytes: int = 0
    count: int = 0
    installed_kib: int = 0
    identical: bool = False
    mm_tar_bytes: int = 0
    mm_count: int = 0
    mm_installed_kib: int = 0
    mkosi_bytes: int = 0
    mkosi_count: int = 0
    mkosi_installed_kib: int = 0
    mkosi_failed: str = ""

    def seconds(self, key: str) -> float | None:
        step = self.steps.get(key)
        return None if step is None else step.m.seconds

    def peak_mib(self, keys: tuple[str, ...]) -> float:
        return max((self.steps[k].m.maxrss_kib / 1024 for k in keys if k in self.steps), default=0.0)


RB_STEPS = ("lock", "fetch", "first", "nocache", "hit")


def run_json(argv: list[str], what: str) -> tuple[Measured, dict]:
    m = check(measure(argv, stdout_only=True, timeout=TIMEOUT), what)
    return m, json.loads(m.output)


def run_mkosi_tree(result: SetResult, base: Path, mirror: str, commands: list[str],
                   replacements: dict[str, str]) -> None:
    """Step 8: the host's mkosi makes the set's tree (``Format=directory``, empty ``Cache=``)."""
    mkosi = shutil.which("mkosi")
    if not mkosi:
        result.mkosi_failed = "mkosi is not installed"
        return
    version = subprocess.run([mkosi, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    d = mkosi_config(base / "mkosi", mirror, "directory", None, ("apt", *result.packages))
    m = measure([mkosi, "-f", "build"], cwd=d, timeout=TIMEOUT)
    commands.append(f"cd $WORK/{result.name}/mkosi && {pretty(m.argv, replacements)}  "
                    f"# mkosi.default: Format=directory Packages=apt,{','.join(result.packages)}")
    if m.ok:
        status = (d / "image" / "var/lib/dpkg/status").read_text(errors="replace")
        result.mkosi_count, result.mkosi_installed_kib = installed_packages(status)
        result.mkosi_bytes = du(d / "image")
        result.steps["mkosi"] = Step(f"{version}, Format=directory", m,
                                     f"tree only (no tar); fetches every .deb; {result.mkosi_count} packages")
    else:
        result.mkosi_failed = f"`{reason(m)}` (exit {m.returncode} after {m.seconds:.1f} s)"
    shutil.rmtree(d, ignore_errors=True)


def bench_set(name: str, packages: tuple[str, ...], work: Path, suite: str, mirrors: tuple[str, ...],
              quick: bool, commands: list[str], replacements: dict[str, str], mkosi_mirror: str | None) -> SetResult:
    say = lambda text: print(f"[{name}] {text}", file=sys.stderr, flush=True)
    base = work / name
    extra = f"\n[Content]\nPackages={' '.join(packages)}\n" if packages else ""
    directory = make_definition(base / "defs", "minimal", None, extra_conf=extra, name=name)
    store = base / "store"
    result = SetResult(name, packages, " ".join(f"{x:.2f}" for x in os.getloadavg()))

    def build(key: str, label: str, out: str, *flags: str) -> dict:
        say(label)
        m, j = run_json(reprobuild("build", "-C", str(directory), "--locked", "-f", "tar", "-o", str(base / out),
                                   "--store", str(store), "--json", *flags), f"{name}: reprobuild build")
        result.steps[key] = Step(label, m, stage_note(j))
        commands.append(pretty(m.argv, replacements))
        return j

    say("lock (empty store)")
    m, j = run_json(reprobuild("lock", "-C", str(directory), "--store", str(store), "--json"), f"{name}: lock")
    result.locked = dict(j["sets"])
    result.steps["lock"] = Step("lock, empty store", m, " + ".join(f"{k} {v}" for k, v in result.locked.items())
                                + " packages resolved")
    commands.append(pretty(m.argv, replacements))
    say("fetch")
    m, j = run_json(reprobuild("fetch", "-C", str(directory), "--store", str(store), "--json"), f"{name}: fetch")
    result.fetched_bytes = int(j["bytes_downloaded"])
    result.steps["fetch"] = Step("fetch, cold", m, f"{len(j['fetched'])} files, {result.fetched_bytes / 2**20:.0f} MiB "
                                 "downloaded and verified")
    commands.append(pretty(m.argv, replacements))
    build("first", "first build (no stage cache yet)", "out-first")
    build("nocache", "build --no-cache (warm store)", "out-nocache", "--no-cache")
    build("hit", "rebuild from the stage cache", "out-hit")
    tars = [base / out / "image.tar" for out in ("out-first", "out-nocache", "out-hit")]
    result.identical = len({sha256_file(t) for t in tars}) == 1
    result.steps["nocache"].note += "; the 3 tars " + ("identical" if result.identical else "DIFFER")
    result.tar_bytes = tars[0].stat().st_size
    status = tar_dpkg_status(tars[0])
    result.count, result.installed_kib = installed_packages(status or "")
    for out in ("out-nocache", "out-hit"):
        shutil.rmtree(base / out)

    say("mmdebstrap")
    mm_tar = base / "mmdebstrap.tar"
    m = check(measure(mmdebstrap_argv(suite, "", mm_tar, None, packages, mirrors), timeout=TIMEOUT),
              f"{name}: mmdebstrap")
    result.steps["mm"] = Step("mmdebstrap", m, "fetches indices + .debs")
    commands.append(pretty(m.argv, replacements))
    result.mm_tar_bytes = mm_tar.stat().st_size
    result.mm_count, result.mm_installed_kib = installed_packages(tar_dpkg_status(mm_tar) or "")
    mm_tar.unlink()
    if not quick:
        cache = base / "apt-cache"
        say("mmdebstrap, priming its .deb cache")
        check(measure(mmdebstrap_argv(suite, "", base / "prime.tar", cache, packages, mirrors), timeout=TIMEOUT),
              f"{name}: mmdebstrap (priming)")
        (base / "prime.tar").unlink()
        say("mmdebstrap, .debs cached")
        m = check(measure(mmdebstrap_argv(suite, "", mm_tar, cache, packages, mirrors), timeout=TIMEOUT),
                  f"{name}: mmdebstrap (cached)")
        result.steps["mm-cached"] = Step("mmdebstrap, .debs cached (sync-in/out)", m, "still fetches indices")
        commands.append(pretty(m.argv, replacements))
        mm_tar.unlink()
    if mkosi_mirror is not None:
        say("mkosi")
        run_mkosi_tree(result, base, mkosi_mirror, commands, replacements)
    shutil.rmtree(base)  # stores and tars of a large set are GBs
    return result


def mb(kib: int) -> float:
    return kib * 1024 / 1e6


def set_table(r: SetResult) -> str:
    rows = []
    for step in r.steps.values():
        rows.append([step.label, f"{step.m.seconds:.1f}", f"{step.m.maxrss_kib / 1024:.0f}", step.note])
    return table(["step", "wall s", "peak RSS MiB", "notes"], rows)


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def summary(results: list[SetResult]) -> tuple[str, str, str]:
    """The cross-set tables (reprobuild; mmdebstrap and the ratios) and the verdict (linearity in
    installed size, the memory bound)."""
    ours, peers, mkosi_rows = [], [], []
    per_100mb: list[tuple[int, float]] = []  # (installed KiB, --no-cache s per 100 MB), in --sets order
    for r in results:
        installed = mb(r.installed_kib)
        nocache = r.seconds("nocache")
        per = None if not installed or nocache is None else nocache / installed * 100
        if per is not None:
            per_100mb.append((r.installed_kib, per))
        ours.append([r.name, str(r.count), f"{installed:.0f}", f"{r.tar_bytes / 2**20:.0f}",
                     *(f"{r.seconds(k):.1f}" for k in RB_STEPS), "—" if per is None else f"{per:.2f}",
                     f"{r.peak_mib(RB_STEPS):.0f}"])
        mm_cached = r.seconds("mm-cached")
        peers.append([
            r.name, f"{r.mm_count} / {mb(r.mm_installed_kib):.0f} / {r.mm_tar_bytes / 2**20:.0f}",
            f"{r.seconds('mm'):.1f}", f"{r.peak_mib(('mm', 'mm-cached')):.0f}",
            "—" if mm_cached is None else f"{mm_cached:.1f}",
            ratio(r.seconds("mm"), sum(r.seconds(k) or 0 for k in ("lock", "fetch", "first"))),
            ratio(r.seconds("mm"), r.seconds("nocache")), ratio(mm_cached, r.seconds("nocache")),
        ])  # fmt: skip
        if r.mkosi_count or r.mkosi_failed:
            mkosi_rows.append([
                r.name, f"{r.mkosi_count} / {mb(r.mkosi_installed_kib):.0f} / {r.mkosi_bytes / 2**20:.0f}"
                if r.mkosi_count else "—", "—" if r.seconds("mkosi") is None else f"{r.seconds('mkosi'):.1f}",
                f"{r.peak_mib(('mkosi',)):.0f}" if r.mkosi_count else "—",
                ratio(r.seconds("mkosi"), r.seconds("nocache")), r.mkosi_failed or "",
            ])  # fmt: skip
    ours_table = table(["set", "packages", "installed MB", "tar MiB", "lock s", "fetch s", "first build s",
                        "--no-cache s", "cached s", "--no-cache s per 100 MB installed", "peak RSS MiB"], ours)
    peers_table = table(["set", "mmdebstrap: packages / installed MB / tar MiB", "mmdebstrap s", "its peak RSS MiB",
                         ".debs cached s", "mmdebstrap ÷ (lock + fetch + first build)", "mmdebstrap ÷ --no-cache",
                         "cached mmdebstrap ÷ --no-cache"], peers)
    if mkosi_rows:
        peers_table += "\n\nmkosi, same run:\n\n" + table(
            ["set", "mkosi: packages / installed MB / tree MiB", "mkosi s", "its peak RSS MiB", "mkosi ÷ --no-cache",
             "could not run"], mkosi_rows)
    peak = max((r.peak_mib(RB_STEPS) for r in results), default=0.0)
    peak_build = max((r.peak_mib(("first", "nocache", "hit")) for r in results), default=0.0)
    verdict = []
    if len(per_100mb) >= 2:
        sized = sorted(per_100mb)  # the sets with the least and the most installed are compared
        growth = sized[-1][1] / sized[0][1]
        verdict.append(f"`--no-cache` build time per 100 MB installed: {', '.join(f'{p:.2f}' for _, p in per_100mb)} s; "
                       f"the largest set takes {growth:.2f}× the smallest set's time per MB "
                       f"({'linear or better' if growth <= 1.25 else 'growing faster than linear'}, "
                       "with 25 % allowed for the shared machine's noise)")
    verdict.append(f"reprobuild's peak RSS over every step and set: {peak:.0f} MiB (builds alone: {peak_build:.0f} MiB)")
    return ours_table, peers_table, "; ".join(verdict)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    ap.add_argument("--quick", action="store_true", help="skip the cached-mmdebstrap and mkosi runs")
    ap.add_argument("--no-mkosi", action="store_true", help="skip the mkosi runs")
    ap.add_argument("--write-docs", action="store_true", help="update '## scaling' in docs/benchmarks.md")
    ap.add_argument("--keep", type=Path, help="work here (default: a temporary directory; each set's store "
                                              "and tars are deleted once measured)")
    ap.add_argument("--docs", type=Path, default=DOCS, help="the benchmarks document to update")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for the load average to drop")
    args = ap.parse_args()

    from reprobuild.debian.sources import host_mirror_for

    if not shutil.which("mmdebstrap"):
        print("mmdebstrap is needed (apt-get install mmdebstrap)", file=sys.stderr)
        return 2
    mirror = host_mirror_for("debian")
    security = host_mirror_for("debian-security")
    suite = json.loads((Path(__file__).resolve().parents[1] / "lock/minimal/reprobuild.lock").read_text())["release"]
    # The suites a lock reads (docs/lockfile.md), so that both tools install the same versions.
    mirrors = (f"deb {mirror} {suite} main", f"deb {mirror} {suite}-updates main",
               f"deb {security} {suite}-security main")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    replacements = {str(work): "$WORK", mirror: "MIRROR", security: "SECURITY-MIRROR"}
    commands: list[str] = []
    try:
        if not args.no_wait:
            wait_for_quiet()
        facts = machine_facts()
        source = source_digest()
        results = []
        for name in args.sets:
            results.append(bench_set(name, SETS[name], work, suite, mirrors, args.quick, commands, replacements,
                                     None if args.quick or args.no_mkosi else mirror))
            print(set_table(results[-1]), file=sys.stderr)
        ours, peers, verdict = summary(results)
        print(ours)
        print(peers)
        print(verdict)
        check_source_unchanged(source)
        if args.write_docs:
            body = [
                "`bench/scaling.py`: three package sets, trixie amd64 from the mirror of the host's apt sources",
                "(main, -updates, -security for both tools), each a copy of `lock/minimal`'s definition with",
                "`[Content] Packages=` added, built as `-f tar`, beside `mmdebstrap --variant=minbase",
                "--include=… --format=tar` in the same run. Per set, with a fresh store: `lock` (empty store:",
                "indices downloaded and scanned), `fetch` (every .deb), the first `build --locked -f tar` (no",
                "stage cache yet; it fills it), `--no-cache` (the tree built again from the warm store), and an",
                "unchanged rebuild from the stage cache. Peak RSS is `wait4`'s `ru_maxrss` (the largest process",
                "of the step's tree). Installed MB = the sum of Installed-Size over the tar's dpkg status.",
                "",
                facts_line(facts),
                "",
                "| set | packages added to minbase |",
                "|---|---|",
                *(f"| {r.name} | {' '.join(r.packages) or '— (`lock/minimal` as it is)'} |" for r in results),
                "",
                "reprobuild:",
                "",
                ours,
                "",
                "mmdebstrap (and mkosi), same run (ratios > 1: reprobuild is faster):",
                "",
                peers,
                "",
                f"**Scaling** — {verdict}.",
                "",
                READING,
                "",
            ]
            for r in results:
                body += [f"{r.name} (load average at its start {r.load}):", "", set_table(r), ""]
            body += ["Commands (paths are temporary; `MIRROR`, `SECURITY-MIRROR`: the host's Debian mirrors):", "",
                     "```sh", "python bench/scaling.py" + (" --quick" if args.quick else "") + " --write-docs",
                     *commands, "```"]
            update_docs_section("scaling (issue 20, `bench/scaling.py`)", "\n".join(body), args.docs)
            print("updated docs/benchmarks.md (## scaling)", file=sys.stderr)
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
