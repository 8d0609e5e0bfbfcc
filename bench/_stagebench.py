"""Shared pieces of bench/build.py, bench/image.py and bench/boot.py (not a benchmark itself).

* `measure`: run one command as a child, with wall time from a monotonic clock, peak memory from
  ``wait4``'s ``ru_maxrss`` (the largest resident set of the child and of every descendant it
  waited for — the figure ``/usr/bin/time -v`` prints), and each output line time-stamped, so a
  progress line can mark where a stage starts.
* `make_definition`: a copy of one of the project's reference definitions (``lock/<name>``) in a
  temporary directory, signing with the project's keys (``keys/``), locked fresh against the
  host's mirror (the committed lock may name versions the mirror has dropped).
* `update_docs_section`: replace one ``## …`` section of docs/benchmarks.md, leaving the others
  (written by other benchmarks) untouched.

Nothing here names a mirror host: the mirror is read from the host's apt sources at run time.
"""

from __future__ import annotations

import datetime
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
KEYS = REPO / "keys"
_KEY_SETTINGS = ("LockKey", "VerityKey", "VerityCertificate", "SecureBootKey", "SecureBootCertificate")
_KEY_FILES = {"LockKey": "lock.key", "VerityKey": "verity.key", "VerityCertificate": "verity.crt",
              "SecureBootKey": "secure-boot.key", "SecureBootCertificate": "secure-boot.crt"}


@dataclass(frozen=True)
class Measured:
    """One child process: wall seconds, peak RSS (KiB), exit status (None: killed at the timeout),
    its merged stdout+stderr as (seconds since start, line) pairs, and the CPU seconds (user +
    system) it and every descendant it waited for used (``wait4``'s ``ru_utime + ru_stime``)."""

    argv: tuple[str, ...]
    seconds: float
    maxrss_kib: int
    returncode: int | None
    lines: tuple[tuple[float, str], ...] = field(default_factory=tuple)
    stderr: str = ""  # only with stdout_only (otherwise stderr is in ``lines``)
    cpu_seconds: float = 0.0

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def first(self, pattern: str) -> float | None:
        """Time of the first output line matching the regular expression ``pattern``."""
        rx = re.compile(pattern)
        return next((t for t, line in self.lines if rx.search(line)), None)


