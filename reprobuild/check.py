"""The reproducibility check (reprotest's idea, built in): build twice, varied, compare, bisect.

``check_reproducible`` builds the locked image of a definition directory once under a control
environment and once with every variation below applied, each build a separate
``python -m reprobuild build --locked`` process. If the outputs differ it rebuilds with subsets of
the variations (halving, as reprotest's bisection does) until it has the smallest sets that still
make the output differ, then runs the diff between the control build and the culprit's build.

Each variation is really applied to the second build's process, and the report says how:

=============  ==========================================  ======================================
variation      control build                               varied build
=============  ==========================================  ======================================
build-path     the definition where it is, output in       a copy of the definition (external
               ``WORK/a/out``, cwd ``WORK/a``              files it names reached by symlinks) in
                                                           a deeper, longer path; other output
                                                           dir and cwd
time           the real clock                              ``faketime +397d`` (skipped, and said
                                                           so, without the ``faketime`` program)
timezone       ``TZ=UTC``                                  ``TZ=Pacific/Kiritimati`` (UTC+14)
locale         ``LC_ALL=C.UTF-8``                          ``LC_ALL=C``, ``LANG=C`` or another
                                                           locale ``locale -a`` lists
umask          022                                         077 (``sh -c 'umask 077; exec …'``)
hostname       the host's                                  ``unshare --uts`` + ``hostname``
cpus           every CPU                                   one CPU (``taskset -c 0``); skipped on
                                                           a one-CPU machine
store          the given (warm) store                      a fresh empty store: every package is
                                                           downloaded from the lock's URLs again
environment    ``SOURCE_DATE_EPOCH`` unset, ``HOME`` and   ``SOURCE_DATE_EPOCH=1``, other ``HOME``
               ``TMPDIR`` in WORK/a                        and ``TMPDIR``, ``LANGUAGE``, an
                                                           unrelated variable
build-         ``BuildDirectory=`` as configured (kept     a new empty build directory
directory      between builds, with what earlier builds    (``build --build-directory``); not
               left there)                                 applied without ``BuildDirectory=``
=============  ==========================================  ======================================

Cost: two builds when reproducible; about 2·log2(n)+2 more for one culprit among n variations.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprobuild.errors import BuildError, UsageError
from reprobuild.fileio import sha256_file
from reprobuild.manifest import OUTPUT_FILES

Say = Callable[[str], None]

VARIATIONS = ("build-path", "time", "timezone", "locale", "umask", "hostname", "cpus", "store", "environment",
              "build-directory", "workspace")
TIME_SHIFT = "+397d"  # more than a year and not a whole number of weeks: dates and weekdays move
VARIANT_TZ = "Pacific/Kiritimati"
VARIANT_HOSTNAME = "reprobuild-check-variant"


class CheckError(BuildError):
    """A build of the check failed outright (not: the builds differed)."""


@dataclass(frozen=True)
class VariationResult:
    name: str
    applied: bool
    detail: str  # how it was applied, or why it could not be


@dataclass(frozen=True)
class BuildRecord:
    label: str
    variations: tuple[str, ...]
    sha256: str
    seconds: float


@dataclass(frozen=True)
class CheckReport:
    reproducible: bool
    variations: tuple[VariationResult, ...]
    builds: tuple[BuildRecord, ...]
    culprits: tuple[tuple[str, ...], ...] = ()  # smallest variation sets that change the output
    diff_summary: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"schema": "reprobuild-check/1", "reproducible": self.reproducible,
                "variations": [vars(v) for v in self.variations],
                "builds": [{**vars(b), "variations": list(b.variations)} for b in self.builds],
                "culprits": [list(c) for c in self.culprits], "diff_summary": self.diff_summary}  # fmt: skip


# -- one build's environment ---------------------------------------------------------------------


@dataclass(frozen=True)
class BuildRun:
    """Everything one build process gets, as data (so each variation is visibly applied)."""

    definition: Path
    cwd: Path
    output: Path
    store: Path
    env: dict[str, str] = field(default_factory=dict)
    umask: int = 0o022
    hostname: str | None = None
    cpus: str | None = None  # taskset CPU list
    time_shift: str | None = None  # faketime offset
    build_directory: Path | None = None  # overrides BuildDirectory= (an empty one)
    workspace: str = "auto"  # build --workspace: where the trees are made (reprobuild.workspace)


def relocate_definition(directory: Path, base: Path) -> Path:
    """Copy the definition ``directory`` under ``base`` so that its relative paths still work.

    Files the definition names outside its own directory (keys in ``../../keys`` …) are reached
    through symlinks at the same relative place: the copy is nested as deep below ``base`` as
    the furthest such reference climbs. Returns the new definition directory.
    """
    from reprobuild.config import SECTIONS, SETTINGS, load_spec

    directory = directory.resolve()
    spec = load_spec(directory)
    external: list[tuple[str, Path]] = []
    for s in SETTINGS:
        if not getattr(s, "is_path", False):
            continue
        value = getattr(getattr(spec, SECTIONS[s.section]), s.dest)
        for p in value if isinstance(value, tuple) else (value,):
            if isinstance(p, Path) and p.is_absolute() and directory not in p.parents and p != directory:
                external.append((os.path.relpath(p, directory), p))
    depth = max((rel.split(os.sep).count("..") for rel, _ in external), default=0)
    new = base.joinpath(*[f"level{i}" for i in range(depth)], directory.name)
    shutil.copytree(directory, new, symlinks=True)
    base_str = os.path.normpath(base.resolve()) + os.sep
    for rel, target in external:
        link = os.path.normpath(new / rel)
        if link.startswith(base_str) and not os.path.lexists(link):
            Path(link).parent.mkdir(parents=True, exist_ok=True)
            Path(link).symlink_to(target)
    return new


def _variant_locale() -> tuple[str, str]:
    try:
        names = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=False).stdout.split()
    except OSError:
        names = []
    for preferred in ("fr_FR.utf8", "de_DE.utf8", "tr_TR.utf8", "en_US.utf8"):
        if preferred in names:
            return preferred, f"LANG=LC_ALL={preferred}"
    return "C", "LC_ALL=C (no other locale installed; the control build uses C.UTF-8)"


def _base_env(home: Path) -> dict[str, str]:
    # Built from scratch, not inherited: what the build sees is exactly what the report says.
    env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
           "HOME": str(home), "TMPDIR": str(home), "TZ": "UTC", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}  # fmt: skip
    if "PYTHONPATH" in os.environ:  # the builds run the same reprobuild as the caller
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def plan_variations(available_cpus: int | None = None,
                    build_directory: Path | None = None) -> tuple[VariationResult, ...]:
    """Which variations this host (and a definition with ``build_directory`` as its
    BuildDirectory=) can apply, and how (or why not)."""
    cpus = available_cpus if available_cpus is not None else len(os.sched_getaffinity(0))
    _, loc_detail = _variant_locale()
    out = [
        VariationResult("build-path", True, "definition copied to a deeper path; other output dir and cwd"),
        VariationResult("time", shutil.which("faketime") is not None,
                        f"clock shifted by faketime {TIME_SHIFT}" if shutil.which("faketime") else
                        "not applied: the faketime program is missing (apt-get install faketime)"),
        VariationResult("timezone", Path("/usr/share/zoneinfo", VARIANT_TZ).exists(),
                        f"TZ={VARIANT_TZ} (control: TZ=UTC)" if Path("/usr/share/zoneinfo", VARIANT_TZ).exists()
                        else f"not applied: no /usr/share/zoneinfo/{VARIANT_TZ} (apt-get install tzdata)"),
        VariationResult("locale", True, loc_detail),
        VariationResult("umask", True, "umask 077 (control: 022)"),
        VariationResult("hostname", shutil.which("unshare") is not None and os.geteuid() == 0,
                        f"unshare --uts, hostname {VARIANT_HOSTNAME}" if os.geteuid() == 0 else
                        "not applied: changing the hostname in a UTS namespace needs root"),
        VariationResult("cpus", cpus > 1 and shutil.which("taskset") is not None,
                        f"taskset -c 0: 1 CPU (control: {cpus})" if cpus > 1 else
                        "not applied: this machine has one CPU"),
        VariationResult("store", True, "a fresh empty store, filled from the lock's URLs (control: the warm store)"),
        VariationResult("environment", True, "SOURCE_DATE_EPOCH=1 (control: unset), other HOME and TMPDIR, "
                                             "LANGUAGE=fr, an unrelated variable"),
        VariationResult("build-directory", build_directory is not None,
                        f"a new empty build directory (control: BuildDirectory={build_directory}, kept)"
                        if build_directory is not None else
                        "not applied: the definition sets no BuildDirectory= (every build starts empty)"),
        VariationResult("workspace", True, "trees made beside the output, on its file system (--workspace output; "
                                           "control: auto, in memory when they fit)"),
    ]  # fmt: skip
    return tuple(out)


def make_run(definition: Path, work: Path, label: str, applied: frozenset[str], warm_store: Path) -> BuildRun:
    """The BuildRun of a build with ``applied`` variations, in a new directory ``work/label``."""
    if "build-path" in applied:
        root = work / f"{label}-relocated-build-path-with-a-longer-name"
        root.mkdir(parents=True)
        definition = relocate_definition(definition, root / "def")
        cwd = root / "cwd" / "elsewhere"
        output = root / "out" / "deeper" / "output"
    else:
        root = work / label
        root.mkdir(parents=True)
        cwd, output = root, root / "out"
    cwd.mkdir(parents=True, exist_ok=True)
    home = root / "home"
    home.mkdir()
    env = _base_env(home)
    if "timezone" in applied:
        env["TZ"] = VARIANT_TZ
    if "locale" in applied:
        loc, _ = _variant_locale()
        env["LC_ALL"] = env["LANG"] = loc
    if "environment" in applied:
        other = root / "other-home"
        other.mkdir()
        env.update({"SOURCE_DATE_EPOCH": "1", "HOME": str(other), "TMPDIR": str(other), "LANGUAGE": "fr",
                    "REPROBUILD_CHECK_UNRELATED": "variant"})  # fmt: skip
    store = warm_store
    if "store" in applied:
        store = root / "cold-store"
    return BuildRun(definition=definition, cwd=cwd, output=output, store=store, env=env,
                    umask=0o077 if "umask" in applied else 0o022,
                    hostname=VARIANT_HOSTNAME if "hostname" in applied else None,
                    cpus="0" if "cpus" in applied else None,
                    time_shift=TIME_SHIFT if "time" in applied and shutil.which("faketime") else None,
                    build_directory=root / "empty-build-directory" if "build-directory" in applied else None,
                    workspace="output" if "workspace" in applied else "auto")  # fmt: skip


def build_argv(run: BuildRun, fmt: str | None) -> list[str]:
    """The command line of one build, every variation a visible wrapper."""
    argv = [sys.executable, "-m", "reprobuild", "build", "-C", str(run.definition), "--locked",
            "-o", str(run.output), "--store", str(run.store), "-q",
            # No stage cache: a cached stage from one variation would hide a leak in another.
            "--no-cache", "--workspace", run.workspace]  # fmt: skip
    if fmt:
        argv += ["-f", fmt]
    if run.build_directory is not None:
        argv += ["--build-directory", str(run.build_directory)]
    if run.time_shift:
        argv = ["faketime", "-f", run.time_shift, *argv]
    argv = ["sh", "-c", f"umask {run.umask:03o}; exec \"$@\"", "sh", *argv]
    if run.cpus is not None:
        argv = ["taskset", "-c", run.cpus, *argv]
    if run.hostname is not None:
        argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', run.hostname, *argv]
    return argv


def run_build(run: BuildRun, fmt: str, timeout: float | None = None) -> Path:
    """Run one build process; return its main output. Raises CheckError when it fails."""
    r = subprocess.run(build_argv(run, fmt), cwd=run.cwd, env=run.env, capture_output=True, text=True,
                       timeout=timeout, check=False)  # fmt: skip
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-10:])
        raise CheckError(f"a check build failed (exit status {r.returncode}):\n{tail}")
    return run.output / OUTPUT_FILES[fmt]


def output_digest(path: Path) -> str:
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            st = p.lstat()
            h.update(f"{p.relative_to(path)}\0{st.st_mode:o}\0{st.st_uid}\0{st.st_gid}\0{int(st.st_mtime)}\0".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(hashlib.sha256(p.read_bytes()).digest())
        return "tree:" + h.hexdigest()
    return sha256_file(path)


# -- the check -----------------------------------------------------------------------------------


def check_reproducible(definition: Path, work: Path, fmt: str | None = None, store: Path | None = None,
                       variations: Sequence[str] = VARIATIONS, bisect: bool = True,
                       say: Say = lambda _m: None, timeout: float | None = None) -> CheckReport:  # fmt: skip
    """Build ``definition``'s locked image under the control and the varied environment; compare;
    bisect the variations when the outputs differ. ``work`` must be an empty or missing directory
    (builds and their outputs stay there for inspection). Raises CheckError when a build fails."""
    from reprobuild.config import load_spec
    from reprobuild.store import Store

    unknown = sorted(set(variations) - set(VARIATIONS))
    if unknown:
        raise UsageError(f"unknown variation(s) {', '.join(unknown)} (known: {', '.join(VARIATIONS)})")
    definition = definition.resolve()
    spec = load_spec(definition)
    fmt = fmt or spec.build.format
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise UsageError(f"{work} is not empty")
    warm = (store or Store.default_root()).resolve()
    plan = tuple(v for v in plan_variations(build_directory=spec.build.build_directory) if v.name in variations)
    usable = tuple(v.name for v in plan if v.applied)
    builds: list[BuildRecord] = []
    outputs: dict[frozenset[str], tuple[Path, str]] = {}
    counter = iter(range(1, 1000))

    def build(applied: frozenset[str]) -> tuple[Path, str]:
        if applied in outputs:
            return outputs[applied]
        label = "control" if not applied else f"build{next(counter)}"
        say(f"build {label}: {', '.join(sorted(applied)) or 'no variations'}")
        started = time.monotonic()
        out = run_build(make_run(definition, work, label, applied, warm), fmt, timeout)
        digest = output_digest(out)
        builds.append(BuildRecord(label, tuple(sorted(applied)), digest, round(time.monotonic() - started, 1)))
        outputs[applied] = (out, digest)
        return out, digest

    control_out, control_digest = build(frozenset())
    _, varied_digest = build(frozenset(usable))
    if varied_digest == control_digest:
        return CheckReport(True, plan, tuple(builds))
    culprits: list[tuple[str, ...]] = []
    if bisect:
        culprits = [tuple(sorted(c)) for c in _bisect(list(usable), lambda s: build(frozenset(s))[1] != control_digest)]
    culprit = frozenset(culprits[0]) if culprits else frozenset(usable)
    summary = _diff_summary(control_out, build(culprit)[0])
    return CheckReport(False, plan, tuple(builds), tuple(culprits), summary)


def _bisect(items: list[str], differs: Callable[[list[str]], bool]) -> list[list[str]]:
    """Smallest subsets of ``items`` (known to differ as a whole) that make the output differ.

    Halves the set and recurses into each half that differs alone; when neither half does, the
    cause is an interaction and the whole set is returned."""
    if len(items) <= 1:
        return [items]
    mid = len(items) // 2
    found = []
    for half in (items[:mid], items[mid:]):
        if differs(half):
            found += _bisect(half, differs)
    return found or [items]


def _diff_summary(a: Path, b: Path) -> str:
    from reprobuild.diff.compare import compare_paths
    from reprobuild.diff.render import render_text

    text = render_text(compare_paths(a, b))
    return text.split("\nDetails\n", 1)[0].rstrip() + "\n"
