#!/usr/bin/env python3
"""Benchmark: incremental rebuilds with the content-keyed cache (issue 9), side by side with mkosi.

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

mkosi ``--incremental`` (the host's mkosi, Debian 12's mkosi 14) runs the same steps on the same
package list where it can: its disk formats need a vfat mount this kernel may lack, so it builds
``Format=directory`` with ``mkosi.extra/``, which is its own incremental path (it copies the
cached tree and re-runs the final stage). mkosi 14 does not notice package changes in its cache
(its documentation: remove the cache by hand), so its package-add step runs with ``-ff``. It
also reuses its cache only when a "pre-dev" cache image exists too, which it writes only for
definitions with a build script; the bench creates that (never read) placeholder after the first
build, so that mkosi's incremental path is really taken.

A third definition, ``build-scripts`` (lock/minimal + ``BuildPackages=gcc make libc6-dev`` +
the fixture C project ``fixtures/hello-c`` as ``BuildScripts=``/``BuildSources=``), times a full
build, a rebuild with nothing changed and a rebuild after editing one source file, and reports
for each the time spent on top of the compile itself (the ``build`` stage): issue 19's target
is under 5 s for the source edit. mkosi is not run for it.

    bench/incremental.py                      # all definitions, with mkosi
    bench/incremental.py --only minimal --no-mkosi --json
    bench/incremental.py --only build-scripts --no-mkosi
    bench/incremental.py --write-docs         # update '## incremental' in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._stagebench import (
    DOCS,
    Measured,
    facts_line,
    machine_facts,
    measure,
    reprobuild,
    table,
    update_docs_section,
    wait_for_quiet,
)
from reprobuild.store import Store

ADDED_PACKAGE = "less"  # small, no maintainer-script surprises, not in minbase
STEPS = ("full build", "no-change", "extra-tree edit", "package add")
TARGETS = {"no-change": {"minimal": 1.0, "bootable": 1.0}, "extra-tree edit": {"minimal": 3.0, "bootable": 10.0}}
SIGNING_KEYS = {"LockKey": None, "VerityKey": "keys/verity.key", "VerityCertificate": "keys/verity.crt",
                "SecureBootKey": "keys/secure-boot.key", "SecureBootCertificate": "keys/secure-boot.crt"}
# The packages lock/bootable adds to minbase (as bench/boot.py gives mkosi).
BOOTABLE_PACKAGES = ("systemd", "systemd-sysv", "udev", "dbus", "linux-image-amd64", "systemd-boot-efi")


def run_reprobuild(*args: str, env: dict[str, str]) -> tuple[float, dict]:
    m = measure(reprobuild(*args), env=env, stdout_only=True)
    if not m.ok:
        raise SystemExit(f"reprobuild {' '.join(args)} failed:\n{m.stderr[-3000:]}")
    try:
        return m.seconds, json.loads(m.output)
    except ValueError:
        return m.seconds, {}


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
    """Hard-link the .deb objects (never the build cache) of an existing store: no re-download."""
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
    lock_s, _ = run_reprobuild("lock", "-C", str(d), "-q", env=env)
    build = ("build", "-C", str(d), "--locked", "-o", str(out), "--json")
    rows = {"full build": run_reprobuild(*build, env=env), "no-change": run_reprobuild(*build, env=env)}
    (d / "extra/etc/bench-motd").write_text("version 2\n")
    rows["extra-tree edit"] = run_reprobuild(*build, env=env)
    with open(d / "reprobuild.conf", "a") as f:
        f.write(f"\n[Content]\nPackages={ADDED_PACKAGE}\n")
    relock_s, _ = run_reprobuild("lock", "-C", str(d), "-q", env=env)
    rows["package add"] = run_reprobuild(*build, env=env)
    result = {"lock_seconds": round(lock_s, 2), "relock_seconds": round(relock_s, 2), "steps": {}}
    for step, (seconds, doc) in rows.items():
        result["steps"][step] = {"seconds": round(seconds, 2), "cache_hits": doc.get("cache_hits", []),
                                 "timings": doc.get("timings", {}), "sha256": doc.get("manifest", {}).get("sha256")}
    return result


BUILD_STEPS = ("full build", "no-change", "source edit")
BUILD_TARGET = 5.0  # seconds on top of the compile, for the source edit (issue 19)


def bench_build_scripts(root: Path, env: dict[str, str]) -> dict:
    """lock/minimal (a DDI) with the fixture C project built by BuildScripts=."""
    d = make_definition(root / "build-scripts", "minimal")
    shutil.copytree(REPO / "fixtures/hello-c", d / "src")
    shutil.copy2(REPO / "fixtures/hello-c/build.sh", d / "build.sh")
    with open(d / "reprobuild.conf", "a") as f:
        f.write("\n[Content]\nBuildPackages=gcc make libc6-dev\nBuildScripts=build.sh\n"
                "[Build]\nBuildSources=src\n")
    run_reprobuild("lock", "-C", str(d), "-q", env=env)
    build = ("build", "-C", str(d), "--locked", "-o", str(d / "out"), "--json")
    rows = {"full build": run_reprobuild(*build, env=env), "no-change": run_reprobuild(*build, env=env)}
    source = d / "src/greet.c"
    source.write_text(source.read_text().replace("hello from", "greetings from"))
    rows["source edit"] = run_reprobuild(*build, env=env)
    steps = {}
    for step, (seconds, doc) in rows.items():
        compile_s = doc.get("timings", {}).get("build", 0.0)
        steps[step] = {"seconds": round(seconds, 2), "compile_seconds": round(compile_s, 2),
                       "overhead_seconds": round(seconds - compile_s, 2), "cache_hits": doc.get("cache_hits", []),
                       "timings": doc.get("timings", {})}
    return {"steps": steps}


def report_build_scripts(result: dict) -> tuple[str, str]:
    rows = [[step, f"{r['seconds']:.1f}", f"{r['compile_seconds']:.1f}", f"{r['overhead_seconds']:.1f}",
             f"≤ {BUILD_TARGET:.0f}" if step == "source edit" else "", ", ".join(r["cache_hits"]) or "–"]
            for step, r in result["steps"].items()]
    text = table(["step", "reprobuild s", "compile (build stage) s", "on top of the compile s", "target s",
                  "stages from the cache"], rows)
    overhead = result["steps"]["source edit"]["overhead_seconds"]
    verdict = (f"build-scripts source edit {overhead:.1f} s on top of the compile (target ≤ {BUILD_TARGET:.0f} s: "
               f"{'met' if overhead <= BUILD_TARGET else 'NOT met'})")
    return text, verdict


def mkosi_conf(name: str, mirror: str, extra_packages: tuple[str, ...] = ()) -> str:
    """mkosi.default for the definition ``name``: Debian trixie, Format=directory, its packages."""
    packages = (*(BOOTABLE_PACKAGES if name == "bootable" else ()), *extra_packages)
    lines = ["[Distribution]", "Distribution=debian", "Release=trixie", f"Mirror={mirror}", "",
             "[Output]", "Format=directory", "", "[Content]", "WithDocs=yes"]
    if packages:
        lines.append(f"Packages={','.join(packages)}")
    return "\n".join(lines) + "\n"


def bench_mkosi(root: Path, name: str, mirror: str) -> dict:
    """The same four steps with mkosi --incremental (Format=directory); a step that fails says why."""
    exe = shutil.which("mkosi")
    if exe is None:
        return {"error": "mkosi is not installed (apt-get install mkosi)"}
    d = root / f"mkosi-{name}"
    (d / "mkosi.extra/etc").mkdir(parents=True)
    (d / "mkosi.extra/etc/bench-motd").write_text("version 1\n")
    (d / "mkosi.default").write_text(mkosi_conf(name, mirror))

    def step(*force: str) -> dict:
        m: Measured = measure([exe, *force, "--incremental", "build"], cwd=d, timeout=1800)
        if m.ok:
            return {"seconds": round(m.seconds, 2)}
        tail = [line for _, line in m.lines if line.strip()][-1:] or [f"exit {m.returncode}"]
        return {"seconds": None, "error": f"exit {m.returncode} after {m.seconds:.0f} s: {tail[0][:160]}"}

    steps = {"full build": step("-f")}
    # mkosi 14 reuses its cache only when both cache images exist (need_cache_images), but writes
    # the pre-dev one only for definitions with a build script, so without this never-read
    # placeholder every --incremental run would rebuild its cache from scratch.
    placeholder = d / "image.cache-pre-dev"
    if (d / "image.cache-pre-inst").exists() and not placeholder.exists():
        placeholder.mkdir()
    steps["no-change"] = step("-f")
    (d / "mkosi.extra/etc/bench-motd").write_text("version 2\n")
    steps["extra-tree edit"] = step("-f")
    (d / "mkosi.default").write_text(mkosi_conf(name, mirror, (ADDED_PACKAGE,)))
    steps["package add"] = step("-ff")  # -ff: mkosi 14 must be told to drop its cached tree
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    shutil.rmtree(d, ignore_errors=True)
    return {"version": version, "steps": steps}


def report(results: dict, mkosi: dict) -> tuple[str, list[str]]:
    rows, verdicts = [], []
    for name, r in results.items():
        for step in STEPS:
            row = r["steps"][step]
            target = TARGETS.get(step, {}).get(name)
            m = mkosi.get(name, {})
            ms = m.get("steps", {}).get(step, {})
            mk = f"{ms['seconds']:.1f}" if ms.get("seconds") is not None else "—"
            ratio = f"{ms['seconds'] / row['seconds']:.1f}×" if ms.get("seconds") and row["seconds"] else "—"
            rows.append([name, step, f"{row['seconds']:.1f}", f"≤ {target:.0f}" if target else "", mk, ratio,
                         ", ".join(row["cache_hits"]) or "–"])
            if target:
                verdicts.append(f"{name} {step} {row['seconds']:.1f} s (target ≤ {target:.0f} s: "
                                f"{'met' if row['seconds'] <= target else 'NOT met'})")
    text = table(["definition", "step", "reprobuild s", "target s", "mkosi --incremental s", "mkosi ÷ reprobuild",
                  "stages from the cache"], rows)
    return text, verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("minimal", "bootable", "build-scripts"), action="append")
    parser.add_argument("--seed-store", type=Path, default=Store.default_root())
    parser.add_argument("--no-mkosi", action="store_true", help="skip the mkosi rows")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help="update '## incremental' in docs/benchmarks.md")
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    chosen = args.only or ["minimal", "bootable", "build-scripts"]
    names = [n for n in chosen if n != "build-scripts"]
    root = Path(tempfile.mkdtemp(prefix="reprobuild-bench-incremental-"))
    wait_for_quiet()
    facts = machine_facts()
    try:
        store = root / "store"
        seed_store(store, args.seed_store)
        env = {**os.environ, "REPROBUILD_STORE": str(store)}
        env.pop("SOURCE_DATE_EPOCH", None)
        results = {name: bench_definition(root, name, env) for name in names}
        built = bench_build_scripts(root, env) if "build-scripts" in chosen else None
        mkosi: dict = {}
        if not args.no_mkosi:
            from reprobuild.debian.sources import host_mirror_for

            mirror = host_mirror_for("debian")
            mkosi = {name: bench_mkosi(root, name, mirror) for name in names}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"results": results, "mkosi": mkosi, "build_scripts": built}, indent=2, sort_keys=True))
        return 0
    text, verdicts = report(results, mkosi) if results else ("", [])
    print(text)
    if built is not None:
        built_text, built_verdict = report_build_scripts(built)
        print(built_text)
        verdicts.append(built_verdict)
    for name, m in mkosi.items():
        for step, s in m.get("steps", {}).items():
            if s.get("error"):
                print(f"mkosi {name} {step}: {s['error']}")
    print("; ".join(verdicts))
    if args.write_docs and built is not None:
        built_text, built_verdict = report_build_scripts(built)
        update_docs_section("build-scripts", "\n".join([
            "`bench/incremental.py --only build-scripts` (issue 19): `lock/minimal` with",
            "`BuildPackages=gcc make libc6-dev` and the fixture C project `fixtures/hello-c` as",
            "`BuildScripts=`/`BuildSources=`, disk output (a DDI), in a fresh store (package files hard-linked from",
            "the user's store, no cache entries): full build, rebuild with nothing changed, rebuild after",
            "editing one source file. \"On top of the compile\" is the whole command minus the `build`",
            "stage (sandbox set-up plus the scripts, i.e. the compile), interpreter start-up included.",
            "",
            facts_line(facts),
            "",
            built_text,
            "",
            f"**Target (issue 19)** — {built_verdict}.",
            "",
            "How: the source edit changes only the `build` stage's inputs (the sources' content digest),",
            "so the build environment and the installed packages come from the cache (the build",
            "environment kept extracted in the store, the installed tree as its tar); the scripts run",
            "in an overlay over the build environment and the tree stage configures a copy of the",
            "installed tree extracted into the build's workspace.",
            "",
            "```sh",
            "python bench/incremental.py --only build-scripts --no-mkosi --write-docs",
            "```",
        ]), args.docs)
        print("updated docs/benchmarks.md (## build-scripts)", file=sys.stderr)
    if args.write_docs and results:
        version = next((m["version"] for m in mkosi.values() if m.get("version")), "mkosi")
        body = "\n".join([
            "`bench/incremental.py` (issue 9): copies of `lock/minimal` and `lock/bootable` with an extra tree",
            "added, in one fresh store (package files hard-linked from the user's store, no cache entries):",
            "full build, rebuild with nothing changed, rebuild after editing one file in the extra tree,",
            f"rebuild after adding one package (`{ADDED_PACKAGE}`; its re-lock timed apart). Every step is the",
            "real `reprobuild build --locked` command (a DDI), interpreter start-up included.",
            f"{version} runs the same steps with `--incremental` on the same package list, as",
            "`Format=directory` with `mkosi.extra/` (its disk formats need a vfat mount this kernel lacks):",
            "it builds less than we do (no file system, verity, initrd, UKI, ESP or DDI). mkosi 14 does",
            "not notice a package change in its cache, so its package-add step runs with `-ff`; and it",
            "reuses its cache only when a \"pre-dev\" cache image exists too, which it writes only for",
            "definitions with a build script, so the bench adds that (never read) placeholder after the",
            "first build: without it every mkosi run rebuilds its cache from scratch.",
            "",
            facts_line(facts),
            "",
            text,
            "",
            "**Targets (issue 9)** — " + "; ".join(verdicts) + ".",
            "",
            "How: an unchanged rebuild finds the output stage in the cache and, when the output file is",
            "still the one it wrote (same inode, size, mtime and ctime), does not even copy it. An",
            "extra-tree edit finds the installed packages cached as a tar, extracts it into the build's",
            "workspace (in memory) and configures that copy, runs mkfs from the cached tools tree in",
            "place, and reuses the initrd. A package change re-runs dpkg, but every",
            "package's payload is cached decompressed (stage `unpacked`), and the tools tree and",
            "initrd stay cached.",
            "",
            "```sh",
            "python bench/incremental.py --write-docs",
            "```",
        ])
        update_docs_section("incremental", body, args.docs)
        print("updated docs/benchmarks.md (## incremental)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