def measure(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 1200.0, stdout_only: bool = False) -> Measured:
    """Run ``argv`` (new session, stdin closed); stdout and stderr merged, each line time-stamped
    as it arrives. ``stdout_only`` drops stderr (for ``--json`` output that must parse).
    Killed with its whole session at ``timeout`` (then ``returncode`` is None)."""
    err_file = tempfile.TemporaryFile() if stdout_only else None  # noqa: SIM115 (closed below)
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=err_file if stdout_only else subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    lines: list[tuple[float, str]] = []
    pending = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = start + timeout
    killed = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            if not sel.select(timeout=min(left, 1.0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            now = time.monotonic() - start
            if not chunk:
                break
            pending += chunk
            *done, pending = pending.split(b"\n")
            lines.extend((now, d.decode("utf-8", "replace").rstrip("\r")) for d in done)
    finally:
        sel.close()
    if pending:
        lines.append((time.monotonic() - start, pending.decode("utf-8", "replace")))
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    stderr = ""
    if err_file is not None:
        err_file.seek(0)
        stderr = err_file.read().decode("utf-8", "replace")
        err_file.close()
    return Measured(tuple(argv), seconds, usage.ru_maxrss, None if killed else proc.returncode, tuple(lines),
                    stderr, usage.ru_utime + usage.ru_stime)


def reprobuild(*args: str) -> list[str]:
    """argv for the command line of *this* checkout (the one holding this bench/), run by the
    interpreter running the bench — even when another copy is installed in its environment."""
    return ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "reprobuild", *args]


def pretty(argv: tuple[str, ...] | list[str], replacements: dict[str, str]) -> str:
    """A command as the doc shows it: ``python -m reprobuild …``, temporary paths and the mirror
    replaced by names (``$WORK``, ``MIRROR``) so that no host name reaches the repository."""
    text = shlex.join(argv).replace(f"env PYTHONPATH={REPO} {sys.executable}", "python").replace(f"{REPO}/", "")
    for old, new in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(old, new)
    return text


def check(m: Measured, what: str) -> Measured:
    if not m.ok:
        tail = "\n".join([*(line for _, line in m.lines[-40:]), *m.stderr.splitlines()[-40:]])
        raise SystemExit(f"{what} failed (exit {m.returncode}): {shlex.join(m.argv)}\n{tail}")
    return m


def project_keys(fallback: Path) -> Path:
    """The project's keys/ (untracked, so absent from a `git archive` snapshot), or keys made
    with ``reprobuild keygen`` under ``fallback`` (the same names)."""
    if all((KEYS / name).exists() for name in _KEY_FILES.values()):
        return KEYS
    if not all((fallback / name).exists() for name in _KEY_FILES.values()):
        fallback.mkdir(parents=True, exist_ok=True)
        for prefix, flags in (("lock", ()), ("verity", ("--verity",)), ("secure-boot", ("--secure-boot",))):
            check(measure(reprobuild("keygen", *flags, "--out", str(fallback / prefix))), "reprobuild keygen")
    return fallback


def make_definition(root: Path, reference: str, index_store: Path | None, extra_conf: str = "",
                    extra_files: dict[str, str] | None = None, name: str | None = None) -> Path:
    """``lock/<reference>`` copied to ``root/<name or reference>`` with absolute key paths, locked fresh.

    ``index_store`` only caches the archive indices the lock step reads (it is not a package store
    any timed build uses); None: not locked here (a benchmark that times the lock runs it itself).
    ``extra_files``: relative path → text, or ``symlink:TARGET``.
    """
    directory = root / (name or reference)
    directory.mkdir(parents=True)
    keys = project_keys(root / "keys")
    conf = []
    for line in (REPO / "lock" / reference / "reprobuild.conf").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in _KEY_SETTINGS:
            line = f"{key}={keys / _KEY_FILES[key]}"
        conf.append(line)
    (directory / "reprobuild.conf").write_text("\n".join(conf) + "\n" + extra_conf)
    from tests.live_images import write_files  # the live tests' definitions are made the same way

    write_files(directory, extra_files or {})
    if index_store is None:
        return directory
    check(measure(reprobuild("lock", "-C", str(directory), "--store", str(index_store), "-q")), "reprobuild lock")
    return directory


def machine_facts() -> dict[str, str]:
    """What the doc states about the run: date, nproc, load average now, CPU model, kernel."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    marker = REPO / ".bench-commit"  # written into a `git archive` snapshot, which has no .git
    commit = marker.read_text().strip() if marker.exists() else subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
    ).stdout.strip() or "?"
    return {"commit": commit, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": str(os.cpu_count() or "?"), "load": load, "cpu": cpu, "kernel": os.uname().release}


def source_digest() -> str:
    """sha256 over the paths and bytes of ``reprobuild/**/*.py`` of the checkout being measured.
    The stage cache's keys include the code's digest, so an edit during a run turns its cached
    rows into rebuilds: a script compares this before and after (:func:`check_source_unchanged`)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((REPO / "reprobuild").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def check_source_unchanged(before: str) -> None:
    """Exit (status 1, nothing written) when the measured code changed during the run."""
    if source_digest() != before:
        print(f"error: {REPO}/reprobuild changed during the run: cached rows were rebuilds, nothing "
              "written (run from a worktree that stays put: git worktree add /tmp/wt HEAD)", file=sys.stderr)
        sys.exit(1)


def facts_line(facts: dict[str, str]) -> str:
    return (f"Run {facts['date']} at commit {facts['commit']} on {facts['nproc']} CPUs ({facts['cpu']}), kernel {facts['kernel']}, "
            f"load average at start {facts['load']} (shared machine: other builds may have run meanwhile).")


def wait_for_quiet(limit: float = 2.0, patience: float = 300.0) -> None:
    """Wait (up to ``patience`` s) until the 1-minute load average is below ``limit``: the machine
    is shared, and a busy neighbour distorts wall times. Never fails; the doc records the load."""
    deadline = time.monotonic() + patience
    while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
        print(f"waiting for the load average ({os.getloadavg()[0]:.2f}) to drop below {limit} …",
              file=sys.stderr)
        time.sleep(15)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (also readable as plain text on a terminal)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


STAGE_ORDER = ("fetch", "tools", "buildenv", "build", "install", "tree", "tar", "cpio", "fs", "initrd", "esp", "ddi")


def stage_note(j: dict) -> str:
    """'fetch 1.7 + tree 19.2 + tar 0.5 s' from ``build --json``'s timings, in pipeline order
    (stages this list does not know go last), and the stage-cache hits if any."""
    timings = j.get("timings", {})
    order = sorted(timings, key=lambda k: (STAGE_ORDER.index(k) if k in STAGE_ORDER else len(STAGE_ORDER), k))
    text = " + ".join(f"{k} {timings[k]:.1f}" for k in order) + " s"
    return text + (f"; cache hits: {', '.join(j['cache_hits'])}" if j.get("cache_hits") else "")


def mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def secs(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def update_docs_section(heading: str, body: str, path: Path = DOCS) -> None:
    """Replace the section ``## heading`` of docs/benchmarks.md with ``body`` (or append it).

    Only this section's lines change: the file is re-read just before writing, so sections other
    benchmarks write at the same time are kept.
    """
    title = f"## {heading}"
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nEach section is written by its script in `bench/` (`--write-docs`) from one real run "
        "on the machine named in it; numbers from a shared 2-core machine are indicative, not precise.\n")
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    new = [title, "", *body.strip("\n").splitlines(), ""]
    if start is None:
        lines = [*lines, "", *new] if lines and lines[-1].strip() else [*lines, *new]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines).rstrip("\n") + "\n")
    os.replace(tmp, path)


