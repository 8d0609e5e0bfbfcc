#!/usr/bin/env python3
"""Benchmark: the bootable DDI — cold and warm build time, size, and qemu start → multi-user — with mkosi.

One run, same machine, same mirror (the host's apt sources; no host name is written here):

  1. ``lock/bootable`` plus an ExtraTrees= marker unit that writes a line to /dev/kmsg once
     multi-user.target is reached (as tests/live_images.py does);
  2. reprobuild cold (empty store), warm (every .deb in the store, tree rebuilt: ``--no-cache``
     where the stage cache exists) and, where it exists, the unchanged rebuild from the stage cache;
  3. the DDI booted under qemu (``reprobuild.vm.run_until``; TCG unless --kvm, KVM fails on the
     machine these numbers come from) until the marker appears on the serial console;
  4. mkosi (the host's, if installed: Debian 12 ships mkosi 14) on the same package list: first its
     bootable disk image (the like-for-like comparison), then — where that cannot run — the same
     packages as a directory tree, cold (empty package cache) and warm (``Cache=`` filled).
     Skipped by --quick.

    python bench/boot.py [--quick] [--kvm] [--write-docs] [--keep DIR]

Target (issue 6): a warm bootable DDI in ≤ 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stagebench import (
    DOCS,
    Measured,
    check,
    facts_line,
    machine_facts,
    make_definition,
    measure,
    mib,
    pretty,
    reprobuild,
    secs,
    stage_note,
    table,
    update_docs_section,
    wait_for_quiet,
)

MARKER = b"REPROBUILD-MARKER-END"
# The same marker unit as the live boot tests.
from tests.live_images import MARKER_UNIT

# The packages lock/bootable adds to minbase; mkosi gets the same list.
PACKAGES = ("systemd", "systemd-sysv", "udev", "dbus", "linux-image-amd64", "systemd-boot-efi")


def build(directory: Path, store: Path, out: Path, *extra: str) -> tuple[Measured, dict]:
    m = check(measure(reprobuild("build", "-C", str(directory), "--locked", "-f", "disk", "-o", str(out),
                                 "--store", str(store), "--json", *extra), stdout_only=True), "reprobuild build")
    return m, json.loads(m.output)


def boot(image: Path, kvm: bool, log: Path) -> tuple[float | None, str]:
    from reprobuild.vm import QemuConfig, run_until

    cfg = QemuConfig(image=image, kvm="auto" if kvm else "no", serial_log=log)
    t0 = time.monotonic()
    found, console = run_until(cfg, MARKER, timeout=900)
    seconds = time.monotonic() - t0
    if not found:
        return None, f"marker not seen in {seconds:.0f} s; console tail: {console[-300:].decode(errors='replace')!r}"
    line = next((x for x in console.decode(errors="replace").splitlines() if "REPROBUILD-MARKER root=" in x), "")
    root = re.search(r"root=(\S+)", line)
    return seconds, f"{'KVM' if kvm else 'TCG'}; root={root.group(1) if root else '?'}"


def mkosi_config(directory: Path, mirror: str, fmt: str, cache: Path | None,
                 packages: tuple[str, ...] = PACKAGES) -> Path:
    """An ``mkosi.default`` for mkosi 14 (also used by bench/scaling.py with its package sets)."""
    directory.mkdir(parents=True)
    lines = ["[Distribution]", "Distribution=debian", "Release=trixie", f"Mirror={mirror}", "",
             "[Output]", f"Format={fmt}", f"Bootable={'yes' if fmt.startswith('gpt_') else 'no'}",
             "KernelCommandLine=console=ttyS0", "", "[Content]", f"Packages={','.join(packages)}", "Autologin=yes",
             # WithDocs=yes: mkosi 14 removes the documentation with `rm` run in systemd-nspawn, which
             # fails here (no system bus to register the container); docs stay, as in our image.
             "WithDocs=yes"]
    if cache is not None:
        lines.append(f"Cache={cache}")
    (directory / "mkosi.default").write_text("\n".join(lines) + "\n")
    return directory


def reason(m: Measured) -> str:
    """The line of mkosi's output that explains a failure (never a mirror URL: those are cut)."""
    lines = [x for x in m.output.splitlines() if x.strip() and not x.startswith(" ")]
    pick = next((x for x in lines if x.startswith("mount:")), None) or next(
        (x for x in reversed(lines) if "rror" in x or "ailed" in x), lines[-1] if lines else f"exit {m.returncode}")
    pick = re.sub(r"mkosi-\w{8}", "mkosi-XXXXXXXX", pick)  # mkosi's random workspace name
    return re.sub(r"\w+://\S+", "URL", pick.strip())[:200]


