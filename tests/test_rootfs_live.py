"""Live: a real trixie minbase from the host's Debian mirror, built twice, compared with mmdebstrap.

The packages come from :func:`acquire_minbase` only, so this can later switch to a lock.
Needs root, network to the mirror in /etc/apt/sources.list.d/debian.sources, and mmdebstrap.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from reprobuild.rootfs.plan import plan_from_debs
from reprobuild.rootfs.tree import TreeSettings, build_tree, write_tar

pytestmark = [pytest.mark.live, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

EPOCH = 1747699200
SUITE = "trixie"

# Entries only mmdebstrap's tarball has, each with its reason (see docs/reproducibility.md).
ONLY_MMDEBSTRAP = {
    # mmdebstrap mknods /dev entries in root mode; our /dev stays empty (devtmpfs at boot).
    "./dev/console", "./dev/fd", "./dev/full", "./dev/null", "./dev/ptmx", "./dev/pts", "./dev/random",
    "./dev/shm", "./dev/stderr", "./dev/stdin", "./dev/stdout", "./dev/tty", "./dev/urandom", "./dev/zero",
    "./etc/apt/sources.list",  # mmdebstrap writes its mirror; a lock-built image has no sources
    "./etc/hostname", "./etc/resolv.conf",  # copies of the build host's files
    "./run/lock",  # our /run is a tmpfs during the install; /run is a tmpfs at boot anyway
    "./var/cache/apt/archives/lock", "./var/lib/apt/lists/lock",  # created by running apt; we never run apt
    "./var/lib/apt/extended_states",  # apt's auto marks; we write it only when the plan marks packages
    # dpkg/debconf backups: intermediate states, removed (docs/formats.md §11)
    "./var/cache/debconf/config.dat-old", "./var/cache/debconf/templates.dat-old",
    "./var/lib/dpkg/diversions-old", "./var/lib/dpkg/status-old",
}
ONLY_OURS = {"./etc/machine-id"}  # MachineId= default: an empty file (mmdebstrap only empties an existing one)


def _mirror() -> str:
    text = Path("/etc/apt/sources.list.d/debian.sources").read_text()
    m = re.search(r"^URIs:\s*(\S+)", text, re.MULTILINE)
    assert m, "no URIs: in the host's debian.sources"
    return m.group(1)


def acquire_minbase(dest: Path) -> tuple[list[Path], Path]:
    """The one package-acquisition step: minbase .debs (and mmdebstrap's own tarball for comparison)."""
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap not installed (apt-get install mmdebstrap)")
    debs = dest / "debs"
    debs.mkdir()
    ref = dest / "mmdebstrap.tar"
    subprocess.run(
        ["mmdebstrap", "--variant=minbase", "--skip=essential/unlink",
         f"--customize-hook=sync-out /var/cache/apt/archives {debs}", SUITE, str(ref), _mirror()],
        check=True, capture_output=True, env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)},
    )
    return sorted(debs.glob("*.deb")), ref


@pytest.fixture(scope="module")
def minbase(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    return acquire_minbase(tmp_path_factory.mktemp("minbase"))


def _names(tar: Path) -> set[str]:
    with tarfile.open(tar) as tf:
        return {"./" + n.removeprefix("./").rstrip("/") if n not in (".", "./") else "." for n in tf.getnames()}


def test_minbase_twice_identical_and_close_to_mmdebstrap(tmp_path: Path, minbase: tuple[list[Path], Path]) -> None:
    debs, reference = minbase
    plan, paths = plan_from_debs(debs)
    digests = []
    for i, umask in enumerate((0o022, 0o077)):
        work = tmp_path / f"build{i}" / ("nested/" * i or ".")
        work.mkdir(parents=True)
        old = os.umask(umask)
        try:
            build_tree(plan, paths.__getitem__, work / "tree", TreeSettings(), EPOCH)
        finally:
            os.umask(old)
        write_tar(work / "tree", work / "tree.tar", EPOCH)
        digests.append(hashlib.sha256((work / "tree.tar").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    ours, theirs = _names(tmp_path / "build0/tree.tar"), _names(reference)
    assert theirs - ours == ONLY_MMDEBSTRAP
    assert ours - theirs == ONLY_OURS
