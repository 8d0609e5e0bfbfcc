"""Real unprivileged users for the rootless tests and benchmark, with a reprobuild they can run.

:func:`rootless_users` (needs root) creates each user with ``useradd`` (a home, no automatic
subordinate ids) and, when asked, a 65536-id range with ``usermod --add-subuids/--add-subgids``
that overlaps no other entry; it removes the users (``userdel -r``) afterwards.

Commands run through ``runuser`` with Debian's ``/usr/bin/python3``: the interpreter that runs the
tests may live under root's home, where another user cannot execute it. Its venv lives in a
world-readable temporary directory, and a ``.pth`` file names copies of this checkout's
``reprobuild`` package and of the running interpreter's site-packages (the same dependency
versions, no network; the compiled ones need the same Python minor version, which is checked).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from reprobuild import userns

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class Env:
    root: Path  # world-readable directory holding the venv and the copies
    python: Path

    def argv(self, user: str, *args: str, env: Mapping[str, str] | None = None) -> list[str]:
        """``reprobuild ARGS`` as ``user``, in a clean environment (plus ``env``)."""
        return self.command(user, str(self.python), "-m", "reprobuild", *args, env=env)

    def command(self, user: str, *argv: str, env: Mapping[str, str] | None = None) -> list[str]:
        """Any ``argv`` as ``user``, in a clean environment (plus ``env``)."""
        home = pwd.getpwnam(user).pw_dir
        base = {"HOME": home, "USER": user, "LOGNAME": user, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "LC_ALL": "C.UTF-8", **(env or {})}
        return ["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in base.items()), *argv]

    def run(self, user: str, *args: str, cwd: Path, env: Mapping[str, str] | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(user, *args, env=env), cwd=cwd, text=True, capture_output=True,
                              timeout=timeout, check=False)

    def ok(self, user: str, *args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        result = self.run(user, *args, cwd=cwd, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"reprobuild {' '.join(args)} as {user} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result


def _site_packages() -> list[Path]:
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return [Path(p) for p in sorted(paths) if Path(p).is_dir()]


def remove_user(name: str) -> None:
    """Remove ``name``, its processes and its home (userdel -r keeps the home of a user whose
    processes still run, and a later useradd -m would reuse it)."""
    try:
        home = Path(pwd.getpwnam(name).pw_dir)
    except KeyError:
        home = Path("/home") / name
    subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, check=False)
    subprocess.run(["userdel", "-r", name], capture_output=True, check=False)
    if home.name == name:
        shutil.rmtree(home, ignore_errors=True)


def make_user(name: str, *, subids: bool) -> None:
    remove_user(name)  # a leftover of a killed run
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", "-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0", name],
                   check=True)
    if subids:
        text = [Path(f).read_text() if Path(f).exists() else "" for f in ("/etc/subuid", "/etc/subgid")]
        start = userns.suggest_start(*text)
        subprocess.run(["usermod", "--add-subuids", f"{start}-{start + 65535}", "--add-subgids",
                        f"{start}-{start + 65535}", name], check=True)


@contextlib.contextmanager
def rootless_users(users: Mapping[str, bool]) -> Iterator[Env]:
    """Create ``users`` (name → with a subordinate range?) and a venv they can run; remove both
    afterwards. Needs root."""
    for tool in ("useradd", "usermod", "userdel", "runuser", "newuidmap", "newgidmap"):
        if shutil.which(tool) is None:
            raise AssertionError(f"{tool} is missing (make setup installs uidmap and the user tools)")
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"], text=True,
                             capture_output=True, check=True).stdout.strip()
    if version != str(sys.version_info[:2]):
        raise AssertionError(f"{SYSTEM_PYTHON} is Python {version}, this is {sys.version_info[:2]}: "
                             "the copied dependencies would not load")
    root = Path(tempfile.mkdtemp(prefix="reprobuild-rootless-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        shutil.copytree(REPO / "reprobuild", root / "src/reprobuild", ignore=shutil.ignore_patterns("__pycache__"))
        deps = []
        for i, site in enumerate(_site_packages()):
            deps.append(root / f"deps{i}")
            shutil.copytree(site, deps[-1], symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pth", "__editable__*", "reprobuild*"))
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
        purelib = subprocess.run([str(root / "venv/bin/python"), "-c",
                                  "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 text=True, capture_output=True, check=True).stdout.strip()
        Path(purelib, "reprobuild-tests.pth").write_text("".join(f"{p}\n" for p in [root / "src", *deps]))
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
        for name, subids in users.items():
            make_user(name, subids=subids)
        yield Env(root, root / "venv/bin/python")
    finally:
        for name in users:
            remove_user(name)
        # Files the users' builds left here belong to their subordinate ids: root removes them.
        shutil.rmtree(root, ignore_errors=True)