def mkosi_notes() -> list[str]:
    """What the mkosi rows mean, with the one host fact they depend on read at run time."""
    try:
        vfat = "vfat" in Path("/proc/filesystems").read_text().split()
    except OSError:
        vfat = False
    return [
        "mkosi is Debian 12's (mkosi 14: `pip download mkosi` finds no mkosi in the package index reachable here).",
        "Its disk formats create the ESP in a loop partition and mount it to install the boot loader;",
        f"this machine's kernel {'has' if vfat else 'has no'} vfat in /proc/filesystems, and the container cannot",
        "load modules, so a failure at that mount is reported as \"could not run here\" rather than given a",
        "number. The directory rows build the same package list with debootstrap + apt and stop where our",
        "build goes on to the tools tree, file system, initrd, UKI, ESP and DDI: compare them with our",
        "*tree* stage. `Cache=` keeps the downloaded .debs (the mirror is close, so it saves little);",
        "mkosi's `--incremental` is compared in the incremental section. `WithDocs=yes` because mkosi 14 removes documentation by running",
        "`rm` in systemd-nspawn, which fails here (no system bus to register the container).",
        "",
    ]


def du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=False).stdout
    return int(out.split()[0]) if out else 0


def run_mkosi(work: Path, mirror: str, commands: list[str]) -> list[list[str]]:
    mkosi = shutil.which("mkosi")
    if not mkosi:
        return [["mkosi", "—", "—", "—", "could not run: mkosi is not installed (apt-get install mkosi)"]]
    version = subprocess.run([mkosi, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    rows = []
    # The like-for-like run: a bootable disk image.
    d = mkosi_config(work / "mkosi-disk", mirror, "gpt_squashfs", None)
    m = measure([mkosi, "-f", "build"], cwd=d, timeout=1200)
    commands.append(f"cd $WORK/mkosi-disk && {pretty(m.argv, {})}  # mkosi.default: Format=gpt_squashfs Bootable=yes")
    if m.ok:
        image = next(d.glob("image*.raw*"), None)
        rows.append([f"{version}, gpt_squashfs Bootable=yes, cold", secs(m.seconds), f"{m.maxrss_kib / 1024:.0f}",
                     mib(image.stat().st_size if image else None), "bootable disk image"])
    else:
        rows.append([f"{version}, gpt_squashfs Bootable=yes", "—", "—", "—",
                     f"could not run here: `{reason(m)}` (exit {m.returncode} after {m.seconds:.1f} s)"])
    shutil.rmtree(d, ignore_errors=True)
    if m.ok:
        return rows
    # Fallback: the same packages as a directory tree (no ESP, UKI, verity or disk image).
    cache = work / "mkosi-cache"
    cache.mkdir()
    for label in ("cold (empty Cache=)", "warm (Cache= filled)"):
        d = mkosi_config(work / f"mkosi-dir-{label.split()[0]}", mirror, "directory", cache)
        m = measure([mkosi, "-f", "build"], cwd=d, timeout=1200)
        commands.append(f"cd $WORK/mkosi-dir-{label.split()[0]} && {pretty(m.argv, {})}  "
                        "# mkosi.default: Format=directory Cache=$WORK/mkosi-cache")
        if m.ok:
            rows.append([f"{version}, directory, {label}", secs(m.seconds), f"{m.maxrss_kib / 1024:.0f}",
                         mib(du(d / "image")), "tree only: no ESP/UKI/verity/DDI"])
        else:
            rows.append([f"{version}, directory, {label}", "—", "—", "—",
                         f"could not run here: `{reason(m)}` (exit {m.returncode} after {m.seconds:.1f} s)"])
        shutil.rmtree(d, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="skip mkosi")
    ap.add_argument("--kvm", action="store_true", help="let qemu use KVM if it works (default: TCG)")
    ap.add_argument("--write-docs", action="store_true", help="update '## boot' in docs/benchmarks.md")
    ap.add_argument("--docs", type=Path, default=DOCS, help="the benchmarks document to update")
    ap.add_argument("--keep", type=Path, help="work here and keep the outputs (default: a temporary directory)")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for the load average to drop")
    args = ap.parse_args()

    from reprobuild.debian.sources import host_mirror_for

    mirror = host_mirror_for("debian")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-boot-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        directory = make_definition(
            work / "defs", "bootable", work / "index-store", extra_conf="[Content]\nExtraTrees=extra\n",
            extra_files={"extra/etc/systemd/system/reprobuild-marker.service": MARKER_UNIT,
                         "extra/etc/systemd/system/multi-user.target.wants/reprobuild-marker.service":
                             "symlink:../reprobuild-marker.service"})  # fmt: skip
        if not args.no_wait:
            wait_for_quiet()
        facts = machine_facts()
        store = work / "store"
        rows: list[list[str]] = []
        commands: list[str] = []
        subs = {str(work): "$WORK"}

        def record(label: str, m: Measured, j: dict) -> None:
            rows.append([label, secs(m.seconds), f"{m.maxrss_kib / 1024:.0f}", mib(j["manifest"]["size"]), stage_note(j)])
            commands.append(pretty(m.argv, subs))
            print(f"{label}: {m.seconds:.1f} s", file=sys.stderr)

        m, j_cold = build(directory, store, work / "out-cold")
        record("reprobuild, cold store", m, j_cold)
        cache = "--no-cache" in measure(reprobuild("build", "--help")).output
        m_warm, j_warm = build(directory, store, work / "out-warm", *(["--no-cache"] if cache else []))
        record("reprobuild, warm store" + (" --no-cache" if cache else ""), m_warm, j_warm)
        if cache:
            m, j = build(directory, store, work / "out-hit")
            record("reprobuild, warm store + stage cache (unchanged)", m, j)
        image = work / "out-warm/image.raw"
        same = j_cold["manifest"]["sha256"] == j_warm["manifest"]["sha256"]
        seconds, boot_note = boot(image, args.kvm, work / "console.log")
        rows.append([f"qemu start → multi-user marker ({'KVM if it works' if args.kvm else 'TCG'}, 2 vCPU, 2 GiB)",
                     secs(seconds), "—", "—", boot_note])
        if not args.quick:
            rows.extend(run_mkosi(work, mirror, commands))

        text = table(["run", "wall s", "peak RSS MiB", "output MiB", "notes"], rows)
        verdict = (f"warm bootable DDI in {m_warm.seconds:.1f} s (target ≤ 30 s: "
                   f"{'met' if m_warm.seconds <= 30 else 'NOT met'}); cold and warm DDIs "
                   f"{'byte-identical' if same else 'DIFFER'}")
        print(text)
        print(verdict)
        if args.write_docs:
            body = "\n".join([
                "`bench/boot.py`: `lock/bootable` (minbase + systemd, udev, dbus, linux-image-amd64,",
                "systemd-boot-efi; signed UKI with its initrd on the ESP, erofs root with dm-verity) plus an",
                "ExtraTrees= unit that writes a marker to /dev/kmsg after multi-user.target. Cold = empty store;",
                "warm = every .deb in the store, the tree rebuilt. The boot time runs from starting qemu (OVMF,",
                "no Secure Boot enrollment) to the marker on the serial console. mkosi gets the same package list.",
                "Seed figures for mkosi on Debian from the issue: first build ~30 s (container) / ~90 s (VM image),",
                "incremental ~5 s / ~30 s — on other hardware; they are not measured here.",
                "",
                facts_line(facts),
                "",
                text,
                "",
                f"**Target (issue 6)** — {verdict}.",
                "",
                *([] if args.quick else mkosi_notes()),
                "Commands (`$WORK` is a temporary directory; mkosi's `Mirror=` is the host's Debian mirror):",
                "",
                "```sh",
                "python bench/boot.py" + (" --quick" if args.quick else "") + (" --kvm" if args.kvm else "")
                + " --write-docs",
                *commands,
                "```",
            ])
            update_docs_section("boot", body, args.docs)
            print("updated docs/benchmarks.md (## boot)", file=sys.stderr)
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