# -- an in-process build that time-stamps its progress lines ---------------------------------------
#
# `reprobuild build --json` silences the progress lines, and without --json there are no stage
# timings. The benchmarks that need both run this driver instead: the same library call the
# command line makes (reprobuild.build.build_locked, as `build --locked`), with a `say` that
# prefixes every line with the seconds since the process started, and the --json document
# (timings, cache hits, manifest) on stdout.

def driver_argv(directory: Path, store: Path, out: Path, fmt: str, no_cache: bool = True) -> list[str]:
    return ["env", f"PYTHONPATH={REPO}", sys.executable, str(Path(__file__).resolve()), "build", str(directory),
            str(store), str(out), fmt, "no-cache" if no_cache else "cache"]


def stamped(stderr: str) -> list[tuple[float, str]]:
    """The driver's progress lines as (seconds since its start, message)."""
    out = []
    for line in stderr.splitlines():
        head, _, msg = line.partition(" ")
        try:
            out.append((float(head), msg))
        except ValueError:
            continue
    return out


def _driver(directory: str, store: str, out: str, fmt: str, cache: str) -> int:
    import dataclasses
    import json

    started = time.monotonic()
    from reprobuild.build import BuildOptions, build_locked
    from reprobuild.config import load_spec
    from reprobuild.lockfile import load_lock
    from reprobuild.store import Store

    spec = load_spec(Path(directory))
    lock = load_lock(spec.lock_path)
    fields = {f.name for f in dataclasses.fields(BuildOptions)}
    extra = {"cache": cache == "cache"} if "cache" in fields else {}  # older checkouts have no stage cache
    options = BuildOptions(output_dir=Path(out), format=fmt, **extra)

    def say(message: str) -> None:
        print(f"{time.monotonic() - started:.3f} {message}", file=sys.stderr, flush=True)

    result = build_locked(spec, lock, Store(store), options, say=say)
    print(json.dumps({"timings": result.timings, "cache_hits": getattr(result, "cache_hits", []),
                      "manifest": result.manifest, "seconds": round(time.monotonic() - started, 3)}))
    return 0


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "build":
    sys.exit(_driver(*sys.argv[2:]))


def tar_dpkg_status(path: Path) -> str | None:
    """The text of the tar's var/lib/dpkg/status (None if it has none)."""
    with tarfile.open(path) as tf:
        for member in tf:
            if member.name.lstrip("./") == "var/lib/dpkg/status" and member.isfile():
                return tf.extractfile(member).read().decode("utf-8", "replace")  # type: ignore[union-attr]
    return None


def installed_packages(status: str) -> tuple[int, int]:
    """(packages, sum of their Installed-Size in KiB) of the installed stanzas of a dpkg status."""
    count = kib = 0
    for stanza in status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Status") == "install ok installed":
            count += 1
            kib += int(fields.get("Installed-Size", "0") or 0)
    return count, kib


def tar_packages(path: Path) -> int | None:
    """Installed packages per the tar's var/lib/dpkg/status (None if it has none)."""
    status = tar_dpkg_status(path)
    return None if status is None else installed_packages(status)[0]
